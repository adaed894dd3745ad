"""healthd: the daemon kind every actor in the tree heartbeats to.

pikerd reads its table to know each actor's liveness: the systemd watchdog is
only fed while every critical actor's heartbeat is fresh, and ``piker
services`` shows each actor's last-heartbeat age. A heartbeat is sent from the
actor's own trio loop, so a blocked loop (a hung strategy callback) goes stale
even though its process is alive.
"""
from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import tractor
import trio

from ..log import get_logger
from ._ipc import send_whole
from ._lifetime import daemon_lifetime
from ._spec import TIER_HEALTH, DaemonSpec

log = get_logger(__name__)

HEALTHD = 'healthd'


class Beat(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str
    pid: int
    addr: tuple[str, int] | None
    age_secs: float
    state: str  # 'ok' | 'stale' | 'gone'


class HealthTable:
    """Last heartbeat per actor name (actor-global state of healthd)."""

    def __init__(self, stale_after_secs: float) -> None:
        self.stale_after_secs = stale_after_secs
        self._last: dict[str, float] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._gone: set[str] = set()

    def beat(self, name: str, kind: str, pid: int, addr: tuple[str, int] | None) -> None:
        self._last[name] = time.monotonic()
        self._meta[name] = {'kind': kind, 'pid': pid, 'addr': addr}
        self._gone.discard(name)

    def gone(self, name: str) -> None:
        self._gone.add(name)

    def forget(self, name: str) -> None:
        self._last.pop(name, None)
        self._meta.pop(name, None)
        self._gone.discard(name)

    def report(self) -> list[Beat]:
        now = time.monotonic()
        out = []
        for name, ts in sorted(self._last.items()):
            age = now - ts
            if name in self._gone:
                state = 'gone'
            elif age > self.stale_after_secs:
                state = 'stale'
            else:
                state = 'ok'
            meta = self._meta[name]
            out.append(Beat(name=name, kind=meta['kind'], pid=meta['pid'],
                            addr=meta['addr'], age_secs=round(age, 3), state=state))
        return out


_table: HealthTable | None = None


def _get_table() -> HealthTable:
    if _table is None:
        raise RuntimeError('healthd is not running in this actor')
    return _table


# -- daemon-kind trio ----------------------------------------------------------

@tractor.context
async def _setup_persistent_healthd(ctx: tractor.Context, stale_after_secs: float = 5.0,
                                    heartbeat_secs: float = 1.0) -> None:
    global _table
    async with daemon_lifetime(HEALTHD, heartbeat=False):
        _table = HealthTable(stale_after_secs)
        me = tractor.current_actor()
        await ctx.started({'pid': os.getpid()})
        while True:
            # healthd beats for itself locally: a hung healthd goes stale too
            _table.beat(me.name, HEALTHD, os.getpid(), None)
            await trio.sleep(heartbeat_secs)


class HealthdCfg(msgspec.Struct, frozen=True, kw_only=True):
    stale_after_secs: float = 5.0
    heartbeat_secs: float = 1.0


def healthd_init(stale_after_secs: float = 5.0, heartbeat_secs: float = 1.0) -> DaemonSpec:
    return DaemonSpec(
        name=HEALTHD, kind=HEALTHD,
        fixture='piker.service._health:_setup_persistent_healthd',
        enable_modules=['piker.service._health'],
        config=HealthdCfg(stale_after_secs=stale_after_secs, heartbeat_secs=heartbeat_secs),
        tier=TIER_HEALTH,
    )


@asynccontextmanager
async def maybe_spawn_healthd(**kwargs: Any) -> AsyncIterator[tractor.Portal]:
    from ._discovery import maybe_spawn_daemon
    async with maybe_spawn_daemon('piker.service._health:healthd_init', **kwargs) as portal:
        yield portal


# -- RPC endpoints (run inside healthd) ------------------------------------------

@tractor.context
async def heartbeats(ctx: tractor.Context, name: str, kind: str, pid: int,
                     addr: list[Any] | None = None) -> None:
    """One long-lived stream per actor; each message is one heartbeat."""
    table = _get_table()
    peer_addr = (addr[0], int(addr[1])) if addr else None
    table.beat(name, kind, pid, peer_addr)
    await ctx.started()
    try:
        async with ctx.open_stream() as stream:
            async for _ in stream:
                table.beat(name, kind, pid, peer_addr)
    finally:
        table.gone(name)


async def health_report() -> list[dict[str, Any]]:
    return [msgspec.to_builtins(b) for b in _get_table().report()]


@tractor.context
async def health_snapshot(ctx: tractor.Context) -> None:
    """:func:`health_report` for periodic callers (see ``_ipc.call_ctx``)."""
    await ctx.started(await health_report())


async def forget(name: str) -> None:
    _get_table().forget(name)


# -- the client side: every daemon runs this -------------------------------------

async def run_heartbeat(name: str, kind: str, period_secs: float, *,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Beat to healthd every ``period_secs`` forever, reconnecting as needed."""
    task_status.started()
    me = tractor.current_actor()
    addr = list(me.accept_addr) if me.accept_addr else None
    warned = False
    while True:
        try:
            async with tractor.find_actor(HEALTHD) as portal:
                if portal is None:
                    raise LookupError(HEALTHD)
                async with portal.open_context(
                    heartbeats, name=name, kind=kind, pid=os.getpid(), addr=addr,
                ) as (ctx, _):
                    async with ctx.open_stream() as stream:
                        warned = False
                        while True:
                            await send_whole(stream, None, max(5 * period_secs, 2.0))
                            await trio.sleep(period_secs)
        except trio.Cancelled:
            raise
        except (OSError, LookupError, trio.TooSlowError, trio.BrokenResourceError,
                trio.ClosedResourceError, tractor.RemoteActorError) as err:
            if not warned:
                log.warning('heartbeat.lost', target=HEALTHD, error=repr(err))
                warned = True
        await trio.sleep(period_secs)
