"""datad.<backend>: quotes fan-out, shm OHLC writer, history and search.

This module is datad's whole RPC surface (it and the backend's declared datad
module are the only modules datad enables); the logic lives in ``_bus``.
"""
from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import tractor
import trio

from piker.brokers._protocol import (
    backend_endpoints,
    load_datad_backend,
    parse_backend_cfg,
)
from piker.log import get_logger
from piker.service import DaemonSpec, daemon_lifetime, maybe_spawn_daemon
from piker.service._spec import TIER_FEEDS

from ._bus import DEFAULT_HISTORY_BARS, FeedBus, FeedError
from ._shm import sweep_stale_segments
from ._timing import check_period

log = get_logger(__name__)

DATAD = 'datad'
# what a subscriber may get back instead of a feed (``started`` carries it)
_USER_ERRORS = ('FqmeError', 'PeriodError', 'ReplayConfigError', 'ReplayFileError',
                'SimError', 'BackendError', 'ConfigError', 'FeedError')

_bus: FeedBus | None = None


def _get() -> FeedBus:
    if _bus is None:
        raise RuntimeError('datad is not running in this actor')
    return _bus


# -- daemon-kind trio -------------------------------------------------------------

@tractor.context
async def _setup_persistent_datad(ctx: tractor.Context, backend: str,
                                  backend_cfg: dict[str, Any] | None = None) -> None:
    global _bus
    async with daemon_lifetime(DATAD) as nursery:
        swept = sweep_stale_segments()
        module, eps = load_datad_backend(backend)
        cfg = parse_backend_cfg(backend, backend_cfg)
        bus = _bus = FeedBus(tractor.current_actor().name, backend, module, eps.endpoints,
                             cfg, nursery)
        try:
            await nursery.start(bus.run_sampler_link)
            log.info('datad.ready', backend=backend, swept_segments=len(swept))
            await ctx.started({'pid': os.getpid(), 'backend': backend,
                               'backend_cfg': backend_cfg or {}, 'swept': swept})
            await trio.sleep_forever()
        finally:
            _bus = None
            bus.close()
            log.info('datad.stopped', backend=backend)


class DatadCfg(msgspec.Struct, frozen=True, kw_only=True):
    backend: str
    # the backend's validated ``[brokers.<backend>]`` table (its own Struct)
    backend_cfg: msgspec.Struct


def datad_init(backend: str, backend_cfg: dict[str, Any] | None = None) -> DaemonSpec:
    """``datad.<backend>``: enables this module and the backend's datad module only."""
    eps = backend_endpoints(backend, DATAD)
    return DaemonSpec(
        name=f'{DATAD}.{backend}', kind=DATAD,
        fixture='piker.data._feed:_setup_persistent_datad',
        enable_modules=['piker.data._feed', eps.module],
        # a bad table fails here, before a spawn
        config=DatadCfg(backend=backend, backend_cfg=parse_backend_cfg(backend, backend_cfg)),
        infect_asyncio=eps.infect_asyncio,
        tier=TIER_FEEDS,
    )


@asynccontextmanager
async def maybe_spawn_datad(backend: str, backend_cfg: dict[str, Any] | None = None,
                            ) -> AsyncIterator[tractor.Portal]:
    async with maybe_spawn_daemon('piker.data._feed:datad_init', backend=backend,
                                  backend_cfg=dict(backend_cfg or {})) as portal:
        yield portal


# -- RPC endpoints (run inside datad) -------------------------------------------------

def _user_error(err: Exception) -> dict[str, str] | None:
    name = type(err).__name__
    if name in _USER_ERRORS:
        return {'type': name, 'msg': str(err)}
    return None


@tractor.context
async def open_feed_stream(
    ctx: tractor.Context,
    fqmes: list[str],
    timeframes: list[int],
    history_bars: int = DEFAULT_HISTORY_BARS,
    start_stream: bool = True,
) -> None:
    """One consumer: ``started`` gives resolved fqmes, first quotes, buffer
    tokens and market info (or ``{'error': {...}}``); then quote batches."""
    bus = _get()
    try:
        tfs = sorted({check_period(tf) for tf in timeframes})
        if history_bars < 1:
            raise FeedError(f'history_bars must be >= 1, found {history_bars}')
        feeds = await bus.subscribe(fqmes, tfs, history_bars)
    except Exception as err:
        error = _user_error(err)
        if error is None:
            raise
        await ctx.started({'error': error})
        return
    await ctx.started({
        'fqmes': [f.fqme for f in feeds],
        'first_quotes': {f.fqme: f.snapshot() for f in feeds},
        'tokens': {f.fqme: {tf: w.shm.token.to_dict() for tf, w in f.writers.items()}
                   for f in feeds},
        'market_info': {f.fqme: f.info for f in feeds},
        'clock': bus.clock_kind,
        'sampled': bus.sampled,
        'pid': os.getpid(),
    })
    consumer = bus.add_consumer(feeds) if start_stream else None
    try:
        async with ctx.open_stream() as stream:
            async with trio.open_nursery() as n:

                async def until_peer_closes() -> None:
                    async for _ in stream:
                        pass
                    n.cancel_scope.cancel()

                n.start_soon(until_peer_closes)
                if consumer is not None:
                    await bus.run_sender(consumer, stream)
                    n.cancel_scope.cancel()
    finally:
        if consumer is not None:
            bus.remove_consumer(consumer)


async def feed_status() -> dict[str, Any]:
    return _get().status()


async def search(pattern: str) -> list[str]:
    bus = _get()
    return await bus.mod.search(pattern, bus.cfg)
