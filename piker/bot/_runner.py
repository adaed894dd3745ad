"""Drive one strategy: feed it events, contain its failures, gate its intents.

:class:`StrategyRunner` is the sync core of a strategy actor. The actor shell
turns samplerd increments, quotes and emsd messages into calls on the runner and
sends whatever each call returns to emsd. Nothing here awaits, so the whole
lifecycle (including the on-error policy and the trading-window gate) is tested
by feeding events directly.

A strategy exception never propagates: it is logged with its context, the runner
becomes ``failed``, the ``on_error`` policy's intents are returned, and later events
only update bookkeeping (positions, open orders), never the strategy.
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np

from piker.clearing._messages import TERMINAL_STATES, BrokerdFill, Cancel, Order, Status
from piker.config import CronJobCfg, StrategyCfg
from piker.log import get_logger
from piker.types import Struct

from ._loader import build_params, load_strategy
from ._schedule import TradingWindow
from ._strategy import Intent, Strategy, StrategyContext

log = get_logger(__name__)

RunnerState = Literal['new', 'running', 'stopped', 'failed']
OnError = Literal['cancel', 'cancel_and_flatten', 'leave']


class RunnerSummary(Struct, frozen=True):
    """Counts for health/STATUS lines and the end-of-run report."""
    strategy: str
    state: RunnerState
    error: str | None
    orders_sent: int
    orders_dropped: int
    cancels_sent: int
    fills: int
    open_orders: int
    positions: dict[str, float]

    def line(self) -> str:
        pos = ' '.join(f'{k}={v:+g}' for k, v in self.positions.items() if v) or 'flat'
        err = f' ({self.error})' if self.error else ''
        return (
            f'{self.strategy}: {self.state}{err} | orders {self.orders_sent} '
            f'(dropped {self.orders_dropped}) | fills {self.fills} | {pos}'
        )


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _bar_time_iso(bars: np.ndarray) -> str | None:
    if len(bars) == 0:
        return None
    return datetime.fromtimestamp(int(bars['time'][-1]), UTC).isoformat()


class StrategyRunner:
    """Owns one :class:`Strategy` and its :class:`StrategyContext`.

    Every event method returns the intents to send to emsd, in order. Before
    :meth:`start`, seed state with :meth:`sync_position` / :meth:`sync_order`.
    """

    def __init__(
        self,
        strategy: Strategy,
        ctx: StrategyContext,
        *,
        on_error: OnError = 'cancel',
        window: TradingWindow | None = None,
    ) -> None:
        self.strategy = strategy
        self.ctx = ctx
        self.on_error = on_error
        self.window = window
        self.state: RunnerState = 'new'
        self.error: BaseException | None = None
        # set by a `halt` cron job: new orders are dropped until `resume`
        self.halted = False
        self._orders_sent = 0
        self._orders_dropped = 0
        self._cancels_sent = 0
        self._fills = 0

    @classmethod
    def from_cfg(
        cls,
        cfg: StrategyCfg,
        strategies_dir: Path,
        *,
        clock: Callable[[], datetime] = _utc_now,
        index: int = 0,
    ) -> StrategyRunner:
        """Load, configure and wire the strategy of one ``[[strategies]]`` entry."""
        strategy_cls = load_strategy(cfg.strategy, strategies_dir)
        params = build_params(strategy_cls, cfg.params, cfg.name)
        window = None
        if cfg.schedule.window is not None:
            window = TradingWindow.from_cfg(
                cfg.schedule.window, f'$.strategies[{index}].schedule.window',
            )
        ctx = StrategyContext(
            cfg.name, markets=cfg.markets, account=cfg.account,
            timeframe_secs=cfg.timeframe_secs, clock=clock,
        )
        return cls(strategy_cls(params), ctx, on_error=cfg.on_error, window=window)

    @property
    def name(self) -> str:
        return self.ctx.name

    @property
    def failed(self) -> bool:
        return self.state == 'failed'

    # -- startup sync ---------------------------------------------------------

    def sync_position(self, fqme: str, size: float) -> None:
        """The position emsd reports at dialog open."""
        self.ctx._set_position(fqme, size)

    def sync_order(self, status: Status) -> None:
        """An open order emsd reports at dialog open."""
        if self._known_market(status.fqme, 'order.sync_unknown_market', oid=status.oid):
            self.ctx._apply_status(status)

    # -- events -------------------------------------------------------------

    def start(self) -> list[Intent]:
        if self.state != 'new':
            raise RuntimeError(f'runner {self.name!r}: start() in state {self.state!r}')
        self.state = 'running'
        log.info('strategy.start', strategy=self.name, markets=list(self.ctx.markets),
                 window=self.window.describe() if self.window else None)
        return self._call('on_start')

    def bar_closed(self, fqme: str, bars: np.ndarray) -> list[Intent]:
        """``bars``: closed bars only (no live row), last row just closed; the
        strategy gets a read-only view of the same memory."""
        if len(bars) == 0:
            raise ValueError(f'bar_closed({fqme!r}): expected at least one closed bar, got none')
        view = self.ctx._set_bars(fqme, bars)
        return self._call('on_bar', fqme, view, fqme=fqme, bar_time=_bar_time_iso(view))

    def quote(self, fqme: str, quote: Any) -> list[Intent]:
        self.ctx._check_market(fqme)
        return self._call('on_quote', fqme, quote, fqme=fqme)

    def order_status(self, status: Status) -> list[Intent]:
        """A :class:`Status` from emsd; a fill it carries is applied (once) as well."""
        if not self._known_market(status.fqme, 'order.status_unknown_market', oid=status.oid):
            return []
        fill = self._fill_from_status(status)
        self.ctx._apply_status(status)
        out: list[Intent] = []
        if fill is not None and self.ctx._apply_fill(fill):
            self._fills += 1
            out += self._call('on_fill', fill, fqme=fill.fqme)
        out += self._call('on_order', status, fqme=status.fqme or None)
        return out

    def fill(self, fill: BrokerdFill) -> list[Intent]:
        """A fill; duplicates (same ``fill_id``, e.g. also seen in a Status) are ignored."""
        if not self._known_market(fill.fqme, 'fill.unknown_market', oid=fill.oid):
            return []
        if not self.ctx._apply_fill(fill):
            return []
        self._fills += 1
        return self._call('on_fill', fill, fqme=fill.fqme)

    # -- reconnects (the actor's session loop) ---------------------------------

    def unsent(self, queued: list[Intent], reason: str) -> list[Intent]:
        """Intents still queued when the link to emsd was lost: which to keep.

        Flattening orders are kept (they only reduce risk, e.g. a cron
        flatten). Other new orders were decided against a market that moved
        on: they are dropped, and the strategy hears ``canceled`` with
        ``reason``. Cancels are dropped too: :meth:`cancels_to_resend` asks
        again for every open order once the link is back. Returns what to send
        on the next session (kept intents, then what the callbacks made).
        """
        keep: list[Intent] = []
        dropped: list[Order] = []
        for msg in queued:
            if isinstance(msg, Order) and self.ctx._is_flatten(msg.oid):
                keep.append(msg)
            elif isinstance(msg, Order):
                dropped.append(msg)
        out: list[Intent] = []
        for order in dropped:
            out += self.order_status(Status(
                oid=order.oid, state='canceled', fqme=order.fqme, account=order.account,
                action=order.action, size=order.size, remaining=order.size, reason=reason,
                source=order.source, ts_ns=order.ts_ns,
            ))
        if dropped:
            log.warning('order.not_sent', strategy=self.name, count=len(dropped),
                        oids=[o.oid for o in dropped], reason=reason)
        return keep + out

    def resolve(
        self,
        asked: list[str],
        working: list[Status],
        fills: list[BrokerdFill],
        reason: str,
        undecided: dict[str, str] | None = None,
    ) -> list[Intent]:
        """Settle orders that were in flight when the link to emsd was lost,
        from what the broker side reports by oid; nothing is sent again.

        ``fills`` are applied once each (``on_fill``; known fill ids are
        ignored), ``working`` statuses update their orders (terminal ones
        reach ``on_order``). An asked order still open after that never
        reached a broker, or ended there unfilled: it becomes ``error`` with
        ``reason`` (``canceled`` when partly filled). ``undecided`` ones stay
        open (the broker could not tell; asked again on the next reconnect).
        """
        out: list[Intent] = []
        for fill in fills:
            out += self.fill(fill)
        still_working: set[str] = set()
        for status in working:
            if status.state in TERMINAL_STATES:
                out += self.order_status(status)
            else:
                still_working.add(status.oid)
                self.sync_order(status)
        pending = set(undecided or {})
        open_now = {o.oid: o for o in self.ctx.open_orders()}
        for oid in asked:
            order = open_now.get(oid)
            if order is None or oid in still_working or oid in pending:
                continue
            state = 'canceled' if order.filled else 'error'
            log.warning('order.lost', strategy=self.name, oid=oid, fqme=order.fqme,
                        filled=order.filled, state=state, reason=reason)
            out += self.order_status(Status(
                oid=oid, state=state, fqme=order.fqme, account=self.ctx.account,  # type: ignore[arg-type]
                action=order.action, size=order.size, filled=order.filled,
                remaining=order.remaining, reason=reason, source=self.name,
            ))
        for oid, why in (undecided or {}).items():
            log.warning('order.undecided', strategy=self.name, oid=oid, reason=why)
        return out

    def cancels_to_resend(self) -> list[Intent]:
        """A Cancel for every open order the strategy asked to cancel: the
        first may have been lost with the link (a second one is harmless)."""
        return [Cancel(oid=o.oid, fqme=o.fqme, reason=f'strategy {self.name} (again after '
                       'a reconnect)')
                for o in self.ctx.open_orders() if o.oid in self.ctx._cancel_sent]

    def run_job(self, job: CronJobCfg) -> list[Intent]:
        """Apply a cron job. ``flatten`` and ``cancel_all`` run in any state: they
        only reduce risk."""
        match job.action:
            case 'flatten':
                self.ctx.flatten()
            case 'cancel_all':
                for order in self.ctx.open_orders():
                    self.ctx.cancel(order.oid)
            case 'halt':
                self.halted = True
            case 'resume':
                self.halted = False
        log.info('job.applied', strategy=self.name, action=job.action, halted=self.halted)
        return self._gate(self.ctx.drain_intents())

    def stop(self) -> list[Intent]:
        """Graceful stop: ``on_stop`` runs (its intents are returned); idempotent."""
        if self.state in ('new', 'running'):
            was_running = self.state == 'running'
            self.state = 'stopped'
            log.info('strategy.stop', strategy=self.name)
            if was_running:
                return self._call('on_stop', allow_stopped=True)
        return []

    def summary(self) -> RunnerSummary:
        return RunnerSummary(
            strategy=self.name,
            state=self.state,
            error=None if self.error is None else f'{type(self.error).__name__}: {self.error}',
            orders_sent=self._orders_sent,
            orders_dropped=self._orders_dropped,
            cancels_sent=self._cancels_sent,
            fills=self._fills,
            open_orders=len(self.ctx.open_orders()),
            positions=dict(self.ctx._positions),
        )

    # -- internals ----------------------------------------------------------

    def _known_market(self, fqme: str, event: str, **fields: Any) -> bool:
        if fqme and fqme not in self.ctx.markets:
            log.warning(event, strategy=self.name, fqme=fqme, markets=list(self.ctx.markets),
                        **fields)
            return False
        return True

    def _fill_from_status(self, status: Status) -> BrokerdFill | None:
        if status.fill_id is None or not status.fill_size or status.fill_price is None:
            return None
        known = {o.oid: o for o in self.ctx.open_orders()}.get(status.oid)
        action = status.action or (known.action if known else None)
        fqme = status.fqme or (known.fqme if known else '')
        if action is None or not fqme:
            log.warning('fill.unattributable', strategy=self.name, oid=status.oid,
                        fill_id=status.fill_id)
            return None
        return BrokerdFill(
            oid=status.oid, reqid=status.reqid or '', fill_id=status.fill_id,
            account=status.account or self.ctx.account, fqme=fqme, action=action,
            size=status.fill_size, price=status.fill_price, ts_ns=status.ts_ns,
        )

    def _call(
        self, callback: str, *args: Any, fqme: str | None = None, bar_time: str | None = None,
        allow_stopped: bool = False,
    ) -> list[Intent]:
        if not (self.state == 'running' or (allow_stopped and self.state == 'stopped')):
            return []
        try:
            getattr(self.strategy, callback)(self.ctx, *args)
        except Exception as err:
            return self._fail(err, callback, fqme, bar_time)
        return self._gate(self.ctx.drain_intents())

    def _fail(
        self, err: Exception, callback: str, fqme: str | None, bar_time: str | None,
    ) -> list[Intent]:
        log.exception(
            'strategy.failed', strategy=self.name, callback=callback, fqme=fqme,
            bar_time=bar_time, error=f'{type(err).__name__}: {err}', on_error=self.on_error,
        )
        self.state = 'failed'
        self.error = err
        # intents of the failing callback are half-done work: never send them
        unsent = self.ctx.drain_intents()
        for msg in unsent:
            if isinstance(msg, Order):
                self.ctx._forget_order(msg.oid)
        if unsent:
            log.warning('order.dropped_on_error', strategy=self.name, count=len(unsent))
        match self.on_error:
            case 'cancel':
                for order in self.ctx.open_orders():
                    self.ctx.cancel(order.oid)
            case 'cancel_and_flatten':
                self.ctx.flatten()
            case 'leave':
                pass
        return self._gate(self.ctx.drain_intents())

    def _gate(self, intents: list[Intent]) -> list[Intent]:
        """Cancels and flattening orders always pass; other new orders need an open
        trading window and no halt."""
        out: list[Intent] = []
        for msg in intents:
            match msg:
                case Cancel():
                    self._cancels_sent += 1
                    out.append(msg)
                case Order() if self.ctx._is_flatten(msg.oid):
                    self._orders_sent += 1
                    out.append(msg)
                case Order():
                    if self._blocked(msg):
                        self._orders_dropped += 1
                        self.ctx._forget_order(msg.oid)
                    else:
                        self._orders_sent += 1
                        out.append(msg)
        return out

    def _blocked(self, order: Order) -> bool:
        fields = dict(strategy=self.name, oid=order.oid, fqme=order.fqme,
                      action=order.action, size=order.size, kind=order.kind)
        if self.halted:
            log.warning('order.halted', **fields)
            return True
        if self.window is None:
            return False
        secs, ns = divmod(order.ts_ns, 1_000_000_000)
        created = datetime.fromtimestamp(secs, UTC) + timedelta(microseconds=ns // 1_000)
        if self.window.is_open(created):
            return False
        log.warning('order.outside_window', window=self.window.describe(),
                    created=created.isoformat(), **fields)
        return True
