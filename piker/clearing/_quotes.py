"""Quotes for the order path: one feed subscription per market, on demand.

emsd (risk gate, dark triggers, P&L marks) and paperboi (clearing) both need
the latest quote of every market they hold orders in. :class:`QuoteFeeds`
subscribes to datad through :func:`piker.data.open_feed` the first time a
market is needed and hands every batch, normalised to :class:`QuoteTick`, to
one synchronous callback.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import trio

from ..log import get_logger
from ..types import Fqme, Struct

log = get_logger(__name__)

FEED_START_SECS = 20.0


class QuoteTick(Struct, frozen=True):
    fqme: str
    bid: float | None
    ask: float | None
    # the last trade price, when the update carried one
    last: float | None
    ts_ns: int

    @property
    def mark(self) -> float | None:
        """The price to value positions at: last trade, else the mid."""
        if self.last is not None:
            return self.last
        if self.bid is not None and self.ask is not None:
            return (self.bid + self.ask) / 2
        return self.bid if self.bid is not None else self.ask


def _get(quote: Any, *names: str) -> Any:
    for name in names:
        value = quote.get(name) if isinstance(quote, Mapping) else getattr(quote, name, None)
        if value is not None:
            return value
    return None


def _price(value: Any) -> float | None:
    if isinstance(value, int | float) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def normalize_quote(quote: Any, fqme: str | None = None) -> QuoteTick | None:
    """One quote (a dict or a Struct from datad) as a :class:`QuoteTick`;
    ``None`` when it carries no usable price."""
    key = _get(quote, 'fqme', 'symbol') or fqme
    if not isinstance(key, str):
        return None
    bid, ask = _price(_get(quote, 'bid')), _price(_get(quote, 'ask'))
    last = _price(_get(quote, 'last', 'price'))
    if bid is None and ask is None and last is None:
        return None
    ts = _get(quote, 'ts_ns')
    if ts is None:
        secs = _get(quote, 'time', 'ts')
        ts = int(secs * 1e9) if isinstance(secs, int | float) else 0
    return QuoteTick(fqme=key, bid=bid, ask=ask, last=last, ts_ns=int(ts))


def normalize_batch(batch: Any) -> list[QuoteTick]:
    """A datad batch (``{fqme: quote}``, a list of quotes, or one quote)."""
    if isinstance(batch, Mapping) and not _looks_like_quote(batch):
        items = [normalize_quote(q, fqme) for fqme, q in batch.items()]
    elif isinstance(batch, list | tuple):
        items = [normalize_quote(q) for q in batch]
    else:
        items = [normalize_quote(batch)]
    return [q for q in items if q is not None]


def _looks_like_quote(obj: Mapping[str, Any]) -> bool:
    return any(k in obj for k in ('bid', 'ask', 'last', 'price'))


class FeedError(RuntimeError):
    """A market whose feed could not be opened; the text says why."""


class _FeedState:
    def __init__(self, fqme: str) -> None:
        # the feed's canonical name for the market (``mnq.sim`` -> ``mnq.cme.sim``)
        self.fqme = fqme
        self.ready = trio.Event()
        self.error: str | None = None
        self.market_info: Any = None
        # under a driven (test/replay) clock, quotes and orders carry that
        # clock's time: see QuoteFeeds.catch_up
        self.driven = False
        self.last_ts_ns = 0
        self.moved = trio.Event()


class QuoteFeeds:
    """Per-market datad subscriptions feeding ``on_batch`` (sync, never awaits).

    ``backend_cfgs`` maps a backend name to its ``[brokers.<backend>]`` table
    (builtins), passed to datad when it is spawned.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        backend_cfgs: Mapping[str, Any],
        on_batch: Callable[[list[QuoteTick]], None],
    ) -> None:
        self._nursery = nursery
        self._cfgs = dict(backend_cfgs)
        self._on_batch = on_batch
        self._feeds: dict[str, _FeedState] = {}

    def subscribed(self) -> list[str]:
        return [f for f, s in self._feeds.items() if s.ready.is_set() and s.error is None]

    def canonical(self, fqme: str) -> str:
        state = self._feeds.get(fqme)
        return state.fqme if state else fqme

    def market_info(self, fqme: str) -> Any:
        state = self._feeds.get(fqme)
        return state.market_info if state else None

    async def ensure(self, fqme: str, timeout_secs: float = FEED_START_SECS) -> str:
        """Subscribe to ``fqme`` (once) and return its canonical fqme after its
        first quote was delivered to ``on_batch``; raise :class:`FeedError`
        otherwise."""
        state = self._feeds.get(fqme)
        if state is None or (state.ready.is_set() and state.error is not None):
            state = self._feeds[fqme] = _FeedState(fqme)
            self._nursery.start_soon(self._run_feed, fqme, state)
        with trio.move_on_after(timeout_secs):
            await state.ready.wait()
        if not state.ready.is_set():
            raise FeedError(f'no quote for {fqme} within {timeout_secs:g}s: is its feed running?')
        if state.error is not None:
            raise FeedError(state.error)
        return state.fqme

    async def catch_up(self, fqme: str, ts_ns: int, timeout_secs: float = 2.0) -> None:
        """Under a driven clock, wait (bounded) until ``fqme``'s quotes reach
        ``ts_ns``: an order stamped at a bar boundary then clears against the
        market at that boundary, whatever order the actors' messages race in.
        A wall-clock feed returns at once (the latest quote is the market)."""
        state = self._feeds.get(fqme)
        if state is None or not state.driven:
            return
        with trio.move_on_after(timeout_secs):
            while state.last_ts_ns < ts_ns:
                await state.moved.wait()

    def _mark(self, state: _FeedState, quotes: list[QuoteTick]) -> None:
        newest = max((q.ts_ns or 0 for q in quotes), default=0)
        if newest > state.last_ts_ns:
            state.last_ts_ns = newest
            state.moved.set()
            state.moved = trio.Event()

    def _deliver(self, quotes: list[QuoteTick]) -> None:
        # a consumer bug must not cost every later quote of the market
        try:
            self._on_batch(quotes)
        except Exception:
            log.exception('quotes.consumer_failed', fqmes=[q.fqme for q in quotes])

    async def _run_feed(self, fqme: str, state: _FeedState) -> None:
        try:
            backend = Fqme.parse(fqme).backend
            from ..data import open_feed
            # quotes only: no OHLC buffers or history for the order path
            async with open_feed([fqme], backend_cfg=self._cfgs.get(backend) or {},
                                 timeframes=[]) as feed:
                canonical = (getattr(feed, 'fqmes', None) or [fqme])[0]
                if canonical != fqme:
                    state.fqme = canonical
                    self._feeds.setdefault(canonical, state)
                state.market_info = _first_value(getattr(feed, 'market_info', None), canonical)
                state.driven = getattr(feed, 'clock', 'wall') == 'driven'
                first = normalize_batch(getattr(feed, 'first_quotes', None) or {})
                if first:
                    self._deliver(first)
                    self._mark(state, first)
                    state.ready.set()
                assert feed.stream is not None  # opened with start_stream=True
                async for batch in feed.stream:
                    quotes = normalize_batch(batch)
                    if quotes:
                        self._deliver(quotes)
                        self._mark(state, quotes)
                        state.ready.set()
        except trio.Cancelled:
            raise
        except Exception as err:
            state.error = f'feed for {fqme} failed: {_describe(err)}'
            log.warning('quotes.feed_failed', fqme=fqme, error=state.error)
        else:
            state.error = f'feed for {fqme} ended'
            log.warning('quotes.feed_ended', fqme=fqme)
        finally:
            state.ready.set()


def _first_value(info: Any, fqme: str) -> Any:
    if isinstance(info, Mapping):
        return info.get(fqme) or next(iter(info.values()), None)
    return info


def _describe(err: BaseException) -> str:
    """The remote error's last line when it came from another actor."""
    msgdata = getattr(err, 'msgdata', None)
    if isinstance(msgdata, dict) and msgdata.get('tb_str'):
        lines = [ln for ln in msgdata['tb_str'].strip().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else msgdata.get('type_str', 'remote error')
    return f'{type(err).__name__}: {err}'
