"""Shared-memory OHLC buffers: cross-process zero-copy reads, read-only readers,
no leaks whoever dies first, no resource_tracker noise."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import trio

from piker.data._shm import (
    ShmArray,
    ShmError,
    ShmToken,
    ohlc_dtype,
    open_shm_array,
    owner_pid,
    sweep_stale_segments,
)

SHM_DIR = Path('/dev/shm')
PROC_TIMEOUT_SECS = 15

READER_CODE = textwrap.dedent('''
    import json, sys
    from piker.data._shm import ShmArray
    shm = ShmArray.attach(json.loads(sys.argv[1]))
    view = shm.array            # taken once: later writes must show through it
    print('>>ready', flush=True)
    for line in sys.stdin:
        try:
            view['close'][0] = -1.0
            write_error = None
        except ValueError as exc:
            write_error = str(exc)
        print('>>' + json.dumps({
            'view_last_close': float(view[-1]['close']),
            'len': len(shm),
            'array_last_close': float(shm.array[-1]['close']),
            'writeable': bool(view.flags.writeable),
            'write_error': write_error,
        }), flush=True)
    shm.close()
''')


def _bars(closes: list[float], t0_secs: int = 1_700_000_000) -> np.ndarray:
    rows = np.zeros(len(closes), dtype=ohlc_dtype)
    rows['time'] = t0_secs + 60 * np.arange(len(closes))
    for field in ('open', 'high', 'low', 'close'):
        rows[field] = closes
    rows['volume'] = 1.0
    return rows


def _spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, '-c', code, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _reply(proc: subprocess.Popen) -> str:
    """The child's next `>>`-marked stdout line (anything else, e.g. logs, is skipped)."""
    for line in proc.stdout:
        if line.startswith('>>'):
            return line[2:].strip()
    raise AssertionError(f'child exited without replying: {proc.stderr.read()}')


def _reap(proc: subprocess.Popen) -> str:
    """Kill (if still running), wait, close the pipes; returns what was left on stderr."""
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    proc.kill()
    proc.wait(PROC_TIMEOUT_SECS)
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.stderr.close()
    return stderr


def _assert_no_tracker_noise(stderr: str) -> None:
    assert 'resource_tracker' not in stderr
    assert 'leaked' not in stderr


@pytest.fixture
def shm():
    with open_shm_array(f'test-{os.urandom(4).hex()}', capacity=64) as buf:
        yield buf


def test_subprocess_reader_sees_writes_zero_copy_and_is_readonly(shm):
    shm.push(_bars([1.0, 2.0, 3.0]))
    reader = _spawn(READER_CODE, json.dumps(shm.token.to_dict()))
    try:
        assert _reply(reader) == 'ready'
        shm.update_last(close=42.5)
        shm.push(_bars([7.0]))
        reader.stdin.write('check\n')
        reader.stdin.flush()
        seen = json.loads(_reply(reader))
        reader.stdin.close()
        assert reader.wait(PROC_TIMEOUT_SECS) == 0
    finally:
        stderr = _reap(reader)
    assert seen['view_last_close'] == 42.5  # the old view shows the new value
    assert seen['len'] == 4
    assert seen['array_last_close'] == 7.0
    assert seen['writeable'] is False
    assert 'read-only' in seen['write_error']
    assert shm.array['close'][0] == 1.0  # reader's write attempt changed nothing
    _assert_no_tracker_noise(stderr)


def test_killed_reader_then_owner_close_leaves_no_segment():
    shm = ShmArray.create(f'test-{os.urandom(4).hex()}', capacity=16)
    shm.push(_bars([1.0, 2.0]))
    path = SHM_DIR / shm.name
    reader = _spawn(READER_CODE, json.dumps(shm.token.to_dict()))
    try:
        assert _reply(reader) == 'ready'
        reader.send_signal(signal.SIGKILL)
        reader.wait(PROC_TIMEOUT_SECS)
        assert path.exists()  # a dying reader never takes the segment with it
        assert list(shm.array['close']) == [1.0, 2.0]
    finally:
        stderr = _reap(reader)
        shm.close()
    assert not path.exists()
    _assert_no_tracker_noise(stderr)


def test_killed_owner_segment_removed_by_sweep():
    code = textwrap.dedent('''
        import time
        from piker.data._shm import ShmArray
        shm = ShmArray.create('doomed', capacity=8)
        print('>>' + shm.name, flush=True)
        time.sleep(60)
    ''')
    owner = _spawn(code)
    try:
        name = _reply(owner)
        assert owner_pid(name) == owner.pid
        assert (SHM_DIR / name).exists()
        owner.send_signal(signal.SIGKILL)
        owner.wait(PROC_TIMEOUT_SECS)
    finally:
        _reap(owner)
    assert (SHM_DIR / name).exists()  # SIGKILL runs no cleanup
    assert name in sweep_stale_segments()
    assert not (SHM_DIR / name).exists()


