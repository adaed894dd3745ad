"""Finding a strategy class and building its params from ``bot.toml``.

Strategy files are loaded by *path* (``importlib.util.spec_from_file_location``),
not through ``sys.path``, so loading works the same from any working directory
and inside a freshly spawned actor process that only knows the directory.
Every failure is one :class:`StrategyLoadError` line naming the file and the fix.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec

from piker.config import BotCfg, ConfigError
from piker.types import Fqme, FqmeError, resolve_fqme

from ._schedule import TradingWindow, cron_trigger
from ._strategy import Strategy, StrategyParams

# module names under which strategy files are registered in sys.modules
MODULE_PREFIX = 'strategies.'
_PARAMS_FIX = '(fix [[strategies]] params in bot.toml)'


class StrategyLoadError(Exception):
    """A strategy that cannot be loaded or configured; ``str()`` is one line."""


def available_strategies(strategies_dir: Path) -> list[str]:
    """Module names of the strategy files in ``strategies_dir``."""
    try:
        return sorted(
            p.stem for p in Path(strategies_dir).glob('*.py') if not p.name.startswith('_')
        )
    except OSError:
        return []


def _display(path: Path) -> str:
    """Relative to the cwd when under it (``strategies/x.py``), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def _source_of(cls: type) -> str:
    mod = sys.modules.get(cls.__module__)
    file = getattr(mod, '__file__', None)
    return _display(Path(file)) if file else cls.__module__


def _origin_line(err: BaseException, file: Path) -> str:
    """``file:line`` of the innermost frame of ``err`` inside ``file``."""
    if isinstance(err, SyntaxError) and err.filename:
        return f'{_display(Path(err.filename))}:{err.lineno}'
    line = None
    for frame in traceback.extract_tb(err.__traceback__):
        if Path(frame.filename) == file:
            line = frame.lineno
    return f'{_display(file)}:{line}' if line else _display(file)


def _exec_file(name: str, file: Path) -> ModuleType:
    mod_name = f'{MODULE_PREFIX}{name}'
    spec = importlib.util.spec_from_file_location(mod_name, file)
    if spec is None or spec.loader is None:
        raise StrategyLoadError(f'strategy {name!r}: cannot load {_display(file)} as a module')
    module = importlib.util.module_from_spec(spec)
    # registered before exec: msgspec and dataclasses resolve annotations through it
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(mod_name, None)
        msg = err.msg if isinstance(err, SyntaxError) else str(err)
        raise StrategyLoadError(
            f'strategy {name!r} ({_origin_line(err, file)}): '
            f'{type(err).__name__}: {msg} (fix the strategy file)'
        ) from None
    return module


def _innermost(err: BaseException) -> str:
    """``file:line`` where ``err`` was raised, skipping importlib's own frames."""
    if isinstance(err, SyntaxError) and err.filename:
        return f'{_display(Path(err.filename))}:{err.lineno}'
    frames = [
        f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith('<frozen')
    ]
    if not frames:
        return '?'
    return f'{_display(Path(frames[-1].filename))}:{frames[-1].lineno}'


def _import_dotted(modpath: str) -> ModuleType:
    try:
        return importlib.import_module(modpath)
    except ModuleNotFoundError as err:
        if err.name and (modpath == err.name or modpath.startswith(f'{err.name}.')):
            raise StrategyLoadError(
                f'strategy {modpath!r}: no module named {err.name!r} (check the dotted path '
                'in `strategy` of [[strategies]] in bot.toml, and that its package is installed)'
            ) from None
        raise StrategyLoadError(
            f'strategy {modpath!r} ({_innermost(err)}): ModuleNotFoundError: {err}'
        ) from None
    except Exception as err:
        msg = err.msg if isinstance(err, SyntaxError) else str(err)
        raise StrategyLoadError(
            f'strategy {modpath!r} ({_innermost(err)}): {type(err).__name__}: {msg}'
        ) from None


def _pick_class(module: ModuleType, spec: str, clsname: str | None, where: str) -> type[Strategy]:
    if clsname is not None:
        cls = getattr(module, clsname, None)
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            found = 'nothing' if cls is None else repr(cls)
            raise StrategyLoadError(
                f'strategy {spec!r} ({where}): expected `{clsname}` to be a Strategy '
                f'subclass, found {found}'
            )
        return cls
    found_classes = [
        obj for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, Strategy) and obj is not Strategy
        and obj.__module__ == module.__name__
    ]
    if not found_classes:
        raise StrategyLoadError(
            f'strategy {spec!r} ({where}): no Strategy subclass defined (expected '
            '`class MyStrategy(Strategy):` with `from piker.bot import Strategy`)'
        )
    if len(found_classes) > 1:
        names = ', '.join(sorted(c.__name__ for c in found_classes))
        raise StrategyLoadError(
            f'strategy {spec!r} ({where}): {len(found_classes)} Strategy subclasses '
            f'({names}); name one as `{spec.split(":")[0]}:{found_classes[0].__name__}` '
            'in `strategy` of [[strategies]] in bot.toml'
        )
    return found_classes[0]


