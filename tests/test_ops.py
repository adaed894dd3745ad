"""Running unattended, on the real process tree (``python -m piker bot run``):
sd_notify against a fake notify socket, the semantic watchdog, graceful stop on
SIGTERM and journald-style stdout.

systemd itself is never started: a datagram socket with ``SO_PASSCRED`` stands
in for PID 1 and reads the sender's pid from ``SCM_CREDENTIALS``, which is what
``NotifyAccess=main`` checks.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from piker.service._watchdog import unhealthy
from tests.conftest import REPO, PikerProc, descendants, pid_alive, run_piker, spawn_piker

WATCHDOG_USEC = 1_000_000
PING_INTERVAL_SECS = WATCHDOG_USEC / 2 / 1_000_000
STOP_TIMEOUT_SECS = 15.0
STARTUP_SECS = 60.0
SD_VARS = ('NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID')

MEANREV = {
    'name': 'mr', 'strategy': 'mean_revert', 'markets': ['ethusd.sim'], 'timeframe_secs': 1,
    'params': {'lookback': 3, 'entry_z': 0.5, 'size': 1.0, 'tick': 0.05},
}
SMA = {
    'name': 'sma', 'strategy': 'sma_cross', 'markets': ['btcusd.sim'], 'timeframe_secs': 1,
    'params': {'fast': 2, 'slow': 4, 'size': 1.0},
}

# entry at market on start (a position), then always one resting limit far
# below the market (an open order); written into a temp strategies dir
PROBE_SOURCE = '''
from piker.bot import Strategy, StrategyParams


class Probe(Strategy):

    class Params(StrategyParams):
        size: float = 1.0
        rest_below_frac: float = 0.2

    def on_start(self, ctx):
        ctx.buy(ctx.markets[0], self.params.size)

    def on_bar(self, ctx, fqme, bars):
        if not ctx.open_orders(fqme):
            price = round(float(bars['close'][-1]) * (1 - self.params.rest_below_frac), 2)
            ctx.buy(fqme, self.params.size, limit=price)
'''
PROBE = {'name': 'probe', 'strategy': 'probe', 'markets': ['btcusd.sim'], 'timeframe_secs': 1}
# the probe's resting limit sits 20% below the market
WIDE_BAND_RISK = {'price_band_frac': 0.5}


def probe_strategies_dir(tmp: Path) -> Path:
    d = tmp / 'strategies'
    d.mkdir(exist_ok=True)
    (d / 'probe.py').write_text(PROBE_SOURCE)
    for name in ('mean_revert.py', 'sma_cross.py'):
        (d / name).write_text((REPO / 'strategies' / name).read_text())
    return d


# -- harness ------------------------------------------------------------------

def _toml_value(value: Any) -> str:
    match value:
        case bool():
            return 'true' if value else 'false'
        case int() | float():
            return repr(value)
        case str():
            return json.dumps(value)
        case list():
            return '[' + ', '.join(_toml_value(v) for v in value) + ']'
        case dict():
            return '{ ' + ', '.join(f'{k} = {_toml_value(v)}' for k, v in value.items()) + ' }'
    raise TypeError(f'no TOML form for {value!r}')


def write_bot_toml(tmp: Path, strategies: list[dict[str, Any]],
                   strategies_dir: Path = REPO / 'strategies',
                   risk: dict[str, Any] | None = None) -> Path:
    """A small paper/sim bot: fast heartbeats so staleness shows within ~1.5 s."""
    lines = [
        'name = "ops"', 'mode = "paper"', 'backend = "sim"', 'log_level = "info"',
        f'stop_timeout_secs = {STOP_TIMEOUT_SECS}',
        f'strategies_dir = {json.dumps(str(strategies_dir))}',
        '[brokers.sim]', 'seed = 7', 'quote_rate_hz = 20',
        '[health]', 'heartbeat_secs = 0.3', 'stale_after_secs = 1.5',
        '[risk]', *(f'{k} = {_toml_value(v)}' for k, v in (risk or {}).items()),
    ]
    for s in strategies:
        lines.append('[[strategies]]')
        lines += [f'{k} = {_toml_value(v)}' for k, v in s.items()]
    path = tmp / 'bot.toml'
    path.write_text('\n'.join(lines) + '\n')
    tomllib.loads(path.read_text())  # fail here, not in the subprocess
    return path


def records(proc: PikerProc) -> list[dict[str, Any]]:
    """Every JSON record the tree printed so far (a torn last line is skipped)."""
    out = []
    for line in proc.stdout.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def events(proc: PikerProc, name: str) -> list[dict[str, Any]]:
    return [r for r in records(proc) if r.get('event') == name]


def wait_until(check: Callable[[], Any], timeout_secs: float, what: str,
               proc: PikerProc | None = None) -> Any:
    deadline = time.monotonic() + timeout_secs
    while True:
        got = check()
        if got:
            return got
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f'bot exited ({proc.proc.returncode}) while waiting for {what}:'
                                 f'\n{proc.stderr[-3000:]}')
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout_secs}s waiting for {what}')
        time.sleep(0.05)


class FakeSystemd:
    """PID 1's side of sd_notify: a thread collects every datagram with its
    arrival time and the sender's pid (SCM_CREDENTIALS)."""

    def __init__(self, address: str, on_ready: Callable[[], None] | None = None) -> None:
        self.address = address
        self.msgs: list[tuple[float, list[str], int]] = []
        self._on_ready = on_ready
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind(address)
        self._sock.settimeout(0.2)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        size = socket.CMSG_SPACE(struct.calcsize('3i'))
        while not self._done.is_set():
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(4096, size)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack('3i', payload)[0]
            lines = data.decode().split('\n')
            if 'READY=1' in lines and self._on_ready is not None:
                self._on_ready()
            self.msgs.append((time.monotonic(), lines, pid))

    def times_of(self, field: str, after: float = 0.0) -> list[float]:
        return [t for t, lines, _ in list(self.msgs) if field in lines and t > after]

    def values_of(self, key: str) -> list[str]:
        return [line.split('=', 1)[1] for _, lines, _ in list(self.msgs)
                for line in lines if line.startswith(key + '=')]

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def fake_systemd() -> Iterator[FakeSystemd]:
    # short path: AF_UNIX paths are limited to 108 bytes
    base = Path('/tmp') / f'sdops-{uuid.uuid4().hex[:8]}'
    base.mkdir()
    fake = FakeSystemd(str(base / 'notify'))
    yield fake
    fake.close()
    Path(fake.address).unlink(missing_ok=True)
    base.rmdir()


