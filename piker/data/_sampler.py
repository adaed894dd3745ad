"""samplerd: the tree's one OHLC clock.

At each boundary ``b`` of a registered period (``b % period == 0``) samplerd

1. asks every *buffer owner* (a datad, over a long-lived context stream) to
   open the row of ``b`` in its buffers of that period and waits for the ack
   - under the driven clock the same request first makes the owner publish
   every backend event up to ``b``, so a bar's ticks are in before it closes;
2. then hands ``Increment(period, b, index)`` to every subscriber of that
   period, where ``index`` is the new row's position (``_timing``).

Owners keep one writer per buffer: samplerd never touches shared memory.
Subscribers each have their own context stream and sender task with a
latest-per-period slot, so a slow subscriber is conflated and one that stops
draining (or dies) is dropped without delaying anyone else.

Clocks: ``wall`` sleeps to each real boundary (owners are asked ~4 ms ahead,
increments leave ~2 ms ahead and clients hold each until its boundary); ``driven`` moves only when a
client calls :func:`advance_to`, which processes every boundary in
``(now, epoch]`` in order and returns once all of them are delivered.
"""
from __future__ import annotations

import collections
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import msgspec
import tractor
import trio

from piker.log import get_logger
from piker.service import DaemonSpec, call_ctx, daemon_lifetime, maybe_spawn_daemon
from piker.service._spec import TIER_FEEDS

from ._timing import (
    PeriodError,
    boundaries_between,
    check_period,
    next_boundary,
    origin_for,
    row_position,
)
from ._types import Increment
from ._wire import send_whole

log = get_logger(__name__)

SAMPLERD = 'samplerd'
ClockKind = Literal['wall', 'driven']
CLOCKS = ('wall', 'driven')

# wall clock: owners open their rows this long before the boundary (a trade
# still lands in the row of its own timestamp, so early rows are harmless)...
OPEN_ROWS_LEAD_SECS = 0.020
# ...and increments leave this long before it: a tractor message takes 0.6-5 ms
# on a busy 2-core box, so clients get them early and release each at its
# boundary (``IncrementStream``) rather than milliseconds after it
SEND_LEAD_SECS = 0.008
WALL_OWNER_ACK_SECS = 0.5
DRIVEN_OWNER_ACK_SECS = 30.0
# a subscriber whose send blocks this long is dropped
SUBSCRIBER_SEND_SECS = 5.0


class SamplerError(RuntimeError):
    """samplerd cannot do what was asked (wrong clock, bad period)."""


class _Owner:
    """A buffer owner (datad) linked over one context stream."""

    def __init__(self, name: str, periods: set[int], stream: tractor.MsgStream) -> None:
        self.name = name
        self.periods = periods
        self.stream = stream
        self._acks: dict[float, trio.Event] = {}
        self.alive = True

    def acked(self, epoch: float) -> None:
        event = self._acks.pop(epoch, None)
        if event is not None:
            event.set()

    def gone(self) -> None:
        self.alive = False
        for event in self._acks.values():
            event.set()
        self._acks.clear()

    async def advance(self, epoch: float, periods: list[int], timeout_secs: float) -> bool:
        """Ask for rows (and, driven, events) up to ``epoch``; True once acked."""
        if not self.alive:
            return False
        event = self._acks[epoch] = trio.Event()
        try:
            await send_whole(self.stream, {'advance': epoch, 'periods': periods}, timeout_secs)
            with trio.move_on_after(timeout_secs):
                await event.wait()
                return self.alive
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                tractor._exceptions.TransportClosed):
            self.gone()
            return False
        finally:
            self._acks.pop(epoch, None)
        log.warning('sampler.owner_slow', owner=self.name, epoch=epoch,
                    timeout_secs=timeout_secs)
        return False


