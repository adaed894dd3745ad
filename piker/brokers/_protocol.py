"""The backend contract: the endpoint table and the datad feed protocol.

Each backend package ``piker/brokers/<name>/__init__.py`` declares, in one
introspectable table, which endpoints it serves per daemon kind and from which
module::

    ENDPOINTS = {
        'datad': {
            'module': 'piker.brokers.sim.feed',
            'endpoints': ['market_info', 'history', 'stream_quotes', 'search'],
        },
    }

An entry may add ``'infect_asyncio': True`` (the daemon runs asyncio, e.g.
ib_async). Daemons enable exactly the declared module, so a kind never gains
another kind's capabilities (datad never enables a brokerd module).
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Protocol

import msgspec
import numpy as np

from piker.config import BrokersCfg, ConfigError

DAEMON_KINDS = ('datad', 'brokerd')
DATAD_ENDPOINTS = ('market_info', 'history', 'stream_quotes', 'search')
# optional datad endpoints; ``wall_clock`` marks a backend whose time is not
# the wall clock (replay): its bars follow file time, not samplerd's wall clock
DATAD_OPTIONAL = ('wall_clock',)


class BackendError(ValueError):
    """An unknown backend, or one whose endpoint table is incomplete."""


class Endpoints(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    module: str
    endpoints: tuple[str, ...]
    infect_asyncio: bool = False


class DatadBackend(Protocol):
    """What datad calls in a backend's datad module (module-level functions).

    ``cfg`` is the backend's validated ``[brokers.<name>]`` table.
    """

    async def market_info(self, fqme: str, cfg: Any) -> dict[str, Any]:
        """Resolve ``fqme`` (raising ``FqmeError`` naming the choices when it is
        unknown or ambiguous) and describe it; ``['fqme']`` is the canonical name."""
        ...

    async def history(self, fqme: str, cfg: Any, *, timeframe_secs: int, end_epoch: int,
                      count: int) -> np.ndarray:
        """Up to ``count`` bars (``ohlc_dtype``) built from the trades strictly before
        ``end_epoch``; the last may be the partial bar in progress at ``end_epoch``."""
        ...

    async def search(self, pattern: str, cfg: Any) -> list[str]:
        ...

    async def stream_quotes(
        self,
        fqme: str,
        cfg: Any,
        *,
        clock: Any,
        publish: Callable[[Sequence[Any]], None],
        start_ns: int,
        task_status: Any,
    ) -> None:
        """Forever: ``now = await clock.sleep_until_ns(t)``, then ``publish`` (in
        time order) every tick with ``start_ns <= ts_ns <= now`` not yet published.
        ``task_status.started(first_quote)`` first: the latest quote before
        ``start_ns`` as a dict of ``Tick`` fields."""
        ...


def backend_names() -> list[str]:
    """Backend packages present under ``piker.brokers``."""
    import piker.brokers as pkg
    return sorted(
        m.name for m in pkgutil.iter_modules(pkg.__path__)
        if m.ispkg and not m.name.startswith('_')
    )


def get_backend(name: str) -> ModuleType:
    """The backend package ``piker.brokers.<name>``; it must declare ``ENDPOINTS``."""
    names = backend_names()
    if name not in names:
        raise BackendError(f'unknown backend {name!r}: choose one of {", ".join(names)}')
    module = importlib.import_module(f'piker.brokers.{name}')
    table = getattr(module, 'ENDPOINTS', None)
    if not isinstance(table, dict):
        raise BackendError(
            f'backend {name!r} declares no ENDPOINTS table in piker/brokers/{name}/__init__.py')
    return module


def backend_endpoints(name: str, kind: str) -> Endpoints:
    """What backend ``name`` serves for daemon ``kind``, from its table."""
    if kind not in DAEMON_KINDS:
        raise BackendError(f'unknown daemon kind {kind!r}: expected one of {DAEMON_KINDS}')
    table = get_backend(name).ENDPOINTS
    entry = table.get(kind)
    if entry is None:
        served = ', '.join(sorted(table)) or 'nothing'
        raise BackendError(f'backend {name!r} has no {kind} endpoints (it serves: {served})')
    try:
        return msgspec.convert({'kind': kind, **entry}, Endpoints)
    except msgspec.ValidationError as err:
        raise BackendError(
            f'piker/brokers/{name}/__init__.py: bad ENDPOINTS[{kind!r}]: {err}') from None


def load_datad_backend(name: str) -> tuple[ModuleType, Endpoints]:
    """Import backend ``name``'s datad module and check it serves the protocol."""
    eps = backend_endpoints(name, 'datad')
    missing = [e for e in DATAD_ENDPOINTS if e not in eps.endpoints]
    if missing:
        raise BackendError(
            f'backend {name!r}: datad endpoints {missing} are not declared in ENDPOINTS '
            f'(required: {", ".join(DATAD_ENDPOINTS)})')
    module = importlib.import_module(eps.module)
    absent = [e for e in eps.endpoints if not callable(getattr(module, e, None))]
    if absent:
        raise BackendError(f'{eps.module} declares {absent} in ENDPOINTS but does not define them')
    return module, eps


def parse_backend_cfg(name: str, raw: dict[str, Any] | None) -> Any:
    """Validate a ``[brokers.<name>]`` table (plain builtins) against bot.toml's schema."""
    if name not in BrokersCfg.__struct_fields__:
        raise BackendError(f'backend {name!r} has no [brokers.{name}] table in the config schema')
    try:
        brokers = msgspec.convert({name: raw or {}}, BrokersCfg)
    except msgspec.ValidationError as err:
        msg = str(err).replace('`$.', '`$.brokers.')
        raise ConfigError(f'[brokers.{name}]: {msg}') from None
    return getattr(brokers, name)
