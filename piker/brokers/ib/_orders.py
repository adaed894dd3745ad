"""brokerd.ib's order bookkeeping: IB's reports → broker-dialog messages.

Pure and sync (testable without IB or an event loop). Orders are identified
by the EMS ``oid``, which travels to IB in ``orderRef``; IB's own ids
(``orderId`` per client id, the global ``permId``) are learned as reports
arrive and used as fallbacks, so orders can be matched back after a
reconnect even under another client id.

Quantities are driven by fills (see ``broker.py``), so this module emits only
what fills cannot say: a working order was canceled, or IB ended it with an
error (a rejection, ``Inactive``), or a cancel failed.
"""
from __future__ import annotations

from collections.abc import Iterable

from ...clearing._messages import BrokerdError, BrokerdOrder, BrokerdStatus, now_ns
from .api import CANCEL_CODES, IbError, OrderReport

SIZE_EPS = 1e-9
WORKING_STATUSES = frozenset({
    'PendingSubmit', 'ApiPending', 'PreSubmitted', 'Submitted', 'PendingCancel',
    'ValidationError',
})
CANCELED_STATUSES = frozenset({'Cancelled', 'ApiCancelled'})


class AccountMap:
    """bot.toml's account aliases ↔ IB account codes (``[brokers.ib.accounts]``)."""

    def __init__(self, aliases: dict[str, str]) -> None:
        self._code_by_alias = dict(aliases)
        self._alias_by_code = {code: alias for alias, code in aliases.items()}
        self.managed: list[str] = []

    def alias_for(self, code: str) -> str:
        return self._alias_by_code.get(code, code)

    def code_for(self, alias: str) -> str:
        """IB's code for ``alias``; a managed code passes as itself."""
        code = self._code_by_alias.get(alias)
        if code is not None:
            return code
        if alias in self.managed:
            return alias
        known = sorted({*self._code_by_alias, *(self.alias_for(c) for c in self.managed)})
        raise ValueError(
            f'unknown IB account {alias!r}: expected one of {", ".join(known) or "(none)"}; '
            'map it to an IB account code under [brokers.ib.accounts] in bot.toml'
        )

    def aliases(self) -> list[str]:
        return sorted({self.alias_for(c) for c in self.managed})


def map_status(status: str, error_code: int | None) -> str | None:
    """IB's order status as a dialog state (None: not one we know)."""
    if status == 'Filled':
        return 'filled'
    if status in CANCELED_STATUSES:
        if error_code is not None and error_code not in CANCEL_CODES:
            return 'error'
        return 'canceled'
    if status == 'Inactive':
        return 'error'
    if status in WORKING_STATUSES:
        return 'open'
    return None


class TrackedOrder:
    """One order brokerd.ib knows, placed here or found at IB."""

    __slots__ = (
        'oid', 'account', 'fqme', 'action', 'size', 'kind', 'price', 'ts_ns',
        'order_id', 'client_id', 'perm_id', 'state', 'filled', 'cancel_requested',
    )

    def __init__(self, order: BrokerdOrder) -> None:
        self.oid = order.oid
        self.account = order.account
        self.fqme = order.fqme
        self.action = order.action
        self.size = order.size
        self.kind = order.kind
        self.price = order.price
        self.ts_ns = order.ts_ns
        self.order_id = 0
        self.client_id = -1
        self.perm_id = 0
        self.state = 'pending'
        self.filled = 0.0
        self.cancel_requested = False

    @property
    def reqid(self) -> str | None:
        if self.order_id:
            return str(self.order_id)
        return str(self.perm_id) if self.perm_id else None

    @property
    def terminal(self) -> bool:
        return self.state in ('filled', 'canceled', 'rejected', 'error')

    @property
    def remaining(self) -> float:
        return max(self.size - self.filled, 0.0)

    def update(self, order: BrokerdOrder) -> None:
        self.size, self.kind, self.price = order.size, order.kind, order.price

    def as_order(self) -> BrokerdOrder:
        return BrokerdOrder(
            oid=self.oid, account=self.account, fqme=self.fqme, action=self.action,  # type: ignore[arg-type]
            size=self.size, kind=self.kind, price=self.price, reqid=self.reqid,  # type: ignore[arg-type]
            ts_ns=self.ts_ns,
        )


def external_oid(perm_id: int) -> str:
    """The oid given to an order placed outside piker (no ``orderRef``)."""
    return f'ib-{perm_id}'


