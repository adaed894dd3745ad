"""Dependents survive their daemons: a strategy actor keeps trading while
emsd, paperboi, datad or samplerd is SIGKILLed and comes back.

The tree tests run ``python -m piker bot run`` (real processes, paper mode on
the sim market) with a strategy that trades every 1 s bar and keeps one
resting limit far below the market, kill one daemon mid-trading and check:
the strategy actor is the same process, it fills again within 15 s, nothing
was filled twice, ``on_start`` ran once, and the broker's positions equal the
ledger's fills. The pure parts (bar gaps, in-flight resolution, error
classification) are tested directly, and the Resolve protocol through emsd
and paperboi on an in-process tree.
"""
from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import trio

from piker.bot._actor import BarGaps, is_permanent
from piker.bot._runner import StrategyRunner
from piker.bot._strategy import Strategy, StrategyContext
from piker.clearing import BrokerdFill, Cancel, EmsError, Status, open_ems
from piker.clearing._ledger_view import ledger_dirs, read_fills
from piker.data._shm import ohlc_dtype
from piker.service import open_runtime
from tests.conftest import PikerProc, pid_alive, run_piker
from tests.test_ems import BACKENDS, last_price, place
from tests.test_ops import events, records, service_pids, start_bot, wait_until, write_bot_toml

FQME = 'btcusd.sim'
STARTUP_SECS = 60.0
RECOVER_SECS = 15.0

# a market order every bar (buy, sell, buy, ...) and always one resting buy
# far below the market; a lost resting order is placed again (so the test
# sees it), an on_start that runs again is counted in the log
PINGPONG_SOURCE = '''
from piker.bot import Strategy, StrategyParams


class PingPong(Strategy):

    class Params(StrategyParams):
        size: float = 1.0
        rest_below_frac: float = 0.3

    def __init__(self, params=None):
        super().__init__(params)
        self.bars = 0
        self.limit_oid = None

    def on_start(self, ctx):
        ctx.log.info('pingpong.on_start')

    def on_bar(self, ctx, fqme, bars):
        self.bars += 1
        open_oids = {o.oid for o in ctx.open_orders(fqme)}
        if self.limit_oid not in open_oids:
            price = round(float(bars['close'][-1]) * (1 - self.params.rest_below_frac), 2)
            self.limit_oid = ctx.buy(fqme, self.params.size, limit=price)
        if len(open_oids - {self.limit_oid}) == 0:
            if self.bars % 2:
                ctx.buy(fqme, self.params.size)
            else:
                ctx.sell(fqme, self.params.size)
'''
PINGPONG = {'name': 'pp', 'strategy': 'pingpong', 'markets': [FQME], 'timeframe_secs': 1}
RISK = {'price_band_frac': 0.5}


# -- the pure parts ------------------------------------------------------------------

def test_bar_gaps_drop_duplicates_and_count_missed_periods():
    gaps = BarGaps(period_secs=1)
    assert gaps.admit(100) == (True, 0)
    assert gaps.admit(101) == (True, 0)
    # a re-subscribe delivers the last boundary again: dropped
    assert gaps.admit(101) == (False, 0)
    assert gaps.admit(99) == (False, 0)
    # three boundaries (102, 103, 104) never arrived
    assert gaps.admit(105) == (True, 3)
    assert gaps.last_epoch == 105
    five = BarGaps(period_secs=5)
    assert five.admit(100) == (True, 0)
    assert five.admit(115) == (True, 2)


@pytest.mark.parametrize('error, permanent', [
    ("ConfigError: bot.toml [risk]: Expected `float`, got `str`", True),
    ('broker dialog failed: {"sim": "LedgerError: journal.jsonl is locked"}', True),
    ('RouteError: backend \'sim\' has no live order side', True),
    ("('emsd', 'x')\nTraceback ...\npiker.types.FqmeError: bad fqme 'x'", True),
    ('SpecError: no such daemon', True),
    ('PeriodError: sampling period must be whole seconds', True),
    ('BackendError: unknown backend', True),
    ('FeedError: datad.sim (pid 12) died while this feed was open', False),
    ('SamplerError: samplerd (pid 3) died while subscribed', False),
    ('ServiceUnavailable: emsd failed to start: OSError: connect failed', False),
    ('EmsError: emsd (pid 9) died while this dialog was open', False),
])
def test_permanent_errors_are_config_type_errors(error, permanent):
    assert is_permanent(error) is permanent


