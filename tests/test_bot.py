"""The bot end to end on the real tree: strategy actors, samplerd (driven
clock), datad (replay backend), emsd, paperboi, the ledger."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from piker.bot._run import BOT_INIT, EMSD_INIT, emsd_kwargs
from piker.clearing import open_ems
from piker.config import BotCfg, parse_config
from piker.data import advance_clock, maybe_spawn_samplerd
from piker.service import ServiceUnavailable, find_service, open_runtime, request_spawn
from tests.conftest import REPO, run_piker

START = 1_700_006_400  # Wed 2023-11-15 00:00 UTC
TF = 60
# fast=2 / slow=4 SMAs over these closes cross up at bar 5, down at bar 7, up at bar 10
CLOSES = [10, 10, 10, 10, 10, 12, 12, 9, 8, 8, 11, 13, 13]
# each bar opens 0.25 below its close; the order sent when bar k closes fills at
# the touch, which is then the open of bar k + 1 (its first tick is at the boundary)
OPEN_BELOW_CLOSE = 0.25
EXPECTED = [(5, 'buy', 1.0, 11.75), (7, 'sell', 2.0, 7.75), (10, 'buy', 2.0, 12.75)]
# the shipped strategies; test-only ones are loaded by dotted path (tests.strategies.*)
STRATEGIES = REPO / 'strategies'


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / 'replay'
    d.mkdir()
    lines = ['time,open,high,low,close,volume']
    lines += [f'{START + TF * k},{c - OPEN_BELOW_CLOSE},{c},{c - OPEN_BELOW_CLOSE},{c},1'
              for k, c in enumerate(CLOSES)]
    (d / 'xyz.csv').write_text('\n'.join(lines) + '\n')
    (d / 'abc.csv').write_text('\n'.join(
        ['time,open,high,low,close,volume'] +
        [f'{START + TF * k},50,50,50,50,1' for k in range(len(CLOSES))]) + '\n')
    return d


def bot_cfg(data_dir: Path, strategies: list[dict[str, Any]]) -> BotCfg:
    return parse_config({
        'name': 'e2e', 'mode': 'paper', 'backend': 'replay',
        'brokers': {'replay': {'data_dir': str(data_dir), 'timeframe_secs': TF}},
        'risk': {'max_order_size': 10, 'max_position': 10},
        'strategies': strategies,
    })


async def start_bot(cfg: BotCfg, index: int) -> None:
    await request_spawn(BOT_INIT, {
        'strategy_cfg': msgspec.to_builtins(cfg.strategies[index]),
        'bot_cfg': msgspec.to_builtins(cfg), 'strategies_dir': str(STRATEGIES),
        'index': index, 'clock': 'driven',
    })


async def summary_of(name: str) -> dict[str, Any]:
    async with find_service(f'bot.{name}') as portal:
        assert portal is not None, name
        return await portal.run_from_ns('piker.bot._actor', 'bot_summary')


async def settle(name: str, increments: int,
                 fills_seen: list[tuple] | None = None) -> dict[str, Any]:
    """Wait until the bot handled ``increments`` bars and its orders are done
    (and, given ``fills_seen``, the test's own client heard of every fill)."""
    while True:
        s = await summary_of(name)
        if (s['increments'] >= increments and s['open_orders'] == 0
                and (fills_seen is None or len(fills_seen) >= s['fills'])):
            return s
        await trio.sleep(0.02)


async def collect_fills(ems: Any, bar: list[int], out: list[tuple]) -> None:
    async for status in ems.statuses:
        if status.fill_size:
            out.append((bar[0], status.action, status.fill_size, status.fill_price,
                        status.source))


async def test_sma_cross_trades_exactly_the_scripted_path(reg_addr, state_dir, data_dir):
    cfg = bot_cfg(data_dir, [{
        'name': 'sma', 'strategy': 'sma_cross', 'markets': ['xyz.replay'],
        'timeframe_secs': TF, 'params': {'fast': 2, 'slow': 4, 'size': 1.0},
    }])
    with trio.fail_after(90):
        async with open_runtime('tester', reg_addr) as rt:
            async with maybe_spawn_samplerd(clock='driven', start_epoch=START):
                pass
            await request_spawn(EMSD_INIT, emsd_kwargs(cfg))
            await start_bot(cfg, 0)
            # paper mode: no live broker actor anywhere in the tree
            assert not [s for s in rt.services.list() if s.kind == 'brokerd']
            fills: list[tuple] = []
            bar = [0]
            async with open_ems(mode='paper', source='test', backends=['replay']) as ems:
                async with trio.open_nursery() as n:
                    n.start_soon(collect_fills, ems, bar, fills)
                    for k in range(1, len(CLOSES) + 1):
                        bar[0] = k - 1  # the bar that closes at this boundary
                        await advance_clock(START + TF * k)
                        await settle('sma', k, fills)
                    await trio.sleep(0.3)
                    n.cancel_scope.cancel()
                status = await ems.ems_status()
            assert [f[:4] for f in fills] == EXPECTED
            assert {f[4] for f in fills} == {'sma'}
            pos = {p['fqme']: p for p in status['positions']}['xyz.replay']
            assert pos['size'] == 1.0 and pos['avg_price'] == 12.75
            # long 1 @11.75 -> 7.75 (-4), short 1 @7.75 -> 12.75 (-5)
            assert pos['realized_pnl'] == pytest.approx(-9.0)
            s = await summary_of('sma')
            assert s['orders_sent'] == 3 and s['fills'] == 3 and s['state'] == 'running'
            assert s['warmed'] == ['xyz.replay']


async def test_failing_strategy_stops_alone(reg_addr, state_dir, data_dir):
    cfg = bot_cfg(data_dir, [
        {'name': 'boom', 'strategy': 'tests.strategies.boom', 'markets': ['abc.replay'],
         'timeframe_secs': TF, 'params': {'fail_at': 2, 'limit': 49.0}, 'on_error': 'cancel'},
        {'name': 'sma', 'strategy': 'sma_cross', 'markets': ['xyz.replay'],
         'timeframe_secs': TF, 'params': {'fast': 2, 'slow': 4, 'size': 1.0}},
    ])
    with trio.fail_after(90):
        async with open_runtime('tester', reg_addr) as rt:
            async with maybe_spawn_samplerd(clock='driven', start_epoch=START):
                pass
            await request_spawn(EMSD_INIT, emsd_kwargs(cfg))
            await start_bot(cfg, 0)
            await start_bot(cfg, 1)
            for k in range(1, len(CLOSES) + 1):
                await advance_clock(START + TF * k)
                await settle('sma', k)
                while (await summary_of('boom'))['increments'] < k:
                    await trio.sleep(0.02)
            boom = await summary_of('boom')
            assert boom['state'] == 'failed'
            assert 'ZeroDivisionError: boom' in boom['error']
            # its resting limit was canceled by the on_error policy
            assert boom['orders_sent'] == 1 and boom['cancels_sent'] == 1
            while (await summary_of('boom'))['open_orders']:
                await trio.sleep(0.05)
            # the other strategy and the tree are unaffected
            sma = await summary_of('sma')
            assert sma['state'] == 'running' and sma['fills'] == 3
            assert {s.name for s in rt.services.list()} >= {'bot.boom', 'bot.sma', 'emsd'}
            assert rt.services.deaths == []


async def test_orders_outside_the_window_are_not_sent(reg_addr, state_dir, data_dir):
    # START is a Wednesday 00:00 UTC = Tuesday 19:00 in New York: outside 09:30-16:00
    cfg = bot_cfg(data_dir, [{
        'name': 'sma', 'strategy': 'sma_cross', 'markets': ['xyz.replay'],
        'timeframe_secs': TF, 'params': {'fast': 2, 'slow': 4, 'size': 1.0},
        'schedule': {'window': {'days': 'mon-fri', 'start': '09:30', 'end': '16:00',
                                'timezone': 'America/New_York'}},
    }])
    with trio.fail_after(90):
        async with open_runtime('tester', reg_addr):
            async with maybe_spawn_samplerd(clock='driven', start_epoch=START):
                pass
            await request_spawn(EMSD_INIT, emsd_kwargs(cfg))
            await start_bot(cfg, 0)
            for k in range(1, len(CLOSES) + 1):
                await advance_clock(START + TF * k)
                await settle('sma', k)
            s = await summary_of('sma')
            assert s['orders_sent'] == 0 and s['fills'] == 0
            assert s['orders_dropped'] == 3


async def test_unknown_strategy_fails_to_start_with_a_clear_error(reg_addr, state_dir, data_dir):
    cfg = bot_cfg(data_dir, [{
        'name': 'nope', 'strategy': 'no_such_strategy', 'markets': ['xyz.replay'],
        'timeframe_secs': TF,
    }])
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr):
            with pytest.raises(ServiceUnavailable, match='bot.nope failed to start:.*no_such_strategy'):
                await start_bot(cfg, 0)


