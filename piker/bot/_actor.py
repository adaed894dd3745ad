"""``bot.<name>``: the strategy actor, one per ``[[strategies]]`` entry.

The actor is a thin async shell around the sync :class:`StrategyRunner`: it
turns samplerd increments, datad quotes and emsd statuses into runner calls,
and forwards the intents each call returns to emsd through a single sender
task (so they leave in the order the strategy made them, and a callback never
awaits IPC).

Two parts. Once, for the actor's life: load the strategy (a bad strategy or
bad params fail the spawn, before ``started``) and keep the runner. Then a
*session loop*, running beside it: open the EMS dialog (positions, open
orders, warm-up), the feed and the increments; trade; when any of them is
lost (an error, a stream that ends, a daemon pid that exits) log
``bot.link_lost``, tear the session down, wait with backoff and open a new
one. The strategy object stays the same: ``on_start`` runs in the first
session only. A reconnect settles the orders that were in flight by oid with
the broker side (never re-sending them), takes positions from the broker and
reports bars missed in the gap.

``started`` is reported once the first session attempt has an outcome
(``running``, ``waiting`` for a daemon, or ``failed`` for good) or after
``FIRST_SESSION_WAIT_SECS``, whichever is first. The phase (``connecting`` /
``waiting`` / ``running`` / ``stopped`` / ``failed``) and its reason are in
:func:`bot_summary`.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import numpy as np
import tractor
import trio

from ..clearing import Cancel, Order, OrderClient, open_ems
from ..config import BotCfg, ConfigError, StrategyCfg, parse_config
from ..data import ShmArray, open_feed, open_sample_stream
from ..log import bind_contextvars, bound_contextvars, get_logger
from ..service import DaemonSpec, daemon_lifetime
from ..service._spec import TIER_STRATEGY
from ._runner import StrategyRunner
from ._schedule import run_jobs

log = get_logger(__name__)

BOT_KIND = 'bot'
# how long a stopping strategy may take to hand its last intents to emsd
STOP_FLUSH_SECS = 5.0
# between session attempts: doubling from the first to the last, back to the
# first after a session that stayed up HEALTHY_SESSION_SECS
BACKOFF_FIRST_SECS = 0.25
BACKOFF_MAX_SECS = 5.0
HEALTHY_SESSION_SECS = 2.0
# `started` waits this long at most for the first session: in the normal case
# "the bot is up" still means "it can trade", but a bot whose daemons are down
# is up too (phase `waiting`), never a spawn that times out
FIRST_SESSION_WAIT_SECS = 15.0

Phase = Literal['connecting', 'waiting', 'running', 'stopped', 'failed']
T = TypeVar('T')

# error types no retry can fix: a config, a ledger, a route, a spec, a market
# name, a period or a backend that is wrong until an operator changes it
PERMANENT_ERRORS = ('ConfigError', 'LedgerError', 'RouteError', 'SpecError', 'FqmeError',
                    'PeriodError', 'BackendError')
_PERMANENT_RE = re.compile(r'\b(' + '|'.join(PERMANENT_ERRORS) + r')\b')


def is_permanent(error: BaseException | str) -> bool:
    """Is ``error`` a config-type error that retrying cannot fix?

    Such an error fails the strategy's session for good (phase ``failed``)
    instead of being retried. Errors from other actors arrive as text
    (tractor 0.1.0a5 boxes application exceptions by type *name*, and emsd
    reports broker dialog failures as strings), so the type name is matched in
    the text; a local exception also counts by its own type name.
    """
    if isinstance(error, str):
        return _PERMANENT_RE.search(error) is not None
    if isinstance(error, BaseExceptionGroup):
        return any(is_permanent(e) for e in error.exceptions)
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & set(PERMANENT_ERRORS)) or is_permanent(_describe(error))


def _describe(err: BaseException) -> str:
    """``Type: message`` of an error; the last line of a remote traceback."""
    msgdata = getattr(err, 'msgdata', None)
    if isinstance(msgdata, dict) and msgdata.get('tb_str'):
        lines = [ln.strip() for ln in msgdata['tb_str'].strip().splitlines() if ln.strip()]
        return lines[-1] if lines else str(msgdata.get('type_str'))
    if isinstance(err, BaseExceptionGroup):
        return '; '.join(_describe(e) for e in err.exceptions)
    return f'{type(err).__name__}: {err}'


class LinkLost(Exception):
    """A link of the session failed to open or was lost.

    ``link``: 'emsd', 'datad.<backend>' or 'samplerd'; ``reason``: the text
    the phase shows (``datad.sim unavailable: ...``)."""

    def __init__(self, link: str, reason: str, permanent: bool = False) -> None:
        super().__init__(reason)
        self.link = link
        self.reason = reason
        self.permanent = permanent


def _link_lost_in(err: BaseException) -> LinkLost | None:
    if isinstance(err, LinkLost):
        return err
    if isinstance(err, BaseExceptionGroup):
        for sub in err.exceptions:
            found = _link_lost_in(sub)
            if found is not None:
                return found
    return None


@asynccontextmanager
async def _link(name: str, cm: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """Enter ``cm`` (an open_* of a daemon); any error it raises, entering or
    leaving (``open_feed`` raises when datad's pid exits), becomes
    :class:`LinkLost` naming the link."""
    entered = False
    try:
        async with cm as value:
            entered = True
            yield value
    except Exception as err:
        lost = _link_lost_in(err)
        if lost is not None:
            raise lost from None
        what = 'lost' if entered else 'unavailable'
        raise LinkLost(name, f'{name} {what}: {_describe(err)}', is_permanent(err)) from err


class BarGaps:
    """Which increments reach the strategy across re-subscribes.

    An increment at or before the last delivered boundary is a duplicate
    (dropped); one more than a period after it means boundaries were missed
    (their count is returned, to be reported, never silently skipped).
    """

    def __init__(self, period_secs: int) -> None:
        self.period_secs = period_secs
        self.last_epoch: int | None = None

    def admit(self, epoch: int) -> tuple[bool, int]:
        """(deliver it?, boundaries missed before it)."""
        last = self.last_epoch
        if last is not None and epoch <= last:
            return False, 0
        missed = 0 if last is None else max((epoch - last) // self.period_secs - 1, 0)
        self.last_epoch = epoch
        return True, missed


class BotClock:
    """What ``ctx.now()`` reads: the wall clock, or under a driven samplerd the
    boundary of the latest increment (so replays and tests are deterministic)."""

    def __init__(self, driven: bool) -> None:
        self.driven = driven
        self.epoch: int | None = None

    def now(self) -> datetime:
        if self.driven and self.epoch is not None:
            return datetime.fromtimestamp(self.epoch, UTC)
        return datetime.now(UTC)


class BotState:
    """Actor-global state of one strategy actor (read by the RPC endpoints)."""

    def __init__(self, runner: StrategyRunner, scfg: StrategyCfg, cfg: BotCfg,
                 clock: BotClock) -> None:
        self.runner = runner
        self.scfg = scfg
        self.cfg = cfg
        self.clock = clock
        self.last_prices: dict[str, float] = {}
        self.warmed: list[str] = []
        self.increments = 0
        self.bars = BarGaps(scfg.timeframe_secs)
        self.intents_tx, self.intents_rx = trio.open_memory_channel[Order | Cancel](math.inf)
        # what a graceful stop needs
        self.stop_fn: Any = None
        self.stopped = False
        self.phase: Phase = 'connecting'
        self.reason = ''
        # the EMS dialog of the running session, if one runs
        self.ems: OrderClient | None = None
        self.sessions = 0
        self.lost_link: str | None = None
        # orders queued for emsd but not handed to it yet: never "in flight",
        # so never resolved against the broker as lost (see _sync_broker_side)
        self.unsent: set[str] = set()
        # the one sender task runs (a graceful stop then leaves sending to it)
        self.sender_alive = False
        self.sending = False
        # fills of other sources already applied to our positions
        self.others_fills: set[str] = set()
        # the session loop; shielded so a stopping actor can still flush to emsd
        self.sessions_scope = trio.CancelScope(shield=True)
        # set once the first session attempt has an outcome (running, waiting, failed)
        self.settled = trio.Event()

    def enqueue(self, intents: list[Order | Cancel]) -> None:
        for intent in intents:
            if isinstance(intent, Order):
                self.unsent.add(intent.oid)
            self.intents_tx.send_nowait(intent)

    def set_phase(self, phase: Phase, reason: str = '') -> None:
        if self.phase in ('stopped', 'failed') or (phase, reason) == (self.phase, self.reason):
            return
        level = log.warning if phase in ('waiting', 'failed') else log.info
        level('bot.phase', phase=phase, reason=reason, was=self.phase)
        self.phase, self.reason = phase, reason
        if phase != 'connecting':
            self.settled.set()


_state: BotState | None = None


def _closed_bars(shm: ShmArray, inc_index: int) -> np.ndarray:
    """Zero-copy view of every bar before row ``inc_index`` (the just-opened one)."""
    arr = shm.array
    if len(arr) == 0:
        return arr
    stop = inc_index - int(arr['index'][0])
    return arr[: max(stop, 0)]


def _price_of(quote: dict[str, Any]) -> float | None:
    last = quote.get('last')
    if last:
        return float(last)
    bid, ask = quote.get('bid'), quote.get('ask')
    if bid and ask:
        return (float(bid) + float(ask)) / 2
    return None


@tractor.context
async def _setup_persistent_bot(
    ctx: tractor.Context,
    strategy_cfg: dict[str, Any],
    bot_cfg: dict[str, Any],
    strategies_dir: str,
    index: int = 0,
    clock: str = 'wall',
) -> None:
    global _state
    async with daemon_lifetime(BOT_KIND) as nursery:
        scfg = msgspec.convert(strategy_cfg, StrategyCfg)
        cfg: BotCfg = parse_config(bot_cfg, source='bot.toml')
        bind_contextvars(strategy=scfg.name)
        bot_clock = BotClock(driven=clock == 'driven')
        # a bad strategy or bad params fail here, before `started`
        runner = StrategyRunner.from_cfg(scfg, Path(strategies_dir), clock=bot_clock.now,
                                         index=index)
        state = _state = BotState(runner, scfg, cfg, bot_clock)
        if scfg.schedule.jobs:
            # bad cron fields fail the startup, before `started`
            await nursery.start(partial(
                run_jobs, scfg.schedule.jobs,
                lambda job: state.enqueue(runner.run_job(job)),
                now_fn=bot_clock.now,
                where=f'$.strategies[{index}].schedule.jobs',
            ))

        async def stop(wait_acks: bool = True) -> None:
            if not state.stopped:
                state.stopped = True
                await _graceful_stop(state, wait_acks=wait_acks)
                state.set_phase('stopped')

        state.stop_fn = stop
        nursery.start_soon(_run_sessions, state)
        try:
            with trio.move_on_after(FIRST_SESSION_WAIT_SECS):
                await state.settled.wait()
            await ctx.started({'pid': os.getpid(), 'warmed': state.warmed,
                               'phase': state.phase, 'reason': state.reason})
            await trio.sleep_forever()
        finally:
            try:
                with trio.CancelScope(shield=True):
                    await stop(wait_acks=False)
            finally:
                state.sessions_scope.cancel()


async def _run_sessions(state: BotState) -> None:
    """Open sessions until the strategy stops, or an error no retry can fix."""
    backoff = BACKOFF_FIRST_SECS
    with state.sessions_scope:
        while not state.stopped:
            began = trio.current_time()
            established = state.sessions
            try:
                await _session(state)
                lost = LinkLost('bot', 'the session ended')
            except LinkLost as err:
                lost = err
            state.ems = None
            was_up = state.sessions > established
            if was_up:
                state.lost_link = lost.link
                log.warning('bot.link_lost', link=lost.link, reason=lost.reason,
                            session_secs=round(trio.current_time() - began, 3))
                _keep_unsent(state, f'not sent: the session was lost ({lost.reason})')
                if trio.current_time() - began >= HEALTHY_SESSION_SECS:
                    backoff = BACKOFF_FIRST_SECS
            if lost.permanent:
                state.set_phase('failed', lost.reason)
                log.error('bot.failed', reason=lost.reason,
                          hint='fix the configuration, then restart the bot')
                return
            if state.stopped:
                return
            state.set_phase('connecting' if was_up else 'waiting', lost.reason)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_SECS)


def _keep_unsent(state: BotState, reason: str) -> None:
    """Intents still queued when a session ends: see ``StrategyRunner.unsent``."""
    queued: list[Order | Cancel] = []
    while True:
        try:
            queued.append(state.intents_rx.receive_nowait())
        except trio.WouldBlock:
            break
    state.unsent.difference_update(i.oid for i in queued if isinstance(i, Order))
    kept = state.runner.unsent(queued, reason)
    if queued:
        log.info('bot.intents_held', queued=len(queued), kept=len(kept))
    state.enqueue(kept)


async def _session(state: BotState) -> None:
    """One session: returns never; raises :class:`LinkLost` when it ends."""
    scfg, cfg, runner = state.scfg, state.cfg, state.runner
    tf = scfg.timeframe_secs
    async with _link('emsd', open_ems(
        mode=cfg.mode,
        backend_cfgs=msgspec.to_builtins(cfg.brokers),
        risk_cfg=msgspec.to_builtins(cfg.risk),
        paper_cfg=msgspec.to_builtins(cfg.paper),
        account=scfg.account,
        source=scfg.name,
        backends=[cfg.backend],
    )) as ems:
        if ems.errors:
            text = f'broker dialog failed: {ems.errors}'
            raise LinkLost('emsd', text, is_permanent(text))
        to_warm = sorted({*scfg.markets, *(p.fqme for p in ems.start_positions
                                           if p.size and p.account == scfg.account)})
        state.warmed = list(await ems.warm(to_warm))
        log.info('bot.warmed', markets=state.warmed)
        async with _link(f'datad.{cfg.backend}', open_feed(
            list(scfg.markets),
            backend_cfg=msgspec.to_builtins(getattr(cfg.brokers, cfg.backend)),
            timeframes=[tf],
        )) as feed:
            shms = {fqme: feed.attach(fqme, tf) for fqme in scfg.markets}
            for fqme, quote in feed.first_quotes.items():
                price = _price_of(quote)
                if price is not None:
                    state.last_prices[fqme] = price
            async with _link('samplerd', open_sample_stream(tf)) as increments:
                await _sync_broker_side(state, ems)
                first = state.sessions == 0
                state.sessions += 1
                if first:
                    state.enqueue(runner.start())
                    log.info('bot.started', markets=list(scfg.markets), timeframe_secs=tf,
                             mode=cfg.mode)
                else:
                    log.info('bot.reconnected', sessions=state.sessions,
                             open_orders=len(runner.ctx.open_orders()),
                             positions=dict(runner.ctx._positions))
                state.ems = ems
                state.set_phase('running')
                async with trio.open_nursery() as n:
                    n.start_soon(_send_intents, ems, state)
                    n.start_soon(_on_increments, increments, shms, state, cfg.backend)
                    n.start_soon(_on_quotes, feed, state, cfg.backend)
                    n.start_soon(_on_statuses, ems, state)


async def _sync_broker_side(state: BotState, ems: OrderClient) -> None:
    """What the broker side says, before anything trades: our working
    orders, what became of our other open orders (by oid, nothing re-sent),
    then the positions of our markets."""
    runner, name = state.runner, state.scfg.name
    working = [s for s in ems.open_orders if s.source == name]
    for status in working:
        runner.sync_order(status)
    listed = {s.oid for s in working}
    asked = {o.oid: o.fqme for o in runner.ctx.open_orders()
             if o.oid not in listed and o.oid not in state.unsent}
    if asked:
        reply = await ems.resolve(asked)
        why = ('lost in flight when emsd died; not re-sent' if state.lost_link == 'emsd'
               else f'lost in flight when {state.lost_link} was lost; not re-sent')
        log.info('bot.resolved', asked=len(asked), known=len(reply.statuses),
                 fills=len(reply.fills), unknown=len(reply.unknown),
                 undecided=len(reply.undecided))
        state.enqueue(runner.resolve(list(asked), reply.statuses, reply.fills, why,
                                     undecided=reply.undecided))
    # the broker's positions as the dialog opened: every fill above is in them
    for fqme in state.scfg.markets:
        runner.sync_position(fqme, ems.start_position(fqme, state.scfg.account))
    state.enqueue(runner.cancels_to_resend())


async def _send_intents(ems: OrderClient, state: BotState) -> None:
    """The one task that hands intents to emsd, in the order they were made."""
    state.sender_alive = True
    try:
        async for intent in state.intents_rx:
            state.sending = True
            try:
                await _send_one(ems, intent, state)
            except (trio.BrokenResourceError, trio.ClosedResourceError,
                    tractor._exceptions.TransportClosed) as err:
                raise LinkLost('emsd', f'emsd lost: {_describe(err)}') from err
            finally:
                state.sending = False
    finally:
        state.sender_alive = False


async def _send_one(ems: Any, intent: Order | Cancel, state: BotState) -> None:
    match intent:
        case Order():
            # from here on it may reach emsd: a lost link resolves it by oid
            state.unsent.discard(intent.oid)
            log.info('order.send', oid=intent.oid, fqme=intent.fqme, action=intent.action,
                     size=intent.size, kind=intent.kind, price=intent.price)
            await ems.send(intent)
        case Cancel():
            log.info('order.cancel', oid=intent.oid)
            await ems.cancel(intent.oid)


async def _on_increments(increments: Any, shms: dict[str, ShmArray], state: BotState,
                         backend: str) -> None:
    tf = state.scfg.timeframe_secs
    async for inc in increments:
        last = state.bars.last_epoch
        deliver, missed = state.bars.admit(inc.epoch)
        if not deliver:
            log.info('bot.bar_duplicate', epoch=inc.epoch, last_epoch=last)
            continue
        if missed:
            assert last is not None
            log.warning('bot.bars_missed', count=missed, last_epoch=last, epoch=inc.epoch,
                        first_missed_epoch=last + tf, last_missed_epoch=inc.epoch - tf,
                        timeframe_secs=tf)
        state.clock.epoch = inc.epoch
        state.increments += 1
        for fqme, shm in shms.items():
            bars = _closed_bars(shm, inc.index)
            if len(bars):
                state.enqueue(state.runner.bar_closed(fqme, bars))
    raise LinkLost('samplerd', 'samplerd lost: the increment stream ended')


async def _on_quotes(feed: Any, state: BotState, backend: str) -> None:
    markets = set(state.runner.ctx.markets)
    async for batch in feed.stream:  # a list of quote dicts, oldest first
        for quote in batch:
            fqme = quote['fqme']
            if fqme not in markets:
                continue
            price = _price_of(quote)
            if price is not None:
                state.last_prices[fqme] = price
            state.enqueue(state.runner.quote(fqme, quote))
    raise LinkLost(f'datad.{backend}', f'datad.{backend} lost: the quote stream ended')


async def _on_statuses(ems: OrderClient, state: BotState) -> None:
    runner = state.runner
    name = runner.name
    ctx = runner.ctx
    async for status in ems.statuses:
        if status.source and status.source != name:
            # someone else's order (an operator flatten, a cron job of another
            # strategy) moved this account's position in one of our markets
            if (status.fill_size and status.fqme in ctx.markets
                    and status.account == ctx.account
                    and status.fill_id not in state.others_fills):
                state.others_fills.add(status.fill_id or f'{status.oid}:{status.filled}')
                signed = status.fill_size if status.action == 'buy' else -status.fill_size
                runner.sync_position(status.fqme, ctx.position(status.fqme) + signed)
                log.info('position.external_fill', fqme=status.fqme, source=status.source,
                         size=signed, position=ctx.position(status.fqme))
            continue
        if status.state in ('rejected', 'error'):
            log.warning('order.' + status.state, oid=status.oid, reason=status.reason,
                        code=status.code)
        elif status.fill_size:
            log.info('order.fill', oid=status.oid, fqme=status.fqme,
                     size=status.fill_size, price=status.fill_price, state=status.state)
        state.enqueue(runner.order_status(status))
    raise LinkLost('emsd', 'emsd lost: the status stream ended')


async def _graceful_stop(state: BotState, wait_acks: bool = True) -> None:
    """on_stop, then the configured stop policy; hand what is left to emsd
    (when a session runs: without one it is logged as unsent)."""
    scfg, runner = state.scfg, state.runner
    state.enqueue(runner.stop())
    if scfg.on_stop in ('cancel', 'cancel_and_flatten'):
        for order in runner.ctx.open_orders():
            runner.ctx.cancel(order.oid)
    if scfg.on_stop == 'cancel_and_flatten':
        runner.ctx.flatten()
    state.enqueue(runner.ctx.drain_intents())
    ems = state.ems
    with trio.move_on_after(STOP_FLUSH_SECS) as cs:
        # one consumer at a time, so intents leave in the order they were made:
        # the session's sender when it runs, else this task
        while ems is not None and state.sender_alive and (
                state.sending or state.intents_rx.statistics().current_buffer_used):
            await trio.sleep(0.005)
        while ems is not None and not state.sender_alive:
            try:
                intent = state.intents_rx.receive_nowait()
            except trio.WouldBlock:
                break
            try:
                await _send_one(ems, intent, state)
            except Exception as err:
                log.error('bot.stop_flush_failed', error=_describe(err))
                ems = None
    if cs.cancelled_caught:
        log.error('bot.stop_flush_timeout', secs=STOP_FLUSH_SECS)
    left = state.intents_rx.statistics().current_buffer_used
    if left:
        log.error('bot.stop_unsent', count=left, reason=state.reason or 'no session to emsd',
                  hint='check `piker bot status` for orders still working')
    # let emsd's answers to those cancels land, so the summary is final
    with trio.move_on_after(STOP_FLUSH_SECS if wait_acks and ems is not None else 0):
        while runner.ctx.open_orders():
            await trio.sleep(0.05)
    log.info('bot.stopped', summary=runner.summary().line())


# -- daemon-kind trio -------------------------------------------------------------

class BotDaemonCfg(msgspec.Struct, frozen=True, kw_only=True):
    """A strategy actor's config as pikerd keeps it (fields = the fixture's kwargs)."""
    strategy_cfg: StrategyCfg
    bot_cfg: BotCfg
    strategies_dir: str
    index: int = 0
    clock: str = 'wall'


def bot_init(strategy_cfg: dict[str, Any], bot_cfg: dict[str, Any], strategies_dir: str,
             index: int = 0, clock: str = 'wall') -> DaemonSpec:
    try:
        scfg = msgspec.convert(strategy_cfg, StrategyCfg)
    except msgspec.ValidationError as err:
        raise ConfigError(f'bot.toml [[strategies]][{index}]: {err}') from None
    return DaemonSpec(
        name=f'{BOT_KIND}.{scfg.name}', kind=BOT_KIND,
        fixture='piker.bot._actor:_setup_persistent_bot',
        enable_modules=['piker.bot._actor'],
        config=BotDaemonCfg(strategy_cfg=scfg, bot_cfg=parse_config(bot_cfg, source='bot.toml'),
                            strategies_dir=strategies_dir, index=index, clock=clock),
        tier=TIER_STRATEGY,
    )


# -- RPC ----------------------------------------------------------------------------

async def stop_strategy() -> dict[str, Any]:
    """Stop the strategy now (on_stop, then its stop policy; intents flushed to
    emsd) and return its final summary; the actor itself stays up until
    pikerd cancels it."""
    if _state is None or _state.stop_fn is None:
        raise RuntimeError('no running strategy in this actor')
    with bound_contextvars(strategy=_state.runner.name), trio.CancelScope(shield=True):
        await _state.stop_fn()
    return await bot_summary()


@tractor.context
async def summary_snapshot(ctx: tractor.Context) -> None:
    """:func:`bot_summary` for periodic callers (see ``service.call_ctx``)."""
    await ctx.started(await bot_summary())


async def bot_summary() -> dict[str, Any]:
    """The runner's summary plus the actor's view: last prices, warmed
    markets, increments seen, and the session ``phase`` with its ``reason``
    (``waiting`` + ``datad.sim unavailable: ...``) and ``sessions`` opened."""
    if _state is None:
        raise RuntimeError('no strategy runs in this actor')
    summary = msgspec.to_builtins(_state.runner.summary())
    summary['last_prices'] = dict(_state.last_prices)
    summary['warmed'] = list(_state.warmed)
    summary['increments'] = _state.increments
    summary['phase'] = _state.phase
    summary['reason'] = _state.reason
    summary['sessions'] = _state.sessions
    return summary
