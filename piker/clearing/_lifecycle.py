"""Order lifecycle as an explicit state-transition table.

emsd keeps one :class:`OrderTrack` per ``oid``; each broker event goes through
:func:`transition`, so an impossible sequence (a cancel ack for a filled order)
is an :class:`InvalidTransition` naming both ends instead of a silently wrong
status. Beyond the issue's events there is ``submit``: a dark stop that fired
and was sent to the broker (``dark -> pending``), while ``trigger`` is an
alert firing (``dark -> triggered``, terminal).

Fills are authoritative for quantities and prices. A broker's ``filled`` or
``canceled`` status may arrive before its fill messages, so
:meth:`OrderTrack.on_fill` still records a fill in a terminal state (without a
transition) as long as it stays within the order size: money that moved is
never dropped from the status stream.
"""
from __future__ import annotations

from typing import Literal, get_args

from ..log import get_logger
from ._messages import (
    TERMINAL_STATES,
    BrokerdFill,
    BrokerdStatus,
    Order,
    OrderState,
    Status,
)

log = get_logger(__name__)

OrderEvent = Literal[
    'ack', 'fill_partial', 'fill_full', 'cancel_ack', 'reject', 'error',
    'trigger', 'modify', 'submit',
]
STATES: tuple[str, ...] = get_args(OrderState)
EVENTS: tuple[str, ...] = get_args(OrderEvent)

# state -> {event: next state}; anything absent is invalid. Terminal states
# accept nothing.
TRANSITIONS: dict[str, dict[str, str]] = {
    'pending': {
        'ack': 'open',
        # brokers may report fills before the ack
        'fill_partial': 'partial',
        'fill_full': 'filled',
        'cancel_ack': 'canceled',
        'reject': 'rejected',
        'error': 'error',
        'modify': 'pending',
    },
    'dark': {
        'trigger': 'triggered',
        'submit': 'pending',
        'cancel_ack': 'canceled',
        'reject': 'rejected',
        'error': 'error',
        'modify': 'dark',
    },
    'open': {
        # a modify's ack re-acks a working order
        'ack': 'open',
        'fill_partial': 'partial',
        'fill_full': 'filled',
        'cancel_ack': 'canceled',
        'reject': 'rejected',
        'error': 'error',
        # keeps working on its old terms until the broker acks the change
        'modify': 'open',
    },
    'partial': {
        'ack': 'partial',
        'fill_partial': 'partial',
        'fill_full': 'filled',
        'cancel_ack': 'canceled',
        'reject': 'rejected',
        'error': 'error',
        'modify': 'partial',
    },
    **{state: {} for state in TERMINAL_STATES},
}


class InvalidTransition(ValueError):
    """An event that the order's current state does not allow."""

    def __init__(self, state: str, event: str) -> None:
        self.state = state
        self.event = event
        super().__init__(f'{state} -> {event}')


def transition(state: OrderState, event: OrderEvent) -> OrderState:
    """The state after ``event``; raises :class:`InvalidTransition`."""
    try:
        row = TRANSITIONS[state]
    except KeyError:
        raise ValueError(f'unknown order state {state!r}; expected one of {STATES}') from None
    if event not in EVENTS:
        raise ValueError(f'unknown order event {event!r}; expected one of {EVENTS}')
    try:
        return row[event]  # type: ignore[return-value]
    except KeyError:
        raise InvalidTransition(state, event) from None


_SIZE_EPS = 1e-9
# terminal states in which a broker's fill can still arrive (status raced ahead)
_LATE_FILL_OK = frozenset({'filled', 'canceled', 'rejected', 'error'})


