"""The Strategy API, StrategyRunner and the loader, driven synchronously."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from piker.bot._loader import (
    StrategyLoadError,
    build_params,
    load_strategy,
    validate_strategies,
)
from piker.bot._runner import StrategyRunner
from piker.bot._schedule import TradingWindow
from piker.bot._strategy import (
    OHLC_DTYPE,
    Strategy,
    StrategyContext,
    StrategyError,
)
from piker.clearing._messages import BrokerdFill, Cancel, Order, Status
from piker.config import CronJobCfg, WindowCfg, parse_config

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = REPO / 'strategies'
MKT = 'btcusd.sim'
# Monday 2026-03-09 14:00Z = 10:00 New York (EDT): inside a 09:30-16:00 window
T0 = datetime(2026, 3, 9, 14, 0, tzinfo=UTC)


class Clock:
    """A settable clock for the context."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make_bars(closes: list[float], start: datetime = T0, period_secs: int = 60) -> np.ndarray:
    bars = np.zeros(len(closes), dtype=OHLC_DTYPE)
    bars['index'] = np.arange(len(closes))
    bars['time'] = int(start.timestamp()) + period_secs * np.arange(len(closes))
    for field in ('open', 'high', 'low', 'close'):
        bars[field] = closes
    bars['volume'] = 1.0
    return bars


def make_fill(order: Order, fill_id: str | None = None, size: float | None = None,
              price: float = 100.0) -> BrokerdFill:
    return BrokerdFill(
        oid=order.oid, reqid='r1', fill_id=fill_id or f'f-{order.oid}', account=order.account,
        fqme=order.fqme, action=order.action, size=order.size if size is None else size,
        price=price,
    )


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict]:
    """structlog event dicts (through the stdlib pipeline) named ``name``."""
    return [
        r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get('event') == name
    ]


def new_ctx(clock: Clock | None = None, markets: tuple[str, ...] = (MKT,)) -> StrategyContext:
    return StrategyContext('t', markets=markets, account='acct', clock=clock or Clock())


# -- context ---------------------------------------------------------------------

def test_buy_market_queues_order_with_unique_uuid_oids() -> None:
    clock = Clock()
    ctx = new_ctx(clock)
    oids = [ctx.buy(MKT, 1) for _ in range(500)]
    assert len(set(oids)) == 500
    assert all(uuid.UUID(o).version == 4 for o in oids)
    intents = ctx.drain_intents()
    assert ctx.drain_intents() == []
    first = intents[0]
    assert isinstance(first, Order)
    assert (first.oid, first.fqme, first.action, first.size, first.kind, first.price) == (
        oids[0], MKT, 'buy', 1.0, 'market', None)
    assert (first.account, first.source) == ('acct', 't')
    assert first.ts_ns == int(T0.timestamp()) * 1_000_000_000


def test_limit_and_stop_orders_carry_kind_and_price() -> None:
    ctx = new_ctx()
    ctx.sell(MKT, 2, limit=101.5)
    ctx.buy(MKT, 3, stop=99.0)
    lim, stp = ctx.drain_intents()
    assert (lim.action, lim.kind, lim.price, lim.size) == ('sell', 'limit', 101.5, 2.0)
    assert (stp.action, stp.kind, stp.price) == ('buy', 'stop', 99.0)
    assert [o.kind for o in ctx.open_orders(MKT)] == ['limit', 'stop']


@pytest.mark.parametrize('call, needle', [
    (lambda c: c.buy(MKT, 0), '`size` must be a finite number > 0, got 0'),
    (lambda c: c.sell(MKT, float('nan')), 'got nan'),
    (lambda c: c.buy(MKT, 1, limit=-3), 'price must be a finite number > 0, got -3'),
    (lambda c: c.buy(MKT, 1, limit=1, stop=2), 'pass `limit` or `stop`, not both'),
    (lambda c: c.buy('eth.sim', 1), "market 'eth.sim' is not one of its markets ['btcusd.sim']"),
])
def test_bad_intent_raises_error_naming_the_problem(call, needle) -> None:
    ctx = new_ctx()
    with pytest.raises(StrategyError) as err:
        call(ctx)
    assert needle in str(err.value)
    assert ctx.drain_intents() == []


