"""datad with the replay backend: a CSV replayed through the driven clock (and
paced on the wall clock) reproduces its bars exactly in shared memory."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio

from piker.brokers.replay import read_ohlc_csv
from piker.data import (
    FeedError,
    advance_clock,
    maybe_spawn_samplerd,
    open_feed,
    open_sample_stream,
)
from piker.service import open_runtime

START = 1_700_006_400  # a UTC midnight
FIELDS = ['time', 'open', 'high', 'low', 'close', 'volume']
BARS = """time,open,high,low,close,volume
{t0},100.0,101.5,99.5,101.0,1200
{t1},101.0,101.25,100.0,100.25,800.5
{t2},100.25,100.25,100.25,100.25,0
{t3},100.5,103.0,100.5,102.75,3
{t4},102.75,102.75,98.0,98.5,41.7
{t5},98.5,99.0,97.25,98.75,7
"""


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / 'replay'
    d.mkdir()
    (d / 'abc.csv').write_text(BARS.format(**{f't{k}': START + 60 * k for k in range(6)}))
    return d


def cfg_of(data_dir: Path, **kw) -> dict:
    return {'data_dir': str(data_dir), 'timeframe_secs': 60, **kw}


def rows(arr: np.ndarray) -> list[tuple]:
    return [tuple(r) for r in arr[FIELDS].tolist()]


async def test_driven_replay_reproduces_the_csv_bars_exactly(reg_addr, state_dir, data_dir):
    csv_bars = read_ohlc_csv(data_dir / 'abc.csv')
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr):
            async with maybe_spawn_samplerd(clock='driven', start_epoch=START):
                pass
            async with (
                open_feed(['abc.replay'], backend_cfg=cfg_of(data_dir),
                          timeframes=[60, 120]) as feed,
                open_sample_stream(60) as incs,
            ):
                shm = feed.attach('abc.replay', 60)
                for k in range(1, 7):
                    await advance_clock(START + 60 * k)
                    inc = await incs.receive()
                    closed = shm.array[shm.array['index'] == inc.index - 1]
                    # every tick of the bar is in before its increment
                    assert rows(closed) == rows(csv_bars[k - 1:k])
                live = shm.array[shm.array['time'] < START + 360]
                assert rows(live) == rows(csv_bars)
                # after the file ends the clock still opens (flat) rows
                assert shm.array[-1][['time', 'open', 'volume']].tolist() == (
                    START + 360, 98.75, 0.0)
                two = feed.attach('abc.replay', 120).array
                two = two[two['time'] < START + 360]
                pairs = csv_bars.reshape(3, 2)
                assert two['time'].tolist() == pairs['time'][:, 0].tolist()
                assert two['open'].tolist() == pairs['open'][:, 0].tolist()
                assert two['high'].tolist() == pairs['high'].max(axis=1).tolist()
                assert two['low'].tolist() == pairs['low'].min(axis=1).tolist()
                assert two['close'].tolist() == pairs['close'][:, 1].tolist()
                assert two['volume'].tolist() == pairs['volume'].sum(axis=1).tolist()


async def test_wall_replay_paces_at_speed_and_builds_bars_from_tick_times(
    reg_addr, state_dir, data_dir,
):
    csv_bars = read_ohlc_csv(data_dir / 'abc.csv')
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr):
            # 360 s of bars at 600x: ~0.6 s
            async with open_feed(['abc.replay'], backend_cfg=cfg_of(data_dir, speed=600.0),
                                 timeframes=[60]) as feed:
                shm = feed.attach('abc.replay', 60)
                t0 = trio.current_time()
                seen = []
                async for batch in feed.stream:
                    seen.extend(q['ts_ns'] for q in batch)
                    if batch[-1]['last_ts_ns'] >= (START + 345) * 1_000_000_000:
                        break
                elapsed = trio.current_time() - t0
                assert 0.4 < elapsed < 3.0, elapsed
                # every replayed trade, in order (the first came with first_quotes)
                assert seen == [START * 1_000_000_000 + 15_000_000_000 * k for k in range(1, 24)]
                assert rows(shm.array) == rows(csv_bars)


async def test_bad_replay_setup_is_one_clear_error(reg_addr, state_dir, tmp_path, data_dir):
    (data_dir / 'bad.csv').write_text(f'time,open,high,low,close,volume\n'
                                      f'{START},10,9,8,9,1\n')
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr):
            with pytest.raises(FeedError, match=r'bad\.csv:2: column `high`: 9 is below `open` 10'):
                async with open_feed(['bad.replay'], backend_cfg=cfg_of(data_dir)):
                    pass
            with pytest.raises(Exception, match="unknown market 'nope.replay'"):
                async with open_feed(['nope.replay'], backend_cfg=cfg_of(data_dir)):
                    pass
            # the good file of the same directory still serves
            async with open_feed(['abc.replay'], backend_cfg=cfg_of(data_dir),
                                 start_stream=False) as feed:
                assert feed.fqmes == ['abc.replay']
