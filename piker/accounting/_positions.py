"""Fills and positions: the pure arithmetic of accounting.

A :class:`Position` is a fold of :func:`apply_fill` over a market's fills in
ledger order. Money is stored as floats (what brokers and TOML speak) but every
step is computed in :class:`~decimal.Decimal` from each float's shortest repr,
so sizes cancel exactly (``0.1 + 0.2 - 0.3`` is flat, not ``5e-17``) and the
same fills always give bit-identical positions, whether folded live or
recomputed on reload.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from decimal import Decimal

from ..types import Struct


class Fill(Struct, frozen=True):
    """One execution as the ledger records it.

    ``size`` is signed: positive bought, negative sold. ``fee`` is a cost
    (positive reduces realized P&L). Callers convert a broker's ``BrokerdFill``
    into this record; accounting never imports the clearing messages.
    """
    fill_id: str
    fqme: str
    size: float
    price: float
    fee: float = 0.0
    # UTC epoch nanoseconds of the execution
    ts_ns: int = 0
    oid: str = ''
    broker: str = ''
    account: str = ''


class Position(Struct, frozen=True):
    """Net holding in one market: signed size at a size-weighted average entry."""
    fqme: str
    size: float = 0.0
    avg_price: float = 0.0
    realized_pnl: float = 0.0

    def unrealized(self, last_price: float) -> float:
        """Mark-to-market P&L of the open size at ``last_price``."""
        if self.size == 0:
            return 0.0
        return float((_d(last_price) - _d(self.avg_price)) * _d(self.size))

    @property
    def is_flat(self) -> bool:
        return self.size == 0


def _d(x: float) -> Decimal:
    return Decimal(repr(float(x)))


def _sign(x: Decimal) -> int:
    return (x > 0) - (x < 0)


def validate_fill(fill: Fill) -> None:
    """Raise ``ValueError`` naming the field when ``fill`` cannot be accounted."""
    where = f'fill {fill.fill_id!r}'
    if not fill.fill_id:
        raise ValueError(f'fill for {fill.fqme!r} has an empty `fill_id`; every fill needs a unique id')
    if not fill.fqme:
        raise ValueError(f'{where} has an empty `fqme`; expected a market such as "btcusd.sim"')
    if not math.isfinite(fill.size) or fill.size == 0:
        raise ValueError(
            f'{where}: `size` must be a finite non-zero signed quantity '
            f'(+ bought, - sold), got {fill.size!r}'
        )
    if not math.isfinite(fill.price):
        raise ValueError(f'{where}: `price` must be finite, got {fill.price!r}')
    if not math.isfinite(fill.fee):
        raise ValueError(f'{where}: `fee` must be finite, got {fill.fee!r}')


def apply_fill(pos: Position, fill: Fill) -> Position:
    """Return ``pos`` after ``fill``.

    - adding (or opening) moves the average price, weighted by size;
    - reducing realizes ``(exit - avg) * closed_qty * sign(position)``;
    - crossing through zero realizes the closed part and opens the
      remainder at the fill price;
    - the fee is taken from realized P&L on the fill that paid it.
    """
    if fill.fqme != pos.fqme:
        raise ValueError(
            f'fill {fill.fill_id!r} is for {fill.fqme!r} but the position is {pos.fqme!r}'
        )
    size, avg, realized = _d(pos.size), _d(pos.avg_price), _d(pos.realized_pnl)
    qty, px = _d(fill.size), _d(fill.price)
    realized -= _d(fill.fee)
    new_size = size + qty

    if size == 0 or _sign(size) == _sign(qty):
        avg = (abs(size) * avg + abs(qty) * px) / abs(new_size)
    else:
        closed = min(abs(qty), abs(size))
        realized += (px - avg) * closed * _sign(size)
        if new_size == 0:
            avg = Decimal(0)
        elif _sign(new_size) != _sign(size):
            avg = px

    return Position(
        fqme=pos.fqme,
        size=float(new_size),
        avg_price=float(avg),
        realized_pnl=float(realized),
    )


def positions_from_fills(fills: Iterable[Fill]) -> dict[str, Position]:
    """Fold ``fills`` (in ledger order) into one position per market."""
    out: dict[str, Position] = {}
    for fill in fills:
        pos = out.get(fill.fqme) or Position(fqme=fill.fqme)
        out[fill.fqme] = apply_fill(pos, fill)
    return out
