"""The risk gate on the real tree, driven the way an operator found its
holes: ``piker order`` subprocesses against a running pikerd."""
from __future__ import annotations

import json
import signal

import trio

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
