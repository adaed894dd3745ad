"""The feed bus: datad's state and logic (its RPC surface is ``_feed``).

Per market one :class:`MarketFeed`: one upstream backend stream however many
consumers, the OHLC buffers it writes (one :class:`BarWriter` per timeframe),
and the latest quote. Per consumer one :class:`Consumer`: the quote rows
queued since its last batch and a sender task. Publishing is synchronous and
never waits on a consumer: a consumer that keeps up gets every quote in
batches; one that cannot drain is conflated to the latest quote per market,
and one stuck for ``CONSUMER_SEND_SECS`` is dropped.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from contextlib import nullcontext
from types import ModuleType
from typing import Any

import tractor
import trio

from piker.log import get_logger
from piker.service._proc import cancel_when_gone

from ._bars import BarWriter
from ._clocks import DrivenClock, FeedClock, WallClock
from ._sampler import maybe_spawn_samplerd, register_owner
from ._shm import ShmArray
from ._timing import capacity_rows, floor_to, origin_for, row_position
from ._wire import QUOTE_FIELDS, encode_row, join_rows, send_whole

log = get_logger(__name__)

_NS = 1_000_000_000
DEFAULT_HISTORY_BARS = 1000
CONSUMER_SEND_SECS = 10.0
# quote rows held for a consumer before it is conflated to the latest per market
MAX_PENDING_ROWS = 50_000
# trades kept to fill a timeframe buffer added while the market streams
RECENT_TRADES_NS = 120 * _NS
LINK_RETRY_SECS = 1.0
LINK_WAIT_SECS = 30.0
UPSTREAM_RETRY_SECS = 5.0
DRIVEN_FLUSH_SECS = 2.0

_SEND_ERRORS = (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                tractor._exceptions.TransportClosed)


class FeedError(RuntimeError):
    """datad cannot serve the request (no samplerd, backend failure)."""


class _StartedOnce:
    """``task_status`` that remembers whether ``started`` was called."""

    def __init__(self, status: Any) -> None:
        self._status = status
        self.done = False

    def started(self, value: Any = None) -> None:
        if not self.done:
            self.done = True
            self._status.started(value)


class Consumer:
    """One subscriber: the quote rows pending for it and delivery counters.

    A consumer that keeps up gets every quote; once ``MAX_PENDING_ROWS`` pile
    up (it cannot drain) the pending rows are dropped and its next batch holds
    the latest quote of each market that changed: conflation.
    """

    def __init__(self, cid: int, fqmes: list[str]) -> None:
        self.cid = cid
        self.fqmes = fqmes
        self.rows: list[bytes] = []
        self.dirty: set[str] = set()
        self.overflow = False
        self.wake = trio.Event()
        self.flushed = trio.Event()
        self.flushed.set()
        self.batches = 0
        self.quotes = 0
        self.conflated = 0

    def push(self, fqme: str, rows: list[bytes]) -> None:
        self.dirty.add(fqme)
        if not self.overflow:
            self.rows.extend(rows)
            if len(self.rows) > MAX_PENDING_ROWS:
                self.overflow = True
                self.rows = []
        self.wake.set()
        if self.flushed.is_set():
            self.flushed = trio.Event()

    def take(self, feeds: dict[str, MarketFeed]) -> list[bytes]:
        """The rows of the next batch (latest per market after an overflow)."""
        if self.overflow:
            rows = [encode_row(feeds[f].snapshot_row()) for f in self.dirty if f in feeds]
            self.conflated += 1
        else:
            rows = self.rows
        self.rows = []
        self.dirty = set()
        self.overflow = False
        return rows


class MarketFeed:
    """One market: its buffers, its latest quote, its consumers."""

    def __init__(self, fqme: str, info: dict[str, Any], start_ns: int) -> None:
        self.fqme = fqme
        self.info = info
        self.start_ns = start_ns
        self.writers: dict[int, BarWriter] = {}
        self.consumers: set[Consumer] = set()
        self.upstream_starts = 0
        self.ticks = 0
        self.ts_ns = 0
        self.bid: float | None = None
        self.ask: float | None = None
        self.bid_size: float | None = None
        self.ask_size: float | None = None
        self.last: float | None = None
        self.last_size: float | None = None
        self.last_ts_ns: int | None = None
        self.volume = 0.0
        self.recent: deque[tuple[int, float, float]] = deque()

    def seed(self, quote: dict[str, Any] | None) -> None:
        """The state before the first live tick: the backend's latest quote and
        the close of the history bars."""
        quote = quote or {}
        self.ts_ns = int(quote.get('ts_ns') or self.start_ns)
        for field in ('bid', 'ask', 'bid_size', 'ask_size', 'last', 'last_size'):
            setattr(self, field, quote.get(field))
        if self.last is None:
            for writer in self.writers.values():
                close = float(writer.shm.array['close'][-1])
                if not math.isnan(close):
                    self.last = close
                    break

    def publish(self, ticks: Sequence[Any]) -> None:
        """Fold ticks (time ordered) into buffers and state; queue a quote row
        per tick for every consumer."""
        writers = tuple(self.writers.values())
        recent = self.recent
        consumers = self.consumers
        fqme = self.fqme
        rows: list[bytes] = []
        for t in ticks:
            ts_ns = self.ts_ns = t.ts_ns
            if t.bid is not None:
                self.bid = t.bid
                self.bid_size = t.bid_size
            if t.ask is not None:
                self.ask = t.ask
                self.ask_size = t.ask_size
            price = t.last
            if price is not None:
                size = t.last_size or 0.0
                self.last = price
                self.last_size = size
                self.last_ts_ns = ts_ns
                self.volume += size
                for writer in writers:
                    writer.apply_trade(ts_ns, price, size)
                recent.append((ts_ns, price, size))
            if consumers:
                rows.append(encode_row((
                    fqme, ts_ns, self.bid, self.ask, self.bid_size, self.ask_size,
                    self.last, self.last_size, self.last_ts_ns, self.volume)))
        if recent:
            horizon = self.ts_ns - RECENT_TRADES_NS
            while recent and recent[0][0] < horizon:
                recent.popleft()
        self.ticks += len(ticks)
        for consumer in consumers:
            consumer.push(fqme, rows)

    def snapshot_row(self) -> tuple[Any, ...]:
        return (self.fqme, self.ts_ns, self.bid, self.ask, self.bid_size, self.ask_size,
                self.last, self.last_size, self.last_ts_ns, self.volume)

    def snapshot(self) -> dict[str, Any]:
        """The latest quote as a dict (``QUOTE_FIELDS`` keys)."""
        return dict(zip(QUOTE_FIELDS, self.snapshot_row(), strict=True))

    def status(self) -> dict[str, Any]:
        return {
            'upstream_starts': self.upstream_starts,
            'consumers': len(self.consumers),
            'timeframes': sorted(self.writers),
            'ticks': self.ticks,
            'late_ticks': {tf: w.late_ticks for tf, w in self.writers.items()},
        }


class FeedBus:
    """datad's actor-global state."""

    def __init__(self, name: str, backend: str, module: ModuleType, endpoints: tuple[str, ...],
                 cfg: Any, nursery: trio.Nursery) -> None:
        self.name = name
        self.backend = backend
        self.mod = module
        self.endpoints = endpoints
        self.cfg = cfg
        self.nursery = nursery
        self.feeds: dict[str, MarketFeed] = {}
        self.consumers: dict[int, Consumer] = {}
        self.clock: FeedClock | None = None
        self.clock_kind: str | None = None
        self.sampled = True
        self.origin_epoch = 0
        self.linked = trio.Event()
        self.link_error: str | None = None
        self._locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self._link_stream: tractor.MsgStream | None = None
        self._next_cid = 0
        self._registered_periods: set[int] = set()

    # -- samplerd link -----------------------------------------------------------

    def _on_linked(self, info: dict[str, Any]) -> None:
        if self.clock is not None:
            if info['clock'] != self.clock_kind or (
                    self.sampled and info['origin_epoch'] != self.origin_epoch):
                log.error('datad.sampler_changed', clock=info['clock'],
                          origin_epoch=info['origin_epoch'], was_clock=self.clock_kind,
                          was_origin_epoch=self.origin_epoch,
                          hint='samplerd restarted with another clock: restart datad too')
            return
        self.clock_kind = info['clock']
        if self.clock_kind == 'driven':
            self.clock = DrivenClock(int(info['now_epoch'] * _NS))
            self.origin_epoch = int(info['origin_epoch'])
        elif 'wall_clock' in self.endpoints:
            # file time: bars follow tick times, samplerd's wall clock does not apply
            clock = self.mod.wall_clock(self.cfg)
            self.clock = clock
            self.sampled = False
            self.origin_epoch = origin_for(clock.start_ns / _NS)
        else:
            self.clock = WallClock()
            self.origin_epoch = int(info['origin_epoch'])
        log.info('datad.clock', clock=self.clock_kind, sampled=self.sampled,
                 origin_epoch=self.origin_epoch)

    def sampled_periods(self) -> set[int]:
        if not self.sampled:
            return set()
        return {tf for feed in self.feeds.values() for tf in feed.writers}

    async def run_sampler_link(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Stay linked to samplerd as the owner of this datad's buffers."""
        task_status.started()
        warned = False
        while True:
            died: list[int] = []
            try:
                async with maybe_spawn_samplerd() as portal:
                    with trio.CancelScope() as link:
                        async with portal.open_context(
                            register_owner, name=self.name,
                            periods=sorted(self.sampled_periods()),
                        ) as (ctx, info), ctx.open_stream() as stream, \
                                trio.open_nursery() as n:
                            # a SIGKILLed samplerd never ends the stream: watch its pid
                            n.start_soon(cancel_when_gone, info.get('pid'), link, died)
                            try:
                                self._on_linked(info)
                            except Exception as err:
                                # e.g. a replay dir without files: every subscriber hears it
                                self.link_error = f'{type(err).__name__}: {err}'
                                raise
                            self.link_error = None
                            self._link_stream = stream
                            self._registered_periods = self.sampled_periods()
                            self.linked.set()
                            warned = False
                            await self._serve_sampler(stream)
                            n.cancel_scope.cancel()
                if died:
                    log.warning('datad.sampler_link_lost', error=f'samplerd (pid {died[0]}) died',
                                hint='re-linking to the samplerd pikerd starts again')
                    warned = True
            except trio.Cancelled:
                raise
            except tractor.ContextCancelled:
                log.info('datad.sampler_link_closed')  # samplerd stopped (tree teardown)
            except Exception as err:
                if not warned:
                    log.warning('datad.sampler_link_lost', error=repr(err)[:500])
                    warned = True
            finally:
                self._link_stream = None
            await trio.sleep(LINK_RETRY_SECS if not died else 0.1)

    async def _serve_sampler(self, stream: tractor.MsgStream) -> None:
        async for msg in stream:
            match msg:
                case {'advance': epoch, 'periods': list() as periods}:
                    await self.on_advance(epoch, periods)
                    await stream.send({'ack': epoch})
                case _:
                    log.warning('datad.bad_sampler_msg', msg=repr(msg)[:200])

    async def on_advance(self, epoch: float, periods: list[int]) -> None:
        """samplerd reached ``epoch``: (driven) publish everything up to it and
        let consumers see it, then open the rows of ``periods``."""
        if isinstance(self.clock, DrivenClock):
            if not await self.clock.advance_to_ns(int(epoch * _NS)):
                log.warning('datad.streams_unsettled', epoch=epoch)
            with trio.move_on_after(DRIVEN_FLUSH_SECS):
                for consumer in list(self.consumers.values()):
                    await consumer.flushed.wait()
        for feed in self.feeds.values():
            for period in periods:
                writer = feed.writers.get(period)
                if writer is not None:
                    writer.ensure_until(epoch)

    async def _update_periods(self) -> None:
        periods = self.sampled_periods()
        stream = self._link_stream
        if stream is None or periods == self._registered_periods:
            return
        self._registered_periods = periods
        try:
            await send_whole(stream, {'periods': sorted(periods)}, LINK_WAIT_SECS)
        except _SEND_ERRORS as err:
            log.warning('datad.period_update_failed', error=repr(err))

    async def wait_linked(self) -> None:
        with trio.move_on_after(LINK_WAIT_SECS):
            while not self.linked.is_set():
                if self.link_error:
                    raise FeedError(f'{self.name} cannot start its clock: {self.link_error}')
                with trio.move_on_after(0.1):
                    await self.linked.wait()
            return
        raise FeedError(f'{self.name}: no samplerd link after {LINK_WAIT_SECS} s; '
                        'is pikerd running and able to start samplerd?')

    # -- subscriptions -------------------------------------------------------------

    def now_ns(self) -> int:
        assert self.clock is not None
        return self.clock.now_ns()

    async def subscribe(self, fqmes: list[str], timeframes: list[int],
                        history_bars: int) -> list[MarketFeed]:
        """Feeds for ``fqmes`` (resolved by the backend), created on first use."""
        await self.wait_linked()
        feeds: list[MarketFeed] = []
        for text in fqmes:
            info = await self.mod.market_info(text, self.cfg)
            fqme = info['fqme']
            async with self._locks[fqme]:
                feed = self.feeds.get(fqme)
                if feed is None:
                    feed = await self._open_market(fqme, info, timeframes, history_bars)
                else:
                    for tf in timeframes:
                        if tf not in feed.writers:
                            await self._add_timeframe(feed, tf, history_bars)
            if feed not in feeds:
                feeds.append(feed)
        await self._update_periods()
        return feeds

    async def _open_market(self, fqme: str, info: dict[str, Any], timeframes: list[int],
                           history_bars: int) -> MarketFeed:
        start_epoch = self.now_ns() // _NS
        feed = MarketFeed(fqme, info, start_epoch * _NS)
        try:
            for tf in timeframes:
                feed.writers[tf] = await self._new_writer(fqme, tf, start_epoch, history_bars)
            first = await self.nursery.start(self._run_upstream, feed)
        except BaseException:
            for writer in feed.writers.values():
                writer.shm.destroy()
            raise
        feed.seed(first)
        self.feeds[fqme] = feed
        log.info('feed.opened', fqme=fqme, timeframes=timeframes, start_epoch=start_epoch)
        return feed

    async def _new_writer(self, fqme: str, tf: int, end_epoch: int,
                          history_bars: int) -> BarWriter:
        hist = await self.mod.history(fqme, self.cfg, timeframe_secs=tf, end_epoch=end_epoch,
                                      count=history_bars)
        start = row_position(floor_to(end_epoch, tf), tf, self.origin_epoch)
        shm = ShmArray.create(f'{fqme}.{tf}s', capacity_rows(tf), start=start)
        try:
            writer = BarWriter(shm, tf, self.origin_epoch, fqme=fqme)
            writer.open(end_epoch, hist)
        except BaseException:
            shm.destroy()
            raise
        return writer

    async def _add_timeframe(self, feed: MarketFeed, tf: int, history_bars: int) -> None:
        """A buffer for a market that already streams: history up to the last
        published second, then the trades published since."""
        end_epoch = max(feed.ts_ns, feed.start_ns) // _NS
        writer = await self._new_writer(feed.fqme, tf, end_epoch, history_bars)
        for ts_ns, price, size in list(feed.recent):
            if ts_ns >= end_epoch * _NS:
                writer.apply_trade(ts_ns, price, size)
        if self.sampled:
            writer.ensure_until(self.now_ns() / _NS)
        feed.writers[tf] = writer
        log.info('feed.timeframe_added', fqme=feed.fqme, timeframe_secs=tf)

    async def _run_upstream(self, feed: MarketFeed, *,
                            task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The market's one backend stream; restarted after a failure once it
        has started (a failure before that goes to the subscriber)."""
        status = _StartedOnce(task_status)
        start_ns = feed.start_ns
        while True:
            feed.upstream_starts += 1
            attached = self.clock.attach() if isinstance(self.clock, DrivenClock) else nullcontext()
            try:
                with attached:
                    await self.mod.stream_quotes(
                        feed.fqme, self.cfg, clock=self.clock, publish=feed.publish,
                        start_ns=start_ns, task_status=status)
                log.error('feed.upstream_ended', fqme=feed.fqme)
            except trio.Cancelled:
                raise
            except Exception as err:
                if not status.done:
                    raise
                log.error('feed.upstream_failed', fqme=feed.fqme, error=repr(err)[:500],
                          retry_secs=UPSTREAM_RETRY_SECS)
            if not status.done:
                status.started(None)
            await trio.sleep(UPSTREAM_RETRY_SECS)
            start_ns = max(feed.ts_ns + 1, start_ns)

    # -- consumers ------------------------------------------------------------------

    def add_consumer(self, feeds: list[MarketFeed]) -> Consumer:
        self._next_cid += 1
        consumer = Consumer(self._next_cid, [f.fqme for f in feeds])
        self.consumers[consumer.cid] = consumer
        for feed in feeds:
            feed.consumers.add(consumer)
        return consumer

    def remove_consumer(self, consumer: Consumer) -> None:
        self.consumers.pop(consumer.cid, None)
        for fqme in consumer.fqmes:
            feed = self.feeds.get(fqme)
            if feed is not None:
                feed.consumers.discard(consumer)
        consumer.dirty.clear()
        consumer.flushed.set()

    async def run_sender(self, consumer: Consumer, stream: tractor.MsgStream) -> None:
        """Send the consumer's pending quotes as one batch at a time; return
        when the peer fails or stops draining."""
        feeds = self.feeds
        while True:
            await consumer.wake.wait()
            consumer.wake = trio.Event()
            if consumer.dirty:
                rows = consumer.take(feeds)
                try:
                    await send_whole(stream, join_rows(rows), CONSUMER_SEND_SECS)
                except _SEND_ERRORS as err:
                    log.warning('feed.consumer_dropped', consumer=consumer.cid,
                                fqmes=consumer.fqmes, reason=repr(err)[:300])
                    return
                consumer.batches += 1
                consumer.quotes += len(rows)
            if not consumer.dirty:
                consumer.flushed.set()

    # -- introspection / teardown -------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            'name': self.name,
            'backend': self.backend,
            'clock': self.clock_kind,
            'sampled': self.sampled,
            'origin_epoch': self.origin_epoch,
            'now_epoch': self.now_ns() / _NS if self.clock else None,
            'consumers': {
                c.cid: {'fqmes': c.fqmes, 'batches': c.batches, 'quotes': c.quotes,
                        'conflated': c.conflated}
                for c in self.consumers.values()
            },
            'feeds': {fqme: feed.status() for fqme, feed in self.feeds.items()},
            'segments': sorted(w.shm.name for f in self.feeds.values()
                               for w in f.writers.values()),
            'wall_time': time.time(),
        }

    def close(self) -> None:
        """Unlink every segment this datad owns."""
        for feed in self.feeds.values():
            for writer in feed.writers.values():
                writer.shm.destroy()
        self.feeds.clear()