def test_sweep_keeps_segments_of_live_owners(shm):
    assert shm.name not in sweep_stale_segments()
    assert (SHM_DIR / shm.name).exists()


def test_sigterm_teardown_via_cancellation_unlinks_segment():
    code = textwrap.dedent('''
        import signal, trio
        from piker.data._shm import open_shm_array

        async def main():
            with trio.open_signal_receiver(signal.SIGTERM) as sigs:
                with open_shm_array('sigterm', capacity=8) as shm:
                    print('>>' + shm.name, flush=True)
                    async for _ in sigs:
                        return

        trio.run(main)
    ''')
    owner = _spawn(code)
    try:
        name = _reply(owner)
        assert (SHM_DIR / name).exists()
        owner.send_signal(signal.SIGTERM)
        assert owner.wait(PROC_TIMEOUT_SECS) == 0
    finally:
        stderr = _reap(owner)
    assert not (SHM_DIR / name).exists()
    _assert_no_tracker_noise(stderr)


def test_owner_exit_without_close_unlinks_segment():
    code = textwrap.dedent('''
        from piker.data._shm import ShmArray
        shm = ShmArray.create('forgotten', capacity=8)
        print('>>' + shm.name, flush=True)
    ''')
    owner = _spawn(code)
    try:
        out = _reply(owner)
        assert owner.wait(PROC_TIMEOUT_SECS) == 0
    finally:
        err = _reap(owner)
    assert not err
    assert not (SHM_DIR / out.strip()).exists()


async def test_trio_cancellation_destroys_segment():
    with trio.fail_after(5):
        with trio.move_on_after(0.05):
            with open_shm_array('cancelled', capacity=8) as shm:
                name = shm.name
                await trio.sleep_forever()
    assert not (SHM_DIR / name).exists()


def test_push_overflow_error_names_capacity(shm):
    shm.push(_bars([1.0] * 32))  # the window starts mid-capacity: 32 rows fit
    with pytest.raises(ShmError, match='is full.*capacity is 64'):
        shm.push(_bars([1.0]))


def test_prepend_history_before_live_rows_keeps_indices_absolute(shm):
    shm.push(_bars([10.0, 11.0], t0_secs=1_700_000_600))
    shm.prepend(_bars([float(c) for c in range(10)], t0_secs=1_700_000_000))
    arr = shm.array
    assert len(arr) == 12
    assert list(arr['close'][-3:]) == [9.0, 10.0, 11.0]
    assert list(arr['index']) == list(range(22, 34))
    assert np.all(np.diff(arr['time']) == 60)
    with pytest.raises(ShmError, match='room for 22 rows'):
        shm.prepend(_bars([1.0] * 23))


def test_update_last_and_last_n(shm):
    with pytest.raises(ShmError, match='empty'):
        shm.update_last(close=1.0)
    shm.push(_bars([1.0, 2.0, 3.0]))
    shm.update_last(high=5.0, close=4.0, volume=9.0)
    last = shm.last()
    assert (last['high'][0], last['close'][0], last['volume'][0]) == (5.0, 4.0, 9.0)
    assert list(shm.last(2)['close']) == [2.0, 4.0]
    assert len(shm.last(100)) == 3
    with pytest.raises(ShmError, match='unknown fields'):
        shm.update_last(price=1.0)


def test_reader_write_methods_refused(shm):
    shm.push(_bars([1.0]))
    reader = ShmArray.attach(shm.token)
    try:
        for call in (
            lambda: reader.push(_bars([2.0])),
            lambda: reader.prepend(_bars([2.0])),
            lambda: reader.update_last(close=2.0),
        ):
            with pytest.raises(ShmError, match='read-only'):
                call()
        with pytest.raises(ShmError, match='only its owner'):
            reader.destroy()
    finally:
        reader.close()
    assert (SHM_DIR / shm.name).exists()  # reader close never unlinks


def test_token_roundtrips_as_plain_builtins(shm):
    data = shm.token.to_dict()
    assert data['dtype_descr'][0] == ['index', '<i8']
    assert json.loads(json.dumps(data)) == data
    assert ShmToken.from_dict(data) == shm.token
    assert ShmToken.from_dict(data).dtype == ohlc_dtype


def test_attach_missing_segment_error_says_why():
    token = ShmToken(shm_name='piker_1_nope', dtype_descr=(('close', '<f8'),), size=4)
    with pytest.raises(ShmError, match='does not exist'):
        ShmArray.attach(token)


def test_push_wrong_dtype_refused(shm):
    with pytest.raises(ShmError, match='expected the buffer dtype'):
        shm.push(np.zeros(1, dtype=[('close', 'f8')]))


def test_duplicate_key_in_one_process_refused(shm):
    key = shm.name.split('_', 2)[2]
    with pytest.raises(ShmError, match='already exists'):
        ShmArray.create(key, capacity=8)
