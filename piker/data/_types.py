"""Market-data records that cross actor boundaries."""
from __future__ import annotations

from piker.types import Struct


class Tick(Struct, frozen=True):
    """One backend event: a quote, and a trade too when ``last`` is set.

    Backends may publish any object with these attributes (the sim model's
    ``SimTick`` has exactly these fields).
    """

    fqme: str
    ts_ns: int
    bid: float | None
    ask: float | None
    bid_size: float | None
    ask_size: float | None
    last: float | None = None
    last_size: float | None = None


class Quote(Struct, frozen=True):
    """The latest state of one market, as a consumer receives it.

    ``last``/``last_size``/``last_ts_ns`` describe the latest trade (which may be
    older than the latest bid/ask); ``volume`` sums trade sizes since the feed
    started. On the wire a quote is a plain dict with these keys, and a batch
    is ``{fqme: quote}``: slow consumers get the latest quote per market.
    """

    fqme: str
    ts_ns: int
    bid: float | None = None
    ask: float | None = None
    bid_size: float | None = None
    ask_size: float | None = None
    last: float | None = None
    last_size: float | None = None
    last_ts_ns: int | None = None
    volume: float = 0.0


class Increment(Struct, frozen=True):
    """A period boundary: the bar opening at ``epoch`` begins at buffer row
    ``index``; the bar that just closed is ``index - 1``."""

    period_secs: int
    epoch: int
    index: int