def test_readme_bot_run_bounded_session(reg_addr, tmp_path):
    """The README's main command, bounded: paper trading on sim, a summary, exit 0."""
    res = run_piker('bot', 'run', '--for', '12s', '--registry', f'{reg_addr[0]}:{reg_addr[1]}',
                    '--state-dir', str(tmp_path / 'state'), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in res.stdout.splitlines()]
    summary = [r for r in records if r['event'] == 'bot.summary']
    assert len(summary) == 1
    s = summary[0]
    assert s['mode'] == 'paper'
    assert {x['strategy'] for x in s['strategies']} == {'sma-btc', 'meanrev-eth'}
    assert all(x['state'] == 'stopped' for x in s['strategies'])
    assert s['orders'] >= 1
    events = {r['event'] for r in records}
    assert {'bot.warmed', 'bot.started', 'bot.ready', 'pikerd.stopped'} <= events
    assert not [r for r in records if r['level'] in ('error', 'critical')]


def test_bot_run_attaches_to_a_running_pikerd(reg_addr, tmp_path, piker_procs):
    """With a pikerd up, `bot run` joins it: its strategies run under that
    pikerd, and the pikerd (and its daemons) outlive the session."""
    import time

    from piker.service import registry_answers
    from tests.conftest import descendants, pid_alive, spawn_piker
    reg = f'{reg_addr[0]}:{reg_addr[1]}'
    pikerd = spawn_piker(piker_procs, tmp_path, 'pikerd', '--registry', reg,
                         '--state-dir', str(tmp_path / 'state'))
    deadline = time.monotonic() + 20
    while not registry_answers(reg_addr):
        assert time.monotonic() < deadline, pikerd.stderr
        time.sleep(0.1)
    res = run_piker('bot', 'run', '--for', '6s', '--registry', reg,
                    '--state-dir', str(tmp_path / 'state'), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert 'runtime.attached' in {r['event'] for r in records}
    summary = [r for r in records if r['event'] == 'bot.summary'][0]
    assert {x['state'] for x in summary['strategies']} == {'stopped'}
    # the strategy actors were children of pikerd, and are gone; its daemons stay
    assert '"service":"bot.sma-btc"' in pikerd.stdout
    assert pid_alive(pikerd.pid)
    kids = descendants(pikerd.pid)
    assert len(kids) >= 4  # healthd, samplerd, datad.sim, emsd, paperboi.sim
    assert pikerd.stop() == 0


@pytest.mark.parametrize('toml, expected', [
    ('[[strategies]]\nname = "x"\nstrategy = "nope"\nmarkets = ["btcusd.sim"]\n',
     "strategy 'nope'"),
    ('[[strategies]]\nname = "x"\nstrategy = "sma_cross"\nmarkets = ["btcusd.sim"]\n'
     'params = { fast = "three" }\n', 'Expected `int`, got `str` - at `$.params.fast`'),
    ('[[strategies]]\nname = "x"\nstrategy = "sma_cross"\nmarkets = ["dogeusd.sim"]\n',
     "unknown market 'dogeusd.sim'"),
    ('[[strategies]]\nname = "x"\nstrategy = "sma_cross"\nmarkets = ["gld.sim"]\n',
     "ambiguous fqme 'gld.sim': use 'gld.arca.sim' or 'gld.venture.sim'"),
])
def test_bot_check_names_strategy_problems(tmp_path, toml, expected):
    cfg = tmp_path / 'bot.toml'
    cfg.write_text(f'strategies_dir = "{REPO / "strategies"}"\n' + toml)
    res = run_piker('bot', 'check', '-c', str(cfg))
    assert res.returncode == 2, res.stdout
    assert expected in res.stderr
    assert 'Traceback' not in res.stderr
    assert all(line.startswith('piker: error: ') for line in res.stderr.strip().splitlines())


def test_bot_run_on_replay_drives_the_clock_and_ends_with_the_files(reg_addr, tmp_path,
                                                                   data_dir):
    cfg = tmp_path / 'replay.toml'
    cfg.write_text(f'''
name = "replayed"
backend = "replay"
strategies_dir = "{STRATEGIES}"
[brokers.replay]
data_dir = "{data_dir}"
timeframe_secs = {TF}
speed = 600.0
[[strategies]]
name = "sma"
strategy = "sma_cross"
markets = ["xyz.replay"]
timeframe_secs = {TF}
params = {{ fast = 2, slow = 4, size = 1.0 }}
''')
    res = run_piker('bot', 'run', '-c', str(cfg), '--registry', f'{reg_addr[0]}:{reg_addr[1]}',
                    '--state-dir', str(tmp_path / 'state'), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert 'replay.finished' in {r['event'] for r in records}
    s = [r for r in records if r['event'] == 'bot.summary'][0]
    assert s['fills'] == 3
    pos = {p['fqme']: p for p in s['positions']}['xyz.replay']
    assert (pos['size'], pos['avg_price']) == (1.0, 12.75)
    assert pos['realized_pnl'] == pytest.approx(-9.0)


def test_cron_job_flattens_on_schedule(reg_addr, tmp_path):
    """A `flatten` cron job (every 3 s, wall clock) closes what the strategy bought."""
    cfg = tmp_path / 'cron.toml'
    cfg.write_text(f'''
name = "cron"
strategies_dir = "{STRATEGIES}"
[[strategies]]
name = "once"
strategy = "tests.strategies.buy_once"
markets = ["spy.sim"]
timeframe_secs = 1
params = {{ size = 2 }}
[[strategies.schedule.jobs]]
action = "flatten"
minute = "*"
second = "*/3"
''')
    res = run_piker('bot', 'run', '-c', str(cfg), '--for', '8s',
                    '--registry', f'{reg_addr[0]}:{reg_addr[1]}',
                    '--state-dir', str(tmp_path / 'state'), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in res.stdout.splitlines()]
    fired = [r for r in records if r['event'] == 'job.fire']
    assert fired and all(r['action'] == 'flatten' for r in fired)
    s = [r for r in records if r['event'] == 'bot.summary'][0]
    assert s['strategies'][0]['fills'] == 2  # the buy, then the flatten
    pos = {p['fqme']: p for p in s['positions']}['spy.sim']
    assert pos['size'] == 0.0
