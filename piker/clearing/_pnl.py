"""The day's P&L that feeds the risk gate's daily loss limit.

Mark-to-market since the start of the UTC day, per (account, fqme)::

    pnl = cash_today + size_now * mark_now - size_at_start * mark_at_start

``cash_today`` is what today's fills paid or received, fees included, so the
sum is realized plus unrealized P&L of the day. At the first event of a new UTC
day each book re-bases on its current size and mark. A book whose market has
no mark yet counts its cash only; its first quote (or fill price) becomes the
start mark. After an emsd restart the day re-bases at the restart: the halt
itself is persisted by the gate, the P&L baseline is not.
"""
from __future__ import annotations

from datetime import UTC, date, datetime


class _Book:
    __slots__ = ('cash', 'mark', 'size', 'start_mark', 'start_size')

    def __init__(self, size: float = 0.0) -> None:
        self.start_size = size
        self.start_mark: float | None = None
        self.size = size
        self.mark: float | None = None
        self.cash = 0.0

    def value(self) -> float:
        if self.mark is None or self.start_mark is None:
            return self.cash
        return self.cash + self.size * self.mark - self.start_size * self.start_mark

    def rebase(self) -> None:
        self.start_size = self.size
        self.start_mark = self.mark
        self.cash = 0.0


def utc_day(ts_ns: int) -> date:
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).date()


class DayPnl:
    def __init__(self) -> None:
        self._books: dict[tuple[str, str], _Book] = {}
        self._day: date | None = None

    def _roll(self, ts_ns: int) -> None:
        day = utc_day(ts_ns)
        if day != self._day:
            if self._day is not None:
                for book in self._books.values():
                    book.rebase()
            self._day = day

    def start_position(self, account: str, fqme: str, size: float) -> None:
        """A position that existed before emsd saw any fill of it."""
        if (account, fqme) not in self._books:
            self._books[(account, fqme)] = _Book(size)

    def on_fill(self, account: str, fqme: str, signed_size: float, price: float,
                fee: float, ts_ns: int) -> None:
        self._roll(ts_ns)
        book = self._books.setdefault((account, fqme), _Book())
        book.cash -= signed_size * price + fee
        book.size += signed_size
        if book.mark is None:
            book.mark = price
        if book.start_mark is None:
            book.start_mark = price

    def on_mark(self, fqme: str, mark: float, ts_ns: int) -> None:
        self._roll(ts_ns)
        for (_, book_fqme), book in self._books.items():
            if book_fqme == fqme:
                if book.start_mark is None:
                    book.start_mark = mark
                book.mark = mark

    def total(self, now_ns: int) -> float:
        self._roll(now_ns)
        return sum(book.value() for book in self._books.values())

    def by_market(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (_, fqme), book in self._books.items():
            out[fqme] = out.get(fqme, 0.0) + book.value()
        return out
