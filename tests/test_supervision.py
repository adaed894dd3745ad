"""pikerd's supervision: restarts with backoff, restart intensity escalating
to a non-zero root exit, restart counts in `piker services`, and clients that
ask for a running daemon with another config."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import msgspec
import pytest
import trio

from piker.service import ConfigMismatch, open_runtime, request_spawn
from tests._daemons import maybe_spawn_echod
from tests.conftest import REPO, descendants, pid_alive, run_piker, spawn_piker
from tests.test_service import wait_registry


def _reg(addr: tuple[str, int]) -> str:
    return f'{addr[0]}:{addr[1]}'


def services_json(addr: tuple[str, int]) -> dict:
    res = run_piker('services', '--json', '--registry', _reg(addr), timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


async def test_restart_count_and_exit_reason_show_in_piker_services(
        reg_addr, tmp_path, piker_procs):
    pikerd = spawn_piker(piker_procs, tmp_path, 'pikerd', '--registry', _reg(reg_addr),
                         '--state-dir', str(tmp_path / 'state'))
    await wait_registry(reg_addr)
    with trio.fail_after(90):
        async with open_runtime('tester', reg_addr):
            async with maybe_spawn_echod(tag='svc') as portal:
                first = (await portal.run_from_ns('tests._daemons', 'whoami'))['pid']
        os.kill(first, signal.SIGKILL)
        while True:
            table = await trio.to_thread.run_sync(services_json, reg_addr)
            rows = {r['name']: r for r in table['actors']}
            row = rows.get('echod.svc')
            if row and row['pid'] not in (None, first) and row['restarts'] == 1:
                break
            await trio.sleep(0.3)
    assert row['last_exit'] == 'killed by SIGKILL'
    assert pid_alive(row['pid'])
    assert pikerd.proc.poll() is None
    assert await trio.to_thread.run_sync(pikerd.stop) == 0


async def test_daemon_dying_at_every_start_escalates_to_nonzero_root_exit(
        reg_addr, tmp_path, piker_procs):
    cfg = tmp_path / 'bot.toml'
    cfg.write_text('[supervision]\nmax_restarts = 2\nwindow_secs = 60\n'
                   'backoff_secs = 0.1\nmax_backoff_secs = 0.5\n')
    pikerd = spawn_piker(piker_procs, tmp_path, 'pikerd', '-c', str(cfg), '--registry',
                         _reg(reg_addr), '--state-dir', str(tmp_path / 'state'))
    await wait_registry(reg_addr)
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr):
            await request_spawn('tests._daemons:crashy_init', {'live_secs': 0.3})
        kids = descendants(pikerd.pid)
        rc = await trio.to_thread.run_sync(pikerd.proc.wait, 50)
    assert rc == 3, pikerd.stderr[-2000:]
    records = [json.loads(line) for line in pikerd.stdout.splitlines() if line.startswith('{')]
    events = [r['event'] for r in records]
    assert events.count('service.restarted') == 2
    escalated = [r for r in records if r['event'] == 'service.escalated']
    assert len(escalated) == 1 and 'crashy died 3 times' in escalated[0]['reason']
    assert 'pikerd stopped: supervision escalated: crashy died 3 times' in pikerd.stderr
    assert 'Traceback' not in pikerd.stderr
    await trio.sleep(0.5)
    assert not [k for k in kids if pid_alive(k)]


async def test_asking_for_a_running_daemon_with_another_config_names_the_keys(
        reg_addr, state_dir):
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr):
            await request_spawn('tests._daemons:echod_init',
                                {'tag': 'cfg', 'slow_start_secs': 0.0})
            # the same config attaches
            await request_spawn('tests._daemons:echod_init',
                                {'tag': 'cfg', 'slow_start_secs': 0.0}, match_config=True)
            with pytest.raises(ConfigMismatch) as err:
                await request_spawn('tests._daemons:echod_init',
                                    {'tag': 'cfg', 'slow_start_secs': 0.5}, match_config=True)
    assert 'echod.cfg already runs with another config' in str(err.value)
    assert 'slow_start_secs: runs with 0.0, asked for 0.5' in str(err.value)


def _write_bot(path: Path, max_position: int) -> None:
    path.write_text(f'''
name = "sup"
[risk]
max_position = {max_position}
[[strategies]]
name = "mr-{max_position}"
strategy = "mean_revert"
markets = ["ethusd.sim"]
timeframe_secs = 1
params = {{ lookback = 3, entry_z = 0.5, size = 1.0, tick = 0.05 }}
''')


async def test_bot_run_attaching_with_other_risk_limits_is_refused(
        reg_addr, tmp_path, piker_procs):
    (tmp_path / 'strategies').symlink_to(REPO / 'strategies')
    first, second = tmp_path / 'a.toml', tmp_path / 'b.toml'
    _write_bot(first, 20)
    _write_bot(second, 3)
    state = str(tmp_path / 'state')
    owner = spawn_piker(piker_procs, tmp_path, 'bot', 'run', '-c', str(first),
                        '--registry', _reg(reg_addr), '--state-dir', state)
    with trio.fail_after(90):
        while 'bot.ready' not in owner.stdout:
            assert owner.proc.poll() is None, owner.stderr[-2000:]
            await trio.sleep(0.2)
        res = await trio.to_thread.run_sync(lambda: run_piker(
            'bot', 'run', '-c', str(second), '--for', '30s', '--registry', _reg(reg_addr),
            '--state-dir', state, timeout=80))
    assert res.returncode == 2, res.stderr[-2000:]
    line = [ln for ln in res.stderr.splitlines() if ln.startswith('piker: error:')]
    assert len(line) == 1
    assert 'emsd already runs with another config' in line[0]
    assert 'risk_cfg.max_position: runs with 20.0, asked for 3.0' in line[0]
    assert 'Traceback' not in res.stderr
    assert owner.proc.poll() is None
    assert await trio.to_thread.run_sync(owner.stop) == 0


async def test_pikerd_keeps_typed_configs_and_compares_them_with_defaults_filled_in(
        reg_addr, state_dir):
    from piker.clearing._ems import EmsdCfg
    from piker.config import RiskCfg
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr) as rt:
            await request_spawn('piker.clearing._ems:emsd_init', {'mode': 'paper'})
            spec = rt.services._specs['emsd']
            assert isinstance(spec.config, EmsdCfg)
            assert isinstance(spec.config.risk_cfg, RiskCfg)
            # the defaults spelled out are the same config as none given
            await request_spawn('piker.clearing._ems:emsd_init', {
                'risk_cfg': msgspec.to_builtins(RiskCfg()), 'mode': 'paper',
            }, match_config=True)
            with pytest.raises(ConfigMismatch, match=r'risk_cfg\.max_orders_per_min: runs with'):
                await request_spawn('piker.clearing._ems:emsd_init', {
                    'risk_cfg': {'max_orders_per_min': 7}, 'mode': 'paper'}, match_config=True)
