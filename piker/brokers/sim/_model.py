"""A deterministic synthetic market: quotes, trades and OHLC history that agree.

Every value is a pure function of ``(seed, fqme, time)``, so a live stream, a
restarted stream and a history request all see the same market, and history
bars equal the bars built from the live trade ticks of the same period.

The scheme (all randomness from a generator seeded by a hash of
``seed|fqme|kind|index``; numpy's PCG64, so stable for a given numpy version):

1. **Day anchors**: the log mid at each UTC midnight is drawn independently
   around ``log(price_level)`` (std = one day of volatility / sqrt 2), so the
   path never drifts away from a realistic level.
2. **Hour anchors**: within a day, a Brownian bridge of 24 one-hour steps
   joins consecutive day anchors.
3. **Grid**: within each hour (a *chunk*), a Brownian bridge of 36 000 steps of
   ``GRID_NS`` (100 ms) joins consecutive hour anchors. Bid and ask at a grid
   point are the mid quantised to the tick grid, ``spread_ticks`` apart; the
   quote at any instant is the one of its grid point. Book sizes come from
   their own stream, so history never pays for them.
4. **Trades**: each chunk holds a Poisson(``trades_per_sec`` * 3600) number of
   trades at uniform ns instants, each buyer- or seller-initiated (at the ask
   or the bid of its grid point), of geometric size in lots.

So quotes can be sampled at any rate without changing trades, and a bar's OHLCV
is the first/max/min/last trade price and the summed trade sizes. A bar
without trades repeats the previous trade price with zero volume.
Prices and sizes are the closest float to the decimal multiple of the tick or
lot (``ticks * 5 / 100000``, not ``ticks * 0.00005``), so prices match exactly;
a live builder summing ``last_size`` floats can differ from history's volume
(summed in whole lots) in the last bits: compare volumes at lot precision.
"""
from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction

import msgspec
import numpy as np

from piker.data._shm import ohlc_dtype
from piker.types import Fqme, Struct, resolve_fqme

GRID_NS = 100_000_000
CHUNK_NS = 3_600_000_000_000
GRID_PER_CHUNK = CHUNK_NS // GRID_NS
CHUNKS_PER_DAY = 24
SECS_PER_YEAR = 365 * 86_400
MAX_QUOTE_RATE_HZ = 1e9 / GRID_NS
# Bound on a history request: each day of trades costs ~50 ms to generate.
MAX_HISTORY_SECS = 30 * 86_400
# How far back an empty first bar looks for the last trade price.
_LOOKBACK_CHUNKS = 2 * CHUNKS_PER_DAY


class SimError(ValueError):
    """A bad request to the sim market; the text says what to pass instead."""


class SimMarket(Struct, frozen=True):
    """One synthetic listing and its statistical character."""

    fqme: str
    description: str
    currency: str
    price_level: float  # the level day anchors revert to
    tick_size: float
    lot_size: float
    spread_ticks: int
    vol_annual: float  # of the log mid
    trades_per_sec: float
    mean_trade_lots: float
    quote_rate_hz: float = 4.0
    seed: int = 0


class MarketInfo(Struct, frozen=True):
    fqme: str
    symbol: str
    venue: str | None
    backend: str
    currency: str
    tick_size: float
    lot_size: float
    description: str


class SimTick(Struct, frozen=True):
    """A quote; a trade too when ``last``/``last_size`` are set."""

    fqme: str
    ts_ns: int
    bid: float
    ask: float
    bid_size: float
    ask_size: float
    last: float | None = None
    last_size: float | None = None

    @property
    def is_trade(self) -> bool:
        return self.last is not None