class _Subscriber:
    """One increment subscriber: a latest-per-period slot and a sender task."""

    def __init__(self, sid: int, periods: set[int]) -> None:
        self.sid = sid
        self.periods = periods
        self.pending: dict[int, Increment] = {}
        self.wake = trio.Event()
        self.idle = trio.Event()
        self.idle.set()
        self.dropped = False

    def offer(self, inc: Increment) -> None:
        if self.dropped:
            return
        self.pending[inc.period_secs] = inc
        self.wake.set()
        if self.idle.is_set():
            self.idle = trio.Event()

    async def run_sender(self, stream: tractor.MsgStream) -> None:
        """Send pending increments in boundary order until the peer fails."""
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            batch = sorted(self.pending.values(), key=lambda i: (i.epoch, i.period_secs))
            self.pending.clear()
            for inc in batch:
                try:
                    await send_whole(stream, msgspec.to_builtins(inc), SUBSCRIBER_SEND_SECS)
                except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                        tractor._exceptions.TransportClosed) as err:
                    self.drop(repr(err))
                    return
            if not self.pending:
                self.idle.set()

    def drop(self, reason: str) -> None:
        if not self.dropped:
            log.warning('sampler.subscriber_dropped', subscriber=self.sid, reason=reason)
        self.close()

    def close(self) -> None:
        self.dropped = True
        self.pending.clear()
        self.idle.set()


