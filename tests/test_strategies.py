"""The example strategies, fed scripted closes through StrategyRunner: exact intents."""
from __future__ import annotations

import pytest

from piker.bot._loader import StrategyLoadError, build_params, load_strategy
from piker.bot._runner import StrategyRunner
from piker.clearing._messages import Cancel, Order, Status
from piker.config import parse_config

from .test_strategy_api import MKT, STRATEGIES, Clock, make_bars, make_fill, new_ctx

# fast=2/slow=4 SMAs of these closes cross up at bar 5, down at 8, up at 12
SMA_CLOSES = [10, 10, 10, 10, 10, 12, 14, 13, 11, 9, 8, 9, 11, 13]


def sma_runner(**params) -> StrategyRunner:
    cls = load_strategy('sma_cross', STRATEGIES)
    runner = StrategyRunner(cls(build_params(cls, params, 'sma')), new_ctx(Clock()))
    assert runner.start() == []
    return runner


def feed(runner: StrategyRunner, closes: list[float], *, fill: bool) -> list[tuple[int, Order]]:
    """Close bars one at a time; with ``fill`` every order fills at once."""
    sent = []
    for i in range(len(closes)):
        for msg in runner.bar_closed(MKT, make_bars(closes[:i + 1])):
            assert isinstance(msg, Order)
            sent.append((i, msg))
            if fill:
                runner.fill(make_fill(msg, price=closes[i]))
    return sent


def test_sma_cross_trades_exactly_at_crosses_and_reverses() -> None:
    runner = sma_runner(fast=2, slow=4, size=1.0)
    sent = feed(runner, SMA_CLOSES, fill=True)
    assert [(i, o.action, o.size, o.kind) for i, o in sent] == [
        (5, 'buy', 1.0, 'market'),
        (8, 'sell', 2.0, 'market'),
        (12, 'buy', 2.0, 'market'),
    ]
    assert runner.ctx.position(MKT) == 1.0
    assert runner.summary().fills == 3


def test_sma_cross_counts_working_orders_towards_target() -> None:
    runner = sma_runner(fast=2, slow=4, size=1.0)
    sent = feed(runner, SMA_CLOSES, fill=False)
    # nothing filled: the working buy already counts as +1, so the reversal sells 2
    assert [(i, o.action, o.size) for i, o in sent] == [
        (5, 'buy', 1.0), (8, 'sell', 2.0), (12, 'buy', 2.0),
    ]


def test_sma_cross_first_trade_needs_slow_plus_one_bars() -> None:
    # fast above slow with only `slow` bars: no previous slow SMA, so no cross yet
    assert feed(sma_runner(fast=2, slow=4), [10, 10, 10, 20], fill=True) == []
    # a cross on the first bar where both SMAs have a previous value
    sent = feed(sma_runner(fast=2, slow=4), [10, 10, 10, 10, 12], fill=True)
    assert [(i, o.action, o.size) for i, o in sent] == [(4, 'buy', 1.0)]


def test_sma_cross_defaults_and_bad_params() -> None:
    cls = load_strategy('sma_cross', STRATEGIES)
    p = build_params(cls, {})
    assert (p.fast, p.slow, p.size) == (5, 20, 1.0)
    with pytest.raises(StrategyLoadError,
                       match=r"strategy 'sma' \(.*sma_cross.py\): expected 0 < `fast` < `slow`, "
                             r'got fast=20 slow=5 - at `\$.params`'):
        build_params(cls, {'fast': 20, 'slow': 5}, 'sma')


def revert_runner(**params) -> StrategyRunner:
    cfg = parse_config({'strategies': [
        {'name': 'mr', 'strategy': 'mean_revert', 'markets': [MKT], 'account': 'acct',
         'params': params},
    ]}).strategies[0]
    runner = StrategyRunner.from_cfg(cfg, STRATEGIES, clock=Clock())
    assert runner.start() == []
    return runner


def test_mean_revert_rests_both_bands_then_exits_at_mean() -> None:
    runner = revert_runner(lookback=4, entry_z=2.0, size=1.0)
    assert runner.bar_closed(MKT, make_bars([10, 12, 10])) == []
    # mean 11, std 1: bid 9, offer 13
    bid, offer = runner.bar_closed(MKT, make_bars([10, 12, 10, 12]))
    assert (bid.action, bid.kind, bid.price, bid.size) == ('buy', 'limit', 9.0, 1.0)
    assert (offer.action, offer.kind, offer.price, offer.size) == ('sell', 'limit', 13.0, 1.0)

    # the bid fills: the offer is pulled and an exit rests at the mean
    filled = Status(oid=bid.oid, state='filled', fqme=MKT, action='buy', size=1, filled=1,
                    fill_size=1, fill_price=9.0, fill_id='F1')
    pull, exit_ = runner.order_status(filled)
    assert pull == Cancel(oid=offer.oid, fqme=MKT, reason='strategy mr')
    assert (exit_.action, exit_.kind, exit_.price, exit_.size) == ('sell', 'limit', 11.0, 1.0)
    runner.order_status(Status(oid=offer.oid, state='canceled', fqme=MKT))

    # next bar re-quotes the exit at the new mean (closes 12, 10, 12, 8: mean 10.5)
    cancel, requote = runner.bar_closed(MKT, make_bars([10, 12, 10, 12, 8]))
    assert cancel.oid == exit_.oid
    assert (requote.action, requote.price, requote.size) == ('sell', 10.5, 1.0)
    assert all(o.account == 'acct' and o.source == 'mr' for o in (bid, offer, exit_, requote))


def test_mean_revert_rounds_prices_away_from_mid_to_tick() -> None:
    runner = revert_runner(lookback=3, entry_z=1.0, tick=0.25)
    # mean 11, std sqrt(2/3) = 0.8165: bid 10.1835 -> 10.0, offer 11.8165 -> 12.0
    bid, offer = runner.bar_closed(MKT, make_bars([10, 11, 12]))
    assert (bid.price, offer.price) == (10.0, 12.0)


def test_mean_revert_flat_series_places_nothing() -> None:
    runner = revert_runner(lookback=3)
    assert runner.bar_closed(MKT, make_bars([5, 5, 5])) == []
