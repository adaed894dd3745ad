"""The sim market: deterministic, sane quotes, and history equal to bars rebuilt
from the live ticks."""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from piker.brokers import sim
from piker.brokers.sim import _model
from piker.types import FqmeError

SEC_NS = 1_000_000_000
T0_SECS = 1_700_000_000  # not aligned to the hour: windows cross chunk edges


def _window(market: sim.SimMarket, t0_secs: int, secs: int, **kw) -> list[sim.SimTick]:
    return list(sim.quotes_between(market, t0_secs * SEC_NS, (t0_secs + secs) * SEC_NS, **kw))


def _bars_from_ticks(ticks, first_open_secs: int, timeframe_secs: int, count: int, prev_close):
    """Independent live-bar builder: OHLC from trades, empty bars carry the last price."""
    bars = []
    trades = [t for t in ticks if t.is_trade]
    for k in range(count):
        open_ns = (first_open_secs + k * timeframe_secs) * SEC_NS
        inside = [t for t in trades if open_ns <= t.ts_ns < open_ns + timeframe_secs * SEC_NS]
        if inside:
            prices = [t.last for t in inside]
            volume = 0.0
            for t in inside:
                volume += t.last_size
            bar = (prices[0], max(prices), min(prices), prices[-1], volume)
        else:
            bar = (prev_close,) * 4 + (0.0,)
        prev_close = bar[3]
        bars.append((first_open_secs + k * timeframe_secs, *bar))
    return bars


def _decimals(step: float) -> int:
    return max(0, -int(math.floor(math.log10(step) + 1e-12))) + 1


def _assert_history_matches(market, end_secs, timeframe_secs, count):
    hist = sim.history(market, end_secs, timeframe_secs, count)
    first_open = int(hist['time'][0])
    ticks = _window(market, first_open, end_secs - first_open)
    prev = _model._scaler(market.tick_size)(
        _model._last_trade_ticks_before(market, first_open * SEC_NS))
    rebuilt = _bars_from_ticks(ticks, first_open, timeframe_secs, count, float(prev))
    assert len(rebuilt) == len(hist)
    lot_dp = _decimals(market.lot_size)
    for row, (time, o, h, lo, c, v) in zip(hist, rebuilt, strict=True):
        assert (int(row['time']), row['open'], row['high'], row['low'], row['close']) == (
            time, o, h, lo, c)
        assert row['volume'] == round(v, lot_dp)
    return hist


def test_same_seed_same_ticks_other_seed_differs():
    market = sim.get_market('btcusd.sim', seed=7)
    first = _window(market, T0_SECS, 30)
    _model._chunk.cache_clear()
    _model._book_lots.cache_clear()
    _model._hour_anchors.cache_clear()
    again = _window(sim.get_market('btcusd.sim', seed=7), T0_SECS, 30)
    assert first == again
    other = _window(sim.get_market('btcusd.sim', seed=8), T0_SECS, 30)
    assert [t.bid for t in other] != [t.bid for t in first]