class _Quiet(Strategy):
    def __init__(self, params=None):
        super().__init__(params)
        self.fills: list[str] = []
        self.orders: list[tuple[str, str]] = []

    def on_fill(self, ctx, fill):
        self.fills.append(fill.fill_id)

    def on_order(self, ctx, status):
        self.orders.append((status.oid, status.state))


def _runner() -> tuple[StrategyRunner, _Quiet]:
    strat = _Quiet()
    runner = StrategyRunner(strat, StrategyContext('q', markets=[FQME]))
    runner.start()
    return runner, strat


def test_in_flight_orders_resolve_by_oid_never_resent():
    runner, strat = _runner()
    ctx = runner.ctx
    working = ctx.buy(FQME, 1, limit=10.0)
    filled = ctx.buy(FQME, 2)
    lost = ctx.sell(FQME, 1)
    assert len(ctx.drain_intents()) == 3
    fill = BrokerdFill(oid=filled, reqid='r', fill_id='f-1', account='paper', fqme=FQME,
                       action='buy', size=2, price=100.0)
    intents = runner.resolve(
        asked=[working, filled, lost],
        working=[Status(oid=working, state='open', fqme=FQME, action='buy', size=1,
                        source='q')],
        fills=[fill, fill],
        reason='lost in flight when emsd died; not re-sent',
    )
    assert intents == []  # nothing is sent again
    assert {o.oid for o in ctx.open_orders()} == {working}
    assert ctx.position(FQME) == 2
    assert strat.fills == ['f-1']  # once, though reported twice
    assert (lost, 'error') in strat.orders
    # undecided orders stay open until a later reconnect can tell
    maybe = ctx.buy(FQME, 1)
    ctx.drain_intents()
    assert runner.resolve(asked=[maybe], working=[], fills=[], reason='x',
                          undecided={maybe: 'broker offline'}) == []
    assert maybe in {o.oid for o in ctx.open_orders()}


def test_unsent_orders_are_dropped_flattens_carried_cancels_asked_again():
    runner, strat = _runner()
    ctx = runner.ctx
    ctx._set_position(FQME, 3)
    rest = ctx.buy(FQME, 1, limit=10.0)
    runner.ctx.drain_intents()
    ctx.cancel(rest)
    stale = ctx.buy(FQME, 1)
    (flat,) = ctx.flatten()
    queued = runner._gate(ctx.drain_intents())
    kept = runner.unsent(queued, reason='not sent: the session was lost')
    # the flatten order still goes out; the stale entry never does
    assert [(type(i).__name__, i.oid) for i in kept] == [('Order', flat)]
    assert stale not in {o.oid for o in ctx.open_orders()}
    assert (stale, 'canceled') in strat.orders
    # the cancel (maybe lost with the link) is asked again once it is back
    (again,) = runner.cancels_to_resend()
    assert isinstance(again, Cancel) and again.oid == rest


def test_bars_are_delivered_once_per_boundary_after_a_gap():
    runner, strat = _runner()
    bars = np.zeros(3, dtype=ohlc_dtype)
    bars['time'] = [1, 2, 3]
    got = []
    runner.strategy.on_bar = lambda ctx, fqme, b: got.append(int(b['time'][-1]))  # type: ignore[method-assign]
    gaps = BarGaps(period_secs=1)
    for epoch in (2, 3, 3, 6):
        ok, _missed = gaps.admit(epoch)
        if ok:
            runner.bar_closed(FQME, bars[: min(epoch, 3)])
    assert got == [2, 3, 3]


# -- Resolve through emsd and paperboi (in-process tree) ------------------------------

async def test_resolve_reports_working_filled_and_unknown_orders_by_oid(reg_addr, state_dir):
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)):
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim'], source='x',
                                risk_cfg={'price_band_frac': 0.5}) as ems:
                px = await last_price(ems, FQME)
                rest = await place(ems, FQME, 'buy', 1, kind='limit', price=round(px * 0.7, 2))
                done = await place(ems, FQME, 'buy', 2)
                assert (rest.state, done.state) == ('open', 'filled')
                reply = await ems.resolve({rest.oid: FQME, done.oid: FQME, 'nope': FQME})
                assert [s.oid for s in reply.statuses if s.state == 'open'] == [rest.oid]
                assert [(f.oid, f.size) for f in reply.fills] == [(done.oid, 2.0)]
                assert reply.fills[0].fill_id == done.fill_id
                assert reply.unknown == ['nope']


