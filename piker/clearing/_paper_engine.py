"""Paper clearing: the broker protocol as pure, sync methods.

paperboi (the actor) feeds this engine the broker requests it receives and the
quotes of the markets it clears, and ships back the events each call returns.

Matching rules (documented choices):
- a market order fills in full at the touch: the ask for a buy, the bid for a
  sell (the last price when that side is missing);
- a limit that is marketable on arrival (buy: ask <= limit, sell: bid >=
  limit) fills at the touch, as an exchange would give it price improvement;
- a limit that rested fills in full at its own limit price once the opposite
  touch reaches it (buy: ask <= limit, sell: bid >= limit). No gap
  improvement, no partial fills, no queue position: conservative and simple;
- every request needs a quote for its market first (``BrokerdError``
  otherwise), so a misspelt fqme never rests silently forever;
- a modify is a re-submit with the same ``oid``: it keeps its ``reqid`` and is
  re-checked for marketability at once.

Durability: every fill is applied to the account's :class:`Ledger` (fsynced)
*before* its ``BrokerdFill`` is returned. Resting orders are persisted
atomically to ``<state_dir>/paper/<broker>/orders.toml`` on every change, and a
new engine on the same ``state_dir`` reloads them, so resting paper orders
survive a restart; a corrupt orders file is set aside as
``orders.toml.corrupt-<ts>``, rebuilt from the records it still holds (minus
those the ledger shows filled), and every order it loses is named in one
``paper.orders_lost`` error record. Fill ids are deterministic (``<reqid>-<n>``, ``reqid`` =
``paper-<oid>``; paper fills are whole, so ``n`` is 1): if the process dies
after the ledger write but before the orders file drops the order, the
reloading engine finds that fill id in the ledger and drops the order, and a
re-sent fill would be ignored by the ledger - a fill is never counted twice.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from ..accounting import Fill, Ledger, LedgerError, ledger_dir
from ..config import (
    FeesCfg,
    PaperCfg,
    ensure_state_dir,
    remove_stale_temps,
    write_toml_atomic,
)
from ..log import get_logger
from ..types import Struct
from ._messages import (
    BrokerdCancel,
    BrokerdError,
    BrokerdFill,
    BrokerdOrder,
    BrokerdOrderAck,
    BrokerdPosition,
    BrokerdStatus,
    BrokerEvent,
)
from ._paper_orders import LostOrder, read_orders_file

log = get_logger(__name__)

ORDERS_NAME = 'orders.toml'


class PaperQuote(Struct, frozen=True):
    bid: float | None
    ask: float | None
    last: float | None
    ts_ns: int

    def touch(self, action: str) -> float | None:
        """Where a market order of ``action`` executes: ask to buy, bid to sell."""
        side = self.ask if action == 'buy' else self.bid
        for px in (side, self.last):
            if px is not None and math.isfinite(px) and px > 0:
                return px
        return None


def fee_for(fees: FeesCfg, size: float, price: float) -> float:
    """``per_unit * size + per_order + bps * notional / 1e4``."""
    return fees.per_unit * size + fees.per_order + fees.bps * abs(size * price) / 1e4


def to_ledger_fill(msg: BrokerdFill, broker: str) -> Fill:
    """A broker's fill as the ledger records it (signed size)."""
    return Fill(
        fill_id=msg.fill_id, fqme=msg.fqme,
        size=msg.size if msg.action == 'buy' else -msg.size,
        price=msg.price, fee=msg.fee, ts_ns=msg.ts_ns, oid=msg.oid,
        broker=broker, account=msg.account,
    )


def from_ledger_fill(fill: Fill, reqid: str = '') -> BrokerdFill:
    """A ledger record as the broker message it was (unsigned size + action)."""
    return BrokerdFill(
        oid=fill.oid, reqid=reqid, fill_id=fill.fill_id, account=fill.account,
        fqme=fill.fqme, action='buy' if fill.size > 0 else 'sell', size=abs(fill.size),
        price=fill.price, fee=fill.fee, ts_ns=fill.ts_ns,
    )


