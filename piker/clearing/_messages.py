"""Order-path wire messages.

Client <-> emsd: :class:`Order`, :class:`Cancel`, :class:`Status`.
emsd <-> broker (a live ``brokerd.<backend>`` or ``paperboi.<backend>``):
:class:`BrokerdOrder`, :class:`BrokerdCancel`, :class:`BrokerdOrderAck`,
:class:`BrokerdStatus`, :class:`BrokerdFill`, :class:`BrokerdError`,
:class:`BrokerdPosition`.

Every message is a tagged msgspec Struct; receivers decode with
:func:`decode_msg` into the union of what they accept and dispatch with
``match``. Wire messages never forbid unknown fields (new fields get defaults).
Every broker-side message carries the client order id ``oid`` as well as the
broker's own ``reqid``.
"""
from __future__ import annotations

import time
from typing import Any, Literal, TypeVar

import msgspec

from ..types import Msg

Action = Literal['buy', 'sell']
# market: at the touch; limit: at `price` or better; stop: becomes market when
# the last price crosses `price` (evaluated in emsd, "dark"); alert: a dark
# trigger that only reports.
OrderKind = Literal['market', 'limit', 'stop', 'alert']
OrderState = Literal[
    'pending',      # accepted by emsd, not yet acked by the broker
    'dark',         # resting inside emsd as a local trigger
    'open',         # acked by the broker, working
    'partial',      # partially filled, still working
    'filled',       # terminal: fully filled
    'canceled',     # terminal
    'rejected',     # terminal: refused by the risk gate or the broker
    'error',        # terminal: the broker failed the order
    'triggered',    # terminal for alerts: the trigger fired
]
TERMINAL_STATES: frozenset[str] = frozenset(
    {'filled', 'canceled', 'rejected', 'error', 'triggered'}
)


def now_ns() -> int:
    return time.time_ns()


# -- client <-> emsd ---------------------------------------------------------

class Order(Msg, frozen=True, tag='order'):
    """A client's order intent; re-sending the same `oid` modifies it."""
    oid: str
    fqme: str
    action: Action
    size: float
    kind: OrderKind = 'market'
    price: float | None = None
    account: str = 'paper'
    # who placed it (strategy name or 'cli'), for logs and the audit trail
    source: str = 'cli'
    ts_ns: int = 0


class Cancel(Msg, frozen=True, tag='cancel'):
    oid: str
    fqme: str | None = None
    reason: str = ''


class Status(Msg, frozen=True, tag='status'):
    """An order's lifecycle as emsd reports it to clients."""
    oid: str
    state: OrderState
    fqme: str = ''
    account: str = ''
    action: Action | None = None
    size: float = 0.0
    filled: float = 0.0
    remaining: float = 0.0
    avg_price: float | None = None
    # last fill carried by this status, if any
    fill_size: float | None = None
    fill_price: float | None = None
    fill_id: str | None = None
    reason: str = ''
    # broker error code where the broker gave one (IB: 201, 202, ...)
    code: int | None = None
    reqid: str | None = None
    source: str = ''
    ts_ns: int = 0


ClientMsg = Order | Cancel


# -- emsd <-> broker ---------------------------------------------------------

class BrokerdOrder(Msg, frozen=True, tag='brokerd_order'):
    oid: str
    account: str
    fqme: str
    action: Action
    size: float
    kind: Literal['market', 'limit'] = 'market'
    price: float | None = None
    # set when this modifies an order the broker already acked
    reqid: str | None = None
    ts_ns: int = 0
    # the client that placed it (a strategy's name): kept by the broker with
    # its resting orders so a restarted emsd hands each client its own back
    source: str = ''


class BrokerdCancel(Msg, frozen=True, tag='brokerd_cancel'):
    oid: str
    account: str
    reqid: str | None = None
    fqme: str = ''


class BrokerdOrderAck(Msg, frozen=True, tag='brokerd_ack'):
    oid: str
    reqid: str
    account: str = ''


class BrokerdStatus(Msg, frozen=True, tag='brokerd_status'):
    oid: str
    reqid: str
    account: str
    state: Literal['open', 'partial', 'filled', 'canceled', 'rejected', 'error']
    filled: float = 0.0
    remaining: float = 0.0
    reason: str = ''
    code: int | None = None
    ts_ns: int = 0


class BrokerdFill(Msg, frozen=True, tag='brokerd_fill'):
    oid: str
    reqid: str
    # unique forever for this broker: re-applying a known fill_id is a no-op
    fill_id: str
    account: str
    fqme: str
    action: Action
    size: float
    price: float
    fee: float = 0.0
    ts_ns: int = 0


