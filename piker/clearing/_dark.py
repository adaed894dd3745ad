"""Dark orders: stops and alerts that rest inside emsd, not at a broker.

A ``stop`` becomes a market order when the last price crosses its price; an
``alert`` only reports (``triggered``). The direction comes from the action:
``buy`` fires when the price rises to the level (last >= price), ``sell`` when
it falls to it (last <= price) - a buy stop above the market protects a short,
a sell stop below it protects a long. A level that the market is already
through fires on the next quote.
"""
from __future__ import annotations

from ._messages import Order


def crossed(order: Order, last: float) -> bool:
    assert order.price is not None
    if order.action == 'buy':
        return last >= order.price
    return last <= order.price


class DarkBook:
    """Resting dark orders by market; pure, so triggers test without actors."""

    def __init__(self) -> None:
        self._by_fqme: dict[str, dict[str, Order]] = {}
        self._fqme_of: dict[str, str] = {}

    def add(self, order: Order) -> None:
        """Rest ``order`` (or replace the resting order of the same oid)."""
        if order.kind not in ('stop', 'alert') or order.price is None:
            raise ValueError(
                f'dark order {order.oid!r}: expected kind stop/alert with a price, '
                f'got kind={order.kind!r} price={order.price!r}'
            )
        self.remove(order.oid)
        self._by_fqme.setdefault(order.fqme, {})[order.oid] = order
        self._fqme_of[order.oid] = order.fqme

    def remove(self, oid: str) -> Order | None:
        fqme = self._fqme_of.pop(oid, None)
        if fqme is None:
            return None
        book = self._by_fqme[fqme]
        order = book.pop(oid)
        if not book:
            del self._by_fqme[fqme]
        return order

    def triggered(self, fqme: str, last: float) -> list[Order]:
        """Remove and return every order on ``fqme`` that ``last`` fires."""
        book = self._by_fqme.get(fqme)
        if not book:
            return []
        fired = [o for o in book.values() if crossed(o, last)]
        for order in fired:
            self.remove(order.oid)
        return fired

    def orders(self) -> list[Order]:
        return [o for book in self._by_fqme.values() for o in book.values()]

    def __contains__(self, oid: object) -> bool:
        return oid in self._fqme_of

    def __len__(self) -> int:
        return len(self._fqme_of)