def reqid_for(oid: str) -> str:
    return f'paper-{oid}'


class PaperEngine:
    """Clears orders against the last quotes it was given; see module doc."""

    def __init__(
        self,
        broker: str,
        fees: PaperCfg,
        state_dir: Path | str,
        ledger_for: Callable[[str], Ledger],
    ) -> None:
        self.broker = broker
        self.fees = fees
        self._ledger_for = ledger_for
        self._state_root = Path(state_dir)
        self._dir = self._state_root / 'paper' / broker
        ensure_state_dir(self._dir)
        remove_stale_temps(self._dir)
        self._quotes: dict[str, PaperQuote] = {}
        self._resting: dict[str, BrokerdOrder] = self._load()
        self._drop_already_filled()
        if self._resting:
            log.info('paper.orders_restored', broker=broker, count=len(self._resting))

    @property
    def orders_path(self) -> Path:
        return self._dir / ORDERS_NAME

    # -- persistence ---------------------------------------------------------

    def _load(self) -> dict[str, BrokerdOrder]:
        """Resting orders from disk; a corrupt file is set aside and rebuilt
        from what it still holds, and what it does not is reported (see
        :mod:`._paper_orders`), since paperboi must clear with or without it."""
        path = self.orders_path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        loaded = read_orders_file(path, raw, self.broker, self._state_root)
        orders = {o.oid: o for o in loaded.orders}
        if not loaded.problems:
            return orders
        aside = _set_aside(path)
        log.warning('paper.orders_rebuilt', path=str(path), set_aside=str(aside),
                    kept=len(orders), problems=loaded.problems[:20])
        lost = [x for x in loaded.lost if not self._filled_per_ledger(x)]
        if lost:
            log.error(
                'paper.orders_lost', path=str(path), set_aside=str(aside),
                oids=[x.oid for x in lost if x.oid],
                unreadable_records=sum(1 for x in lost if not x.oid),
                reasons=[f'line {x.line}: {x.reason}' for x in lost][:20],
                fix='re-place these orders if they should still rest',
            )
        write_toml_atomic(path, {'orders': [msgspec.to_builtins(o) for o in orders.values()]})
        return orders

    def _filled_per_ledger(self, lost: LostOrder) -> bool:
        """A lost record whose fill the ledger holds was not resting anyway."""
        if not lost.oid or not lost.account:
            return False
        try:
            if not ledger_dir(self._state_root, self.broker, lost.account).is_dir():
                return False
        except LedgerError:
            return False
        if f'{reqid_for(lost.oid)}-1' not in self._ledger_for(lost.account):
            return False
        log.warning('paper.order_already_filled', oid=lost.oid, reqid=reqid_for(lost.oid))
        return True

    def _drop_already_filled(self) -> None:
        """A crash between the ledger write and the orders-file update leaves a
        filled order on file; the ledger is the truth."""
        filled = [
            o for o in self._resting.values()
            if f'{o.reqid}-1' in self._ledger_for(o.account)
        ]
        for order in filled:
            log.warning('paper.order_already_filled', oid=order.oid, reqid=order.reqid)
            del self._resting[order.oid]
        if filled:
            self._persist()

    def _persist(self) -> None:
        write_toml_atomic(
            self.orders_path,
            {'orders': [msgspec.to_builtins(o) for o in self._resting.values()]},
        )

    # -- queries -------------------------------------------------------------

    def open_orders(self) -> list[BrokerdOrder]:
        """Resting orders, each with its ``reqid`` set."""
        return list(self._resting.values())

    def positions(self, account: str, now_ns: int | None = None) -> list[BrokerdPosition]:
        """Non-flat positions of ``account``, from its ledger."""
        now = time.time_ns() if now_ns is None else now_ns
        return [
            BrokerdPosition(
                broker=self.broker, account=account, fqme=pos.fqme,
                size=pos.size, avg_price=pos.avg_price, realized_pnl=pos.realized_pnl,
                ts_ns=now,
            )
            for pos in self._ledger_for(account).positions().values()
            if pos.size != 0
        ]

    def resolve(self, oids: list[str], accounts: list[str]) -> tuple[
            list[BrokerdOrder], list[BrokerdFill], list[str]]:
        """(resting, filled, never seen) for ``oids``: resting from the book,
        fills from the ledgers of ``accounts`` by their ``oid``. Paper sees
        everything it was sent, so an oid with neither never arrived."""
        wanted = set(oids)
        resting = [o for o in self._resting.values() if o.oid in wanted]
        fills = [
            from_ledger_fill(f, reqid_for(f.oid))
            for account in accounts for f in self._ledger_for(account).fills()
            if f.oid in wanted
        ]
        seen = {o.oid for o in resting} | {f.oid for f in fills}
        return resting, fills, [oid for oid in oids if oid not in seen]

    def quote(self, fqme: str) -> PaperQuote | None:
        return self._quotes.get(fqme)

    # -- requests ------------------------------------------------------------

    def submit(self, order: BrokerdOrder, now_ns: int | None = None) -> list[BrokerEvent]:
        """Ack ``order``, then fill it if marketable, else rest it."""
        ts_ns = time.time_ns() if now_ns is None else now_ns
        prior = self._resting.get(order.oid)
        reqid = reqid_for(order.oid)
        if (reason := self._refusal(order, prior, reqid)) is not None:
            log.warning('paper.refuse', oid=order.oid, fqme=order.fqme, reason=reason)
            return [BrokerdError(
                oid=order.oid, reqid=order.reqid, account=order.account,
                reason=reason, ts_ns=ts_ns,
            )]
        quote = self._quotes[order.fqme]
        order = msgspec.structs.replace(order, reqid=reqid, ts_ns=order.ts_ns or ts_ns)
        events: list[BrokerEvent] = [
            BrokerdOrderAck(oid=order.oid, reqid=reqid, account=order.account),
        ]
        touch = quote.touch(order.action)
        assert touch is not None  # _refusal checked it
        if order.kind == 'market' or _crosses(order, touch):
            events += self._fill(order, touch, ts_ns)
            if prior is not None:
                del self._resting[order.oid]
                self._persist()
            return events
        self._resting[order.oid] = order
        self._persist()
        log.info(
            'paper.rest', oid=order.oid, fqme=order.fqme, action=order.action,
            size=order.size, price=order.price, modify=prior is not None,
        )
        events.append(BrokerdStatus(
            oid=order.oid, reqid=reqid, account=order.account, state='open',
            remaining=order.size, ts_ns=ts_ns,
        ))
        return events

    def _refusal(
        self, order: BrokerdOrder, prior: BrokerdOrder | None, reqid: str,
    ) -> str | None:
        if not math.isfinite(order.size) or order.size <= 0:
            return f'order size must be a positive number, got {order.size!r}'
        if order.kind == 'limit' and (
            order.price is None or not math.isfinite(order.price) or order.price <= 0
        ):
            return f'a limit order needs a positive `price`, got {order.price!r}'
        if prior is not None and prior.account != order.account:
            return (
                f'modify of {order.oid!r} names account {order.account!r} but the order '
                f'rests in {prior.account!r}; cancel it and submit a new oid instead'
            )
        if prior is None and f'{reqid}-1' in self._ledger_for(order.account):
            return (
                f'oid {order.oid!r} was already filled (fill {reqid}-1); '
                'order ids are unique forever, send a new oid'
            )
        quote = self._quotes.get(order.fqme)
        if quote is None or quote.touch(order.action) is None:
            return (
                f'no quote for {order.fqme} yet: paper clearing fills against live '
                'quotes, so the feed for this market must be running'
            )
        return None

    def cancel(self, msg: BrokerdCancel, now_ns: int | None = None) -> list[BrokerEvent]:
        ts_ns = time.time_ns() if now_ns is None else now_ns
        order = self._resting.pop(msg.oid, None)
        if order is None:
            return [BrokerdError(
                oid=msg.oid, reqid=msg.reqid, account=msg.account, ts_ns=ts_ns,
                reason=f'no resting paper order {msg.oid!r} to cancel '
                '(already filled or canceled, or never submitted)',
            )]
        self._persist()
        log.info('paper.cancel', oid=msg.oid, fqme=order.fqme)
        assert order.reqid is not None
        return [BrokerdStatus(
            oid=order.oid, reqid=order.reqid, account=order.account, state='canceled',
            remaining=order.size, reason='canceled on request', ts_ns=ts_ns,
        )]

    # -- market data ---------------------------------------------------------

    def on_quote(
        self,
        fqme: str,
        bid: float | None,
        ask: float | None,
        last: float | None,
        ts_ns: int,
    ) -> list[BrokerEvent]:
        """Record the quote and fill every resting limit it crosses, at the limit."""
        quote = PaperQuote(bid=bid, ask=ask, last=last, ts_ns=ts_ns)
        self._quotes[fqme] = quote
        crossed = [
            o for o in self._resting.values()
            if o.fqme == fqme
            and (touch := quote.touch(o.action)) is not None
            and _crosses(o, touch)
        ]
        events: list[BrokerEvent] = []
        for order in crossed:
            assert order.price is not None
            events += self._fill(order, order.price, ts_ns)
            del self._resting[order.oid]
        if crossed:
            self._persist()
        return events

    # -- fills ---------------------------------------------------------------

    def _fill(self, order: BrokerdOrder, price: float, ts_ns: int) -> list[BrokerEvent]:
        assert order.reqid is not None
        fees = self.fees.fees_by_market.get(order.fqme, self.fees.fees)
        fee = fee_for(fees, order.size, price)
        fill_id = f'{order.reqid}-1'
        ledger = self._ledger_for(order.account)
        fill = BrokerdFill(
            oid=order.oid, reqid=order.reqid, fill_id=fill_id, account=order.account,
            fqme=order.fqme, action=order.action, size=order.size, price=price,
            fee=fee, ts_ns=ts_ns,
        )
        fresh = ledger.apply(to_ledger_fill(fill, self.broker))
        log.info(
            'paper.fill', oid=order.oid, fill_id=fill_id, fqme=order.fqme,
            action=order.action, size=order.size, price=price, fee=fee, replayed=not fresh,
        )
        pos = ledger.position(order.fqme)
        return [
            fill,
            BrokerdStatus(
                oid=order.oid, reqid=order.reqid, account=order.account, state='filled',
                filled=order.size, remaining=0.0, ts_ns=ts_ns,
            ),
            BrokerdPosition(
                broker=self.broker, account=order.account, fqme=order.fqme,
                size=pos.size, avg_price=pos.avg_price, realized_pnl=pos.realized_pnl,
                ts_ns=ts_ns,
            ),
        ]


def _crosses(order: BrokerdOrder, touch: float) -> bool:
    """Is a limit marketable against the opposite touch?"""
    if order.kind != 'limit' or order.price is None:
        return order.kind == 'market'
    if order.action == 'buy':
        return touch <= order.price
    return touch >= order.price


def _set_aside(path: Path) -> Path:
    """Keep a corrupt file as ``<name>.corrupt-<UTC time>`` (a hard link, so
    the name always holds either it or its replacement)."""
    stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
    aside = path.with_name(f'{path.name}.corrupt-{stamp}')
    n = 0
    while True:
        try:
            os.link(path, aside)
            return aside
        except FileExistsError:
            n += 1
            aside = path.with_name(f'{path.name}.corrupt-{stamp}-{n}')
        except OSError:  # no hard links here: a copy will do
            shutil.copyfile(path, aside)
            return aside
