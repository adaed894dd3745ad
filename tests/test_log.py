"""piker.log: the one-pipeline-per-process contract, checked on real output.

Every case runs a small Python subprocess (logging setup is process-global)
and inspects what actually reached its stdout/stderr.
"""
from __future__ import annotations

import json
import logging
import os
import pty
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from piker import log as piker_log
from tests import _logprobe

REPO = Path(__file__).resolve().parent.parent
NOISE = ('TrioDeprecationWarning', 'MultiError')


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if k not in ('JOURNAL_STREAM', 'PIKER_LOG_FORMAT', 'PIKER_LOG_LEVEL', 'PYTHONWARNINGS')
    }
    env.update(extra)
    return env


def _run(code: str, stdout: int = subprocess.PIPE, timeout: float = 30, **env: str,
         ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code)],
        cwd=REPO, env=_env(**env), stdout=stdout, stderr=subprocess.PIPE, timeout=timeout,
    )


def _records(raw: bytes) -> list[dict]:
    text = raw.decode()
    assert text.endswith('\n'), f'stdout must end with a newline: {text[-200:]!r}'
    return [json.loads(line) for line in text.splitlines()]


def _assert_well_formed(rec: dict) -> None:
    for key in ('timestamp', 'level', 'actor', 'logger', 'event', 'pid'):
        assert key in rec, f'{key!r} missing from {rec}'
    assert rec['timestamp'].endswith('Z'), rec['timestamp']


def _frames(exceptions: list[dict]) -> list[dict]:
    out = []
    for exc in exceptions:
        out += exc.get('frames', [])
        out += _frames(exc.get('exceptions', []))
    return out