async def test_restarted_emsd_hands_each_client_its_own_resting_orders(reg_addr, state_dir):
    with trio.fail_after(90):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)) as rt:
            # a dialog whose emsd dies ends with an error, never a hang
            with pytest.raises(EmsError, match=r'emsd \(pid \d+\) died'):
                async with open_ems(backend_cfgs=BACKENDS, backends=['sim'], source='alice',
                                    risk_cfg={'price_band_frac': 0.5}) as ems:
                    px = await last_price(ems, FQME)
                    rest = await place(ems, FQME, 'buy', 1, kind='limit',
                                       price=round(px * 0.7, 2))
                    emsd_pid = rt.services.get('emsd').pid
                    os.kill(emsd_pid, signal.SIGKILL)
                    await ems.wait('never')
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim'], source='bob') as ems:
                assert rt.services.get('emsd').pid != emsd_pid
                (restored,) = ems.open_orders
                assert (restored.oid, restored.source) == (rest.oid, 'alice')


# -- the real tree ----------------------------------------------------------------------

def strategies_dir(tmp: Path) -> Path:
    d = tmp / 'strategies'
    d.mkdir(exist_ok=True)
    (d / 'pingpong.py').write_text(PINGPONG_SOURCE)
    return d


def ledger_fills(state: Path) -> list[dict[str, Any]]:
    (path,) = ledger_dirs(state, 'sim', 'paper')
    return [msgspec.to_builtins(f) for f in read_fills(path)]


def raw_fill_ids(state: Path) -> list[list[str]]:
    """fill ids as written, per file (the snapshot and the journal each must
    be free of repeats; a compaction crash may leave one in both)."""
    (path,) = ledger_dirs(state, 'sim', 'paper')
    snap = path / 'ledger.toml'
    import tomllib
    in_snap = [f['fill_id'] for f in tomllib.loads(snap.read_text()).get('fills', [])] \
        if snap.exists() else []
    journal = path / 'journal.jsonl'
    in_journal = []
    if journal.exists():
        for line in journal.read_bytes().split(b'\n')[:-1]:
            try:
                in_journal.append(json.loads(line)['fill_id'])
            except ValueError:
                continue
    return [in_snap, in_journal]


