"""The Strategy API: what a user strategy subclasses and what its callbacks get.

A strategy is plain sync code. Callbacks never await: order intents made through
the :class:`StrategyContext` are queued as :class:`~piker.clearing.Order` /
:class:`~piker.clearing.Cancel` messages and the runtime (see ``_runner.py``)
drains and sends them. That keeps every strategy testable without an event loop
and makes a slow or broken strategy unable to stall the actor's IPC.

Positions and open orders seen by the strategy are bookkept by the runtime from
the fills and statuses emsd reports, never by the strategy itself.
"""
from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, ClassVar

import msgspec
import numpy as np

from piker.clearing._messages import (
    TERMINAL_STATES,
    Action,
    BrokerdFill,
    Cancel,
    Order,
    OrderKind,
    OrderState,
    Status,
)
from piker.data._shm import ohlc_dtype as OHLC_DTYPE
from piker.log import get_logger

# a position smaller than this is float noise from summing fills: report it as flat
POSITION_EPSILON = 1e-9

Intent = Order | Cancel


class StrategyError(ValueError):
    """A strategy asked for something invalid (bad size, unknown market, ...)."""


class StrategyParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base for a strategy's typed params; give every field a default.

    Built by the loader from the ``params`` table of the strategy's ``[[strategies]]``
    entry, so a typo or a wrong type is a config error before trading starts.
    """


class OpenOrder(msgspec.Struct, frozen=True, kw_only=True):
    """An order of this strategy that is not yet in a terminal state."""
    oid: str
    fqme: str
    action: Action
    size: float
    # None for orders learnt from emsd at startup (Status does not carry them)
    kind: OrderKind | None = None
    price: float | None = None
    state: OrderState = 'pending'
    filled: float = 0.0

    @property
    def remaining(self) -> float:
        return max(self.size - self.filled, 0.0)

    @property
    def signed_remaining(self) -> float:
        return self.remaining if self.action == 'buy' else -self.remaining


class Strategy:
    """Base class for user strategies; override only the callbacks you need.

    Declare typed params as a nested ``class Params(StrategyParams)``; the instance
    gets them as ``self.params``. Keep per-strategy state on ``self``.
    """

    Params: ClassVar[type[StrategyParams]] = StrategyParams

    def __init__(self, params: StrategyParams | None = None) -> None:
        self.params = params if params is not None else type(self).Params()

    def on_start(self, ctx: StrategyContext) -> None:
        """Once, after positions and open orders are known, before any event."""

    def on_bar(self, ctx: StrategyContext, fqme: str, bars: np.ndarray) -> None:
        """After each bar of the strategy's timeframe closes.

        ``bars`` is a read-only zero-copy view of closed bars; ``bars[-1]`` is the
        bar that just closed. Copy what you want to keep beyond this call.
        """

    def on_quote(self, ctx: StrategyContext, fqme: str, quote: Any) -> None:
        """On each quote update of a subscribed market."""

    def on_order(self, ctx: StrategyContext, status: Status) -> None:
        """On each status change of one of this strategy's orders."""

    def on_fill(self, ctx: StrategyContext, fill: BrokerdFill) -> None:
        """On each (deduplicated) fill; ``ctx.position()`` already includes it."""

    def on_stop(self, ctx: StrategyContext) -> None:
        """Once, on a graceful stop; intents made here are still sent."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _to_ns(dt: datetime) -> int:
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


class StrategyContext:
    """What a strategy's callbacks use to see state and express intents.

    Strategy-facing API: :meth:`buy`, :meth:`sell`, :meth:`cancel`, :meth:`flatten`,
    :meth:`position`, :meth:`open_orders`, :meth:`history`, :meth:`now`, :attr:`log`.
    Runtime-facing API: :meth:`drain_intents`; the ``_apply_*`` / ``_set_*`` methods
    are called by :class:`~piker.bot._runner.StrategyRunner` only.
    """

    def __init__(
        self,
        name: str,
        *,
        markets: Iterable[str],
        account: str = 'paper',
        timeframe_secs: int = 60,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.name = name
        self.markets: tuple[str, ...] = tuple(markets)
        self.account = account
        self.timeframe_secs = timeframe_secs
        self._clock = clock
        self.log = get_logger(f'strategies.{name}').bind(strategy=name)
        self._intents: list[Intent] = []
        self._positions: dict[str, float] = {fqme: 0.0 for fqme in self.markets}
        self._orders: dict[str, OpenOrder] = {}
        self._bars: dict[str, np.ndarray] = {}
        self._seen_fill_ids: set[str] = set()
        # per open order: filled size summed from fills (statuses may lag or lead)
        self._fill_qty: dict[str, float] = {}
        # orders that reached a final state: late statuses for them are ignored
        self._done_oids: set[str] = set()
        # oids created by flatten(): exempt from trading-window gating
        self._flatten_oids: set[str] = set()
        self._cancel_sent: set[str] = set()

    # -- strategy-facing ----------------------------------------------------

    def now(self) -> datetime:
        """The injected clock's time, as an aware UTC datetime."""
        now = self._clock()
        if now.tzinfo is None:
            raise StrategyError(
                f'strategy {self.name!r}: the clock returned a naive datetime {now!r}; '
                'expected an aware one (use datetime.now(UTC))'
            )
        return now.astimezone(UTC)

    def buy(
        self, fqme: str, size: float, *, limit: float | None = None, stop: float | None = None,
    ) -> str:
        """Queue a buy: market, or ``limit=`` price, or ``stop=`` trigger; returns its oid."""
        return self._submit('buy', fqme, size, limit=limit, stop=stop)

    def sell(
        self, fqme: str, size: float, *, limit: float | None = None, stop: float | None = None,
    ) -> str:
        """Queue a sell: market, or ``limit=`` price, or ``stop=`` trigger; returns its oid."""
        return self._submit('sell', fqme, size, limit=limit, stop=stop)

    def cancel(self, oid: str) -> bool:
        """Queue a cancel (once per order); ``False`` and nothing sent when ``oid``
        is not open, e.g. it filled before the strategy got to see it."""
        order = self._orders.get(oid)
        if order is None:
            self.log.info('order.cancel_not_open', oid=oid)
            return False
        if oid in self._cancel_sent:
            return True
        self._cancel_sent.add(oid)
        self._intents.append(Cancel(oid=oid, fqme=order.fqme, reason=f'strategy {self.name}'))
        return True

    def flatten(self, fqme: str | None = None) -> list[str]:
        """Cancel open orders and queue market orders that bring positions to zero,
        for ``fqme`` or every market; returns the oids of the flattening orders.

        Allowed outside the trading window. Idempotent while a flattening order for a
        market is still open: no second one is sent.
        """
        targets = [self._check_market(fqme)] if fqme is not None else list(self._positions)
        oids: list[str] = []
        for mkt in targets:
            in_flight = False
            for order in self.open_orders(mkt):
                if order.oid in self._flatten_oids:
                    in_flight = True
                else:
                    self.cancel(order.oid)
            pos = self._positions.get(mkt, 0.0)
            if pos == 0.0 or in_flight:
                continue
            oid = self._submit('sell' if pos > 0 else 'buy', mkt, abs(pos))
            self._flatten_oids.add(oid)
            oids.append(oid)
        return oids

    def position(self, fqme: str) -> float:
        """Filled position in ``fqme`` (signed); excludes unfilled orders."""
        return self._positions.get(self._check_market(fqme), 0.0)

    def open_orders(self, fqme: str | None = None) -> list[OpenOrder]:
        """Non-terminal orders of this strategy (including ones queued but not yet sent)."""
        if fqme is not None:
            self._check_market(fqme)
        return [o for o in self._orders.values() if fqme is None or o.fqme == fqme]

    def history(self, fqme: str) -> np.ndarray:
        """Read-only view of the closed bars of ``fqme`` last delivered (empty before any)."""
        self._check_market(fqme)
        bars = self._bars.get(fqme)
        if bars is None:
            bars = np.zeros(0, dtype=OHLC_DTYPE)
            bars.flags.writeable = False
        return bars

    # -- runtime-facing -----------------------------------------------------

    def drain_intents(self) -> list[Intent]:
        """Take the queued intents, oldest first, leaving the queue empty."""
        intents, self._intents = self._intents, []
        return intents

    def _is_flatten(self, oid: str) -> bool:
        return oid in self._flatten_oids

    def _forget_order(self, oid: str) -> None:
        """Drop an order for good: final, or never sent (gated out by the runtime)."""
        self._orders.pop(oid, None)
        self._flatten_oids.discard(oid)
        self._cancel_sent.discard(oid)
        self._fill_qty.pop(oid, None)
        self._done_oids.add(oid)

    def _set_bars(self, fqme: str, bars: np.ndarray) -> np.ndarray:
        self._check_market(fqme)
        missing = {'time', 'open', 'high', 'low', 'close', 'volume'} - set(bars.dtype.names or ())
        if missing:
            raise ValueError(
                f'bars for {fqme!r} lack fields {sorted(missing)}: expected an OHLC '
                f'structured array with dtype {OHLC_DTYPE}, got {bars.dtype}'
            )
        view = bars.view()
        view.flags.writeable = False
        self._bars[fqme] = view
        return view

    def _set_position(self, fqme: str, size: float) -> None:
        """Startup sync: the position emsd reports for this strategy's account."""
        self._positions[self._check_market(fqme)] = float(size)

    def _apply_status(self, status: Status) -> None:
        """Track an order's lifecycle; unknown non-terminal oids are adopted
        (open orders that emsd reports at startup)."""
        if status.oid in self._done_oids:
            return
        order = self._orders.get(status.oid)
        if status.state in TERMINAL_STATES:
            self._forget_order(status.oid)
            return
        if order is None:
            if status.action is None or not status.fqme:
                self.log.warning('order.status_unadoptable', oid=status.oid, state=status.state)
                return
            order = OpenOrder(
                oid=status.oid, fqme=status.fqme, action=status.action, size=status.size,
            )
        filled = max(order.filled, status.filled, self._fill_qty.get(status.oid, 0.0))
        self._orders[status.oid] = msgspec.structs.replace(order, state=status.state, filled=filled)

    def _apply_fill(self, fill: BrokerdFill) -> bool:
        """Add a fill to the position; ``False`` for an already-applied fill id.

        An order whose fills add up to its size leaves ``open_orders`` at once, even
        before its terminal status arrives.
        """
        if fill.fill_id in self._seen_fill_ids:
            return False
        self._seen_fill_ids.add(fill.fill_id)
        signed = fill.size if fill.action == 'buy' else -fill.size
        pos = self._positions.get(fill.fqme, 0.0) + signed
        self._positions[fill.fqme] = 0.0 if abs(pos) < POSITION_EPSILON else pos
        order = self._orders.get(fill.oid)
        if order is not None:
            qty = self._fill_qty.get(fill.oid, 0.0) + fill.size
            self._fill_qty[fill.oid] = qty
            if qty >= order.size - POSITION_EPSILON:
                self._forget_order(fill.oid)
            else:
                self._orders[fill.oid] = msgspec.structs.replace(
                    order, filled=max(order.filled, qty),
                )
        return True

    # -- internals ----------------------------------------------------------

    def _check_market(self, fqme: str) -> str:
        if fqme not in self._positions:
            raise StrategyError(
                f'strategy {self.name!r}: market {fqme!r} is not one of its markets '
                f'{list(self.markets)} (add it to `markets` of this [[strategies]] entry in bot.toml)'
            )
        return fqme

    def _submit(
        self, action: Action, fqme: str, size: float, *,
        limit: float | None = None, stop: float | None = None,
    ) -> str:
        self._check_market(fqme)
        where = f'strategy {self.name!r} {action}({fqme!r}, ...)'
        if not (isinstance(size, int | float) and math.isfinite(size) and size > 0):
            raise StrategyError(f'{where}: `size` must be a finite number > 0, got {size!r}')
        if limit is not None and stop is not None:
            raise StrategyError(f'{where}: pass `limit` or `stop`, not both')
        price = limit if limit is not None else stop
        if price is not None and not (
            isinstance(price, int | float) and math.isfinite(price) and price > 0
        ):
            raise StrategyError(f'{where}: price must be a finite number > 0, got {price!r}')
        kind: OrderKind = 'limit' if limit is not None else 'stop' if stop is not None else 'market'
        oid = str(uuid.uuid4())
        order = Order(
            oid=oid, fqme=fqme, action=action, size=float(size), kind=kind,
            price=None if price is None else float(price), account=self.account,
            source=self.name, ts_ns=_to_ns(self.now()),
        )
        self._intents.append(order)
        self._orders[oid] = OpenOrder(
            oid=oid, fqme=fqme, action=action, size=order.size, kind=kind, price=order.price,
        )
        return oid