DEFAULT_MARKETS: tuple[SimMarket, ...] = (
    SimMarket(
        fqme='btcusd.sim', description='Bitcoin / US dollar spot', currency='usd',
        price_level=60_000.0, tick_size=0.5, lot_size=0.0001, spread_ticks=2,
        vol_annual=0.60, trades_per_sec=3.0, mean_trade_lots=50,
    ),
    SimMarket(
        fqme='ethusd.sim', description='Ether / US dollar spot', currency='usd',
        price_level=3_000.0, tick_size=0.05, lot_size=0.001, spread_ticks=2,
        vol_annual=0.75, trades_per_sec=2.0, mean_trade_lots=200,
    ),
    SimMarket(
        fqme='eurusd.sim', description='Euro / US dollar spot FX', currency='usd',
        price_level=1.085, tick_size=0.00005, lot_size=1000.0, spread_ticks=2,
        vol_annual=0.07, trades_per_sec=5.0, mean_trade_lots=100,
    ),
    SimMarket(
        fqme='spy.sim', description='S&P 500 ETF', currency='usd',
        price_level=520.0, tick_size=0.01, lot_size=1.0, spread_ticks=1,
        vol_annual=0.16, trades_per_sec=4.0, mean_trade_lots=100,
    ),
    SimMarket(
        fqme='mnq.cme.sim', description='Micro E-mini Nasdaq-100 future', currency='usd',
        price_level=18_000.0, tick_size=0.25, lot_size=1.0, spread_ticks=1,
        vol_annual=0.20, trades_per_sec=6.0, mean_trade_lots=3,
    ),
    SimMarket(
        fqme='gld.arca.sim', description='SPDR Gold Shares ETF (NYSE Arca)', currency='usd',
        price_level=215.0, tick_size=0.01, lot_size=1.0, spread_ticks=1,
        vol_annual=0.14, trades_per_sec=1.5, mean_trade_lots=50,
    ),
    SimMarket(
        fqme='gld.venture.sim', description='Goldfield Resources (TSX Venture)', currency='cad',
        price_level=0.45, tick_size=0.005, lot_size=100.0, spread_ticks=1,
        vol_annual=0.80, trades_per_sec=0.2, mean_trade_lots=20,
    ),
)
_BY_FQME = {m.fqme: m for m in DEFAULT_MARKETS}


# -- catalogue ------------------------------------------------------------------

def list_fqmes() -> list[str]:
    return sorted(_BY_FQME)


def get_market(fqme: str, seed: int = 0) -> SimMarket:
    """The catalogue market for ``fqme`` (venue-less ok if unambiguous), seeded."""
    key = resolve_fqme(fqme, list_fqmes())
    return msgspec.structs.replace(_BY_FQME[key], seed=seed)


def market_info(fqme: str) -> MarketInfo:
    market = get_market(fqme)
    parsed = Fqme.parse(market.fqme)
    return MarketInfo(
        fqme=market.fqme, symbol=parsed.symbol, venue=parsed.venue, backend=parsed.backend,
        currency=market.currency, tick_size=market.tick_size, lot_size=market.lot_size,
        description=market.description,
    )


def search(pattern: str) -> list[str]:
    """Fqmes whose fqme or description contains ``pattern`` (case-insensitive);
    symbol matches first."""
    needle = pattern.strip().lower()
    if not needle:
        return list_fqmes()
    hits = [
        m for m in DEFAULT_MARKETS
        if needle in m.fqme or needle in m.description.lower()
    ]
    return [m.fqme for m in sorted(hits, key=lambda m: (not m.fqme.startswith(needle), m.fqme))]


# -- the path -------------------------------------------------------------------

def _rng(market: SimMarket, kind: str, index: int) -> np.random.Generator:
    key = f'{market.seed}|{market.fqme}|{kind}|{index}'.encode()
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(key, digest_size=16).digest()))


def _bridge(rng: np.random.Generator, start: float, end: float, steps: int, step_std: float):
    """``steps`` points from ``start`` (inclusive) towards ``end`` (exclusive)."""
    walk = np.concatenate(([0.0], np.cumsum(rng.normal(0.0, step_std, steps))))
    frac = np.arange(steps + 1) / steps
    path = start + frac * (end - start) + walk - frac * walk[-1]
    return path[:-1]


def _step_std(market: SimMarket, step_ns: int) -> float:
    return market.vol_annual * math.sqrt(step_ns / 1e9 / SECS_PER_YEAR)


def _day_anchor(market: SimMarket, day: int) -> float:
    std = _step_std(market, CHUNK_NS * CHUNKS_PER_DAY) / math.sqrt(2)
    return math.log(market.price_level) + std * _rng(market, 'day', day).standard_normal()


@functools.lru_cache(maxsize=16)
def _hour_anchors(market: SimMarket, day: int) -> np.ndarray:
    end = _day_anchor(market, day + 1)
    path = _bridge(
        _rng(market, 'hours', day), _day_anchor(market, day), end,
        CHUNKS_PER_DAY, _step_std(market, CHUNK_NS),
    )
    return np.append(path, end)


class _Chunk(Struct, frozen=True):
    bid_ticks: np.ndarray  # per grid point
    trade_ts_ns: np.ndarray  # sorted
    trade_ticks: np.ndarray
    trade_lots: np.ndarray