def test_flatten_cancels_orders_and_offsets_position_once() -> None:
    ctx = new_ctx()
    entry = ctx.buy(MKT, 3)
    resting = ctx.sell(MKT, 1, limit=120.0)
    [order, _] = ctx.drain_intents()
    assert ctx._apply_fill(make_fill(order))
    ctx._apply_status(Status(oid=entry, state='filled', fqme=MKT, action='buy', size=3, filled=3))
    assert ctx.position(MKT) == 3.0

    [flat_oid] = ctx.flatten()
    cancel, flat = ctx.drain_intents()
    assert cancel == Cancel(oid=resting, fqme=MKT, reason='strategy t')
    assert (flat.oid, flat.action, flat.size, flat.kind) == (flat_oid, 'sell', 3.0, 'market')
    # a second flatten while the first is working sends nothing new
    assert ctx.flatten() == []
    assert ctx.drain_intents() == []


def test_fill_with_known_fill_id_changes_nothing() -> None:
    ctx = new_ctx()
    ctx.buy(MKT, 2)
    [order] = ctx.drain_intents()
    assert ctx._apply_fill(make_fill(order, 'x1', size=1.5))
    assert not ctx._apply_fill(make_fill(order, 'x1', size=1.5))
    [working] = ctx.open_orders(MKT)
    assert (working.filled, working.remaining, working.signed_remaining) == (1.5, 0.5, 0.5)
    assert ctx._apply_fill(make_fill(order, 'x2', size=0.5))
    assert ctx.position(MKT) == 2.0
    # fully filled by fills alone: gone at once, and a late status does not revive it
    assert ctx.open_orders() == []
    ctx._apply_status(Status(oid=order.oid, state='partial', fqme=MKT, action='buy', size=2,
                             filled=1.5))
    assert ctx.open_orders() == []


def test_history_is_readonly_zero_copy_view() -> None:
    runner = StrategyRunner(Strategy(), new_ctx())
    runner.start()
    bars = make_bars([1.0, 2.0, 3.0])
    runner.bar_closed(MKT, bars)
    hist = runner.ctx.history(MKT)
    assert np.shares_memory(hist, bars)
    assert not hist.flags.writeable
    with pytest.raises(ValueError):
        hist['close'][0] = 9.0
    assert len(new_ctx().history(MKT)) == 0


# -- runner ----------------------------------------------------------------------

class Scripted(Strategy):
    """Rests a limit buy on the first bar, market-buys on later ones, raises on
    the bar whose close is negative (after queuing an order)."""

    def __init__(self) -> None:
        super().__init__()
        self.bars_seen = 0

    def on_bar(self, ctx, fqme, bars):
        self.bars_seen += 1
        if self.bars_seen == 1:
            ctx.buy(fqme, 1, limit=90.0)
            return
        ctx.buy(fqme, 1)
        if bars['close'][-1] < 0:
            raise RuntimeError('boom')


def started(strategy: Strategy, clock: Clock | None = None, **kw) -> StrategyRunner:
    runner = StrategyRunner(strategy, new_ctx(clock), **kw)
    assert runner.start() == []
    return runner


