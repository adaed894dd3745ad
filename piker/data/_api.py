"""Client API: ``open_feed`` (datad) and ``open_sample_stream`` (samplerd).

Both keep their tractor stream drained by a local task into a small
conflating buffer, whatever the caller's loop does: a context stream that is
not drained back-pressures the whole channel to that daemon (every other
context and RPC with it), so a slow caller only ever sees fewer, newer
batches.
"""
from __future__ import annotations

import collections
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import tractor
import trio

from piker.brokers._protocol import BackendError, get_backend
from piker.config import ConfigError
from piker.log import get_logger
from piker.service import call_ctx
from piker.service._proc import cancel_when_gone
from piker.types import Fqme, FqmeError, resolve_fqme

from ._bus import DEFAULT_HISTORY_BARS, FeedError
from ._feed import maybe_spawn_datad, open_feed_stream
from ._sampler import SamplerError, maybe_spawn_samplerd, subscribe_increments
from ._shm import ShmArray, ShmToken
from ._timing import PeriodError, check_period
from ._types import Increment
from ._wire import decode_batch

log = get_logger(__name__)

OPEN_TIMEOUT_SECS = 60.0
# increments kept for a caller that does not keep up (oldest dropped first)
MAX_PENDING_INCREMENTS = 10_000
# quotes kept for a caller that does not keep up before conflating to the latest
MAX_PENDING_QUOTES = 50_000
# samplerd sends wall-clock increments a little early; they are held until
# their boundary, spinning at most this long
RELEASE_SPIN_SECS = 0.0015

_ERRORS: dict[str, type[Exception]] = {
    'FqmeError': FqmeError,
    'PeriodError': PeriodError,
    'BackendError': BackendError,
    'ConfigError': ConfigError,
}


def _raise_remote(error: dict[str, str]) -> None:
    kind = _ERRORS.get(error.get('type', ''), FeedError)
    raise kind(error.get('msg', 'datad refused the feed'))


def backend_of(fqmes: Sequence[str]) -> str:
    """The one backend named by every fqme's suffix."""
    if isinstance(fqmes, str) or not fqmes:
        raise FqmeError(f'open_feed needs a non-empty list of fqmes, found {fqmes!r}')
    backends = sorted({Fqme.parse(f).backend for f in fqmes})
    if len(backends) > 1:
        raise FqmeError(
            f'fqmes {list(fqmes)} span backends {", ".join(backends)}: '
            'open one feed per backend')
    get_backend(backends[0])
    return backends[0]


class QuoteStream:
    """Async iterator of quote batches: lists of quote dicts in time order.

    A caller that keeps up sees every quote; one that falls behind by more than
    ``MAX_PENDING_QUOTES`` gets the latest quote per market instead.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] = []
        self._ready = trio.Event()
        self._ended = False
        self.received_batches = 0
        self.received_quotes = 0
        self.conflated = 0

    async def _pump(self, stream: tractor.MsgStream, *,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            async for payload in stream:
                quotes = decode_batch(payload)
                self.received_batches += 1
                self.received_quotes += len(quotes)
                pending = self._pending
                pending.extend(quotes)
                if len(pending) > MAX_PENDING_QUOTES:
                    self._pending = list({q['fqme']: q for q in pending}.values())
                    self.conflated += 1
                self._ready.set()
        finally:
            self._ended = True
            self._ready.set()

    async def receive(self) -> list[dict[str, Any]]:
        while not self._pending:
            if self._ended:
                raise trio.EndOfChannel('the datad feed stream ended')
            await self._ready.wait()
            self._ready = trio.Event()
        batch, self._pending = self._pending, []
        return batch

    def __aiter__(self) -> QuoteStream:
        return self

    async def __anext__(self) -> list[dict[str, Any]]:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


def latest_by_fqme(batch: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last quote of each market in a batch."""
    return {q['fqme']: q for q in batch}