def start_bot(procs: list[PikerProc], tmp: Path, cfg: Path, reg: tuple[str, int],
              env: dict[str, str] | None = None) -> PikerProc:
    clean = {k: v for k, v in (env or {}).items()}
    return spawn_piker(procs, tmp, 'bot', 'run', '-c', str(cfg),
                       '--registry', f'{reg[0]}:{reg[1]}', '--state-dir', str(tmp / 'state'),
                       env=clean)


def service_pids(reg: tuple[str, int]) -> dict[str, int]:
    """name -> pid of every actor in the running tree, as `piker services` shows."""
    res = run_piker('services', '--json', '--registry', f'{reg[0]}:{reg[1]}', timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    return {row['name']: row['pid'] for row in json.loads(res.stdout)['actors']
            if row['kind'] != 'client'}


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f'/proc/{pid}/environ').read_bytes()
    return dict(item.split('=', 1) for item in raw.decode(errors='replace').split('\0')
                if '=' in item)


def stop_and_check_exit(proc: PikerProc, tree: list[int]) -> float:
    """SIGTERM the main pid (KillMode=mixed); exit 0 in time, nothing left behind.
    Returns the stop duration."""
    t0 = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.proc.wait(STOP_TIMEOUT_SECS + 5)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f'bot did not exit within {STOP_TIMEOUT_SECS + 5}s of SIGTERM') from None
    took = time.monotonic() - t0
    assert rc == 0, proc.stderr[-3000:]
    assert took < STOP_TIMEOUT_SECS, took
    left = [p for p in tree if pid_alive(p)]
    assert left == [], f'processes left after exit: {left}'
    return took


# -- 1. sd_notify ---------------------------------------------------------------