class OrderTrack:
    """emsd's mutable record of one order; each ``on_*`` returns the
    :class:`Status` to publish (``None`` when nothing changed)."""

    __slots__ = ('order', 'state', 'filled', 'avg_price', 'reqid', 'fill_ids', 'reason')

    def __init__(self, order: Order, *, dark: bool = False) -> None:
        self.order = order
        self.state: OrderState = 'dark' if dark else 'pending'
        self.filled = 0.0
        self.avg_price: float | None = None
        self.reqid: str | None = None
        self.fill_ids: set[str] = set()
        self.reason = ''

    @property
    def oid(self) -> str:
        return self.order.oid

    @property
    def remaining(self) -> float:
        return max(self.order.size - self.filled, 0.0)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def status(self, ts_ns: int = 0, **extra: object) -> Status:
        o = self.order
        return Status(
            oid=o.oid, state=self.state, fqme=o.fqme, account=o.account,
            action=o.action, size=o.size, filled=self.filled,
            remaining=self.remaining, avg_price=self.avg_price,
            reason=self.reason, reqid=self.reqid, source=o.source, ts_ns=ts_ns,
            **extra,  # type: ignore[arg-type]
        )

    def _go(self, event: OrderEvent) -> None:
        before = self.state
        self.state = transition(self.state, event)
        log.debug('order.transition', oid=self.oid, before=before, order_event=event, after=self.state)

    # -- events --------------------------------------------------------------

    def on_ack(self, reqid: str, ts_ns: int = 0) -> Status:
        self._go('ack')
        self.reqid = reqid
        return self.status(ts_ns)

    def on_submit(self, ts_ns: int = 0) -> Status:
        """A dark stop fired and was sent to the broker."""
        self._go('submit')
        return self.status(ts_ns)

    def on_trigger(self, ts_ns: int = 0) -> Status:
        """An alert fired."""
        self._go('trigger')
        return self.status(ts_ns)

    def on_modify(self, order: Order, ts_ns: int = 0) -> Status:
        if order.oid != self.oid:
            raise ValueError(f'modify for oid {order.oid!r} sent to the track of {self.oid!r}')
        if order.size + _SIZE_EPS < self.filled:
            raise ValueError(
                f'cannot modify {self.oid!r} to size {order.size:g}: {self.filled:g} already filled'
            )
        self._go('modify')
        self.order = order
        return self.status(ts_ns)

    def on_fill(self, fill: BrokerdFill) -> Status | None:
        """Accumulate a fill; ``None`` for a fill id seen before."""
        if fill.fill_id in self.fill_ids:
            return None
        new_filled = self.filled + fill.size
        if new_filled > self.order.size + _SIZE_EPS:
            raise ValueError(
                f'fill {fill.fill_id!r} of {fill.size:g} overfills {self.oid!r}: '
                f'{self.filled:g} of {self.order.size:g} already filled'
            )
        full = new_filled >= self.order.size - _SIZE_EPS
        if self.state in _LATE_FILL_OK:
            # real money moved: record it without pretending the order reopened
            log.warning('order.late_fill', oid=self.oid, state=self.state, fill_id=fill.fill_id)
        else:
            self._go('fill_full' if full else 'fill_partial')
        if fill.reqid and self.reqid is None:
            self.reqid = fill.reqid
        prev = self.avg_price or 0.0
        self.avg_price = (prev * self.filled + fill.price * fill.size) / new_filled
        self.filled = self.order.size if full else new_filled
        self.fill_ids.add(fill.fill_id)
        return self.status(
            fill.ts_ns, fill_size=fill.size, fill_price=fill.price, fill_id=fill.fill_id,
        )

    def on_cancel_ack(self, reason: str = '', ts_ns: int = 0) -> Status:
        self._go('cancel_ack')
        self.reason = reason
        return self.status(ts_ns)

    def on_reject(self, reason: str, ts_ns: int = 0) -> Status:
        self._go('reject')
        self.reason = reason
        return self.status(ts_ns)

    def on_error(self, reason: str, code: int | None = None, ts_ns: int = 0) -> Status:
        self._go('error')
        self.reason = reason
        return self.status(ts_ns, code=code)

    def on_status(self, msg: BrokerdStatus) -> Status | None:
        """Map a broker status report; quantities come from fills, so
        ``open``/``partial`` reports only ever ack a pending order."""
        if msg.reqid and self.reqid is None:
            self.reqid = msg.reqid
        match msg.state:
            case 'open' | 'partial':
                if self.state == 'pending':
                    return self.on_ack(msg.reqid, msg.ts_ns)
                return None
            case 'filled':
                if self.state == 'filled':
                    return None
                self._go('fill_full')
                return self.status(msg.ts_ns)
            case 'canceled':
                return self.on_cancel_ack(msg.reason, msg.ts_ns)
            case 'rejected':
                return self.on_reject(msg.reason, msg.ts_ns)
            case 'error':
                return self.on_error(msg.reason, msg.code, msg.ts_ns)
        raise ValueError(f'unknown broker status state {msg.state!r} for {self.oid!r}')


def _check_table() -> None:
    """Import-time sanity: the table covers exactly the declared states/events."""
    assert set(TRANSITIONS) == set(STATES), set(STATES) ^ set(TRANSITIONS)
    for row in TRANSITIONS.values():
        assert set(row) <= set(EVENTS) and set(row.values()) <= set(STATES)


_check_table()
