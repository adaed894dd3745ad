"""Mutable gateway-side records: working orders and executions."""
from __future__ import annotations

import msgspec

from ._scenario import Listing

DONE_STATES = frozenset({'Filled', 'Cancelled', 'ApiCancelled', 'Inactive'})


class WorkingOrder(msgspec.Struct, kw_only=True):
    """One order as the gateway tracks it (mutable: status and fills change)."""

    order_id: int
    client_id: int
    perm_id: int
    listing: Listing
    exchange: str  # as the client routed it (SMART or the venue)
    action: str  # BUY / SELL
    qty: float
    order_type: str
    lmt_price: float | None = None
    aux_price: float | None = None
    tif: str = 'DAY'
    account: str = ''
    order_ref: str = ''
    oca_group: str = ''
    outside_rth: bool = False
    parent_id: int = 0
    status: str = 'PreSubmitted'
    filled: float = 0.0
    avg_fill_price: float = 0.0
    last_fill_price: float = 0.0
    mode: str = 'fill'
    chunks_left: int = 0
    completed_time: str = ''
    completed_status: str = ''

    @property
    def remaining(self) -> float:
        return max(self.qty - self.filled, 0.0)

    @property
    def done(self) -> bool:
        return self.status in DONE_STATES

    @property
    def side(self) -> str:
        return 'BOT' if self.action == 'BUY' else 'SLD'


class ExecRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One execution (fill), kept for reqExecutions after (re)connects."""

    exec_id: str
    order_id: int
    client_id: int
    perm_id: int
    listing: Listing
    side: str  # BOT / SLD
    shares: float
    price: float
    cum_qty: float
    avg_price: float
    order_ref: str
    account: str
    time_epoch_secs: float
    commission: float
    realized_pnl: float | None = None

    @property
    def exchange(self) -> str:
        return self.listing.exchange
