"""Allowed import directions between piker's packages (static, from the AST).

accounting is the bottom of the domain; the bot never reaches into a broker
backend; the service layer knows daemons only by their ``module:function``
path, never by import.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / 'piker'

BASE = {'types', 'config', 'log'}
ALLOWED: dict[str, set[str]] = {
    'types': set(),
    'config': set(),
    'log': set(),
    'accounting': BASE,
    'service': BASE,
    'data': BASE | {'service', 'brokers'},
    'clearing': BASE | {'accounting', 'data', 'service'},
    'brokers': BASE | {'data', 'clearing', 'accounting', 'service'},
    'bot': BASE | {'data', 'clearing', 'accounting', 'service'},
    'cli': BASE | {'service', 'data', 'clearing', 'accounting', 'bot', 'brokers'},
    '__main__': {'cli'},
    '__init__': {'log'},
}


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix('.py')


def _imported_units(path: Path) -> set[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(PKG)
    pkg_parts = list(rel.parts[:-1])
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split('.')
                if parts[0] == 'piker' and len(parts) > 1:
                    found.add((parts[1], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mod = base + (node.module.split('.') if node.module else [])
                if mod:
                    found.add((mod[0], node.lineno))
                else:
                    for alias in node.names:
                        found.add((alias.name, node.lineno))
            elif node.module and node.module.split('.')[0] == 'piker':
                parts = node.module.split('.')
                if len(parts) > 1:
                    found.add((parts[1], node.lineno))
                else:
                    for alias in node.names:
                        found.add((alias.name, node.lineno))
    return found


def test_import_directions():
    bad = []
    for path in sorted(PKG.rglob('*.py')):
        unit = _unit(path)
        allowed = ALLOWED.get(unit)
        assert allowed is not None, f'new top-level unit {unit!r}: add it to ALLOWED'
        # a sub-package's `_cli.py` plugs its commands into piker/cli.py
        extra = {'cli'} if path.name == '_cli.py' else set()
        for target, line in _imported_units(path):
            if target != unit and target not in allowed | extra:
                bad.append(f'{path.relative_to(PKG.parent)}:{line}: {unit} imports {target}')
    assert not bad, '\n'.join(bad)


def test_bot_never_imports_a_broker_backend():
    for path in (PKG / 'bot').rglob('*.py'):
        assert 'brokers' not in {t for t, _ in _imported_units(path)}, path