def test_sd_notify_ready_after_strategies_status_watchdog_stopping_from_main_pid(
    reg_addr, tmp_path, piker_procs, fake_systemd,
):
    cfg = write_bot_toml(tmp_path, [MEANREV, SMA])
    ready_snapshot: list[int] = []
    bot: list[PikerProc] = []
    # what the tree had printed when READY arrived
    fake_systemd._on_ready = lambda: ready_snapshot.append(bot[0].out_path.stat().st_size)
    env = {'NOTIFY_SOCKET': fake_systemd.address, 'WATCHDOG_USEC': str(WATCHDOG_USEC)}
    bot.append(start_bot(piker_procs, tmp_path, cfg, reg_addr, env))
    proc = bot[0]
    t_ready = wait_until(lambda: fake_systemd.times_of('READY=1'), STARTUP_SECS, 'READY=1',
                         proc)[0]
    # a few watchdog beats and status refreshes while trading
    wait_until(lambda: len(fake_systemd.times_of('WATCHDOG=1')) >= 6, 20, '6 pings', proc)

    tree = descendants(proc.pid)
    actors = service_pids(reg_addr)
    assert {'bot.mr', 'bot.sma', 'emsd', 'datad.sim', 'healthd'} <= set(actors)
    for name, pid in actors.items():
        if pid != proc.pid:
            assert pid in tree, (name, pid, tree)
            leaked = set(SD_VARS) & set(environ_of(pid))
            assert not leaked, f'{name} (pid {pid}) inherited {leaked}'

    stop_and_check_exit(proc, tree)
    msgs = list(fake_systemd.msgs)

    # READY only once every strategy actor reported started (warm, dialog open)
    assert len(fake_systemd.times_of('READY=1')) == 1
    before_ready = proc.out_path.read_bytes()[:ready_snapshot[0]].decode(errors='replace')
    seen = [json.loads(line) for line in before_ready.splitlines() if line.startswith('{')]
    for name in ('mr', 'sma'):
        assert any(r['event'] == 'strategy.start' and r.get('strategy') == name for r in seen)
        assert any(r['event'] == 'bot.warmed' and r.get('strategy') == name for r in seen)
        assert any(r['event'] == 'service.started' and r.get('service') == f'bot.{name}'
                   for r in seen)
    assert all(t >= t_ready for t in fake_systemd.times_of('WATCHDOG=1'))

    # NotifyAccess=main: everything came from the main pid
    assert {pid for _, _, pid in msgs} == {proc.pid}

    # healthy the whole time: pings at WATCHDOG_USEC/2, never a gap systemd would punish
    pings = fake_systemd.times_of('WATCHDOG=1')
    assert len(pings) >= 6
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
    assert sum(gaps) / len(gaps) == pytest.approx(PING_INTERVAL_SECS, abs=0.25)

    # STATUS= kept current: mode, positions and P&L, changing as the bot trades
    statuses = fake_systemd.values_of('STATUS')
    running = [s for s in statuses if s.startswith('paper |')]
    assert len(running) >= 3, statuses
    for text in running:
        assert 'orders' in text and 'pnl realized' in text and 'unrealized' in text, text
        assert text.endswith('| markets btcusd.sim ethusd.sim'), text
    assert len(set(running)) >= 2, running

    # STOPPING=1 last, after the final ping
    last_lines = msgs[-1][1]
    assert 'STOPPING=1' in last_lines, msgs[-3:]
    assert fake_systemd.times_of('STOPPING=1')[0] > pings[-1]


# -- 2. the semantic watchdog ---------------------------------------------------

def withheld_naming(proc: PikerProc, name: str, after_ts: str) -> list[dict[str, Any]]:
    return [r for r in events(proc, 'watchdog.withheld')
            if r['timestamp'] > after_ts and any(p.startswith(name + ':') for p in r['problems'])]


def utc_now_iso() -> str:
    from datetime import UTC, datetime
    return datetime.now(UTC).isoformat().replace('+00:00', 'Z')


def assert_pings_withheld(fake: FakeSystemd, since: float, secs: float) -> None:
    """No WATCHDOG=1 for ``secs`` from ``since``: systemd's WatchdogSec would fire."""
    time.sleep(max(since + secs - time.monotonic(), 0))
    late = fake.times_of('WATCHDOG=1', after=since)
    assert late == [], f'pings while unhealthy: {[round(t - since, 2) for t in late]}'