def load_strategy(spec: str, strategies_dir: Path) -> type[Strategy]:
    """The Strategy subclass named by ``spec``.

    ``spec`` is a module in ``strategies_dir`` (``sma_cross`` -> ``sma_cross.py``),
    optionally ``:Class``, or a dotted import path ``pkg.mod`` / ``pkg.mod:Class``.
    """
    modpath, _, clsname = spec.strip().partition(':')
    if not modpath or (':' in spec and not clsname):
        raise StrategyLoadError(
            f'strategy {spec!r}: expected a module name in strategies/, '
            "`pkg.mod` or `pkg.mod:Class` (fix `strategy` of [[strategies]] in bot.toml)"
        )
    if '.' in modpath:
        module = _import_dotted(modpath)
        where = _display(Path(module.__file__)) if module.__file__ else modpath
    else:
        sdir = Path(strategies_dir).resolve()
        file = sdir / f'{modpath}.py'
        if not file.is_file():
            avail = ', '.join(available_strategies(sdir)) or 'none'
            raise StrategyLoadError(
                f'strategy {modpath!r}: no file {_display(file)} (available in '
                f'{_display(sdir)}: {avail}; fix `strategy` of [[strategies]] in bot.toml)'
            )
        module = _exec_file(modpath, file)
        where = _display(file)
    cls = _pick_class(module, spec, clsname or None, where)
    params_cls = getattr(cls, 'Params', None)
    if not (isinstance(params_cls, type) and issubclass(params_cls, StrategyParams)):
        raise StrategyLoadError(
            f'strategy {spec!r} ({where}): `{cls.__name__}.Params` must subclass '
            f'StrategyParams, found {params_cls!r}'
        )
    return cls


def _params_path(msg: str) -> str:
    """msgspec says ``- at `$.fast``` (or nothing, for the top level); in bot.toml
    the params live under ``$.params``."""
    head, sep, path = msg.rpartition(' - at `$')
    if sep:
        return f'{head} - at `$.params{path}'
    return f'{msg} - at `$.params`'


def build_params(
    strategy_cls: type[Strategy], params: dict[str, Any], name: str | None = None,
) -> StrategyParams:
    """Validate ``params`` (the bot.toml table) into ``strategy_cls.Params``."""
    try:
        return msgspec.convert(params, strategy_cls.Params)
    except msgspec.ValidationError as err:
        label = name or strategy_cls.__name__
        raise StrategyLoadError(
            f'strategy {label!r} ({_source_of(strategy_cls)}): '
            f'{_params_path(str(err))} {_PARAMS_FIX}'
        ) from None


def validate_strategies(
    cfg: BotCfg, strategies_dir: Path, known_markets: list[str] | None = None,
) -> list[str]:
    """Every problem in ``cfg.strategies``, one line each (empty: all good).

    Loads each class, builds its params, parses its trading window and cron jobs,
    and resolves its markets against ``known_markets`` when given.
    """
    problems: list[str] = []
    for i, scfg in enumerate(cfg.strategies):
        where = f'$.strategies[{i}]'
        try:
            cls = load_strategy(scfg.strategy, strategies_dir)
            build_params(cls, scfg.params, scfg.name)
        except StrategyLoadError as err:
            problems.append(str(err))
        if not scfg.markets:
            problems.append(
                f'strategy {scfg.name!r}: no markets - at `{where}.markets` '
                "(list at least one fqme, e.g. markets = ['btcusd.sim'])"
            )
        for j, fqme in enumerate(scfg.markets):
            try:
                if known_markets is not None:
                    resolve_fqme(fqme, known_markets)
                else:
                    Fqme.parse(fqme)
            except FqmeError as err:
                problems.append(f'strategy {scfg.name!r}: {err} - at `{where}.markets[{j}]`')
        sched = scfg.schedule
        try:
            if sched.window is not None:
                TradingWindow.from_cfg(sched.window, f'{where}.schedule.window')
        except ConfigError as err:
            problems.append(f'strategy {scfg.name!r}: {err}')
        for j, job in enumerate(sched.jobs):
            try:
                cron_trigger(job, f'{where}.schedule.jobs[{j}]')
            except ConfigError as err:
                problems.append(f'strategy {scfg.name!r}: {err}')
    return problems