class Feed:
    """What ``open_feed`` yields."""

    def __init__(self, backend: str, portal: tractor.Portal, started: dict[str, Any]) -> None:
        self.backend = backend
        self.portal = portal
        self.fqmes: list[str] = started['fqmes']
        self.first_quotes: dict[str, dict[str, Any]] = started['first_quotes']
        self.market_info: dict[str, dict[str, Any]] = started['market_info']
        self.tokens: dict[str, dict[int, ShmToken]] = {
            fqme: {int(tf): ShmToken.from_dict(tok) for tf, tok in by_tf.items()}
            for fqme, by_tf in started['tokens'].items()
        }
        self.clock: str = started['clock']
        self.stream: QuoteStream | None = None
        self._readers: dict[tuple[str, int], ShmArray] = {}

    def attach(self, fqme: str, timeframe_secs: int | None = None) -> ShmArray:
        """A read-only, zero-copy view of a market's OHLC buffer (closed with the feed)."""
        fqme = self._resolve(fqme)
        by_tf = self.tokens[fqme]
        if timeframe_secs is None:
            timeframe_secs = min(by_tf)
        if timeframe_secs not in by_tf:
            raise PeriodError(
                f'no {timeframe_secs} s buffer for {fqme}: this feed has '
                f'{sorted(by_tf)} (pass timeframes=[...] to open_feed)')
        key = (fqme, timeframe_secs)
        shm = self._readers.get(key)
        if shm is None:
            shm = self._readers[key] = ShmArray.attach(by_tf[timeframe_secs], readonly=True)
        return shm

    def _resolve(self, fqme: str) -> str:
        if fqme in self.tokens:
            return fqme
        try:
            return resolve_fqme(fqme, self.fqmes)
        except FqmeError:
            raise FqmeError(
                f'{fqme!r} is not in this feed: it has {", ".join(self.fqmes)}') from None

    def close(self) -> None:
        for shm in self._readers.values():
            shm.close()
        self._readers.clear()


@asynccontextmanager
async def open_feed(
    fqmes: Sequence[str],
    *,
    backend_cfg: dict[str, Any] | None = None,
    timeframes: Sequence[int] = (60,),
    start_stream: bool = True,
    history_bars: int = DEFAULT_HISTORY_BARS,
) -> AsyncIterator[Feed]:
    """Subscribe to ``fqmes`` of one backend through (find-or-spawned) datad.

    ``backend_cfg`` is the ``[brokers.<backend>]`` table as plain data; the
    first feed that spawns a datad decides its config.
    """
    backend = backend_of(fqmes)
    tfs = [check_period(tf) for tf in timeframes]
    refused: dict[str, str] | None = None
    died: list[int] = []
    async with maybe_spawn_datad(backend, backend_cfg) as portal:
        with trio.CancelScope(deadline=trio.current_time() + OPEN_TIMEOUT_SECS) as session:
            async with portal.open_context(
                open_feed_stream, fqmes=list(fqmes), timeframes=tfs,
                history_bars=history_bars, start_stream=start_stream,
            ) as (ctx, started):
                session.deadline = math.inf
                # a refusal leaves the context first: the callee has returned
                refused = started.get('error')
                if refused is None:
                    feed = Feed(backend, portal, started)
                    try:
                        # both sides always open the stream: closing it is what ends
                        # the callee, so leaving needs no ctx.cancel() (and no error
                        # log from tractor about a cancelled context)
                        async with ctx.open_stream() as stream, trio.open_nursery() as n:
                            n.start_soon(cancel_when_gone, started.get('pid'), session, died)
                            if start_stream:
                                feed.stream = QuoteStream()
                                await n.start(feed.stream._pump, stream)
                            yield feed
                            n.cancel_scope.cancel()
                    finally:
                        feed.close()
        if died:
            raise FeedError(f'datad.{backend} (pid {died[0]}) died while this feed was open; '
                            'pikerd starts a new one on the next open_feed')
        if session.cancelled_caught:
            raise FeedError(f'datad.{backend} did not open the feed of {list(fqmes)} '
                            f'within {OPEN_TIMEOUT_SECS} s')
    if refused is not None:
        _raise_remote(refused)




async def search(backend: str, pattern: str,
                 backend_cfg: dict[str, Any] | None = None) -> list[str]:
    """Symbol search on ``backend``'s datad."""
    get_backend(backend)
    async with maybe_spawn_datad(backend, backend_cfg) as portal:
        return await portal.run_from_ns('piker.data._feed', 'search', pattern=pattern)


