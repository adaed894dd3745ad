"""``piker order|cancel|positions|ledger`` as subprocesses, against a running
pikerd and becoming one."""
from __future__ import annotations

import json
import signal

import trio

from tests.conftest import run_piker, spawn_piker
from tests.test_ems import BACKENDS  # noqa: F401  (sets up the quote feed env)
from tests.test_service import wait_registry


def write_cfg(tmp_path, port: int) -> str:
    cfg = tmp_path / 'bot.toml'
    cfg.write_text(
        f'[registry]\nport = {port}\n\n'
        '[risk]\nmax_order_size = 5.0\nprice_band_frac = 0.9\n'
    )
    return str(cfg)


def statuses(stdout: str) -> list[dict]:
    return [json.loads(ln) for ln in stdout.splitlines()
            if ln.startswith('{') and '"type":"status"' in ln.replace(' ', '')]


async def piker(*args: str):
    return await trio.to_thread.run_sync(lambda: run_piker(*args, timeout=60))


async def test_order_cancel_positions_ledger_against_running_pikerd(
    reg_addr, tmp_path, piker_procs,
):
    state = tmp_path / 'state'
    cfg = write_cfg(tmp_path, reg_addr[1])
    common = ('-c', cfg, '--state-dir', str(state))
    pikerd = spawn_piker(piker_procs, tmp_path, 'pikerd', *common)
    await wait_registry(reg_addr)
    with trio.fail_after(100):
        res = await piker('order', 'buy', 'btcusd.sim', '0.01', '--json', *common)
        assert res.returncode == 0, res.stderr
        sts = statuses(res.stdout)
        assert [s['state'] for s in sts] == ['pending', 'open', 'filled']
        bought = sts[-1]

        # rejected: exit 1, the reason in one stderr line
        res = await piker('order', 'sell', 'btcusd.sim', '50', *common)
        assert res.returncode == 1
        (line,) = res.stderr.strip().splitlines()
        assert 'rejected' in line and 'max_order_size' in line

        # a resting limit exits 0 once open, then cancels by id
        res = await piker('order', 'buy', 'btcusd.sim', '0.02', '--limit', '20000',
                          '--json', *common)
        assert res.returncode == 0, res.stderr
        resting = statuses(res.stdout)[-1]
        assert resting['state'] == 'open'
        res = await piker('cancel', resting['oid'], '--json', *common)
        assert res.returncode == 0, res.stderr
        assert statuses(res.stdout)[-1]['state'] == 'canceled'
        res = await piker('cancel', 'no-such-oid', *common)
        assert res.returncode == 1 and 'unknown order id' in res.stderr

        res = await piker('positions', '--json', *common)
        assert res.returncode == 0, res.stderr
        (pos,) = json.loads(res.stdout.strip().splitlines()[-1])
        assert (pos['broker'], pos['account'], pos['fqme'], pos['size']) == \
            ('sim', 'paper', 'btcusd.sim', 0.01)
        assert pos['avg_price'] == bought['fill_price']

        res = await piker('ledger', '--json', *common)
        assert res.returncode == 0, res.stderr
        (fill,) = json.loads(res.stdout)
        assert fill['fill_id'] == bought['fill_id'] and fill['size'] == 0.01
        assert pikerd.stop(signal.SIGTERM) == 0


async def test_order_becomes_pikerd_when_none_runs(reg_addr, tmp_path):
    state = tmp_path / 'state'
    common = ('-c', write_cfg(tmp_path, reg_addr[1]), '--state-dir', str(state))
    with trio.fail_after(100):
        res = await piker('order', 'sell', 'ethusd.sim', '1', '--json', *common)
        assert res.returncode == 0, res.stderr
        assert statuses(res.stdout)[-1]['state'] == 'filled'
        res = await piker('positions', '--json', *common)
        assert res.returncode == 0, res.stderr
        (pos,) = json.loads(res.stdout.strip().splitlines()[-1])
        assert (pos['fqme'], pos['size']) == ('ethusd.sim', -1.0)
        # a stop needs a pikerd that outlives the command
        res = await piker('order', 'buy', 'ethusd.sim', '1', '--stop', '4000', *common)
        assert res.returncode == 2 and '--stop orders rest inside emsd' in res.stderr
