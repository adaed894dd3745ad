"""`piker bot run` tells the truth with its exit status, on the real tree:
1 when no strategy runs (at the end of startup or later), within one stop
deadline however many strategies hang; 0 for a clean stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from tests.conftest import (
    REPO,
    PikerProc,
    descendants,
    free_port,
    pid_alive,
    run_piker,
    spawn_piker,
)

STARTUP_SECS = 60.0


def write_cfg(tmp: Path, strategies: list[dict[str, Any]], **top: Any) -> Path:
    path = tmp / 'bot.toml'
    data = {'name': 'exits', 'mode': 'paper', 'backend': 'sim', **top,
            'strategies': strategies}
    path.write_text(tomli_w.dumps(data))
    return path


def run_args(cfg: Path, reg_addr: tuple[str, int], tmp: Path) -> list[str]:
    return ['bot', 'run', '-c', str(cfg), '--registry', f'{reg_addr[0]}:{reg_addr[1]}',
            '--state-dir', str(tmp / 'state')]


def events(text: str, name: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith('{'):
            rec = json.loads(line)
            if rec.get('event') == name:
                out.append(rec)
    return out


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith('piker: error:')]


def test_no_strategy_running_after_startup_exits_1(reg_addr, tmp_path):
    cfg = write_cfg(tmp_path, [{'name': 'nope', 'strategy': 'tests.strategies.fail_on_start',
                                'markets': ['btcusd.sim'], 'timeframe_secs': 1}])
    res = run_piker(*run_args(cfg, reg_addr, tmp_path), '--for', '60s', timeout=90)
    assert res.returncode == 1, res.stderr[-3000:]
    [line] = error_lines(res.stderr)
    assert 'no strategy is running after startup' in line
    assert 'bot.nope: failed' in line and 'no such account setting' in line
    assert 'Traceback' not in res.stderr
    assert events(res.stdout, 'bot.ready') == []


def test_every_strategy_failing_later_ends_the_run_with_exit_1(reg_addr, tmp_path):
    cfg = write_cfg(tmp_path, [
        {'name': 'boom', 'strategy': 'tests.strategies.boom', 'markets': ['btcusd.sim'],
         'timeframe_secs': 1, 'params': {'fail_at': 3, 'limit': 1.0}},
    ])
    t0 = time.monotonic()
    res = run_piker(*run_args(cfg, reg_addr, tmp_path), '--for', '120s', timeout=150)
    took = time.monotonic() - t0
    assert res.returncode == 1, res.stderr[-3000:]
    assert took < 60, took
    assert events(res.stdout, 'bot.ready')
    [line] = error_lines(res.stderr)
    assert 'every strategy has stopped' in line
    assert 'bot.boom: failed' in line and 'ZeroDivisionError' in line


def test_sigterm_exits_within_one_deadline_however_many_strategies_hang(
        reg_addr, tmp_path, piker_procs):
    deadline_secs = 6.0
    hung = [{'name': f'hang{i}', 'strategy': 'tests.strategies.hang_on_stop',
             'markets': ['btcusd.sim'], 'timeframe_secs': 1, 'params': {'hang_secs': 120}}
            for i in range(3)]
    cfg = write_cfg(tmp_path, hung, stop_timeout_secs=deadline_secs)
    proc: PikerProc = spawn_piker(piker_procs, tmp_path, *run_args(cfg, reg_addr, tmp_path))
    t_end = time.monotonic() + STARTUP_SECS
    while not events(proc.stdout, 'bot.ready'):
        assert proc.proc.poll() is None, proc.stderr[-3000:]
        assert time.monotonic() < t_end, 'no bot.ready'
        time.sleep(0.2)
    tree = descendants(proc.pid)
    assert len(tree) >= 7
    t0 = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.proc.wait(deadline_secs + 15)
    except subprocess.TimeoutExpired:
        raise AssertionError('bot run outlived its stop deadline by 15 s') from None
    took = time.monotonic() - t0
    assert took < deadline_secs + 3, took
    assert rc == 0, proc.stderr[-3000:]
    time.sleep(0.5)
    assert [p for p in tree if pid_alive(p)] == []
    killed = {r['service'] for r in events(proc.stdout, 'service.kill')}
    assert killed == {'bot.hang0', 'bot.hang1', 'bot.hang2'}


def test_gateway_unreachable_at_start_then_up_the_strategy_starts_by_itself(
        reg_addr, tmp_path, piker_procs):
    gw_port = free_port()
    cfg = write_cfg(tmp_path, [{
        'name': 'once', 'strategy': 'tests.strategies.buy_once', 'account': 'live',
        'markets': ['gld.arca.ib'], 'timeframe_secs': 5, 'params': {'size': 3}}],
        mode='live', backend='ib', brokers={'ib': {
            'ports': [gw_port], 'connect_timeout_secs': 2.0,
            'reconnect_max_backoff_secs': 1.0, 'accounts': {'live': 'DU1234567'}}})
    proc = spawn_piker(piker_procs, tmp_path, *run_args(cfg, reg_addr, tmp_path))
    t_end = time.monotonic() + STARTUP_SECS
    while not events(proc.stdout, 'bot.ready'):
        assert proc.proc.poll() is None, proc.stderr[-3000:]
        assert time.monotonic() < t_end, 'no bot.ready while the gateway is down'
        time.sleep(0.2)
    waiting = [r for r in events(proc.stdout, 'bot.phase') if r['phase'] == 'waiting']
    assert waiting and 'no connection to TWS/IB Gateway' in waiting[0]['reason']
    # it waits: no exit, no fill, for a while
    time.sleep(8)
    assert proc.proc.poll() is None, proc.stderr[-3000:]
    status = run_piker('bot', 'status', '--json', '--registry',
                       f'{reg_addr[0]}:{reg_addr[1]}', timeout=60)
    assert status.returncode == 0, status.stderr
    [row] = json.loads(status.stdout)['strategies']
    assert row['phase'] == 'waiting' and 'IB Gateway' in row['reason']
    gw = subprocess.Popen([sys.executable, '-m', 'tests.fake_tws', '--port', str(gw_port)],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          stdin=subprocess.DEVNULL)
    try:
        t_up = time.monotonic()
        while not [r for r in events(proc.stdout, 'order.fill') if r.get('strategy') == 'once']:
            assert proc.proc.poll() is None, proc.stderr[-3000:]
            assert time.monotonic() - t_up < 60, 'no fill within 60 s of the gateway coming up'
            time.sleep(0.2)
        assert [r for r in events(proc.stdout, 'bot.phase') if r['phase'] == 'running']
        tree = descendants(proc.pid)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(40) == 0, proc.stderr[-3000:]
        time.sleep(0.5)
        assert [p for p in tree if pid_alive(p)] == []
    finally:
        gw.kill()
        gw.wait(10)


def test_corrupt_ledger_is_a_failed_start_naming_the_file_exit_1(reg_addr, tmp_path):
    cfg = write_cfg(tmp_path, [{'name': 'sma', 'strategy': 'sma_cross',
                                'markets': ['btcusd.sim'], 'timeframe_secs': 1,
                                'params': {'fast': 2, 'slow': 4, 'size': 1.0}}],
                    strategies_dir=str(REPO / 'strategies'))
    ledger = tmp_path / 'state' / 'accounting' / 'sim' / 'paper' / 'ledger.toml'
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(bytes(range(256)) * 2)
    before = ledger.read_bytes()
    res = run_piker(*run_args(cfg, reg_addr, tmp_path), '--for', '60s', timeout=90)
    assert res.returncode == 1, res.stderr[-3000:]
    [line] = error_lines(res.stderr)
    assert 'no strategy is running after startup' in line
    assert f'{ledger}:2: corrupt state file: not UTF-8 text' in line
    assert 'Traceback' not in res.stderr
    assert ledger.read_bytes() == before


def test_bot_check_rejects_live_mode_on_a_backend_without_an_order_side(tmp_path):
    cfg = write_cfg(tmp_path, [{'name': 'sma', 'strategy': 'sma_cross',
                                'markets': ['btcusd.sim'], 'timeframe_secs': 1}],
                    mode='live', strategies_dir=str(REPO / 'strategies'))
    for args in (['bot', 'check', '-c', str(cfg)],
                 ['bot', 'run', '-c', str(cfg), '--for', '5s', '--registry',
                  f'127.0.0.1:{free_port()}', '--state-dir', str(tmp_path / 'state')]):
        res = run_piker(*args, timeout=60)
        assert res.returncode == 2, (args, res.stderr)
        [line] = error_lines(res.stderr)
        assert "mode = 'live' needs a backend with an order side, and 'sim' has none" in line
        assert '`$.mode`' in line


def test_ctrl_c_to_the_process_group_stops_in_order_with_a_full_summary(reg_addr, tmp_path):
    """A terminal's Ctrl-C signals every process of the group at once: only
    the root may act on it, or the strategies end before it asks them for
    their final summary."""
    cfg = write_cfg(tmp_path, [{'name': 'once', 'strategy': 'tests.strategies.buy_once',
                                'markets': ['btcusd.sim'], 'timeframe_secs': 1}])
    out = tmp_path / 'out.log'
    with open(out, 'wb') as fh:
        proc = subprocess.Popen(
            [sys.executable, '-m', 'piker', *run_args(cfg, reg_addr, tmp_path)], cwd=REPO,
            stdout=fh, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        t_end = time.monotonic() + STARTUP_SECS
        while not [r for r in events(out.read_text(), 'order.fill')
                   if r.get('strategy') == 'once']:
            assert proc.poll() is None and time.monotonic() < t_end, 'no fill'
            time.sleep(0.2)
        tree = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(40) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    [summary] = events(out.read_text(), 'bot.summary')
    [once] = summary['strategies']
    assert once['fills'] == 1 and once['state'] == 'stopped'
    assert [p['size'] for p in summary['positions']] == [1.0]
    time.sleep(0.5)
    assert [p for p in tree if pid_alive(p)] == []