def broker_positions(cfg: Path, reg: tuple[str, int]) -> dict[str, float]:
    res = run_piker('positions', '--json', '-c', str(cfg), '--registry', f'{reg[0]}:{reg[1]}',
                    timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    return {row['fqme']: row['size'] for row in json.loads(res.stdout)}


def ledger_positions(state: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for f in ledger_fills(state):
        out[f['fqme']] = out.get(f['fqme'], 0.0) + f['size']
    return {k: v for k, v in out.items() if abs(v) > 1e-9}


def settled_positions(cfg: Path, reg: tuple[str, int], state: Path) -> tuple[dict, dict]:
    """Broker positions and ledger sums, read once trading is halted (a
    strategy filling every bar would race a read on a loaded machine)."""
    res = run_piker('bot', 'halt', '--reason', 'test: positions read', '-c', str(cfg),
                    '--registry', f'{reg[0]}:{reg[1]}', timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    for _ in range(20):
        before = len(ledger_fills(state))
        broker = broker_positions(cfg, reg)
        ledger = ledger_positions(state)
        if len(ledger_fills(state)) == before:
            return broker, ledger
    raise AssertionError('the ledger never held still for a positions read')


def strategy_fills_after(state: Path, t_ns: int) -> list[dict[str, Any]]:
    return [f for f in ledger_fills(state) if f['ts_ns'] > t_ns]


@pytest.mark.parametrize('victim', ['emsd', 'paperboi.sim', 'datad.sim', 'samplerd'])
def test_strategy_survives_sigkill_of(victim, reg_addr, tmp_path, piker_procs):
    cfg = write_bot_toml(tmp_path, [PINGPONG], strategies_dir(tmp_path), risk=RISK)
    state = tmp_path / 'state'
    proc: PikerProc = start_bot(piker_procs, tmp_path, cfg, reg_addr)
    wait_until(lambda: events(proc, 'bot.ready'), STARTUP_SECS, 'bot.ready', proc)
    wait_until(lambda: len(ledger_dirs(state, 'sim', 'paper')) == 1
               and len(ledger_fills(state)) >= 2, 20, 'two fills', proc)
    pids = service_pids(reg_addr)
    bot_pid, victim_pid = pids['bot.pp'], pids[victim]

    t_kill = time.time_ns()
    os.kill(victim_pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(victim_pid), 5, f'{victim} to die')
    fresh = wait_until(lambda: strategy_fills_after(state, t_kill), RECOVER_SECS,
                       f'a new fill within {RECOVER_SECS}s of killing {victim}', proc)
    assert fresh
    assert pid_alive(bot_pid), 'the strategy actor died with its daemon'
    # a few more bars of trading after the recovery
    n = len(ledger_fills(state))
    wait_until(lambda: len(ledger_fills(state)) >= n + 2, 10, 'trading to go on', proc)
    after = service_pids(reg_addr)
    assert after['bot.pp'] == bot_pid
    assert after.get(victim) not in (None, victim_pid)

    # nothing filled twice: no repeated fill id, each oid filled once in full
    for ids in raw_fill_ids(state):
        assert [i for i, c in Counter(ids).items() if c > 1] == []
    per_oid = Counter(f['oid'] for f in ledger_fills(state))
    assert [o for o, c in per_oid.items() if c > 1] == []

    recs = records(proc)  # before the halt below (it cancels the resting limit)
    broker, ledger = settled_positions(cfg, reg_addr, state)
    assert broker.keys() == ledger.keys()
    for fqme, size in ledger.items():
        assert broker[fqme] == pytest.approx(size)

    # on_start ran once: a reconnect is not a restart
    assert len([r for r in recs if r['event'] == 'pingpong.on_start']) == 1
    # the resting limit was never lost nor placed twice
    limits = [r for r in recs if r['event'] == 'order.send' and r.get('strategy') == 'pp'
              and r.get('kind') == 'limit']
    assert len(limits) == 1, limits
    lost = [r for r in recs if r['event'] == 'bot.link_lost']
    if victim != 'paperboi.sim':
        # paperboi sits behind emsd: emsd redials it, the strategy's links hold
        assert lost and all(r['actor'] == 'bot.pp' for r in lost), lost
        assert {'link', 'reason'} <= set(lost[0])


def _sends_since(proc: PikerProc, t_epoch: float) -> list[dict[str, Any]]:
    from datetime import datetime
    return [r for r in events(proc, 'order.send') if r.get('strategy') == 'pp'
            and r.get('kind') == 'market'
            and datetime.fromisoformat(r['timestamp'].replace('Z', '+00:00')).timestamp()
            > t_epoch]


@pytest.mark.parametrize('victim', ['emsd', 'paperboi.sim'])
def test_order_in_flight_when_its_daemon_dies_is_resolved_never_resent(
    victim, reg_addr, tmp_path, piker_procs,
):
    """The daemon is stopped (SIGSTOP) so the next bar's order goes into it
    and no answer comes back, then SIGKILLed: the order never reached the
    broker, so the strategy hears it ended (lost in flight) and it is never
    sent again; trading goes on."""
    cfg = write_bot_toml(tmp_path, [PINGPONG], strategies_dir(tmp_path), risk=RISK)
    state = tmp_path / 'state'
    proc = start_bot(piker_procs, tmp_path, cfg, reg_addr)
    wait_until(lambda: events(proc, 'bot.ready'), STARTUP_SECS, 'bot.ready', proc)
    wait_until(lambda: len(ledger_dirs(state, 'sim', 'paper')) == 1
               and len(ledger_fills(state)) >= 2, 20, 'two fills', proc)
    pids = service_pids(reg_addr)
    bot_pid, victim_pid = pids['bot.pp'], pids[victim]
    # just after a bar's order filled: the next bar's order will be in flight
    time.sleep(1.2 - time.time() % 1.0)
    t_stop = time.time()
    os.kill(victim_pid, signal.SIGSTOP)
    try:
        (sent,) = wait_until(lambda: _sends_since(proc, t_stop), 3,
                             f'an order sent while {victim} is stopped', proc)
        time.sleep(0.3)
    finally:
        os.kill(victim_pid, signal.SIGKILL)
    oid = sent['oid']
    t_kill = time.time_ns()
    wait_until(lambda: strategy_fills_after(state, t_kill), RECOVER_SECS,
               f'a new fill within {RECOVER_SECS}s of killing {victim}', proc)

    def heard_lost() -> list[dict[str, Any]]:
        return [r for r in records(proc) if r.get('actor') == 'bot.pp' and r.get('oid') == oid
                and r['event'] in ('order.lost', 'order.error')
                and 'lost in flight' in r.get('reason', '')]

    wait_until(heard_lost, 10, f'the strategy to hear {oid} was lost in flight', proc)
    assert oid not in {f['oid'] for f in ledger_fills(state)}
    assert [r['oid'] for r in events(proc, 'order.send')].count(oid) == 1
    assert pid_alive(bot_pid) and service_pids(reg_addr)['bot.pp'] == bot_pid
    per_oid = Counter(f['oid'] for f in ledger_fills(state))
    assert [o for o, c in per_oid.items() if c > 1] == []


async def test_a_config_type_error_fails_the_strategy_for_good(reg_addr, state_dir):
    """A market the backend does not list is no outage: the actor reports
    phase `failed` with the reason and stops retrying (it stays up)."""
    from piker.bot._run import BOT_INIT, EMSD_INIT, emsd_kwargs
    from piker.config import parse_config
    from piker.service import find_service, request_spawn
    cfg = parse_config({
        'name': 'bad', 'mode': 'paper', 'backend': 'sim',
        'strategies': [{'name': 'bad', 'strategy': 'sma_cross', 'markets': ['nosuch.sim'],
                        'timeframe_secs': 1}],
    })
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)) as rt:
            await request_spawn(EMSD_INIT, emsd_kwargs(cfg))
            await request_spawn(BOT_INIT, {
                'strategy_cfg': msgspec.to_builtins(cfg.strategies[0]),
                'bot_cfg': msgspec.to_builtins(cfg),
                'strategies_dir': str(Path(__file__).parent.parent / 'strategies')})
            async with find_service('bot.bad') as portal:
                summary = await portal.run_from_ns('piker.bot._actor', 'bot_summary')
                assert summary['phase'] == 'failed', summary
                assert 'nosuch.sim' in summary['reason'] and 'Error' in summary['reason']
                await trio.sleep(1.5)
                again = await portal.run_from_ns('piker.bot._actor', 'bot_summary')
            assert again['sessions'] == 0 and again['phase'] == 'failed'
            assert rt.services.get('bot.bad') is not None


async def test_an_order_queued_while_no_session_runs_is_sent_not_resolved_as_lost(
        reg_addr, state_dir):
    """A cron job (or flatten) that queues an order while the strategy's
    session is down: the next session must send it, not ask the broker about
    it (the broker never saw it) and declare it lost while it still goes out."""
    from piker.bot._actor import BotClock, BotState, _send_intents, _sync_broker_side
    from piker.config import parse_config
    cfg = parse_config({'strategies': [{'name': 'q', 'strategy': 'sma_cross',
                                        'markets': [FQME], 'timeframe_secs': 1}],
                        'risk': {'price_band_frac': 0.5}}, source='test')
    runner, strat = _runner()
    state = BotState(runner, cfg.strategies[0], cfg, BotClock(driven=False))
    # queued with no session: e.g. a cron flatten during a reconnect
    queued = runner.ctx.buy(FQME, 1)
    state.enqueue(runner._gate(runner.ctx.drain_intents()))
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)):
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim'], source='q',
                                risk_cfg={'price_band_frac': 0.5}) as ems:
                await last_price(ems, FQME)
                await _sync_broker_side(state, ems)
                # still ours, still open, not declared lost
                assert queued in {o.oid for o in runner.ctx.open_orders()}
                assert not [o for o, st in strat.orders if o == queued and st == 'error']
                async with trio.open_nursery() as n:
                    n.start_soon(_send_intents, ems, state)
                    status = await ems.wait(queued, timeout_secs=20)
                    n.cancel_scope.cancel()
    assert status.state == 'filled'
    assert queued not in state.unsent
