"""``bot.<name>``: the strategy actor, one per ``[[strategies]]`` entry.

The actor is a thin async shell around the sync :class:`StrategyRunner`: it
turns samplerd increments, datad quotes and emsd statuses into runner calls,
and forwards the intents each call returns to emsd through a single sender
task (so they leave in the order the strategy made them, and a callback never
awaits IPC).

Startup, before the first callback: open the EMS dialog, load positions and
open orders, ask the broker side to warm its caches for every open position
and configured market, subscribe to quotes and increments. The lifetime
fixture reports ``started`` only then, so "the bot is up" means "it can trade".
"""
from __future__ import annotations

import math
import os
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import tractor
import trio

from ..clearing import Cancel, Order, open_ems
from ..config import BotCfg, StrategyCfg, parse_config
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

    def __init__(self, runner: StrategyRunner) -> None:
        self.runner = runner
        self.last_prices: dict[str, float] = {}
        self.warmed: list[str] = []
        self.increments = 0
        # set once startup finished: what a graceful stop needs
        self.stop_fn: Any = None
        self.stopped = False


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
        runner = StrategyRunner.from_cfg(scfg, Path(strategies_dir), clock=bot_clock.now,
                                         index=index)
        state = _state = BotState(runner)
        tf = scfg.timeframe_secs
        intents_tx, intents_rx = trio.open_memory_channel[Order | Cancel](math.inf)

        def enqueue(intents: list[Order | Cancel]) -> None:
            for intent in intents:
                intents_tx.send_nowait(intent)

        async with open_ems(
            mode=cfg.mode,
            backend_cfgs=msgspec.to_builtins(cfg.brokers),
            risk_cfg=msgspec.to_builtins(cfg.risk),
            paper_cfg=msgspec.to_builtins(cfg.paper),
            account=scfg.account,
            source=scfg.name,
            backends=[cfg.backend],
        ) as ems:
            if ems.errors:
                raise RuntimeError(f'broker dialog failed: {ems.errors}')
            for pos in ems.positions:
                if pos.fqme in scfg.markets:
                    runner.sync_position(pos.fqme, pos.size)
            for status in ems.open_orders:
                if status.source == scfg.name:
                    runner.sync_order(status)
            to_warm = sorted({*scfg.markets, *(p.fqme for p in ems.positions if p.size)})
            state.warmed = list(await ems.warm(to_warm))
            log.info('bot.warmed', markets=state.warmed)

            async with open_feed(
                list(scfg.markets),
                backend_cfg=msgspec.to_builtins(getattr(cfg.brokers, cfg.backend)),
                timeframes=[tf],
            ) as feed:
                shms = {fqme: feed.attach(fqme, tf) for fqme in scfg.markets}
                for fqme, quote in feed.first_quotes.items():
                    price = _price_of(quote)
                    if price is not None:
                        state.last_prices[fqme] = price
                async with open_sample_stream(tf) as increments:
                    nursery.start_soon(_send_intents, ems, intents_rx)
                    if scfg.schedule.jobs:
                        # bad cron fields fail the startup, before `started`
                        await nursery.start(partial(
                            run_jobs, scfg.schedule.jobs,
                            lambda job: enqueue(runner.run_job(job)),
                            now_fn=bot_clock.now,
                            where=f'$.strategies[{index}].schedule.jobs',
                        ))
                    enqueue(runner.start())
                    log.info('bot.started', markets=list(scfg.markets), timeframe_secs=tf,
                             mode=cfg.mode)
                    await ctx.started({'pid': os.getpid(), 'warmed': state.warmed})
                    nursery.start_soon(_on_increments, increments, shms, state, bot_clock,
                                       enqueue)
                    nursery.start_soon(_on_quotes, feed, state, enqueue)
                    nursery.start_soon(_on_statuses, ems, state, enqueue)
                    async def stop(wait_acks: bool = True) -> None:
                        if not state.stopped:
                            state.stopped = True
                            await _graceful_stop(scfg, runner, ems, intents_rx, enqueue,
                                                 wait_acks=wait_acks)

                    state.stop_fn = stop
                    try:
                        await trio.sleep_forever()
                    finally:
                        with trio.CancelScope(shield=True):
                            # the status task is gone by now: nothing to wait for
                            await stop(wait_acks=False)


async def _send_intents(ems: Any, intents: trio.MemoryReceiveChannel[Order | Cancel]) -> None:
    async for intent in intents:
        await _send_one(ems, intent)