class BrokerdError(Msg, frozen=True, tag='brokerd_error'):
    oid: str
    reqid: str | None = None
    account: str = ''
    code: int | None = None
    reason: str = ''
    ts_ns: int = 0


class BrokerdPosition(Msg, frozen=True, tag='brokerd_position'):
    broker: str
    account: str
    fqme: str
    size: float
    avg_price: float
    # realized P&L of this position in the account's currency, where known
    realized_pnl: float = 0.0
    ts_ns: int = 0


# -- contract warm-up (client -> emsd -> broker and back) ---------------------

class Warm(Msg, frozen=True, tag='warm'):
    """A client asks the brokers of these markets to resolve and cache their
    market info / contracts before trading starts."""
    reqid: str
    fqmes: list[str] = msgspec.field(default_factory=list)


class Warmed(Msg, frozen=True, tag='warmed'):
    """emsd's answer to :class:`Warm`: what was warmed, and why the rest failed."""
    reqid: str
    fqmes: list[str] = msgspec.field(default_factory=list)
    # fqme -> reason it could not be resolved
    errors: dict[str, str] = msgspec.field(default_factory=dict)


class BrokerdWarm(Msg, frozen=True, tag='brokerd_warm'):
    reqid: str
    fqmes: list[str] = msgspec.field(default_factory=list)


class BrokerdWarmed(Msg, frozen=True, tag='brokerd_warmed'):
    reqid: str
    fqmes: list[str] = msgspec.field(default_factory=list)
    errors: dict[str, str] = msgspec.field(default_factory=dict)


# -- resolving orders by oid after a lost link (client -> emsd -> broker) -------

class Resolve(Msg, frozen=True, tag='resolve'):
    """What became of these orders? A client whose dialog was lost (emsd died,
    or the client re-opened its session) asks by oid instead of re-sending."""
    reqid: str
    # oid -> fqme (the fqme routes the question when emsd never saw the oid)
    orders: dict[str, str] = msgspec.field(default_factory=dict)


class Resolved(Msg, frozen=True, tag='resolved'):
    """emsd's answer to :class:`Resolve`.

    ``statuses``: orders emsd tracks (working, or final as it knows them);
    ``fills``: every fill the brokers recorded for the asked oids;
    ``unknown``: oids neither emsd nor their broker ever saw (never arrived);
    ``undecided``: oid -> why nobody could tell (e.g. the broker is offline).
    """
    reqid: str
    statuses: list[Status] = msgspec.field(default_factory=list)
    fills: list[BrokerdFill] = msgspec.field(default_factory=list)
    unknown: list[str] = msgspec.field(default_factory=list)
    undecided: dict[str, str] = msgspec.field(default_factory=dict)


class BrokerdResolve(Msg, frozen=True, tag='brokerd_resolve'):
    reqid: str
    oids: list[str] = msgspec.field(default_factory=list)


class BrokerdResolved(Msg, frozen=True, tag='brokerd_resolved'):
    """A broker's answer: orders still working, recorded fills (its ledger),
    oids it never saw, oids it cannot decide about right now, and oids it saw
    end unfilled (oid -> 'canceled' / 'rejected' / 'error')."""
    reqid: str
    working: list[BrokerdOrder] = msgspec.field(default_factory=list)
    fills: list[BrokerdFill] = msgspec.field(default_factory=list)
    unknown: list[str] = msgspec.field(default_factory=list)
    undecided: dict[str, str] = msgspec.field(default_factory=dict)
    done: dict[str, str] = msgspec.field(default_factory=dict)


BrokerRequest = BrokerdOrder | BrokerdCancel
BrokerEvent = (
    BrokerdOrderAck | BrokerdStatus | BrokerdFill | BrokerdError | BrokerdPosition
)

T = TypeVar('T')


class BadMessage(ValueError):
    """A message that failed validation; the text names the field."""


def decode_msg(raw: Any, into: Any) -> Any:
    """Validate a received message (a dict off the tractor wire, or already a
    Struct) into the tagged union ``into``; raise :class:`BadMessage` naming the
    offending field."""
    if isinstance(raw, msgspec.Struct):
        raw = msgspec.to_builtins(raw)
    try:
        return msgspec.convert(raw, into)
    except msgspec.ValidationError as err:
        raise BadMessage(str(err)) from None


def to_wire(msg: msgspec.Struct) -> dict[str, Any]:
    """A Struct as the plain dict tractor ships (with its ``type`` tag)."""
    return msgspec.to_builtins(msg)