def test_callback_exception_fails_runner_and_cancels_open_orders(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    strat = Scripted()
    runner = started(strat)
    [limit] = runner.bar_closed(MKT, make_bars([100.0]))
    out = runner.bar_closed(MKT, make_bars([100.0, -1.0]))
    # the market buy queued before the raise is never sent; the limit is cancelled
    assert out == [Cancel(oid=limit.oid, fqme=MKT, reason='strategy t')]
    assert runner.failed and isinstance(runner.error, RuntimeError)
    [rec] = [r for r in caplog.records if isinstance(r.msg, dict)
             and r.msg.get('event') == 'strategy.failed']
    assert rec.exc_info and rec.exc_info[0] is RuntimeError
    assert rec.msg['strategy'] == 't' and rec.msg['callback'] == 'on_bar'
    assert rec.msg['fqme'] == MKT
    assert rec.msg['bar_time'] == (T0 + timedelta(minutes=1)).isoformat()
    # later events never reach the strategy
    assert runner.bar_closed(MKT, make_bars([1.0, 2.0, 3.0])) == []
    assert strat.bars_seen == 2
    assert runner.summary().state == 'failed'


def test_on_error_cancel_and_flatten_sends_market_exit() -> None:
    runner = started(Scripted(), on_error='cancel_and_flatten')
    runner.sync_position(MKT, -2.0)
    [limit] = runner.bar_closed(MKT, make_bars([100.0]))
    cancel, flat = runner.bar_closed(MKT, make_bars([100.0, -1.0]))
    assert cancel.oid == limit.oid
    assert (flat.action, flat.size, flat.kind) == ('buy', 2.0, 'market')


def test_on_error_leave_sends_nothing() -> None:
    runner = started(Scripted(), on_error='leave')
    runner.bar_closed(MKT, make_bars([100.0]))
    assert runner.bar_closed(MKT, make_bars([100.0, -1.0])) == []
    assert runner.failed


def test_order_outside_window_dropped_but_cancel_and_flatten_pass(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    window = TradingWindow.from_cfg(WindowCfg())
    clock = Clock()
    runner = started(Scripted(), clock, window=window)
    [limit] = runner.bar_closed(MKT, make_bars([100.0]))
    clock.now = datetime(2026, 3, 14, 15, 0, tzinfo=UTC)  # Saturday
    assert runner.bar_closed(MKT, make_bars([100.0, 101.0])) == []
    [dropped] = events(caplog, 'order.outside_window')
    assert dropped['window'] == 'mon-fri 09:30-16:00 America/New_York'
    assert dropped['created'] == '2026-03-14T15:00:00+00:00'
    assert [o.oid for o in runner.ctx.open_orders()] == [limit.oid]
    runner.sync_position(MKT, 1.0)
    cancel, flat = runner.run_job(CronJobCfg(action='flatten'))
    assert cancel.oid == limit.oid and (flat.action, flat.size) == ('sell', 1.0)
    assert runner.summary().orders_dropped == 1


def test_halt_job_drops_new_orders_until_resume(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    runner = started(Scripted())
    runner.run_job(CronJobCfg(action='halt'))
    assert runner.bar_closed(MKT, make_bars([100.0])) == []
    assert len(events(caplog, 'order.halted')) == 1
    runner.run_job(CronJobCfg(action='resume'))
    [order] = runner.bar_closed(MKT, make_bars([100.0, 101.0]))
    assert order.kind == 'market'


class Recorder(Strategy):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, float]] = []

    def on_fill(self, ctx, fill):
        self.seen.append(('fill', fill.fill_id, ctx.position(fill.fqme)))

    def on_order(self, ctx, status):
        self.seen.append(('order', status.state, ctx.position(MKT)))


def test_status_carried_fill_applied_once_even_if_fill_also_arrives() -> None:
    strat = Recorder()
    runner = started(strat)
    oid = runner.ctx.buy(MKT, 2)
    runner.ctx.drain_intents()
    status = Status(oid=oid, state='filled', fqme=MKT, action='buy', size=2, filled=2,
                    fill_size=2, fill_price=100.0, fill_id='F1')
    runner.order_status(status)
    runner.fill(BrokerdFill(oid=oid, reqid='r', fill_id='F1', account='acct', fqme=MKT,
                            action='buy', size=2, price=100.0))
    assert strat.seen == [('fill', 'F1', 2.0), ('order', 'filled', 2.0)]
    assert runner.ctx.open_orders() == []
    summary = runner.summary()
    assert (summary.fills, summary.positions) == (1, {MKT: 2.0})


def test_sync_order_adopts_open_order_and_foreign_market_is_ignored() -> None:
    runner = StrategyRunner(Strategy(), new_ctx())
    runner.sync_order(Status(oid='old', state='open', fqme=MKT, action='sell', size=1))
    runner.sync_order(Status(oid='other', state='open', fqme='eth.sim', action='buy', size=1))
    assert [o.oid for o in runner.ctx.open_orders()] == ['old']
    runner.start()
    assert runner.stop() == []
    assert runner.state == 'stopped'


# -- loader ----------------------------------------------------------------------

def write(dir_: Path, name: str, body: str) -> Path:
    path = dir_ / f'{name}.py'
    path.write_text(textwrap.dedent(body))
    return path


GOOD = '''
    from piker.bot._strategy import Strategy, StrategyParams

    class Good(Strategy):
        class Params(StrategyParams):
            fast: int = 5
            size: float = 1.0
'''


def test_load_strategy_by_name_from_any_cwd(tmp_path, monkeypatch) -> None:
    write(tmp_path, 'good', GOOD)
    monkeypatch.chdir('/')
    cls = load_strategy('good', tmp_path)
    assert cls.__name__ == 'Good' and issubclass(cls, Strategy)
    params = build_params(cls, {'fast': 7})
    assert (params.fast, params.size) == (7, 1.0)


def test_load_strategy_in_child_process_by_path(tmp_path) -> None:
    write(tmp_path, 'good', GOOD)
    code = f'from piker.bot._loader import load_strategy; print(load_strategy("good", {str(tmp_path)!r}).__name__)'
    out = subprocess.run([sys.executable, '-c', code], cwd='/', capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == 'Good'


def test_missing_strategy_lists_available(tmp_path) -> None:
    write(tmp_path, 'good', GOOD)
    write(tmp_path, 'other', GOOD)
    with pytest.raises(StrategyLoadError) as err:
        load_strategy('nope', tmp_path)
    msg = str(err.value)
    assert "strategy 'nope': no file" in msg and 'nope.py' in msg
    assert 'good, other' in msg and '\n' not in msg


@pytest.mark.parametrize('body, needle', [
    ('x = 1\ndef broken(:\n', 'bad.py:2): SyntaxError: invalid syntax'),
    ('import os\nimport no_such_module_zz\n',
     "bad.py:2): ModuleNotFoundError: No module named 'no_such_module_zz'"),
    ('x = 1\n', 'no Strategy subclass defined'),
])
def test_broken_strategy_file_gives_one_line_with_location(tmp_path, body, needle) -> None:
    (tmp_path / 'bad.py').write_text(body)
    with pytest.raises(StrategyLoadError) as err:
        load_strategy('bad', tmp_path)
    assert needle in str(err.value)
    assert '\n' not in str(err.value)


def test_two_strategy_classes_need_a_name(tmp_path) -> None:
    write(tmp_path, 'two', GOOD + '\n    class Other(Good):\n        pass\n')
    with pytest.raises(StrategyLoadError, match=r'2 Strategy subclasses \(Good, Other\)'):
        load_strategy('two', tmp_path)
    assert load_strategy('two:Other', tmp_path).__name__ == 'Other'
    with pytest.raises(StrategyLoadError, match='expected `Missing` to be a Strategy subclass'):
        load_strategy('two:Missing', tmp_path)


def test_dotted_path_loads_from_package(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / 'mystrats_pkg'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('')
    write(pkg, 'alpha', GOOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_strategy('mystrats_pkg.alpha:Good', STRATEGIES).__name__ == 'Good'
    with pytest.raises(StrategyLoadError, match="no module named 'mystrats_pkg.nope'"):
        load_strategy('mystrats_pkg.nope', STRATEGIES)


def test_ill_typed_param_error_names_strategy_file_and_path(tmp_path, monkeypatch) -> None:
    write(tmp_path, 'good', GOOD)
    monkeypatch.chdir(tmp_path.parent)
    cls = load_strategy('good', tmp_path)
    with pytest.raises(StrategyLoadError) as err:
        build_params(cls, {'fast': 'five'}, 'x')
    assert str(err.value) == (
        f"strategy 'x' ({tmp_path.name}/good.py): Expected `int`, got `str` - at "
        "`$.params.fast` (fix [[strategies]] params in bot.toml)"
    )
    with pytest.raises(StrategyLoadError, match=r'unknown field `slow` - at `\$.params`'):
        build_params(cls, {'slow': 3}, 'x')


def test_validate_strategies_reports_every_problem_with_its_path() -> None:
    cfg = parse_config({'strategies': [
        {'name': 'a', 'strategy': 'sma_cross', 'markets': ['btcusd.sim'],
         'params': {'fast': 'x'}},
        {'name': 'b', 'strategy': 'sma_cross', 'markets': ['gld.ib', 'zzz.sim'],
         'schedule': {'window': {'days': 'mon-fry'},
                      'jobs': [{'action': 'flatten'}, {'action': 'halt', 'hour': '25'}]}},
    ]})
    problems = validate_strategies(cfg, STRATEGIES, ['btcusd.sim', 'gld.arca.ib', 'gld.venture.ib'])
    assert len(problems) == 5, problems
    assert 'Expected `int`, got `str` - at `$.params.fast`' in problems[0]
    assert "ambiguous fqme 'gld.ib'" in problems[1] and '$.strategies[1].markets[0]' in problems[1]
    assert "unknown market 'zzz.sim'" in problems[2]
    assert '$.strategies[1].schedule.window.days' in problems[3]
    assert '$.strategies[1].schedule.jobs[1]' in problems[4]
    assert validate_strategies(parse_config({'strategies': [
        {'name': 'ok', 'strategy': 'mean_revert', 'markets': ['btcusd.sim']}]}), STRATEGIES) == []


def test_runner_from_cfg_wires_params_window_and_account() -> None:
    cfg = parse_config({'strategies': [
        {'name': 'sma', 'strategy': 'sma_cross', 'markets': [MKT], 'account': 'acct',
         'params': {'fast': 3, 'slow': 6}, 'on_error': 'leave',
         'schedule': {'window': {'days': 'mon-fri'}}},
    ]}).strategies[0]
    runner = StrategyRunner.from_cfg(cfg, STRATEGIES, clock=Clock())
    assert (runner.strategy.params.fast, runner.strategy.params.slow) == (3, 6)
    assert (runner.ctx.account, runner.on_error, runner.name) == ('acct', 'leave', 'sma')
    assert runner.window is not None and runner.window.is_open(T0)


class Lifecycle(Strategy):
    def on_start(self, ctx):
        ctx.buy(MKT, 1, limit=50.0)

    def on_quote(self, ctx, fqme, quote):
        if quote['last'] > 100:
            ctx.sell(fqme, 1)

    def on_stop(self, ctx):
        ctx.flatten()


def test_start_quote_stop_callbacks_return_their_intents() -> None:
    runner = StrategyRunner(Lifecycle(), new_ctx())
    [resting] = runner.start()
    assert runner.quote(MKT, {'last': 99.0}) == []
    [sell] = runner.quote(MKT, {'last': 101.0})
    assert (sell.action, sell.kind) == ('sell', 'market')
    cancels = runner.stop()
    assert {c.oid for c in cancels} == {resting.oid, sell.oid}
    assert all(isinstance(c, Cancel) for c in cancels)
    assert runner.stop() == [] and runner.quote(MKT, {'last': 200.0}) == []
    summary = runner.summary()
    assert (summary.state, summary.orders_sent, summary.cancels_sent) == ('stopped', 2, 2)
    assert summary.line() == 't: stopped | orders 2 (dropped 0) | fills 0 | flat'


def test_on_start_exception_fails_before_any_event() -> None:
    class Bad(Strategy):
        def on_start(self, ctx):
            raise KeyError('missing')

    runner = StrategyRunner(Bad(), new_ctx())
    assert runner.start() == []
    assert runner.failed and runner.summary().error == "KeyError: 'missing'"