async def _send_one(ems: Any, intent: Order | Cancel) -> None:
    match intent:
        case Order():
            log.info('order.send', oid=intent.oid, fqme=intent.fqme, action=intent.action,
                     size=intent.size, kind=intent.kind, price=intent.price)
            await ems.send(intent)
        case Cancel():
            log.info('order.cancel', oid=intent.oid)
            await ems.cancel(intent.oid)


async def _on_increments(increments: Any, shms: dict[str, ShmArray], state: BotState,
                         clock: BotClock, enqueue: Any) -> None:
    async for inc in increments:
        clock.epoch = inc.epoch
        state.increments += 1
        for fqme, shm in shms.items():
            bars = _closed_bars(shm, inc.index)
            if len(bars):
                enqueue(state.runner.bar_closed(fqme, bars))


async def _on_quotes(feed: Any, state: BotState, enqueue: Any) -> None:
    markets = set(state.runner.ctx.markets)
    async for batch in feed.stream:  # a list of quote dicts, oldest first
        for quote in batch:
            fqme = quote['fqme']
            if fqme not in markets:
                continue
            price = _price_of(quote)
            if price is not None:
                state.last_prices[fqme] = price
            enqueue(state.runner.quote(fqme, quote))


async def _on_statuses(ems: Any, state: BotState, enqueue: Any) -> None:
    name = state.runner.name
    ctx = state.runner.ctx
    others_fills: set[str] = set()
    async for status in ems.statuses:
        if status.source and status.source != name:
            # someone else's order (an operator flatten, a cron job of another
            # strategy) moved this account's position in one of our markets
            if (status.fill_size and status.fqme in ctx.markets
                    and status.account == ctx.account
                    and status.fill_id not in others_fills):
                others_fills.add(status.fill_id or f'{status.oid}:{status.filled}')
                signed = status.fill_size if status.action == 'buy' else -status.fill_size
                state.runner.sync_position(status.fqme, ctx.position(status.fqme) + signed)
                log.info('position.external_fill', fqme=status.fqme, source=status.source,
                         size=signed, position=ctx.position(status.fqme))
            continue
        if status.state in ('rejected', 'error'):
            log.warning('order.' + status.state, oid=status.oid, reason=status.reason,
                        code=status.code)
        elif status.fill_size:
            log.info('order.fill', oid=status.oid, fqme=status.fqme,
                     size=status.fill_size, price=status.fill_price, state=status.state)
        enqueue(state.runner.order_status(status))


async def _graceful_stop(scfg: StrategyCfg, runner: StrategyRunner, ems: Any,
                         intents_rx: trio.MemoryReceiveChannel[Order | Cancel],
                         enqueue: Any, wait_acks: bool = True) -> None:
    """on_stop, then the configured stop policy; hand what is left to emsd."""
    enqueue(runner.stop())
    if scfg.on_stop in ('cancel', 'cancel_and_flatten'):
        for order in runner.ctx.open_orders():
            runner.ctx.cancel(order.oid)
    if scfg.on_stop == 'cancel_and_flatten':
        runner.ctx.flatten()
    enqueue(runner.ctx.drain_intents())
    with trio.move_on_after(STOP_FLUSH_SECS) as cs:
        while True:
            try:
                intent = intents_rx.receive_nowait()
            except trio.WouldBlock:
                break
            await _send_one(ems, intent)
    if cs.cancelled_caught:
        log.error('bot.stop_flush_timeout', secs=STOP_FLUSH_SECS)
    # let emsd's answers to those cancels land, so the summary is final
    with trio.move_on_after(STOP_FLUSH_SECS if wait_acks else 0):
        while runner.ctx.open_orders():
            await trio.sleep(0.05)
    log.info('bot.stopped', summary=runner.summary().line())


# -- daemon-kind trio -------------------------------------------------------------

def bot_init(strategy_cfg: dict[str, Any], bot_cfg: dict[str, Any], strategies_dir: str,
             index: int = 0, clock: str = 'wall') -> DaemonSpec:
    return DaemonSpec(
        name=f"{BOT_KIND}.{strategy_cfg['name']}", kind=BOT_KIND,
        fixture='piker.bot._actor:_setup_persistent_bot',
        enable_modules=['piker.bot._actor'],
        fixture_kwargs={'strategy_cfg': strategy_cfg, 'bot_cfg': bot_cfg,
                        'strategies_dir': strategies_dir, 'index': index, 'clock': clock},
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
    if _state is None:
        raise RuntimeError('no strategy runs in this actor')
    summary = msgspec.to_builtins(_state.runner.summary())
    summary['last_prices'] = dict(_state.last_prices)
    summary['warmed'] = list(_state.warmed)
    summary['increments'] = _state.increments
    return summary