def test_fresh_process_with_other_hash_seed_sees_same_market():
    code = (
        'from piker.brokers import sim; m = sim.get_market("eurusd.sim", seed=5); '
        f'print(repr(sim.history(m, {T0_SECS}, 60, 30).tolist()))'
    )
    env = dict(os.environ, PYTHONHASHSEED='12345')
    out = subprocess.run(
        [sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=60,
        check=True,
    ).stdout.strip()
    here = sim.history(sim.get_market('eurusd.sim', seed=5), T0_SECS, 60, 30)
    assert out == repr(here.tolist())


@pytest.mark.parametrize('fqme', sim.list_fqmes())
def test_quotes_on_tick_grid_with_positive_spread(fqme):
    market = sim.get_market(fqme, seed=3)
    ticks = _window(market, T0_SECS, 120)
    assert ticks
    assert all(t.fqme == fqme for t in ticks)
    assert all(b.ts_ns <= a.ts_ns for b, a in itertools.pairwise(ticks))
    for t in ticks:
        assert 0 < t.bid < t.ask
        assert t.ask - t.bid == pytest.approx(market.spread_ticks * market.tick_size)
        for price in (t.bid, t.ask) + ((t.last,) if t.is_trade else ()):
            assert price / market.tick_size == pytest.approx(round(price / market.tick_size))
        for size in (t.bid_size, t.ask_size) + ((t.last_size,) if t.is_trade else ()):
            assert size > 0
            assert size / market.lot_size == pytest.approx(round(size / market.lot_size))
        if t.is_trade:
            assert t.last in (t.bid, t.ask)


def test_quote_rate_changes_quotes_not_trades():
    market = sim.get_market('spy.sim')
    slow = _window(market, T0_SECS, 60, quote_rate_hz=1)
    fast = _window(market, T0_SECS, 60, quote_rate_hz=10)
    assert [t for t in slow if t.is_trade] == [t for t in fast if t.is_trade]
    assert sum(not t.is_trade for t in slow) == 60
    assert sum(not t.is_trade for t in fast) == 600


def test_consecutive_windows_partition_the_stream():
    market = sim.get_market('ethusd.sim')
    whole = _window(market, T0_SECS, 90)
    parts = _window(market, T0_SECS, 37) + _window(market, T0_SECS + 37, 53)
    assert parts == whole


@pytest.mark.parametrize('fqme, timeframe_secs, count', [
    ('btcusd.sim', 60, 90),       # crosses hour chunks
    ('eurusd.sim', 5, 200),
    ('spy.sim', 1, 300),
    ('gld.venture.sim', 1, 300),  # 0.2 trades/s: mostly empty bars
    ('mnq.cme.sim', 300, 20),
])
def test_history_equals_bars_rebuilt_from_ticks(fqme, timeframe_secs, count):
    market = sim.get_market(fqme, seed=11)
    end_secs = (T0_SECS // timeframe_secs) * timeframe_secs
    hist = _assert_history_matches(market, end_secs, timeframe_secs, count)
    assert np.all(np.diff(hist['time']) == timeframe_secs)
    assert hist['time'][-1] + timeframe_secs == end_secs
    assert np.all(hist['high'] >= np.maximum(hist['open'], hist['close']))
    assert np.all(hist['low'] <= np.minimum(hist['open'], hist['close']))


def test_history_with_unaligned_end_ends_with_the_partial_bar():
    market = sim.get_market('btcusd.sim', seed=11)
    end_secs = T0_SECS - T0_SECS % 60 + 25
    hist = _assert_history_matches(market, end_secs, 60, 10)
    assert hist['time'][-1] == end_secs - 25
    full = sim.history(market, end_secs + 35, 60, 10)
    assert np.array_equal(hist[:-1], full[:-1])
    assert full['volume'][-1] > hist['volume'][-1]


def test_empty_bars_carry_last_trade_price():
    market = sim.get_market('gld.venture.sim', seed=11)
    hist = sim.history(market, T0_SECS, 1, 300)
    empty = hist['volume'] == 0
    assert empty.sum() > 100
    for i in np.flatnonzero(empty)[1:]:
        row = hist[i]
        assert row['open'] == row['high'] == row['low'] == row['close'] == hist['close'][i - 1]


def test_markets_differ_and_sit_near_their_level():
    levels = {}
    for market in sim.DEFAULT_MARKETS:
        hist = sim.history(market, T0_SECS, 3600, 48)
        mean_close = float(hist['close'].mean())
        assert 0.5 * market.price_level < mean_close < 1.5 * market.price_level
        levels[market.fqme] = tuple(hist['close'])
    assert len(set(levels.values())) == len(levels)


def test_venue_less_fqme_resolves_or_names_the_choices():
    assert sim.get_market('btcusd.sim').fqme == 'btcusd.sim'
    assert sim.get_market('mnq.sim').fqme == 'mnq.cme.sim'
    with pytest.raises(FqmeError, match="'gld.arca.sim' or 'gld.venture.sim'"):
        sim.get_market('gld.sim')
    with pytest.raises(FqmeError, match='unknown market'):
        sim.get_market('doge.sim')


def test_market_info_and_search():
    info = sim.market_info('eurusd.sim')
    assert (info.symbol, info.venue, info.backend) == ('eurusd', None, 'sim')
    assert (info.tick_size, info.currency) == (0.00005, 'usd')
    assert sim.market_info('gld.venture.sim').currency == 'cad'
    assert sim.search('gld') == ['gld.arca.sim', 'gld.venture.sim']
    assert sim.search('US DOLLAR') == ['btcusd.sim', 'ethusd.sim', 'eurusd.sim']
    assert sim.search('') == sim.list_fqmes()
    assert sim.search('nothing-like-this') == []


def test_bad_requests_say_what_to_pass():
    market = sim.get_market('spy.sim')
    with pytest.raises(sim.SimError, match=r'quote_rate_hz must be in \(0, 10\]'):
        next(sim.quotes_between(market, 0, SEC_NS, quote_rate_hz=50))
    with pytest.raises(sim.SimError, match='timeframe_secs must be a whole number'):
        sim.history(market, T0_SECS, 0.5, 10)
    with pytest.raises(sim.SimError, match='ask for fewer or shorter bars'):
        sim.history(market, T0_SECS, 86_400, 365)
