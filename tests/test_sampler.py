"""samplerd: boundary arithmetic, the bar writer, and increments from real actors."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import tractor
import trio

from piker.data import (
    BarWriter,
    advance_clock,
    clock_info,
    maybe_spawn_samplerd,
    ohlc_dtype,
    open_sample_stream,
)
from piker.data._bars import fill_gaps
from piker.data._shm import open_shm_array
from piker.data._timing import (
    HISTORY_ROWS,
    PeriodError,
    boundaries_between,
    next_boundary,
    parse_timeframe,
    row_position,
)
from piker.service import open_runtime
from tests.conftest import descendants

START = 1_700_006_400  # a UTC midnight: origin == START
NS = 1_000_000_000


# -- pure --------------------------------------------------------------------------

def test_boundaries_between_lists_every_boundary_in_order_with_its_periods():
    got = list(boundaries_between(START, START + 10, [5, 2]))
    assert got == [
        (START + 2, [2]), (START + 4, [2]), (START + 5, [5]), (START + 6, [2]),
        (START + 8, [2]), (START + 10, [2, 5]),
    ]
    assert next_boundary(START + 0.5, [60]) == (START + 60, [60])
    assert next_boundary(START, []) is None


def test_timeframe_text_parses_or_names_the_fix():
    assert [parse_timeframe(t) for t in ('1s', '5m', '1h', '1d', '30')] == [1, 300, 3600, 86400, 30]
    with pytest.raises(PeriodError, match=r'expected <n>\[s\|m\|h\|d\]'):
        parse_timeframe('1w')
    with pytest.raises(PeriodError, match=r'within 1\.\.86400'):
        parse_timeframe('2d')


def test_row_position_is_shared_by_every_buffer_of_a_period():
    assert row_position(START, 60, START) == HISTORY_ROWS
    assert row_position(START + 125, 60, START) == HISTORY_ROWS + 2
    assert row_position(START - 60, 60, START) == HISTORY_ROWS - 1


def test_fill_gaps_adds_flat_rows_at_previous_close():
    bars = np.zeros(2, dtype=ohlc_dtype)
    bars[0] = (0, 600, 1.0, 2.0, 0.5, 1.5, 10.0)
    bars[1] = (1, 780, 1.6, 1.7, 1.4, 1.5, 3.0)
    out = fill_gaps(bars, 60)
    assert out['time'].tolist() == [600, 660, 720, 780]
    assert out[['open', 'high', 'low', 'close', 'volume']][1].tolist() == (1.5, 1.5, 1.5, 1.5, 0.0)
    with pytest.raises(ValueError, match='not a multiple of the 60 s period'):
        fill_gaps(np.array([(0, 601, 1, 1, 1, 1, 0)], dtype=ohlc_dtype), 60)


def _writer(shm_key: str, period: int = 60):
    cm = open_shm_array(shm_key, 2 * HISTORY_ROWS, start=row_position(START, period, START))
    return cm


def test_bar_writer_builds_ohlcv_from_trades_and_opens_rows_idempotently():
    history = np.zeros(2, dtype=ohlc_dtype)
    history[0] = (0, START - 120, 10, 11, 9, 10.5, 5)
    history[1] = (1, START - 60, 10.5, 12, 10, 11, 7)
    with _writer(f'test-writer-{os.getpid()}') as shm:
        w = BarWriter(shm, 60, START, fqme='x.sim')
        w.open(START + 1, history)
        # history prepended, the live row opened flat at the last close
        assert shm.array['time'].tolist() == [START - 120, START - 60, START]
        assert shm.array[-1][['open', 'close', 'volume']].tolist() == (11.0, 11.0, 0.0)
        for ts, price, size in [(START + 1, 12.0, 1.0), (START + 20, 14.0, 2.0),
                                (START + 30, 9.0, 1.0), (START + 59, 13.0, 0.5)]:
            w.apply_trade(ts * NS, price, size)
        # samplerd's boundary request, twice: one new row only
        assert w.ensure_until(START + 60) == w.ensure_until(START + 60)
        assert shm.array[-2][['open', 'high', 'low', 'close', 'volume']].tolist() == (
            12.0, 14.0, 9.0, 13.0, 4.5)
        assert shm.array[-1][['time', 'open', 'close', 'volume']].tolist() == (
            START + 60, 13.0, 13.0, 0.0)
        # a trade of the closed bar published after the row opened still lands
        # in its own bar, and the flat row follows its close
        w.apply_trade((START + 59) * NS + 900_000_000, 15.0, 1.0)
        assert shm.array[-2][['high', 'close', 'volume']].tolist() == (15.0, 15.0, 5.5)
        assert shm.array[-1][['open', 'close']].tolist() == (15.0, 15.0)
        # a trade two bars on opens the row in between (flat at the last close)
        w.apply_trade((START + 200) * NS, 16.0, 1.0)
        assert shm.array['time'][-3:].tolist() == [START + 60, START + 120, START + 180]
        assert shm.array[-2][['open', 'close', 'volume']].tolist() == (15.0, 15.0, 0.0)
        assert shm.array[-1][['open', 'high', 'low', 'close']].tolist() == (16.0,) * 4
        positions = shm.array['index'][-4:] - row_position(START, 60, START)
        assert positions.tolist() == [0, 1, 2, 3]


# -- actors -------------------------------------------------------------------------

async def test_driven_clock_delivers_increments_exactly_at_boundaries(reg_addr, state_dir):
    with trio.fail_after(40):
        async with open_runtime('tester', reg_addr):
            async with maybe_spawn_samplerd(clock='driven', start_epoch=START):
                pass
            async with open_sample_stream([1, 5]) as incs:
                assert incs.clock == 'driven'
                res = await advance_clock(START + 10.5)
                assert res == {'now_epoch': START + 10.5, 'boundaries': 10}
                got = [await incs.receive() for _ in range(12)]
                expected = [(e, p) for e in range(START + 1, START + 11) for p in (1, 5)
                            if e % p == 0]
                assert [(i.epoch, i.period_secs) for i in got] == expected
                for inc in got:
                    assert inc.index == row_position(inc.epoch, inc.period_secs, START)
                # nothing more until time moves again, and never backwards
                with trio.move_on_after(0.3):
                    extra = await incs.receive()
                    pytest.fail(f'unexpected increment {extra}')
                assert (await advance_clock(START + 3))['boundaries'] == 0
                await advance_clock(START + 11)
                assert (await incs.receive()).epoch == START + 11
            info = await clock_info()
            assert info['clock'] == 'driven' and info['now_epoch'] == START + 11


async def test_wall_clock_increments_align_to_the_second(reg_addr, state_dir):
    with trio.fail_after(40):
        async with open_runtime('tester', reg_addr):
            async with open_sample_stream(1) as incs:
                assert incs.clock == 'wall'
                lags, epochs = [], []
                for _ in range(3):
                    inc = await incs.receive()
                    lags.append(time.time() - inc.epoch)
                    epochs.append(inc.epoch)
                    assert isinstance(inc.epoch, int)
                # one increment per second, each released at (never before) its boundary
                assert epochs == [epochs[0], epochs[0] + 1, epochs[0] + 2]
                assert all(0 <= lag < 0.25 for lag in lags), lags
            with pytest.raises(PeriodError, match='within 1..86400'):
                async with open_sample_stream(0):
                    pass


async def _subscribe_forever(period_secs: int) -> None:
    async with open_sample_stream(period_secs) as incs:
        async for _ in incs:
            pass


async def test_subscriber_that_disappears_is_dropped_without_disturbing_others(
    reg_addr, state_dir,
):
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr):
            async with maybe_spawn_samplerd(clock='driven', start_epoch=START):
                pass
            async with tractor.open_nursery() as an, open_sample_stream(1) as incs:
                await an.run_in_actor(_subscribe_forever, period_secs=1,
                                               name='doomed_subscriber')
                while (await clock_info())['subscribers'] < 2:
                    await trio.sleep(0.05)
                pid = pid_of_actor('doomed_subscriber')
                os.kill(pid, signal.SIGKILL)
                for k in range(1, 4):
                    await advance_clock(START + k)
                    assert (await incs.receive()).epoch == START + k
                with trio.fail_after(10):
                    while (await clock_info())['subscribers'] > 1:
                        await advance_clock((await clock_info())['now_epoch'] + 1)
                        await incs.receive()
                        await trio.sleep(0.05)
                await an.cancel()


def pid_of_actor(name: str) -> int:
    """The pid of this process's descendant actor called ``name`` (from its argv)."""
    for pid in descendants(os.getpid()):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as fh:
                argv = fh.read().decode(errors='replace')
        except OSError:
            continue
        if f"'{name}'" in argv:
            return pid
    raise LookupError(f'no actor {name!r} below pid {os.getpid()}')
