"""Order clearing, executions and positions: sync logic behind the fake gateway.

The broker never touches sockets. It talks through an :class:`Outbox`, whose
methods take *builders* (``sv -> fields``) so each client gets the layout of
its own negotiated server version.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Protocol

from piker.log import get_logger

from . import _encode as enc
from ._market import Quote, match_listings, parse_end_time
from ._model import ExecRecord, WorkingOrder
from ._requests import PlaceOrder, ReqExecutions
from ._scenario import FILL_MODES, ExecutionSpec, Listing, OrderSpec, Scenario

log = get_logger(__name__)

Build = Callable[[int], list]


class Outbox(Protocol):
    def to_client(self, client_id: int, build: Build) -> None: ...
    def to_position_subscribers(self, build: Build) -> None: ...
    def to_account_subscribers(self, account: str, build: Build) -> None: ...
    def later(self, delay_secs: float, fn: Callable[[], None]) -> None: ...
    def now(self) -> float: ...


class PositionState:
    """Net position per (account, conId) with a per-unit average price."""

    def __init__(self, qty: float = 0.0, avg_price: float = 0.0) -> None:
        self.qty = qty
        self.avg_price = avg_price
        self.realized = 0.0

    def apply(self, signed_qty: float, price: float, mult: float) -> float | None:
        """Book a fill; the realized P&L of the part that closed, else None."""
        q = self.qty
        if q == 0 or (q > 0) == (signed_qty > 0):
            total = abs(q) + abs(signed_qty)
            self.avg_price = (abs(q) * self.avg_price + abs(signed_qty) * price) / total
            self.qty = q + signed_qty
            return None
        closing = min(abs(q), abs(signed_qty))
        pnl = (price - self.avg_price) * closing * mult * (1 if q > 0 else -1)
        self.qty = q + signed_qty
        if abs(self.qty) < 1e-12:
            self.qty, self.avg_price = 0.0, 0.0
        elif (self.qty > 0) != (q > 0):
            self.avg_price = price  # flipped: the remainder opened at this price
        self.realized += pnl
        return pnl


def _chunks(qty: float, n: int) -> list[float]:
    n = max(n, 2)
    if qty == int(qty) and qty >= n:
        base = float(int(qty) // n)
        return [base] * (n - 1) + [qty - base * (n - 1)]
    return [qty / n] * n


class Broker:
    """All order, execution and position state of one fake gateway."""

    def __init__(self, scenario: Scenario, out: Outbox) -> None:
        self.scenario = scenario
        self.out = out
        self.listings: list[Listing] = list(scenario.listings)
        self.by_con_id = {lst.con_id: lst for lst in self.listings}
        rng = random.Random(scenario.seed)
        self.quotes = {lst.con_id: Quote(lst, rng) for lst in self.listings}
        self.orders: dict[tuple[int, int], WorkingOrder] = {}
        self.completed: list[WorkingOrder] = []
        self.executions: list[ExecRecord] = []
        self.positions: dict[tuple[str, int], PositionState] = {}
        self.modes_by_symbol: dict[str, tuple[str, str]] = {
            sym.upper(): (mode, scenario.reject_reason)
            for sym, mode in scenario.fill_modes.items()
        }
        self.modes_by_ref: dict[str, tuple[str, str]] = {}
        self.modes_by_order_id: dict[int, tuple[str, str]] = {}
        self._perm_seq = 900_001_000
        self._exec_seq = 0
        self.next_order_id = scenario.next_valid_id
        self._seed()

    # -- set-up ---------------------------------------------------------------

    @property
    def default_account(self) -> str:
        return self.scenario.accounts[0]

    def _listing(self, con_id: int, what: str) -> Listing:
        try:
            return self.by_con_id[con_id]
        except KeyError:
            raise ValueError(
                f'{what}: conId {con_id} is not among the scenario listings '
                f'{sorted(self.by_con_id)}; add a Listing for it'
            ) from None

    def _order_from_spec(self, spec: OrderSpec, what: str) -> WorkingOrder:
        lst = self._listing(spec.con_id, what)
        return WorkingOrder(
            order_id=spec.order_id, client_id=spec.client_id,
            perm_id=spec.perm_id or self._next_perm(), listing=lst, exchange=lst.exchange,
            action=spec.action, qty=float(spec.qty), order_type=spec.order_type,
            lmt_price=spec.lmt_price, aux_price=spec.aux_price, tif=spec.tif,
            account=spec.account or self.default_account, order_ref=spec.order_ref,
            status=spec.status, filled=float(spec.filled), avg_fill_price=spec.avg_fill_price,
            last_fill_price=spec.avg_fill_price if spec.filled else 0.0,
            mode=self._mode_for(spec.order_ref, spec.order_id, lst.symbol)[0],
        )

    def _seed(self) -> None:
        sc = self.scenario
        for p in sc.positions:
            lst = self._listing(p.con_id, 'Scenario.positions')
            self.positions[(p.account, lst.con_id)] = PositionState(float(p.qty), p.avg_price)
        for spec in sc.open_orders:
            o = self._order_from_spec(spec, 'Scenario.open_orders')
            self.orders[(o.client_id, o.order_id)] = o
        for spec in sc.completed_orders:
            o = self._order_from_spec(spec, 'Scenario.completed_orders')
            o.completed_time = enc.ib_time(self.out.now())
            o.completed_status = o.status
            self.orders[(o.client_id, o.order_id)] = o
            self.completed.append(o)
        for ex in sc.executions:
            self.executions.append(self._exec_from_spec(ex))
        ids = [oid for _, oid in self.orders]
        self.next_order_id = max([sc.next_valid_id, *(i + 1 for i in ids)])

    def _exec_from_spec(self, ex: ExecutionSpec) -> ExecRecord:
        lst = self._listing(ex.con_id, 'execution')
        order = self.orders.get((ex.client_id, ex.order_id))
        perm = ex.perm_id or (order.perm_id if order else self._next_perm())
        return ExecRecord(
            exec_id=ex.exec_id or self._next_exec_id(), order_id=ex.order_id,
            client_id=ex.client_id, perm_id=perm, listing=lst, side=ex.side,
            shares=float(ex.shares), price=ex.price, cum_qty=float(ex.shares),
            avg_price=ex.price, order_ref=ex.order_ref or (order.order_ref if order else ''),
            account=ex.account or self.default_account,
            time_epoch_secs=ex.time_epoch_secs if ex.time_epoch_secs is not None
            else self.out.now(),
            commission=ex.commission if ex.commission is not None
            else self._commission(lst, float(ex.shares)),
        )

    def _next_perm(self) -> int:
        self._perm_seq += 1
        return self._perm_seq

    def _next_exec_id(self) -> str:
        self._exec_seq += 1
        return f'0000f4ce.{int(self.out.now()):08x}.{self._exec_seq:02x}.01'

    @staticmethod
    def _commission(lst: Listing, qty: float) -> float:
        return round(max(lst.min_commission, lst.commission_per_unit * qty), 4)

    # -- fill modes -------------------------------------------------------------

    def set_fill_mode(self, mode: str, *, symbol: str | None = None,
                      order_ref: str | None = None, order_id: int | None = None,
                      reason: str | None = None) -> None:
        if mode not in FILL_MODES:
            raise ValueError(f'fill mode {mode!r} is not one of {FILL_MODES}')
        entry = (mode, reason or self.scenario.reject_reason)
        if order_ref is not None:
            self.modes_by_ref[order_ref] = entry
        elif order_id is not None:
            self.modes_by_order_id[order_id] = entry
        elif symbol is not None:
            self.modes_by_symbol[symbol.upper()] = entry
        else:
            raise ValueError(
                'set_fill_mode needs one of symbol=, order_ref= or order_id= '
                '(to change the default, build the Scenario with default_fill_mode=)'
            )

    def _mode_for(self, order_ref: str, order_id: int, symbol: str) -> tuple[str, str]:
        for table, key in (
            (self.modes_by_ref, order_ref),
            (self.modes_by_order_id, order_id),
            (self.modes_by_symbol, symbol.upper()),
        ):
            if key in table:
                return table[key]
        return self.scenario.default_fill_mode, self.scenario.reject_reason

    # -- pricing ------------------------------------------------------------------

    def _touch(self, o: WorkingOrder) -> float:
        q = self.quotes[o.listing.con_id]
        return q.ask if o.action == 'BUY' else q.bid

    def _marketable(self, o: WorkingOrder) -> bool:
        if o.order_type == 'MKT':
            return True
        if o.order_type == 'LMT' and o.lmt_price is not None:
            touch = self._touch(o)
            return o.lmt_price >= touch if o.action == 'BUY' else o.lmt_price <= touch
        return False

    def _fill_price(self, o: WorkingOrder) -> float:
        if self._marketable(o) or o.lmt_price is None:
            return self._touch(o)
        return o.lmt_price

    # -- client requests ------------------------------------------------------------

    def place(self, client_id: int, req: PlaceOrder) -> None:
        key = (client_id, req.order_id)
        send = self._sender(client_id)
        existing = self.orders.get(key)
        if existing is not None and existing.done:
            send(lambda sv: enc.error(
                sv, req.order_id, 104, f"Can't modify a filled order. Order id {req.order_id} "
                f'is {existing.status}.'))
            return
        matches = match_listings(self.listings, req.contract)
        if len(matches) != 1:
            msg = ('No security definition has been found for the request' if not matches
                   else f'The contract description specified for {req.contract.symbol} '
                   'is ambiguous.')
            send(lambda sv: enc.error(sv, req.order_id, 200, msg))
            return
        lst = matches[0]
        self.next_order_id = max(self.next_order_id, req.order_id + 1)
        account = req.account or self.default_account
        exchange = (req.contract.exchange or lst.exchange).upper()

        if existing is not None:
            self._modify(existing, req)
            return

        o = WorkingOrder(
            order_id=req.order_id, client_id=client_id, perm_id=self._next_perm(),
            listing=lst, exchange=exchange, action=req.action, qty=req.qty,
            order_type=req.order_type, lmt_price=req.lmt_price, aux_price=req.aux_price,
            tif=req.tif or 'DAY', account=account, order_ref=req.order_ref,
            oca_group=req.oca_group, outside_rth=req.outside_rth, parent_id=req.parent_id,
        )
        if req.what_if:
            margin = round(req.qty * self._touch(o) * lst.mult * 0.25, 2)
            send(lambda sv: enc.open_order(sv, o, what_if=True, init_margin=margin))
            return

        reason = self._validate(o, req)
        mode, mode_reason = self._mode_for(o.order_ref, o.order_id, lst.symbol)
        if reason is None and mode == 'reject':
            reason = mode_reason
        if reason is not None:
            o.status = 'Cancelled'
            self._complete(o, f'Rejected: {reason}')
            self.orders[key] = o
            log.info('fake_tws.order.rejected', client_id=client_id, order_id=o.order_id,
                     reason=reason)
            send(lambda sv: enc.error(sv, o.order_id, 201, f'Order rejected - reason:{reason}'))
            return

        o.mode = mode
        self.orders[key] = o
        log.info('fake_tws.order.placed', client_id=client_id, order_id=o.order_id,
                 perm_id=o.perm_id, symbol=lst.symbol, action=o.action, qty=o.qty,
                 order_type=o.order_type, lmt_price=o.lmt_price, mode=mode,
                 order_ref=o.order_ref)
        self._emit_state(o, 'PreSubmitted')
        self._emit_state(o, 'Submitted')
        self._work(o)

    def _validate(self, o: WorkingOrder, req: PlaceOrder) -> str | None:
        if o.account not in self.scenario.accounts:
            return (f'account {o.account!r} is not managed by this gateway '
                    f'(managed: {", ".join(self.scenario.accounts)})')
        if o.action not in ('BUY', 'SELL'):
            return f'action must be BUY or SELL, not {o.action!r}'
        if not (o.qty > 0) or math.isinf(o.qty):
            return f'order size must be a positive number, not {o.qty!r}'
        if o.order_type == 'LMT' and o.lmt_price is None:
            return 'a LMT order needs a limit price'
        if req.contract.sec_type == 'BAG':
            return 'combo (BAG) orders are not supported by the fake gateway'
        return None

    def _modify(self, o: WorkingOrder, req: PlaceOrder) -> None:
        o.qty, o.order_type = req.qty, req.order_type
        o.lmt_price, o.aux_price = req.lmt_price, req.aux_price
        o.order_ref, o.tif = req.order_ref, req.tif or o.tif
        log.info('fake_tws.order.modified', order_id=o.order_id, qty=o.qty,
                 lmt_price=o.lmt_price)
        if o.filled >= o.qty:
            self._finish_fill(o)
            return
        self._emit_state(o, 'Submitted')
        if o.mode == 'fill' and self._marketable(o):
            self.execute(o, o.remaining, self._fill_price(o))

    def _work(self, o: WorkingOrder) -> None:
        """Run the order's fill mode right after it was accepted."""
        match o.mode:
            case 'fill':
                if self._marketable(o):
                    self.execute(o, o.remaining, self._fill_price(o))
            case 'partial':
                sizes = _chunks(o.qty, self.scenario.partial_chunks)
                o.chunks_left = len(sizes)
                self._next_chunk(o, sizes)
            case 'partial_rest':
                self.execute(o, _chunks(o.qty, 2)[0], self._fill_price(o))
            case 'rest':
                pass

    def _next_chunk(self, o: WorkingOrder, sizes: list[float]) -> None:
        if o.done or not sizes:
            return
        size = min(sizes[0], o.remaining)
        self.execute(o, size, self._fill_price(o))
        rest = sizes[1:]
        if rest and not o.done:
            self.out.later(self.scenario.partial_interval_secs,
                           lambda: self._next_chunk(o, rest))

    def cancel(self, client_id: int, order_id: int) -> None:
        send = self._sender(client_id)
        o = self.orders.get((client_id, order_id))
        if o is None:
            send(lambda sv: enc.error(
                sv, order_id, 10147, f'OrderId {order_id} that needs to be cancelled is not found.'))
            return
        if o.done:
            send(lambda sv: enc.error(
                sv, order_id, 161, 'Cancel attempted when order is not in a cancellable '
                f'state.  Order permId ={o.perm_id}'))
            return
        self._cancel(o)

    def _cancel(self, o: WorkingOrder) -> None:
        o.status = 'Cancelled'
        self._complete(o, 'Cancelled')
        log.info('fake_tws.order.cancelled', client_id=o.client_id, order_id=o.order_id)
        send = self._sender(o.client_id)
        send(lambda sv: enc.order_status(o))
        send(lambda sv: enc.error(sv, o.order_id, 202, 'Order Canceled - reason:'))

    def global_cancel(self) -> None:
        for o in list(self.orders.values()):
            if not o.done:
                self._cancel(o)

    # -- execution ---------------------------------------------------------------------

    def execute(self, o: WorkingOrder, qty: float, price: float) -> ExecRecord:
        """Fill ``qty`` of a working order at ``price`` and tell everyone who cares."""
        if o.done:
            raise ValueError(
                f'order {o.order_id} (client {o.client_id}) is already {o.status}; '
                'only working orders can fill'
            )
        qty = min(qty, o.remaining)
        new_filled = o.filled + qty
        o.avg_fill_price = (o.avg_fill_price * o.filled + price * qty) / new_filled
        o.filled = new_filled
        o.last_fill_price = price
        if o.remaining <= 1e-9:
            o.status = 'Filled'
        pos = self._position(o.account, o.listing)
        pnl = pos.apply(qty if o.action == 'BUY' else -qty, price, o.listing.mult)
        ex = ExecRecord(
            exec_id=self._next_exec_id(), order_id=o.order_id, client_id=o.client_id,
            perm_id=o.perm_id, listing=o.listing, side=o.side, shares=qty, price=price,
            cum_qty=o.filled, avg_price=o.avg_fill_price, order_ref=o.order_ref,
            account=o.account, time_epoch_secs=self.out.now(),
            commission=self._commission(o.listing, qty), realized_pnl=pnl,
        )
        self.executions.append(ex)
        log.info('fake_tws.order.fill', client_id=o.client_id, order_id=o.order_id,
                 exec_id=ex.exec_id, qty=qty, price=price, cum_qty=o.filled, status=o.status)
        send = self._sender(o.client_id)
        send(lambda sv: enc.exec_details(sv, -1, ex))
        if o.status == 'Filled':
            self._finish_fill(o, emit_open=True)
        else:
            send(lambda sv: enc.order_status(o))
        send(lambda sv: enc.commission_report(ex))
        self._emit_position(o.account, o.listing)
        return ex

    def _finish_fill(self, o: WorkingOrder, emit_open: bool = True) -> None:
        o.status = 'Filled'
        self._complete(o, 'Filled')
        send = self._sender(o.client_id)
        if emit_open:
            send(lambda sv: enc.open_order(sv, o))
        send(lambda sv: enc.order_status(o))

    def _complete(self, o: WorkingOrder, completed_status: str) -> None:
        o.completed_time = enc.ib_time(self.out.now())
        o.completed_status = completed_status
        if o not in self.completed:
            self.completed.append(o)

    def add_execution(self, *, shares: float, price: float | None = None,
                      order_ref: str | None = None, order_id: int | None = None,
                      client_id: int | None = None, symbol: str | None = None,
                      con_id: int | None = None, side: str = 'BOT',
                      account: str | None = None) -> ExecRecord:
        """An execution that happens now, e.g. while its client is away.

        With ``order_ref`` or ``order_id`` it fills that working order (the
        owner gets the live messages if connected, and sees it on reqExecutions
        after a reconnect). Otherwise it is a stand-alone execution in
        ``symbol``/``con_id`` (think: an order placed in TWS by hand).
        """
        o = self.find_order(order_ref=order_ref, order_id=order_id, client_id=client_id)
        if o is not None:
            return self.execute(o, shares, price if price is not None else self._fill_price(o))
        if order_ref is not None or order_id is not None:
            raise ValueError(
                f'add_execution: no working order with order_ref={order_ref!r} '
                f'order_id={order_id!r}; working orders: {self.working_refs()}'
            )
        lst = self.resolve(symbol, con_id, 'add_execution')
        if side not in ('BOT', 'SLD'):
            raise ValueError(f"add_execution: side must be 'BOT' or 'SLD', not {side!r}")
        acct = account or self.default_account
        px = price if price is not None else self.quotes[lst.con_id].mid
        pnl = self._position(acct, lst).apply(shares if side == 'BOT' else -shares, px, lst.mult)
        ex = ExecRecord(
            exec_id=self._next_exec_id(), order_id=0, client_id=client_id or 0,
            perm_id=self._next_perm(), listing=lst, side=side, shares=float(shares),
            price=px, cum_qty=float(shares), avg_price=px, order_ref='', account=acct,
            time_epoch_secs=self.out.now(), commission=self._commission(lst, shares),
            realized_pnl=pnl,
        )
        self.executions.append(ex)
        self._emit_position(acct, lst)
        return ex

    def find_order(self, *, order_ref: str | None = None, order_id: int | None = None,
                   client_id: int | None = None) -> WorkingOrder | None:
        """The working (not done) order with this ref or id, if any."""
        for o in self.orders.values():
            if o.done:
                continue
            if client_id is not None and o.client_id != client_id:
                continue
            if order_ref is not None and o.order_ref == order_ref:
                return o
            if order_id is not None and o.order_id == order_id:
                return o
        return None

    def working_refs(self) -> list[tuple[int, int, str]]:
        return [(o.client_id, o.order_id, o.order_ref) for o in self.orders.values()
                if not o.done]

    def resolve(self, symbol: str | None, con_id: int | None, what: str) -> Listing:
        """A listing by conId, or by ``SYMBOL``, ``SYMBOL.VENUE`` or local symbol."""
        if con_id is not None:
            return self._listing(con_id, what)
        key = (symbol or '').upper()
        hits = [lst for lst in self.listings
                if key in (lst.symbol.upper(), lst.local.upper(),
                           f'{lst.symbol}.{lst.exchange}'.upper())]
        if len(hits) != 1:
            names = sorted(f'{lst.symbol}.{lst.exchange}' for lst in self.listings)
            raise ValueError(
                f'{what}: symbol {symbol!r} matches {len(hits)} listings; name one as '
                f"'SYMBOL.VENUE' or pass con_id=; listings: {names}"
            )
        return hits[0]

    def on_price(self, con_id: int) -> None:
        """Fill resting ``fill``-mode limits the new quote made marketable."""
        for o in list(self.orders.values()):
            if (not o.done and o.listing.con_id == con_id and o.mode == 'fill'
                    and self._marketable(o)):
                self.execute(o, o.remaining, self._fill_price(o))

    # -- queries -------------------------------------------------------------------------

    def open_orders(self, client_id: int | None) -> list[WorkingOrder]:
        """Working orders of one client (None or master client 0: all)."""
        return [o for o in self.orders.values()
                if not o.done and (client_id in (None, 0) or o.client_id == client_id)]

    def executions_matching(self, f: ReqExecutions) -> list[ExecRecord]:
        since = None
        if f.time:
            try:
                since = parse_end_time(f.time, 0)
            except ValueError:
                log.warning('fake_tws.exec_filter.bad_time', time=f.time)
        side = {'BUY': 'BOT', 'SELL': 'SLD'}.get(f.side.upper(), f.side.upper())
        out = []
        for ex in self.executions:
            if f.client_id and ex.client_id != f.client_id:
                continue
            if f.account and ex.account != f.account:
                continue
            if f.symbol and ex.listing.symbol.upper() != f.symbol.upper():
                continue
            if f.sec_type and ex.listing.sec_type != f.sec_type.upper():
                continue
            if f.exchange and ex.listing.exchange != f.exchange.upper():
                continue
            if side and ex.side != side:
                continue
            if since is not None and ex.time_epoch_secs < since:
                continue
            out.append(ex)
        return out

    def _position(self, account: str, lst: Listing) -> PositionState:
        return self.positions.setdefault((account, lst.con_id), PositionState())

    def position_rows(self) -> list[tuple[str, Listing, PositionState]]:
        return [(acct, self.by_con_id[cid], p) for (acct, cid), p in self.positions.items()]

    def portfolio_fields(self, account: str, lst: Listing, p: PositionState) -> list:
        mid = self.quotes[lst.con_id].mid
        unreal = (mid - p.avg_price) * p.qty * lst.mult
        return enc.portfolio(lst, p.qty, mid, p.avg_price * lst.mult, round(unreal, 2),
                             round(p.realized, 2), account)

    # -- emission helpers ------------------------------------------------------------------

    def _sender(self, client_id: int) -> Callable[[Build], None]:
        return lambda build: self.out.to_client(client_id, build)

    def _emit_state(self, o: WorkingOrder, status: str) -> None:
        o.status = status
        send = self._sender(o.client_id)
        send(lambda sv: enc.open_order(sv, o))
        send(lambda sv: enc.order_status(o))

    def _emit_position(self, account: str, lst: Listing) -> None:
        p = self._position(account, lst)
        qty, avg = p.qty, p.avg_price * lst.mult
        self.out.to_position_subscribers(lambda sv: enc.position(account, lst, qty, avg))
        fields = self.portfolio_fields(account, lst, p)
        self.out.to_account_subscribers(account, lambda sv: fields)
