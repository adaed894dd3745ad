"""Replay bar files: parsing, errors that point at file/line/column, and ticks
that rebuild each bar exactly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from piker.brokers import replay
from piker.data._shm import ohlc_dtype

DATA = Path(__file__).parent / 'data' / 'replay'


def _rebuild(ticks) -> tuple[float, float, float, float, float]:
    prices = [t.price for t in ticks]
    volume = 0.0
    for t in ticks:
        volume += t.size
    return prices[0], max(prices), min(prices), prices[-1], volume


def test_epoch_file_parses_to_ohlc_rows():
    bars = replay.read_ohlc_csv(DATA / 'good_epoch.csv')
    assert bars.dtype == ohlc_dtype
    assert list(bars['index']) == [0, 1, 2, 3, 4]
    assert list(bars['time']) == [1700000000, 1700000060, 1700000120, 1700000180, 1700000300]
    assert tuple(bars[2])[2:] == (102.3, 102.3, 101.2, 101.4, 1500.5)
    assert replay.infer_timeframe_secs(bars) == 60


def test_iso_times_bom_crlf_blank_lines_and_column_order_accepted():
    bars = replay.read_ohlc_csv(DATA / 'good_iso_bom_reordered.csv')
    assert list(bars['time']) == [1700000000, 1700000005, 1700000010]
    assert tuple(bars[0])[2:] == (1.085, 1.0853, 1.0849, 1.08515, 120000.0)
    assert bars['volume'][2] == 80000.25


@pytest.mark.parametrize('filename, line, column, text', [
    ('bad_high_below_open.csv', 17, 'high', 'column `high`: 101.2 is below `open` 101.5'),
    ('bad_low_above_close.csv', 3, 'low', 'column `low`: 101.7 is above `close` 101.6'),
    ('bad_number.csv', 3, 'close', "column `close`: 'abc' is not a number"),
    ('bad_nan.csv', 2, 'volume', "column `volume`: 'nan' is not a finite number"),
    ('bad_negative_volume.csv', 2, 'volume', 'column `volume`: -5 must be >= 0'),
    ('bad_time_order.csv', 4, 'time',
     "column `time`: 1700000060 is not after the previous bar's time 1700000060 (line 3)"),
    ('bad_time_offset.csv', 2, 'time', 'is not UTC: convert it and write it with Z or +00:00'),
    ('bad_time_text.csv', 2, 'time', "'yesterday' is neither whole epoch seconds nor an ISO-8601"),
    ('bad_missing_column.csv', 1, None,
     'missing column `volume`: expected the header time,open,high,low,close,volume'),
    ('bad_field_count.csv', 3, None, 'expected 6 fields'),
    ('bad_empty.csv', 1, None, 'empty file: expected the header'),
    ('bad_header_only.csv', None, None, 'no bars after the header'),
])
def test_bad_file_error_names_file_line_and_column(filename, line, column, text):
    path = DATA / filename
    with pytest.raises(replay.ReplayFileError) as info:
        replay.read_ohlc_csv(path)
    err = info.value
    where = f'{path}:{line}:' if line is not None else f'{path}:'
    assert str(err).startswith(where)
    assert text in str(err)
    assert (err.path, err.line, err.column) == (str(path), line, column)


def test_missing_file_error_names_it(tmp_path):
    with pytest.raises(replay.ReplayFileError, match='nope.csv: cannot read the file'):
        replay.read_ohlc_csv(tmp_path / 'nope.csv')


def test_unexpected_column_refused():
    with pytest.raises(replay.ReplayFileError, match='unexpected column `vwap`'):
        replay.parse_ohlc_csv(['time,open,high,low,close,volume,vwap'], 'x.csv')


def test_fractional_iso_seconds_refused():
    lines = ['time,open,high,low,close,volume', '2023-11-14T22:13:20.5Z,1,1,1,1,1']
    with pytest.raises(replay.ReplayFileError, match='whole seconds'):
        replay.parse_ohlc_csv(lines, 'x.csv')


def test_tick_order_up_bar_visits_low_first_down_bar_high_first():
    bars = replay.read_ohlc_csv(DATA / 'good_epoch.csv')
    up, down = replay.ticks_for_bar(bars[0], 60), replay.ticks_for_bar(bars[2], 60)
    assert [t.price for t in up] == [101.5, 101.0, 102.0, 101.8]
    assert [t.price for t in down] == [102.3, 102.3, 101.2, 101.4]
    assert [t.offset_secs for t in up] == [0.0, 15.0, 30.0, 45.0]


def test_ticks_rebuild_every_file_bar_exactly():
    for name in ('good_epoch.csv', 'good_iso_bom_reordered.csv'):
        bars = replay.read_ohlc_csv(DATA / name)
        for bar in bars:
            rebuilt = _rebuild(replay.ticks_for_bar(bar, 60))
            assert rebuilt == tuple(bar)[2:]


def test_ticks_rebuild_random_bars_exactly():
    rng = np.random.default_rng(0)
    for _ in range(5000):
        o, c = rng.lognormal(3, 2, 2)
        h = max(o, c) * (1 + rng.random())
        lo = min(o, c) * rng.random()
        full_mantissa = float(int(rng.integers(2**52, 2**53))) * 2.0 ** int(rng.integers(-70, 10))
        volume = float(rng.choice([rng.lognormal(5, 4), rng.integers(0, 10**9), full_mantissa]))
        bar = np.array([(0, 0, o, h, lo, c, volume)], dtype=ohlc_dtype)[0]
        ticks = replay.ticks_for_bar(bar, 60)
        assert all(t.size >= 0 for t in ticks)
        assert _rebuild(ticks) == (o, h, lo, c, volume)


def test_replay_ticks_are_time_ordered_within_their_bars():
    bars = replay.read_ohlc_csv(DATA / 'good_epoch.csv')
    ticks = list(replay.replay_ticks(bars, 60))
    assert len(ticks) == 4 * len(bars)
    times = [t for t, _, _ in ticks]
    assert times == sorted(times)
    assert times[:5] == [1700000000.0, 1700000015.0, 1700000030.0, 1700000045.0, 1700000060.0]