@functools.lru_cache(maxsize=32)
def _chunk(market: SimMarket, chunk: int) -> _Chunk:
    day, hour = divmod(chunk, CHUNKS_PER_DAY)
    anchors = _hour_anchors(market, day)
    log_mid = _bridge(
        _rng(market, 'path', chunk), anchors[hour], anchors[hour + 1],
        GRID_PER_CHUNK, _step_std(market, GRID_NS),
    )
    mid_ticks = np.exp(log_mid) / market.tick_size
    bid_ticks = np.maximum(np.rint(mid_ticks - market.spread_ticks / 2), 1).astype(np.int64)

    rng = _rng(market, 'trades', chunk)
    count = rng.poisson(market.trades_per_sec * CHUNK_NS / 1e9)
    offsets_ns = np.sort(rng.integers(0, CHUNK_NS, count))
    is_buy = rng.random(count) < 0.5
    lots = rng.geometric(1.0 / max(market.mean_trade_lots, 1.0), count).astype(np.int64)
    at_bid = bid_ticks[offsets_ns // GRID_NS]
    return _Chunk(
        bid_ticks=bid_ticks,
        trade_ts_ns=chunk * CHUNK_NS + offsets_ns,
        trade_ticks=np.where(is_buy, at_bid + market.spread_ticks, at_bid),
        trade_lots=lots,
    )


@functools.lru_cache(maxsize=8)
def _book_lots(market: SimMarket, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(bid, ask) displayed size in lots per grid point."""
    rng = _rng(market, 'book', chunk)
    depth = max(market.mean_trade_lots, 1.0) * 4
    return 1 + rng.poisson(depth, GRID_PER_CHUNK), 1 + rng.poisson(depth, GRID_PER_CHUNK)


def _chunks(t0_ns: int, t1_ns: int) -> range:
    return range(t0_ns // CHUNK_NS, -(-t1_ns // CHUNK_NS))


def _scaler(step: float):
    """``n -> n * step`` as the float closest to the exact decimal product."""
    frac = Fraction(str(step))
    num, den = frac.numerator, frac.denominator
    return lambda n: (np.asarray(n, dtype=np.int64) * num) / den


def _trades(market: SimMarket, t0_ns: int, t1_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ts_ns, price ticks, lots) of trades in ``[t0_ns, t1_ns)``."""
    parts = [_chunk(market, c) for c in _chunks(t0_ns, t1_ns)]
    if not parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    ts = np.concatenate([p.trade_ts_ns for p in parts])
    lo, hi = np.searchsorted(ts, [t0_ns, t1_ns], 'left')
    return (
        ts[lo:hi],
        np.concatenate([p.trade_ticks for p in parts])[lo:hi],
        np.concatenate([p.trade_lots for p in parts])[lo:hi],
    )


def _last_trade_ticks_before(market: SimMarket, t_ns: int) -> int:
    """Ticks of the last trade before ``t_ns``; the bid there if none is near."""
    last_chunk = (t_ns - 1) // CHUNK_NS
    for chunk in range(last_chunk, last_chunk - _LOOKBACK_CHUNKS, -1):
        data = _chunk(market, chunk)
        n_before = np.searchsorted(data.trade_ts_ns, t_ns, 'left')
        if n_before:
            return int(data.trade_ticks[n_before - 1])
    return int(_chunk(market, last_chunk).bid_ticks[((t_ns - 1) % CHUNK_NS) // GRID_NS])


# -- public queries -------------------------------------------------------------

def quotes_between(
    market: SimMarket,
    t0_ns: int,
    t1_ns: int,
    quote_rate_hz: float | None = None,
) -> Iterator[SimTick]:
    """Quote and trade ticks with ``t0_ns <= ts_ns < t1_ns``, in time order.

    Quotes fall on multiples of ``1 / quote_rate_hz`` seconds since the epoch;
    at an equal instant a quote comes before a trade. Consecutive windows
    ``[a, b)``, ``[b, c)`` together yield exactly the ticks of ``[a, c)``.
    """
    rate_hz = market.quote_rate_hz if quote_rate_hz is None else quote_rate_hz
    if not 0 < rate_hz <= MAX_QUOTE_RATE_HZ:
        raise SimError(
            f'quote_rate_hz must be in (0, {MAX_QUOTE_RATE_HZ:g}] (the path has '
            f'{GRID_NS // 1_000_000} ms resolution), found {rate_hz!r}'
        )
    interval_ns = round(1e9 / rate_hz)
    price, size = _scaler(market.tick_size), _scaler(market.lot_size)
    for chunk in _chunks(t0_ns, t1_ns):
        lo_ns = max(t0_ns, chunk * CHUNK_NS)
        hi_ns = min(t1_ns, (chunk + 1) * CHUNK_NS)
        yield from _chunk_ticks(market, chunk, lo_ns, hi_ns, interval_ns, price, size)


def _chunk_ticks(market, chunk, lo_ns, hi_ns, interval_ns, price, size) -> Iterator[SimTick]:
    data = _chunk(market, chunk)
    bid_lots, ask_lots = _book_lots(market, chunk)
    quote_ts = np.arange(-(-lo_ns // interval_ns) * interval_ns, hi_ns, interval_ns, dtype=np.int64)
    t_lo, t_hi = np.searchsorted(data.trade_ts_ns, [lo_ns, hi_ns], 'left')
    trade_ts = data.trade_ts_ns[t_lo:t_hi]
    ts = np.concatenate((quote_ts, trade_ts))
    is_trade = np.concatenate((np.zeros(len(quote_ts), bool), np.ones(len(trade_ts), bool)))
    order = np.lexsort((is_trade, ts))
    grid = (ts - chunk * CHUNK_NS) // GRID_NS
    bids = price(data.bid_ticks[grid])
    asks = price(data.bid_ticks[grid] + market.spread_ticks)
    bid_sizes, ask_sizes = size(bid_lots[grid]), size(ask_lots[grid])
    lasts = np.concatenate((np.zeros(len(quote_ts)), price(data.trade_ticks[t_lo:t_hi])))
    last_sizes = np.concatenate((np.zeros(len(quote_ts)), size(data.trade_lots[t_lo:t_hi])))
    for i in order.tolist():
        trade = bool(is_trade[i])
        yield SimTick(
            fqme=market.fqme, ts_ns=int(ts[i]),
            bid=float(bids[i]), ask=float(asks[i]),
            bid_size=float(bid_sizes[i]), ask_size=float(ask_sizes[i]),
            last=float(lasts[i]) if trade else None,
            last_size=float(last_sizes[i]) if trade else None,
        )


def history(
    market: SimMarket,
    end_epoch_secs: int | float,
    timeframe_secs: int,
    count: int,
) -> np.ndarray:
    """``count`` bars of ``timeframe_secs`` (open times aligned to the epoch) built
    from exactly the trades strictly before ``end_epoch_secs``.

    An aligned ``end`` gives closed bars only; otherwise the last bar is the
    partial bar in progress at ``end``, which live trades then continue.
    """
    if not isinstance(timeframe_secs, int) or timeframe_secs < 1:
        raise SimError(f'timeframe_secs must be a whole number >= 1, found {timeframe_secs!r}')
    if count < 1:
        raise SimError(f'history count must be >= 1, found {count!r}')
    if timeframe_secs * count > MAX_HISTORY_SECS:
        raise SimError(
            f'history of {count} x {timeframe_secs}s bars spans {timeframe_secs * count} s, '
            f'more than the sim limit of {MAX_HISTORY_SECS} s: ask for fewer or shorter bars'
        )
    end_ns = _secs_to_ns(end_epoch_secs)
    tf_ns = timeframe_secs * 1_000_000_000
    first_open_ns = ((end_ns - 1) // tf_ns - (count - 1)) * tf_ns
    ts, ticks, lots = _trades(market, first_open_ns, end_ns)

    opens_ns = first_open_ns + tf_ns * np.arange(count, dtype=np.int64)
    lo = np.searchsorted(ts, opens_ns, 'left')
    hi = np.append(lo[1:], len(ts))
    has_trades = hi > lo

    bars = np.zeros(count, dtype=ohlc_dtype)
    bars['index'] = np.arange(count)
    bars['time'] = opens_ns // 1_000_000_000
    prev_close = np.full(count, -1, dtype=np.int64)
    if has_trades.any():
        starts = lo[has_trades]
        o_t, c_t = ticks[starts], ticks[hi[has_trades] - 1]
        h_t = np.maximum.reduceat(ticks, starts)
        l_t = np.minimum.reduceat(ticks, starts)
        v_l = np.add.reduceat(lots, starts)
        price, size = _scaler(market.tick_size), _scaler(market.lot_size)
        for field, values in (('open', o_t), ('high', h_t), ('low', l_t), ('close', c_t)):
            bars[field][has_trades] = price(values)
        bars['volume'][has_trades] = size(v_l)
        prev_close[has_trades] = c_t
    _fill_empty_bars(market, bars, has_trades, prev_close, first_open_ns)
    return bars


def _secs_to_ns(secs: int | float) -> int:
    if isinstance(secs, int | np.integer):
        return int(secs) * 1_000_000_000
    return int(Decimal(repr(float(secs))) * 1_000_000_000)


def _fill_empty_bars(market, bars, has_trades, closes_ticks, first_open_ns) -> None:
    """A bar without trades repeats the last trade price before it, volume 0."""
    if has_trades.all():
        return
    latest = np.maximum.accumulate(np.where(has_trades, np.arange(len(bars)), -1))
    carry = np.where(latest >= 0, closes_ticks[np.maximum(latest, 0)], -1)
    if (carry < 0).any():
        carry[carry < 0] = _last_trade_ticks_before(market, first_open_ns)
    empty = ~has_trades
    fill = _scaler(market.tick_size)(carry[empty])
    for field in ('open', 'high', 'low', 'close'):
        bars[field][empty] = fill