@pytest.fixture
def reg_port() -> int:
    """A free loopback port so every tree gets its own registry."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


EMIT = '''
import logging, warnings, sys
from piker.log import get_logger, setup_logging, bind_contextvars
log = get_logger('piker.t')
'''


def test_tractor_tree_stdout_json_lines_each_record_once(reg_port: int) -> None:
    # own session: on a timeout the whole tree is killed, no orphans
    with subprocess.Popen(
        [sys.executable, '-m', 'tests._logprobe', 'tree', str(reg_port), '--quiet-aio'],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    ) as tree:
        try:
            stdout, stderr = tree.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(tree.pid, signal.SIGKILL)
            tree.communicate()
            raise
    proc = subprocess.CompletedProcess(tree.args, tree.returncode, stdout, stderr)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    out, err = proc.stdout.decode(), proc.stderr.decode()
    for text in (out, err):
        assert '\x1b[' not in text
        for word in NOISE:
            assert word not in text
    assert _logprobe.SECRET not in out
    assert 'CancelledError' not in out, 'quiet_asyncio_noise() should drop teardown noise'
    recs = _records(proc.stdout)
    for rec in recs:
        _assert_well_formed(rec)

    actors = ('root', 'child1', 'child2', 'aio')
    pids = {}
    for actor in actors:
        mine = [r for r in recs if r['actor'] == actor]
        pids[actor] = {r['pid'] for r in mine}
        events = [r['event'] for r in mine if r['event'].startswith('probe.')]
        for name in _logprobe.PROBE_EVENTS:
            assert events.count(name) == 1, f'{actor}: {name} x{events.count(name)}'
        warned = [r for r in mine if r['logger'] == 'py.warnings']
        assert len(warned) == 1 and 'probe.warning' in warned[0]['event']
        for r in mine:
            if r['event'].startswith('probe.'):
                assert r['strategy'] == f'strat-{actor}' and r['fqme'] == 'btcusd.sim'
        failed = next(r for r in mine if r['event'] == 'probe.failed')
        assert failed['level'] == 'error'
        assert failed['exception'][0]['exc_type'] == 'ValueError'
        for frame in _frames(failed['exception']):
            assert 'locals' not in frame
        tractor_rec = next(r for r in mine if r['event'] == 'probe.tractor')
        assert tractor_rec['logger'] == 'tractor.probe'
    assert all(len(p) == 1 for p in pids.values()), pids
    assert len({next(iter(p)) for p in pids.values()}) == len(actors)


def test_third_party_records_once_without_locals_or_noise() -> None:
    proc = _run(EMIT + '''
import tractor, tractor.log, trio
setup_logging('info')
setup_logging('info')                      # re-applied, never duplicated
tractor.log.get_console_log('info')        # what open_root_actor() does
bind_contextvars(strategy='s1', oid='o-1')
log.info('ours', qty=3)
for name in ('trio', 'tractor.x', 'ib_async.client', 'asyncio', 'apscheduler.scheduler'):
    logging.getLogger(name).warning('from %s', name)
warnings.warn('deprecated thing', DeprecationWarning)
def leak(api_key):
    secret_local = api_key
    raise KeyError('nope')
try:
    leak('SECRET-XYZ')
except KeyError:
    log.exception('ours.failed')
    logging.getLogger('ib_async.wrapper').error('theirs.failed', exc_info=True)
''')
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b''
    out = proc.stdout.decode()
    assert 'SECRET-XYZ' not in out and '\x1b[' not in out
    recs = _records(proc.stdout)
    events = [r['event'] for r in recs]
    expected = ['ours', 'from trio', 'from tractor.x', 'from ib_async.client', 'from asyncio',
                'from apscheduler.scheduler']
    assert events[:6] == expected
    assert sum('deprecated thing' in e for e in events) == 1
    assert events[-2:] == ['ours.failed', 'theirs.failed']
    for rec in recs:
        _assert_well_formed(rec)
        assert rec['actor'] == 'piker' and rec['strategy'] == 's1' and rec['oid'] == 'o-1'
    for rec in recs[-2:]:
        assert rec['exception'][0]['exc_value'] == "'nope'"
        assert [f['name'] for f in rec['exception'][0]['frames']] == ['<module>', 'leak']
        assert all(set(f) == {'filename', 'lineno', 'name'} for f in rec['exception'][0]['frames'])


def test_each_record_is_one_write() -> None:
    # SOCK_SEQPACKET keeps write boundaries: one packet per write() call
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        for unbuffered in ('1', ''):
            proc = _run(EMIT + '''
setup_logging('info')
for i in range(20):
    log.info('tick', i=i, pad='x' * (i * 300))
logging.getLogger('trio').warning('stdlib too')
''', stdout=theirs.fileno(), PYTHONUNBUFFERED=unbuffered)
            assert proc.returncode == 0, proc.stderr.decode()
            ours.setblocking(False)
            packets = []
            while True:
                try:
                    packets.append(ours.recv(1 << 20))
                except BlockingIOError:
                    break
            assert len(packets) == 21
            for pkt in packets:
                assert pkt.endswith(b'\n') and pkt.count(b'\n') == 1
                json.loads(pkt)


def test_journal_stream_matching_stdout_gets_priority_prefix() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        st = os.fstat(theirs.fileno())
        proc = _run(EMIT + '''
setup_logging('debug')
log.debug('d'); log.info('i'); log.warning('w'); log.error('e'); log.critical('c')
logging.getLogger('trio').error('stdlib')
''', stdout=theirs.fileno(), JOURNAL_STREAM=f'{st.st_dev}:{st.st_ino}')
        assert proc.returncode == 0, proc.stderr.decode()
        theirs.close()
        raw = b''
        while chunk := ours.recv(65536):
            raw += chunk
    lines = raw.decode().splitlines()
    prios = [line[:3] for line in lines]
    assert prios == ['<7>', '<6>', '<4>', '<3>', '<2>', '<3>']
    assert [json.loads(line[3:])['event'] for line in lines] == ['d', 'i', 'w', 'e', 'c', 'stdlib']


def test_journal_stream_of_another_file_gives_no_prefix() -> None:
    with tempfile.TemporaryFile() as other:
        st = os.fstat(other.fileno())
        proc = _run(EMIT + '''
setup_logging('info')
log.warning('w')
''', JOURNAL_STREAM=f'{st.st_dev}:{st.st_ino}')
    assert proc.returncode == 0
    assert proc.stdout.startswith(b'{')
    assert _records(proc.stdout)[0]['event'] == 'w'


def test_oversized_record_capped_and_marked_truncated() -> None:
    proc = _run(EMIT + '''
setup_logging('info')
def deep(n):
    if n == 0:
        raise RuntimeError('v' * 50_000)
    deep(n - 1)
try:
    deep(200)
except RuntimeError:
    log.exception('big.exc', blob='x' * 100_000, nested={'k': ['y' * 10_000] * 10})
log.info('many.fields', **{f'f{i}': 'z' * 1500 for i in range(40)})
log.info('small')
''')
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        assert len(line) <= piker_log.MAX_RECORD_BYTES
    big, many, small = (json.loads(line) for line in lines)
    assert big['truncated'] is True and big['event'] == 'big.exc'
    assert big['exception'][0]['exc_type'] == 'RuntimeError'
    assert len(big['exception'][0]['frames']) <= 11
    assert many['truncated'] is True and many['event'] == 'many.fields'
    assert 'dropped' in many or sum(k.startswith('f') for k in many) == 40
    assert 'truncated' not in small


def test_console_on_tty_and_env_overrides() -> None:
    code = EMIT + '''
setup_logging('info')
log.info('hello.console', x=1)
'''
    leader, follower = pty.openpty()
    try:
        proc = _run(code, stdout=follower)
        os.close(follower)
        follower = -1
        raw = b''
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            raw += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0
    assert b'hello.console' in raw and b'\x1b[' in raw and not raw.startswith(b'{')

    piped_console = _run(code, PIKER_LOG_FORMAT='console')
    assert b'hello.console' in piped_console.stdout
    assert not piped_console.stdout.startswith(b'{') and b'\x1b[' not in piped_console.stdout

    forced = _run(code.replace("setup_logging('info')", "setup_logging('info', force_json=True)"),
                  PIKER_LOG_FORMAT='console')
    assert _records(forced.stdout)[0]['event'] == 'hello.console'


def test_env_level_and_actor_name_applied() -> None:
    proc = _run(EMIT + '''
setup_logging(None, actor='bot.sma')
log.info('dropped'); log.warning('kept')
''', PIKER_LOG_LEVEL='warning')
    assert proc.returncode == 0, proc.stderr.decode()
    recs = _records(proc.stdout)
    assert [(r['event'], r['actor']) for r in recs] == [('kept', 'bot.sma')]


def test_import_sets_pythonwarnings_for_children() -> None:
    proc = _run('''
import os, piker.log
print(os.environ['PYTHONWARNINGS'])
''', PYTHONWARNINGS='default')
    value = proc.stdout.decode().strip()
    assert value.startswith('default,')
    assert 'ignore:trio.MultiError:FutureWarning' in value
    child = _run('import tractor', PYTHONWARNINGS=value)
    assert child.returncode == 0 and b'MultiError' not in child.stderr


def test_quiet_asyncio_noise_drops_cancelled_only() -> None:
    proc = _run(EMIT + '''
import asyncio
from piker.log import quiet_asyncio_noise
setup_logging('info')
async def main():
    quiet_asyncio_noise()
    loop = asyncio.get_running_loop()
    loop.call_exception_handler({'message': 'cb noise', 'exception': asyncio.CancelledError()})
    logging.getLogger('tractor.to_asyncio').error('task errored', exc_info=asyncio.CancelledError())
    loop.call_exception_handler({'message': 'real cb error', 'exception': OSError('boom')})
    logging.getLogger('tractor.to_asyncio').error('real task error', exc_info=ValueError('x'))
asyncio.run(main())
''')
    assert proc.returncode == 0, proc.stderr.decode()
    events = [r['event'] for r in _records(proc.stdout)]
    assert events == ['real cb error', 'real task error']


@pytest.mark.parametrize(('kwargs', 'env', 'needle'), [
    ({'level': 'loud'}, {}, "found 'loud'"),
    ({'level': None}, {'PIKER_LOG_LEVEL': 'verbose'}, '$PIKER_LOG_LEVEL'),
    ({'level': 'info'}, {'PIKER_LOG_FORMAT': 'xml'}, '$PIKER_LOG_FORMAT'),
])
def test_bad_level_or_format_raises_clear_error(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict, env: dict, needle: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match='expected') as info:
        piker_log.setup_logging(**kwargs)
    assert needle in str(info.value)


# -- nothing bare, repeated records summarised (issue 11) --------------------------

def test_hooks_turn_what_python_prints_into_records_and_stderr_stays_empty() -> None:
    proc = _run(EMIT + '''
import gc, threading
setup_logging('info')
def boom(what):
    secret_local = 'HOOK-SECRET'
    raise RuntimeError(what)
t = threading.Thread(target=boom, args=('on a thread',), name='worker'); t.start(); t.join()
class Noisy:
    def __del__(self):
        raise ValueError('in __del__')
Noisy(); gc.collect()
orphan = logging.getLogger('orphan'); orphan.propagate = False
orphan.warning('reaches no handler')
logging.getLogger('fmt').warning('%d apples', 'not a number')
boom('uncaught')
''')
    assert proc.returncode == 1
    assert proc.stderr == b''
    assert b'HOOK-SECRET' not in proc.stdout
    recs = _records(proc.stdout)
    for rec in recs:
        _assert_well_formed(rec)
    by_event = {r['event']: r for r in recs}
    assert list(by_event) == ['thread.uncaught', 'unraisable', 'reaches no handler',
                              'log.emit_failed', 'process.uncaught']
    thread, unraisable, orphan, failed, uncaught = by_event.values()
    assert (thread['level'], thread['thread_name']) == ('error', 'worker')
    assert thread['exception'][0]['exc_value'] == 'on a thread'
    assert [f['name'] for f in thread['exception'][0]['frames']][-1] == 'boom'
    assert unraisable['level'] == 'warning' and 'Noisy.__del__' in unraisable['object']
    assert unraisable['exception'][0]['exc_value'] == 'in __del__'
    assert (orphan['level'], orphan['logger']) == ('warning', 'orphan')
    assert failed['of_logger'] == 'fmt' and 'TypeError' in failed['error']
    assert (uncaught['level'], uncaught['logger']) == ('critical', 'piker.crash')
    assert uncaught['exception'][0]['exc_value'] == 'uncaught'
    for rec in (thread, unraisable, uncaught):
        assert all(set(f) == {'filename', 'lineno', 'name'}
                   for f in _frames(rec['exception']))


def test_repeated_records_pass_a_burst_then_one_summary_per_window_errors_at_error() -> None:
    proc = _run(EMIT + '''
import time
setup_logging('info')
for i in range(2_000):
    log.warning('order.rejected', oid=f'o{i}', rule='max_order_size')
for i in range(30):
    logging.getLogger('ib_async.wrapper').error('Error 200, reqId %s: no contract', i)
log.info('info.never.limited', n=1)
for i in range(25):
    log.info('also.info', i=i)
time.sleep(1.05)                     # the windows close ...
log.info('next.record')              # ... and the next record brings the summaries out
log.warning('order.rejected', oid='late')   # a new window: passes
for i in range(12):
    log.error('db.down', attempt=i)  # pending at exit: flushed by atexit
''', PIKER_LOG_WINDOW_SECS='1', PIKER_LOG_BURST='5')
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b''
    recs = _records(proc.stdout)
    events = [r['event'] for r in recs]
    assert events.count('order.rejected') == 6
    # keyed by the template: the ids differ, the record does not
    assert sum(e.startswith('Error 200, reqId ') for e in events) == 5
    assert events.count('also.info') == 25
    summaries = [r for r in recs if r['event'] == 'log.suppressed']
    got = {(s['of'], s['level'], s['logger']): (s['count'], s['passed']) for s in summaries}
    assert got == {
        ('order.rejected', 'warning', 'piker.t'): (1995, 5),
        ('Error 200, reqId %s: no contract', 'error', 'ib_async.wrapper'): (25, 5),
        ('db.down', 'error', 'piker.t'): (7, 5),
    }
    assert all(s['window_secs'] == 1 for s in summaries)
    # the two closed windows come out right before the record after them
    nxt = events.index('next.record')
    assert events[nxt - 2:nxt] == ['log.suppressed', 'log.suppressed']
    assert events[-1] == 'log.suppressed' and recs[-1]['of'] == 'db.down'
    # a summary is the pipeline's own: no borrowed task context
    assert 'oid' not in recs[nxt - 1] and 'attempt' not in recs[-1]


def test_rate_limiter_windows_per_key_with_a_fake_clock() -> None:
    now = [0.0]
    lim = piker_log.RateLimiter(burst=2, window_secs=10, clock=lambda: now[0])

    def rec(event: str, level: int = logging.WARNING, name: str = 'x') -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, event, (), None)

    assert [lim.admit(rec('a'))[0] for _ in range(4)] == [True, True, False, False]
    assert lim.admit(rec('a', logging.ERROR))[0] is True       # another level, another key
    assert lim.admit(rec('a', name='y'))[0] is True            # another logger too
    assert all(lim.admit(rec('a', logging.INFO))[0] for _ in range(50))
    now[0] = 9.9
    assert lim.admit(rec('b')) == (True, [])
    now[0] = 10.0
    passes, due = lim.admit(rec('b'))
    assert passes and [(d.of, d.count, d.passed, d.window_secs) for d in due] == [('a', 2, 2, 10)]
    assert lim.admit(rec('a'))[0] is True                      # a fresh window
    assert lim.drain() == []


def test_faulthandler_dump_becomes_a_record_of_the_next_process(tmp_path: Path) -> None:
    victim = _run(EMIT + '''
import os
setup_logging('info', actor='victim')
def stuck_in_here():
    os.abort()
stuck_in_here()
''', PYTHONFAULTHANDLER='1', PIKER_STATE_DIR=str(tmp_path))
    assert victim.returncode == -signal.SIGABRT
    assert victim.stderr == b'' and victim.stdout == b''
    (dump,) = (tmp_path / 'crash').iterdir()
    assert dump.name.startswith('victim.') and dump.read_text()
    nxt = _run(EMIT + '''
setup_logging('info', actor='next')
''', PYTHONFAULTHANDLER='1', PIKER_STATE_DIR=str(tmp_path))
    assert nxt.returncode == 0 and nxt.stderr == b''
    (rec,) = _records(nxt.stdout)
    assert (rec['event'], rec['level'], rec['actor']) == ('process.fault_dump', 'critical', 'next')
    assert rec['crashed_actor'] == 'victim' and rec['fault'] == 'Fatal Python error: Aborted'
    assert 'stuck_in_here' in rec['dump']
    assert list((tmp_path / 'crash').iterdir()) == []   # reported once; its own file went at exit
