"""The whole tree in live mode against the fake TWS gateway: a strategy actor's
order goes bot -> emsd -> brokerd.ib -> (fake) IB and its fill lands in the
ledger exactly once; startup loads IB's positions and warms their contracts."""
from __future__ import annotations

import msgspec
import trio

from piker.bot._run import BOT_INIT, EMSD_INIT, emsd_kwargs
from piker.config import parse_config
from piker.service import find_service, open_runtime, request_spawn
from tests.fake_tws import open_fake_gateway
from tests.test_bot import STRATEGIES
from tests.test_ib_backend import ib_cfg, ledger_fill_ids


async def test_live_strategy_order_fills_through_brokerd_ib(reg_addr, state_dir):
    async with open_fake_gateway() as gw:
        cfg = parse_config({
            'name': 'live', 'mode': 'live', 'backend': 'ib',
            'brokers': {'ib': ib_cfg(gw)},
            'strategies': [{'name': 'once', 'strategy': 'tests.strategies.buy_once', 'account': 'live',
                            'markets': ['gld.arca.ib'], 'timeframe_secs': 5,
                            'params': {'size': 3}}],
        })
        with trio.fail_after(120):
            async with open_runtime('tester', reg_addr) as rt:
                await request_spawn(EMSD_INIT, emsd_kwargs(cfg))
                await request_spawn(BOT_INIT, {
                    'strategy_cfg': msgspec.to_builtins(cfg.strategies[0]),
                    'bot_cfg': msgspec.to_builtins(cfg), 'strategies_dir': str(STRATEGIES),
                })
                names = {s.name for s in rt.services.list()}
                assert {'brokerd.ib', 'datad.ib', 'bot.once'} <= names
                assert 'paperboi.ib' not in names
                async with find_service('bot.once') as bot:
                    while True:
                        s = await bot.run_from_ns('piker.bot._actor', 'bot_summary')
                        if s['fills'] and not s['open_orders']:
                            break
                        await trio.sleep(0.1)
                # warm-up covered the configured market and IB's open positions
                assert 'gld.arca.ib' in s['warmed']
                assert any(f.startswith('spy.') for f in s['warmed']), s['warmed']
                assert s['orders_sent'] == 1 and s['positions'] == {'gld.arca.ib': 3.0}
        # the scenario's own pre-existing execution aside, IB saw exactly our order's fill(s)
        execs = [ex for ex in gw.executions if ex.order_ref != 'demo-done-1']
        assert execs and sum(ex.shares for ex in execs) == 3
        ids = ledger_fill_ids(state_dir)
        assert [ids.count(ex.exec_id) for ex in execs] == [1] * len(execs)
