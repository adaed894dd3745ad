"""The bad-input corpus: every case fails with one clear line and touches nothing.

A case is a directory ``tests/data/bad_inputs/<area>/<case>/`` holding
``case.toml`` and whatever files it needs (``bot.toml``, ``state/``...)::

    args = ["bot", "check", "-c", "{config}"]   # piker CLI arguments
    exit = 2                                    # expected exit status
    expect = "`$.risk.max_position` = inf"      # substring of the `piker: error:` line
    env = { PIKER_X = "1" }                     # optional, added to the environment
    allow_new = false                           # optional: new files are no change

The case directory is copied to a temp dir first; in ``args`` and ``env``,
``{config}`` is the copy's ``bot.toml``, ``{state}`` its ``state/`` directory
(created empty when absent) and ``{dir}`` the copy itself. The run must end
with the expected status, print exactly one stderr line starting with
``piker: error:`` (containing ``expect``), no ``Traceback`` anywhere, and leave
every file under the copy as it was (``__pycache__`` aside).

Every ``config`` case is also run as ``bot run -c {config} --for 1s`` on a
free registry port: ``bot check`` and ``bot run`` must reject the same configs
the same way, before anything is spawned.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, free_port

CORPUS = Path(__file__).resolve().parent / 'data' / 'bad_inputs'
TIMEOUT_SECS = 30
ERROR_PREFIX = 'piker: error:'
# environment a case must not inherit from the test run (state would leak outside the copy)
SCRUBBED_ENV = ('PIKER_STATE_DIR', 'STATE_DIRECTORY', 'CREDENTIALS_DIRECTORY', 'NOTIFY_SOCKET')


def _cases(area: str | None = None) -> list[Any]:
    found = []
    for case_file in sorted(CORPUS.glob('*/*/case.toml')):
        case_dir = case_file.parent
        if area is None or case_dir.parent.name == area:
            found.append(pytest.param(case_dir, id=f'{case_dir.parent.name}/{case_dir.name}'))
    return found


class Case:
    """One case directory, copied to ``tmp`` and ready to run."""

    def __init__(self, src: Path, tmp: Path) -> None:
        self.spec = tomllib.loads((src / 'case.toml').read_text())
        self.dir = tmp / 'case'
        shutil.copytree(src, self.dir)
        (self.dir / 'state').mkdir(exist_ok=True)
        self.home = tmp / 'home'  # XDG dirs outside the copy, so a stray write is harmless
        self.home.mkdir()
        self.before = snapshot(self.dir)

    def subst(self, text: str) -> str:
        return (text.replace('{config}', str(self.dir / 'bot.toml'))
                .replace('{state}', str(self.dir / 'state'))
                .replace('{dir}', str(self.dir)))

    def run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        env.update(XDG_STATE_HOME=str(self.home / 'state'),
                   XDG_CONFIG_HOME=str(self.home / 'config'))
        env.update({k: self.subst(str(v)) for k, v in self.spec.get('env', {}).items()})
        return subprocess.run(
            [sys.executable, '-m', 'piker', *(self.subst(a) for a in args)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECS,
            stdin=subprocess.DEVNULL,
        )

    def check(self, res: subprocess.CompletedProcess[str]) -> None:
        out = f'stdout:\n{res.stdout[-2000:]}\nstderr:\n{res.stderr[-3000:]}'
        assert 'Traceback' not in res.stdout + res.stderr, out
        assert res.returncode == self.spec['exit'], out
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith(ERROR_PREFIX)]
        assert len(errors) == 1, out
        assert self.spec['expect'] in errors[0], out
        changed = diff(self.before, snapshot(self.dir),
                       allow_new=self.spec.get('allow_new', False))
        assert not changed, f'files changed under the case copy: {changed}\n{out}'


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (bytecode caches aside)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob('*'))
        if p.is_file() and '__pycache__' not in p.parts
    }


def diff(before: dict[str, str], after: dict[str, str], allow_new: bool) -> list[str]:
    changed = [f'{k} (changed)' for k in before if k in after and after[k] != before[k]]
    changed += [f'{k} (removed)' for k in before if k not in after]
    if not allow_new:
        changed += [f'{k} (new)' for k in after if k not in before]
    return changed


RUN_ARGS = ['bot', 'run', '-c', '{config}', '--for', '1s', '--state-dir', '{state}',
            '--registry', '127.0.0.1:{port}']
# cases run this many at a time (each is a short-lived process): the corpus stays quick
WORKERS = 4


@pytest.fixture(scope='module')
def corpus_runs(tmp_path_factory: pytest.TempPathFactory,
                ) -> dict[tuple[str, str], tuple[Case, subprocess.CompletedProcess[str]]]:
    """Every case run once as written and every config case as ``bot run``,
    concurrently; each test then checks its own result."""
    jobs: list[tuple[tuple[str, str], Case, list[str]]] = []
    for kind, params in (('as_written', _cases()), ('bot_run', _cases('config'))):
        for param in params:
            (case_dir,) = param.values
            case = Case(case_dir, tmp_path_factory.mktemp(f'{kind}-{case_dir.name}'))
            args = case.spec['args'] if kind == 'as_written' else [
                a.replace('{port}', str(free_port())) for a in RUN_ARGS]
            jobs.append(((kind, param.id), case, args))
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda job: job[1].run(job[2]), jobs))
    return {key: (case, res) for (key, case, _), res in zip(jobs, results, strict=True)}


@pytest.mark.parametrize('case_dir', _cases())
def test_bad_input(case_dir: Path, corpus_runs: Any, request: pytest.FixtureRequest) -> None:
    case, res = corpus_runs[('as_written', request.node.callspec.id)]
    case.check(res)


@pytest.mark.parametrize('case_dir', _cases('config'))
def test_bot_run_rejects_what_bot_check_rejects(case_dir: Path, corpus_runs: Any,
                                                request: pytest.FixtureRequest) -> None:
    case, res = corpus_runs[('bot_run', request.node.callspec.id)]
    assert case.spec['args'][:2] == ['bot', 'check'], 'config cases run `bot check`'
    case.check(res)
    # rejected before anything was spawned: no actor tree, no log of one
    assert 'pikerd.starting' not in res.stdout, res.stdout[-2000:]


def test_corpus_is_there() -> None:
    areas = {p.parent.parent.name for p in CORPUS.glob('*/*/case.toml')}
    assert {'config', 'cli'} <= areas
    assert len(_cases('config')) >= 25