class Sampler:
    """samplerd's actor-global state."""

    def __init__(self, clock: ClockKind, start_epoch: float) -> None:
        self.clock = clock
        self._now_epoch = start_epoch
        self.origin_epoch = origin_for(start_epoch)
        self.owners: dict[int, _Owner] = {}
        self.subscribers: dict[int, _Subscriber] = {}
        self.boundaries = 0
        self.skipped = 0
        # wall clock, last 100 boundaries: how long before the boundary each
        # broadcast started, and how long the owners took to open their rows
        self.send_lead_secs: collections.deque[float] = collections.deque(maxlen=100)
        self.owner_ack_secs: collections.deque[float] = collections.deque(maxlen=100)
        self._next_id = 0
        self._changed = trio.Event()
        self._advance_lock = trio.Lock()

    # -- bookkeeping ------------------------------------------------------------

    def now_epoch(self) -> float:
        return time.time() if self.clock == 'wall' else self._now_epoch

    def periods(self) -> set[int]:
        out: set[int] = set()
        for owner in self.owners.values():
            out |= owner.periods
        for sub in self.subscribers.values():
            out |= sub.periods
        return out

    def changed(self) -> None:
        self._changed.set()

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def info(self) -> dict[str, Any]:
        return {
            'clock': self.clock,
            'now_epoch': self.now_epoch(),
            'origin_epoch': self.origin_epoch,
            'periods': sorted(self.periods()),
            'owners': sorted(o.name for o in self.owners.values()),
            'subscribers': len(self.subscribers),
            'boundaries': self.boundaries,
            'skipped': self.skipped,
            'send_lead_ms': [round(x * 1e3, 3) for x in self.send_lead_secs],
            'owner_ack_ms': [round(x * 1e3, 3) for x in self.owner_ack_secs],
        }

    # -- boundaries ---------------------------------------------------------------

    async def open_rows(self, epoch: float, periods: list[int]) -> None:
        """Every owner opens its rows of ``periods`` at ``epoch`` (driven: after
        publishing its events up to ``epoch``)."""
        driven = self.clock == 'driven'
        timeout = DRIVEN_OWNER_ACK_SECS if driven else WALL_OWNER_ACK_SECS
        async with trio.open_nursery() as n:
            for owner in list(self.owners.values()):
                mine = [p for p in periods if p in owner.periods]
                if mine or driven:
                    n.start_soon(owner.advance, epoch, mine, timeout)

    async def broadcast(self, epoch: int, periods: list[int]) -> None:
        """Hand the increments to subscribers; driven: wait until they are sent."""
        self.boundaries += 1
        offered: list[_Subscriber] = []
        for period in periods:
            inc = Increment(period_secs=period, epoch=epoch,
                            index=row_position(epoch, period, self.origin_epoch))
            for sub in list(self.subscribers.values()):
                if period in sub.periods:
                    sub.offer(inc)
                    offered.append(sub)
        if self.clock == 'driven':
            for sub in offered:
                await sub.idle.wait()

    async def process_boundary(self, epoch: int, periods: list[int]) -> None:
        await self.open_rows(epoch, periods)
        await self.broadcast(epoch, periods)

    async def advance_to(self, epoch: float) -> dict[str, Any]:
        if self.clock != 'driven':
            raise SamplerError(
                f"advance_to() needs samplerd's driven clock; this one runs {self.clock!r} "
                "(start samplerd with clock='driven')")
        async with self._advance_lock:
            count = 0
            for boundary, periods in boundaries_between(self._now_epoch, epoch, self.periods()):
                self._now_epoch = boundary
                await self.process_boundary(boundary, periods)
                count += 1
            if epoch > self._now_epoch:
                self._now_epoch = epoch
                async with trio.open_nursery() as n:
                    for owner in list(self.owners.values()):
                        n.start_soon(owner.advance, epoch, [], DRIVEN_OWNER_ACK_SECS)
            return {'now_epoch': self._now_epoch, 'boundaries': count}

    async def run_wall(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Sleep to each real boundary of the registered periods and process it."""
        task_status.started()
        last = 0
        while True:
            # boundaries are processed ahead of time: never the same one twice
            nxt = next_boundary(max(time.time(), last), self.periods())
            if nxt is None:
                await self._wait_changed(None)
                continue
            epoch = nxt[0]
            if not await self._sleep_until(epoch - OPEN_ROWS_LEAD_SECS):
                continue  # periods changed: recompute the next boundary
            periods = [p for p in sorted(self.periods()) if epoch % p == 0]
            if not periods:
                continue
            if last and epoch - last > min(periods):
                self.skipped += 1
                log.warning('sampler.boundary_late', epoch=epoch, previous=last)
            last = epoch
            t0 = time.time()
            await self.open_rows(epoch, periods)
            self.owner_ack_secs.append(time.time() - t0)
            early = epoch - SEND_LEAD_SECS - time.time()
            if early > 0:
                await trio.sleep(early)
            self.send_lead_secs.append(epoch - time.time())
            await self.broadcast(epoch, periods)

    async def _wait_changed(self, timeout_secs: float | None) -> bool:
        self._changed = trio.Event()
        with trio.move_on_after(timeout_secs if timeout_secs is not None else float('inf')):
            await self._changed.wait()
            return True
        return False

    async def _sleep_until(self, wall_epoch: float) -> bool:
        """Sleep until ``wall_epoch``; False if periods changed meanwhile."""
        delay = wall_epoch - time.time()
        return not (delay > 0 and await self._wait_changed(delay))


_sampler: Sampler | None = None


def _get() -> Sampler:
    if _sampler is None:
        raise SamplerError('samplerd is not running in this actor')
    return _sampler


# -- daemon-kind trio -----------------------------------------------------------------

@tractor.context
async def _setup_persistent_samplerd(ctx: tractor.Context, clock: ClockKind = 'wall',
                                     start_epoch: float | None = None) -> None:
    global _sampler
    async with daemon_lifetime(SAMPLERD) as nursery:
        sampler = _sampler = Sampler(clock, time.time() if start_epoch is None else start_epoch)
        try:
            if clock == 'wall':
                await nursery.start(sampler.run_wall)
            log.info('samplerd.ready', clock=clock, origin_epoch=sampler.origin_epoch)
            await ctx.started({'pid': os.getpid(), **sampler.info()})
            await trio.sleep_forever()
        finally:
            _sampler = None


class SamplerdCfg(msgspec.Struct, frozen=True, kw_only=True):
    clock: str = 'wall'
    start_epoch: float | None = None


def samplerd_init(clock: str = 'wall', start_epoch: float | None = None) -> DaemonSpec:
    if clock not in CLOCKS:
        raise SamplerError(f'samplerd clock must be one of {CLOCKS}, found {clock!r}')
    return DaemonSpec(
        name=SAMPLERD, kind=SAMPLERD,
        fixture='piker.data._sampler:_setup_persistent_samplerd',
        enable_modules=['piker.data._sampler'],
        config=SamplerdCfg(clock=clock, start_epoch=start_epoch),
        tier=TIER_FEEDS,
    )


@asynccontextmanager
async def maybe_spawn_samplerd(clock: str | None = None,
                               start_epoch: float | None = None,
                               ) -> AsyncIterator[tractor.Portal]:
    """Find-or-spawn samplerd. ``clock=None`` takes whichever runs (wall if none);
    an explicit clock must match the running one."""
    async with maybe_spawn_daemon('piker.data._sampler:samplerd_init',
                                  clock=clock or 'wall', start_epoch=start_epoch) as portal:
        if clock is not None:
            info = await call_ctx(portal, clock_info_ctx)
            if info['clock'] != clock:
                raise SamplerError(
                    f"samplerd already runs the {info['clock']!r} clock, {clock!r} was asked: "
                    'stop it (or the tree) first')
        yield portal


# -- RPC endpoints (run inside samplerd) ------------------------------------------------

async def clock_info() -> dict[str, Any]:
    return _get().info()


async def advance_to(epoch: float) -> dict[str, Any]:
    """Driven clock: process every boundary in ``(now, epoch]``, return when delivered."""
    return await _get().advance_to(epoch)


# context variants for callers that repeat them (a replay advances once per
# bar): tractor 0.1.0a5 keeps state for every Portal.run call forever
@tractor.context
async def advance_to_ctx(ctx: tractor.Context, epoch: float) -> None:
    await ctx.started(await advance_to(epoch))


@tractor.context
async def clock_info_ctx(ctx: tractor.Context) -> None:
    await ctx.started(await clock_info())


@tractor.context
async def register_owner(ctx: tractor.Context, name: str, periods: list[int]) -> None:
    """A datad links here as the owner of buffers of ``periods``.

    Messages: samplerd -> owner ``{'advance': epoch, 'periods': [...]}``;
    owner -> samplerd ``{'ack': epoch}`` and ``{'periods': [...]}`` updates.
    """
    sampler = _get()
    # the pid lets the owner notice a SIGKILLed samplerd (the stream never ends)
    await ctx.started({**sampler.info(), 'pid': os.getpid()})
    async with ctx.open_stream() as stream:
        owner = _Owner(name, {check_period(p) for p in periods}, stream)
        oid = sampler.new_id()
        sampler.owners[oid] = owner
        sampler.changed()
        log.info('sampler.owner_linked', owner=name, periods=sorted(owner.periods))
        try:
            async for msg in stream:
                match msg:
                    case {'ack': epoch}:
                        owner.acked(epoch)
                    case {'periods': list() as new}:
                        owner.periods = {check_period(p) for p in new}
                        sampler.changed()
                    case _:
                        log.warning('sampler.bad_owner_msg', owner=name, msg=repr(msg)[:200],
                                    expected="{'ack': epoch} or {'periods': [...]}")
        finally:
            owner.gone()
            sampler.owners.pop(oid, None)
            sampler.changed()
            log.info('sampler.owner_unlinked', owner=name)


@tractor.context
async def subscribe_increments(ctx: tractor.Context, periods: list[int]) -> None:
    """One subscriber's increments stream; ``started`` carries the clock info
    (or ``{'error': ...}`` for a bad period)."""
    sampler = _get()
    try:
        wanted = {check_period(p) for p in periods}
    except PeriodError as err:
        await ctx.started({'error': str(err)})
        return
    if not wanted:
        await ctx.started({'error': 'subscribe to at least one period'})
        return
    sub = _Subscriber(sampler.new_id(), wanted)
    sampler.subscribers[sub.sid] = sub
    sampler.changed()
    try:
        await ctx.started({**sampler.info(), 'pid': os.getpid()})
        async with ctx.open_stream() as stream:
            async with trio.open_nursery() as n:

                async def until_peer_closes() -> None:
                    async for _ in stream:
                        pass
                    n.cancel_scope.cancel()

                n.start_soon(until_peer_closes)
                await sub.run_sender(stream)
                n.cancel_scope.cancel()
    finally:
        sub.close()
        sampler.subscribers.pop(sub.sid, None)
        sampler.changed()
