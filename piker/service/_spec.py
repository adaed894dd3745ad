"""What pikerd needs to know to start one daemon: :class:`DaemonSpec`.

Each daemon kind's ``<kind>_init()`` returns one, with the daemon's config as
a typed, validated, frozen Struct (``config``) whose fields are the lifetime
fixture's keyword arguments: pikerd keeps that typed config for restarts and
compares configs field by field (defaults filled in, so ``{}`` and the
defaults spelled out are the same config). Only the hop into the daemon's
process goes as builtins (:attr:`DaemonSpec.fixture_kwargs`: tractor sends
msgpack), converted back to the same types by the fixture. The fixture is
named by ``module:function`` so pikerd imports it itself rather than trusting
a callable from a client.
"""
from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from typing import Any

import msgspec

# shutdown order: lower tiers stop first (strategies before order dialogs,
# order dialogs before feeds, feeds before the health service)
TIER_STRATEGY = 0
TIER_ORDERS = 1
TIER_BROKER = 2
TIER_FEEDS = 3
TIER_HEALTH = 4


class DaemonSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str
    # ``module:function`` of the kind's ``@tractor.context`` lifetime fixture
    fixture: str
    enable_modules: list[str]
    # the kind's own frozen config Struct (fields = the fixture's kwargs), or None
    config: msgspec.Struct | None = None
    infect_asyncio: bool = False
    tier: int = TIER_FEEDS
    # a daemon whose loss makes the whole service unhealthy (drives the watchdog)
    critical: bool = True

    @property
    def fixture_kwargs(self) -> dict[str, Any]:
        """``config`` as builtins, for the one IPC hop into the daemon."""
        if self.config is None:
            return {}
        return msgspec.to_builtins(self.config)


class SpecError(ValueError):
    """A daemon init path that does not name a piker daemon-kind init function."""


def import_path(path: str) -> Any:
    """Resolve ``piker.pkg.mod:attr``; only piker's own modules are importable
    this way, since the path may arrive over (unauthenticated) IPC."""
    mod_name, _, attr = path.partition(':')
    if not attr or not any(mod_name == p or mod_name.startswith(p + '.') for p in _prefixes()):
        raise SpecError(f'bad daemon path {path!r}: expected `piker.<module>:<function>`')
    try:
        module = importlib.import_module(mod_name)
    except ImportError as err:
        raise SpecError(f'bad daemon path {path!r}: {err}') from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SpecError(f'bad daemon path {path!r}: no `{attr}` in {mod_name}') from None


def _prefixes() -> list[str]:
    return ['piker', *_extra_prefixes()]


def _extra_prefixes() -> list[str]:
    # test suites add their own daemon modules through this variable
    extra = os.environ.get('PIKER_EXTRA_DAEMON_PREFIXES', '')
    return list(filter(None, extra.split(',')))


def under_prefixes(module: str, prefixes: list[str] | None = None) -> bool:
    return any(module == p or module.startswith(p + '.')
               for p in (_prefixes() if prefixes is None else prefixes))


# the daemon kinds a client may ask pikerd for over RPC; anything else in piker
# (say `piker.config:write_toml_atomic`) is not a daemon and never called remotely
BOT_INIT = 'piker.bot._actor:bot_init'
SPAWNABLE_INITS = frozenset({
    'piker.service._health:healthd_init',
    'piker.data._sampler:samplerd_init',
    'piker.data._feed:datad_init',
    'piker.clearing._ems:emsd_init',
    'piker.clearing._paper:paperboi_init',
    BOT_INIT,
})
# a backend's order side: `piker.brokers.<backend>.broker:brokerd_init`
_BROKERD_INIT = re.compile(r'piker\.brokers\.[a-z][a-z0-9_]*\.broker:brokerd_init')


def check_spawnable(init: str) -> None:
    """Refuse an init path a client may not have pikerd call: one of
    :data:`SPAWNABLE_INITS`, a backend's ``brokerd_init``, or (tests) a module
    under ``PIKER_EXTRA_DAEMON_PREFIXES``."""
    if init in SPAWNABLE_INITS or _BROKERD_INIT.fullmatch(init):
        return
    if under_prefixes(init.partition(':')[0], _extra_prefixes()):
        return
    raise SpecError(f'{init!r} is not a daemon kind pikerd spawns for a client '
                    "(allowed: piker's own `<kind>_init` functions)")


def resolve_spec(init: str, kwargs: dict[str, Any]) -> DaemonSpec:
    init_fn: Callable[..., DaemonSpec] = import_path(init)
    spec = init_fn(**kwargs)
    if not isinstance(spec, DaemonSpec):
        raise SpecError(f'{init} returned {type(spec).__name__}, expected DaemonSpec')
    return spec


def config_diff(running: Any, asked: Any, path: str = '') -> list[str]:
    """The key paths where two daemon configs (Structs or builtins) differ,
    each with both values (``risk_cfg.max_position: runs with 20, asked for 3``)."""
    if isinstance(running, msgspec.Struct) or isinstance(asked, msgspec.Struct):
        return config_diff(msgspec.to_builtins(running), msgspec.to_builtins(asked), path)
    if isinstance(running, dict) and isinstance(asked, dict):
        out: list[str] = []
        for key in sorted(set(running) | set(asked), key=str):
            sub = f'{path}.{key}' if path else str(key)
            if key not in running:
                out.append(f'{sub}: not set in the running one, asked for {asked[key]!r}')
            elif key not in asked:
                out.append(f'{sub}: runs with {running[key]!r}, not set in the request')
            else:
                out += config_diff(running[key], asked[key], sub)
        return out
    if isinstance(running, (list, tuple)) and isinstance(asked, (list, tuple)):
        running, asked = list(running), list(asked)
    if running != asked:
        return [f'{path or "config"}: runs with {running!r}, asked for {asked!r}']
    return []