def test_watchdog_withholds_pings_for_hung_strategy_and_dead_datad(
    reg_addr, tmp_path, piker_procs, fake_systemd,
):
    cfg = write_bot_toml(tmp_path, [MEANREV])
    env = {'NOTIFY_SOCKET': fake_systemd.address, 'WATCHDOG_USEC': str(WATCHDOG_USEC)}
    proc = start_bot(piker_procs, tmp_path, cfg, reg_addr, env)
    wait_until(lambda: fake_systemd.times_of('READY=1'), STARTUP_SECS, 'READY=1', proc)
    wait_until(lambda: len(fake_systemd.times_of('WATCHDOG=1')) >= 2, 20, 'pings', proc)
    actors = service_pids(reg_addr)
    bot_pid, datad_pid = actors['bot.mr'], actors['datad.sim']
    tree = descendants(proc.pid)

    # a hung strategy: its process lives, its trio loop does not
    mark = utc_now_iso()
    os.kill(bot_pid, signal.SIGSTOP)
    try:
        rec = wait_until(lambda: withheld_naming(proc, 'bot.mr', mark), 15,
                         'watchdog.withheld naming bot.mr', proc)[0]
        assert rec['problems'][0].startswith('bot.mr: stale'), rec
        assert_pings_withheld(fake_systemd, time.monotonic(), 2.5)
        assert any(s.startswith('UNHEALTHY bot.mr: stale') for s in fake_systemd.values_of('STATUS'))
    finally:
        os.kill(bot_pid, signal.SIGCONT)
    t_cont = time.monotonic()
    wait_until(lambda: fake_systemd.times_of('WATCHDOG=1', after=t_cont), 15,
               'pings to resume after SIGCONT', proc)
    assert [r for r in events(proc, 'watchdog.recovered') if r['timestamp'] > mark]
    # the reason is logged once per change, not on every withheld beat
    assert len(withheld_naming(proc, 'bot.mr', mark)) == 1
    before = [t for t in fake_systemd.times_of('WATCHDOG=1') if t < t_cont]
    assert t_cont - before[-1] > 2 * WATCHDOG_USEC / 1e6

    # a dead feed daemon: pikerd restarts it (typically within one watchdog
    # beat, so pings may not even pause) and pings go on: no unit restart for
    # what the tree heals itself
    mark = utc_now_iso()
    os.kill(datad_pid, signal.SIGKILL)
    t_dead = time.monotonic()
    wait_until(lambda: [r for r in events(proc, 'service.restarted')
                        if r['timestamp'] > mark and r['service'] == 'datad.sim'], 15,
               'pikerd to restart datad.sim', proc)
    wait_until(lambda: fake_systemd.times_of('WATCHDOG=1', after=t_dead), 15,
               'pings to resume after the restart', proc)
    assert service_pids(reg_addr)['datad.sim'] != datad_pid
    stop_and_check_exit(proc, [p for p in tree if p != datad_pid])


def test_unhealthy_names_each_critical_actor_that_is_not_ok():
    rows = [
        {'name': 'bot.a', 'state': 'ok', 'age_secs': 0.2},
        {'name': 'bot.b', 'state': 'stale', 'age_secs': 3.04},
        {'name': 'datad.sim', 'state': 'gone', 'age_secs': 7.0},
        {'name': 'client', 'state': 'stale', 'age_secs': 9.0},  # not critical
    ]
    assert unhealthy(rows, ['bot.a']) == []
    assert unhealthy(rows, ['datad.sim', 'bot.b', 'bot.a', 'emsd']) == [
        'bot.b: stale (3.0s)', 'datad.sim: gone (7.0s)', 'emsd: no heartbeat']
    assert unhealthy(None, ['bot.a']) == ['healthd: unreachable']


# -- 4. graceful stop -------------------------------------------------------------

