"""The risk gate on the real tree, driven the way an operator found its
holes: ``piker order`` subprocesses against a running pikerd."""
from __future__ import annotations

import json
import signal

import trio

from piker.config import read_toml
from tests.conftest import spawn_piker
from tests.test_order_cli import piker, statuses
from tests.test_service import wait_registry

FQME = 'btcusd.sim'


async def last_price(*common: str) -> float:
    res = await piker('quote', FQME, '--count', '1', '--json', *common)
    assert res.returncode == 0, res.stderr
    quote = json.loads(res.stdout.strip().splitlines()[-1])
    quote = quote.get(FQME, quote) if isinstance(quote, dict) else quote[0]
    return float(quote.get('last') or quote['bid'])


async def position(*common: str) -> float:
    res = await piker('positions', '--json', *common)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    return sum(p['size'] for p in rows if p['fqme'] == FQME)


async def test_resting_limit_buys_never_let_market_sells_past_max_position(
    reg_addr, tmp_path, piker_procs,
):
    """Found from outside: with max_position = 3, six rounds of (resting limit
    buy 1, market sell 1) left a position of -6."""
    cfg = tmp_path / 'bot.toml'
    cfg.write_text(f'[registry]\nport = {reg_addr[1]}\n\n[risk]\nmax_position = 3.0\n')
    common = ('-c', str(cfg), '--state-dir', str(tmp_path / 'state'))
    pikerd = spawn_piker(piker_procs, tmp_path, 'pikerd', *common)
    await wait_registry(reg_addr)
    with trio.fail_after(100):
        limit = round(await last_price(*common) * 0.99, 1)
        sells: list[str] = []
        for _ in range(5):
            res = await piker('order', 'buy', FQME, '1', '--limit', str(limit), '--json', *common)
            assert res.returncode == 0, res.stderr
            assert statuses(res.stdout)[-1]['state'] == 'open'
            res = await piker('order', 'sell', FQME, '1', '--json', *common)
            sells.append(statuses(res.stdout)[-1]['state'] if res.returncode == 0
                         else res.stderr)
            assert await position(*common) >= -3
        assert sells[:3] == ['filled'] * 3, sells
        for line in sells[3:]:
            (line,) = line.strip().splitlines()
            assert line.startswith('piker: error: order') and 'rejected' in line, line
            assert 'would be -4' in line and 'max_position 3 (risk.max_position)' in line, line
        assert await position(*common) == -3
    assert pikerd.stop(signal.SIGTERM) == 0


async def test_a_binary_halt_file_keeps_emsd_up_and_halted_until_resume(
    reg_addr, tmp_path, piker_procs,
):
    """Found from outside: a binary halt.toml was `emsd failed to start:
    UnicodeDecodeError` without naming the file (a 0-byte one lifted the halt)."""
    cfg = tmp_path / 'bot.toml'
    cfg.write_text(f'[registry]\nport = {reg_addr[1]}\n')
    state = tmp_path / 'state'
    halt = state / 'risk' / 'halt.toml'
    halt.parent.mkdir(parents=True)
    halt.write_bytes(b'\x00\xff\xfe binary \x80' * 8)
    common = ('-c', str(cfg), '--state-dir', str(state))
    pikerd = spawn_piker(piker_procs, tmp_path, 'pikerd', *common)
    await wait_registry(reg_addr)
    with trio.fail_after(100):
        res = await piker('order', 'buy', FQME, '0.01', *common)
        assert res.returncode == 1
        (line,) = res.stderr.strip().splitlines()
        assert 'rejected' in line and f'the halt file {halt} is unreadable' in line, line
        assert 'run `piker bot resume` to clear it' in line, line
        res = await piker('bot', 'status', '--json', *common)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)['status']['halted'] is True
        res = await piker('bot', 'resume', *common)
        assert res.returncode == 0, res.stderr
        assert read_toml(halt)['halted'] is False
        res = await piker('order', 'buy', FQME, '0.01', '--json', *common)
        assert res.returncode == 0, res.stderr
        assert statuses(res.stdout)[-1]['state'] == 'filled'
    assert pikerd.stop(signal.SIGTERM) == 0