class OrderBook:
    def __init__(self) -> None:
        self.orders: dict[str, TrackedOrder] = {}
        self._by_perm: dict[int, str] = {}

    def get(self, oid: str) -> TrackedOrder | None:
        return self.orders.get(oid)

    def track(self, order: BrokerdOrder) -> TrackedOrder:
        """Start tracking ``order`` (or take a modification's new terms)."""
        tracked = self.orders.get(order.oid)
        if tracked is None:
            tracked = self.orders[order.oid] = TrackedOrder(order)
        else:
            tracked.update(order)
        return tracked

    def placed(self, oid: str, order_id: int, client_id: int) -> TrackedOrder:
        tracked = self.orders[oid]
        tracked.order_id, tracked.client_id = order_id, client_id
        if tracked.state == 'pending':
            tracked.state = 'open'
        return tracked

    def oid_of(self, order_ref: str, perm_id: int, order_id: int = 0,
               client_id: int = -1) -> str | None:
        if order_ref and order_ref in self.orders:
            return order_ref
        if perm_id and perm_id in self._by_perm:
            return self._by_perm[perm_id]
        if order_id:
            for tracked in self.orders.values():
                if tracked.order_id == order_id and tracked.client_id == client_id:
                    return tracked.oid
        return None

    def find(self, rep: OrderReport) -> TrackedOrder | None:
        oid = self.oid_of(rep.order_ref, rep.perm_id, rep.order_id, rep.client_id)
        return self.orders.get(oid) if oid else None

    def _learn_ids(self, tracked: TrackedOrder, rep: OrderReport) -> None:
        if rep.perm_id:
            tracked.perm_id = rep.perm_id
            self._by_perm[rep.perm_id] = tracked.oid
        if rep.order_id:
            tracked.order_id, tracked.client_id = rep.order_id, rep.client_id

    def adopt(self, rep: OrderReport, account: str, fqme: str) -> TrackedOrder | None:
        """Track a working order found at IB (after a restart or reconnect)."""
        if map_status(rep.status, rep.error_code) != 'open':
            return None
        oid = rep.order_ref or external_oid(rep.perm_id)
        tracked = self.track(BrokerdOrder(
            oid=oid, account=account, fqme=fqme,
            action='buy' if rep.action.upper() == 'BUY' else 'sell',
            size=rep.qty, kind='limit' if rep.order_type == 'LMT' else 'market',
            price=rep.lmt_price, ts_ns=now_ns(),
        ))
        self._learn_ids(tracked, rep)
        tracked.state = 'open'
        return tracked

    def on_report(self, rep: OrderReport) -> list[BrokerdStatus | BrokerdError]:
        tracked = self.find(rep)
        if tracked is None:
            return []
        self._learn_ids(tracked, rep)
        state = map_status(rep.status, rep.error_code)
        if state is None or tracked.terminal:
            return []
        match state:
            case 'open':
                if tracked.state == 'pending':
                    tracked.state = 'open'
                return []
            case 'filled':
                # fills carry the quantities; the order ends when they add up
                return []
            case 'canceled':
                tracked.state = 'canceled'
                return [BrokerdStatus(
                    oid=tracked.oid, reqid=tracked.reqid or '', account=tracked.account,
                    state='canceled', filled=tracked.filled, remaining=tracked.remaining,
                    reason='canceled at IB', code=rep.error_code, ts_ns=now_ns(),
                )]
            case _:
                tracked.state = 'error'
                reason = (f'IB {rep.error_code}: {rep.error_text}' if rep.error_code
                          else f'IB reports the order {rep.status}')
                return [BrokerdError(
                    oid=tracked.oid, reqid=tracked.reqid, account=tracked.account,
                    code=rep.error_code, reason=reason, ts_ns=now_ns(),
                )]

    def on_error(self, err: IbError, client_id: int) -> list[BrokerdError]:
        """An IB error naming one of our order ids: only a failed cancel is
        reported here (errors that end an order arrive as its report)."""
        oid = self.oid_of('', 0, err.req_id, client_id) if err.req_id > 0 else None
        tracked = self.orders.get(oid) if oid else None
        if tracked is None or tracked.terminal or err.code in CANCEL_CODES:
            return []
        if not tracked.cancel_requested:
            return []
        tracked.cancel_requested = False
        return [BrokerdError(
            oid=tracked.oid, reqid=tracked.reqid, account=tracked.account, code=err.code,
            reason=f'IB {err.code}: {err.text}', ts_ns=now_ns(),
        )]

    def on_fill(self, oid: str, size: float) -> None:
        tracked = self.orders.get(oid)
        if tracked is None:
            return
        tracked.filled += size
        if tracked.filled >= tracked.size - SIZE_EPS and tracked.state != 'error':
            tracked.state = 'filled'

    def working(self, accounts: Iterable[str] | None = None) -> list[TrackedOrder]:
        wanted = set(accounts) if accounts is not None else None
        return [t for t in self.orders.values()
                if not t.terminal and (wanted is None or t.account in wanted)]