def test_sigterm_stops_strategies_cancels_orders_flushes_ledger_exit_0(
    reg_addr, tmp_path, piker_procs,
):
    cfg = write_bot_toml(tmp_path, [PROBE, MEANREV], probe_strategies_dir(tmp_path),
                         risk=WIDE_BAND_RISK)
    proc = start_bot(piker_procs, tmp_path, cfg, reg_addr)
    wait_until(lambda: events(proc, 'bot.ready'), STARTUP_SECS, 'bot.ready', proc)

    def probe_resting() -> list[str]:
        fills = {r['oid'] for r in events(proc, 'order.fill') if r['actor'] == 'emsd'}
        probe = {r['oid'] for r in events(proc, 'order.send') if r.get('strategy') == 'probe'}
        rest = [r['oid'] for r in events(proc, 'paper.rest') if r['oid'] in probe]
        return rest if fills & probe else []

    resting = wait_until(probe_resting, 20, 'the probe to hold a position and a resting order',
                         proc)
    tree = descendants(proc.pid)
    stop_and_check_exit(proc, tree)
    recs = records(proc)

    assert [r['signal'] for r in recs if r['event'] == 'runtime.signal'] == ['SIGTERM']
    stopped = {r['actor'] for r in recs if r['event'] == 'bot.stopped'}
    assert stopped == {'bot.probe', 'bot.mr'}
    # the on_stop policy ('cancel'): the resting order was pulled at the paper broker
    canceled = {r['oid'] for r in recs if r['event'] == 'paper.cancel'}
    assert set(resting) <= canceled
    summary = [r for r in recs if r['event'] == 'bot.summary']
    assert len(summary) == 1
    by_name = {s['strategy']: s for s in summary[0]['strategies']}
    assert {n: s['state'] for n, s in by_name.items()} == {'probe': 'stopped', 'mr': 'stopped'}
    assert all(s['open_orders'] == 0 for s in by_name.values()), by_name
    # strategies stop before the feeds and order dialogs they use
    order = [r['service'] for r in recs if r['event'] == 'service.stopped']
    assert order.index('bot.probe') < order.index('emsd') < order.index('datad.sim')

    # state on disk: nothing resting at the paper broker, every fill in the ledger once
    state = tmp_path / 'state'
    assert tomllib.loads((state / 'paper/sim/orders.toml').read_text())['orders'] == []
    book = state / 'accounting/sim/paper'
    ledger = tomllib.loads((book / 'ledger.toml').read_text())
    ledger_ids = [f['fill_id'] for f in ledger['fills']]
    reported = [r['fill_id'] for r in recs if r['event'] == 'order.fill' and r['actor'] == 'emsd']
    assert sorted(ledger_ids) == sorted(reported) and len(set(ledger_ids)) == len(ledger_ids)
    assert sum(s['fills'] for s in by_name.values()) == len(ledger_ids)
    positions = tomllib.loads((book / 'positions.toml').read_text())
    assert positions['fills_applied'] == len(ledger_ids)
    size = sum(f['size'] for f in ledger['fills'] if f['fqme'] == 'btcusd.sim')
    assert positions['positions']['btcusd.sim']['size'] == pytest.approx(size)
    assert size == pytest.approx(1.0)  # the probe's entry; its resting buy never filled


# -- 5. journald stdout -------------------------------------------------------------

def test_journal_stream_lines_carry_syslog_priority_then_json(reg_addr, tmp_path):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    st = os.fstat(theirs.fileno())
    env = {k: v for k, v in os.environ.items() if k not in ('PIKER_LOG_FORMAT', *SD_VARS)}
    env['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'
    cfg = write_bot_toml(tmp_path, [MEANREV])
    proc = subprocess.Popen(
        [sys.executable, '-m', 'piker', 'bot', 'run', '-c', str(cfg), '--for', '3s',
         '--registry', f'{reg_addr[0]}:{reg_addr[1]}', '--state-dir', str(tmp_path / 'state')],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=theirs.fileno(),
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    theirs.close()
    chunks: list[bytes] = []

    def drain() -> None:
        while data := ours.recv(65536):
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        rc = proc.wait(STARTUP_SECS + 30)
        reader.join(10)
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(5)
        ours.close()
    assert rc == 0
    lines = b''.join(chunks).decode().splitlines()
    assert len(lines) > 20
    priority = {'debug': 7, 'info': 6, 'warning': 4, 'error': 3, 'critical': 2}
    pids = set()
    for line in lines:
        assert line[:1] == '<' and line[2:4] == '>{', line[:200]
        rec = json.loads(line[3:])
        assert int(line[1]) == priority[rec['level']], line[:200]
        pids.add(rec['pid'])
    # every actor writes to the same stream, each record whole
    assert len(pids) >= 5
    assert {json.loads(line[3:])['event'] for line in lines} >= {'bot.ready', 'bot.summary'}