# -- samplerd ---------------------------------------------------------------------------

async def release_at(epoch: float) -> None:
    """Return at wall time ``epoch``: sleep, then spin the last ~1.5 ms (a trio
    sleep overshoots by up to a millisecond)."""
    delay = epoch - time.time()
    if delay > RELEASE_SPIN_SECS:
        await trio.sleep(delay - RELEASE_SPIN_SECS)
    while time.time() < epoch:
        pass


class IncrementStream:
    """Async iterator of :class:`Increment`; ``clock`` is samplerd's clock kind.

    Under the wall clock each increment is yielded at its boundary, never
    before (samplerd sends them ~2 ms ahead to hide the transport delay).
    """

    def __init__(self, info: dict[str, Any]) -> None:
        self.clock: str = info['clock']
        self.origin_epoch: int = info['origin_epoch']
        self._pending: collections.deque[Increment] = collections.deque(
            maxlen=MAX_PENDING_INCREMENTS)
        self._ready = trio.Event()
        self._ended = False

    async def _pump(self, stream: tractor.MsgStream, *,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            async for msg in stream:
                inc = msgspec.convert(msg, Increment)
                if self.clock == 'wall':
                    await release_at(inc.epoch)
                if len(self._pending) == self._pending.maxlen:
                    log.warning('sampler.increment_overflow', dropped=self._pending[0].epoch)
                self._pending.append(inc)
                self._ready.set()
        finally:
            self._ended = True
            self._ready.set()

    async def receive(self) -> Increment:
        while not self._pending:
            if self._ended:
                raise trio.EndOfChannel('the samplerd stream ended')
            await self._ready.wait()
            self._ready = trio.Event()
        return self._pending.popleft()

    def __aiter__(self) -> IncrementStream:
        return self

    async def __anext__(self) -> Increment:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


@asynccontextmanager
async def open_sample_stream(period_secs: int | Sequence[int]) -> AsyncIterator[IncrementStream]:
    """Increments of ``period_secs`` (one or several periods) from samplerd."""
    periods = [period_secs] if isinstance(period_secs, int) else list(period_secs)
    periods = [check_period(p) for p in periods]
    refused: str | None = None
    died: list[int] = []
    async with maybe_spawn_samplerd() as portal:
        with trio.CancelScope(deadline=trio.current_time() + OPEN_TIMEOUT_SECS) as session:
            async with portal.open_context(subscribe_increments, periods=periods) as (ctx, info):
                session.deadline = math.inf
                refused = info.get('error')
                if refused is None:
                    incs = IncrementStream(info)
                    async with ctx.open_stream() as stream, trio.open_nursery() as n:
                        n.start_soon(cancel_when_gone, info.get('pid'), session, died)
                        await n.start(incs._pump, stream)
                        yield incs
                        n.cancel_scope.cancel()
                    # closing the stream ends the callee: it returns, no cancel needed
        if died:
            raise SamplerError(f'samplerd (pid {died[0]}) died while subscribed')
        if session.cancelled_caught:
            raise SamplerError(f'samplerd did not subscribe {periods} within '
                               f'{OPEN_TIMEOUT_SECS} s')
    if refused is not None:
        raise PeriodError(refused)


async def advance_clock(epoch: float) -> dict[str, Any]:
    """Move samplerd's driven clock to ``epoch``; returns once every boundary up
    to it has been delivered (``{'now_epoch', 'boundaries'}``)."""
    from ._sampler import advance_to_ctx
    async with maybe_spawn_samplerd(clock='driven') as portal:
        return await call_ctx(portal, advance_to_ctx, epoch=epoch)


async def clock_info() -> dict[str, Any]:
    """samplerd's clock, now, origin, periods, owners and subscriber count."""
    from ._sampler import clock_info_ctx
    async with maybe_spawn_samplerd() as portal:
        return await call_ctx(portal, clock_info_ctx)


__all__ = ['Feed', 'QuoteStream', 'latest_by_fqme', 'IncrementStream', 'open_feed',
           'open_sample_stream', 'advance_clock', 'clock_info', 'search', 'backend_of',
           'SamplerError']
