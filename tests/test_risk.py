"""The risk gate: each rule rejects what it should and passes what it should."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import msgspec
import pytest

from piker.clearing._exposure import Exposure
from piker.clearing._messages import Cancel, Order
from piker.clearing._risk import RiskGate, RiskRejection
from piker.config import RiskCfg, read_toml

SEC_NS = 1_000_000_000
T0 = 1_700_000_000 * SEC_NS
CFG = RiskCfg(
    max_order_size=100, max_position=150, max_notional=50_000,
    max_orders_per_min=3, price_band_frac=0.05, daily_loss_limit=1_000,
)


@pytest.fixture
def gate(tmp_path: Path) -> RiskGate:
    return RiskGate(CFG, tmp_path / 'risk.toml')


def order(size: float = 1, action: str = 'buy', kind: str = 'market',
          price: float | None = None, oid: str = 'o1') -> Order:
    return Order(oid=oid, fqme='btcusd.sim', action=action, size=size, kind=kind, price=price)


def check(gate: RiskGate, o: Order, last: float | None = 100.0, pos: float = 0.0,
          now_ns: int = T0, buys: float = 0.0, sells: float = 0.0, **kw) -> RiskRejection | None:
    return gate.check(o, last_price=last, exposure=Exposure(position=pos, buys=buys, sells=sells),
                      now_ns=now_ns, **kw)


def test_plain_order_within_limits_passes(gate: RiskGate):
    assert check(gate, order(size=10)) is None
    assert check(gate, order(size=10, kind='limit', price=101)) is None


def test_max_order_size_rejects_with_setting_named(gate: RiskGate):
    rej = check(gate, order(size=500))
    assert rej == RiskRejection(
        rule='max_order_size',
        reason='order size 500 exceeds max_order_size 100 (risk.max_order_size)',
    )
    assert check(gate, order(size=100)) is None


def test_max_position_counts_resulting_size(gate: RiskGate):
    rej = check(gate, order(size=60), pos=100)
    assert rej is not None and rej.rule == 'max_position'
    assert 'would be 160' in rej.reason and '(risk.max_position)' in rej.reason
    assert check(gate, order(size=50), pos=100) is None
    # short side too
    rej = check(gate, order(size=60, action='sell'), pos=-100)
    assert rej is not None and rej.rule == 'max_position'


def test_max_position_lets_reducing_orders_through(gate: RiskGate):
    # already over the limit (e.g. limit lowered): selling down must be allowed
    assert check(gate, order(size=50, action='sell'), pos=190) is None
    # a flip that lands beyond the limit on the other side is not reducing
    rej = check(gate, order(size=100, action='sell'), pos=-60)
    assert rej is not None and rej.rule == 'max_position'


def test_max_notional_uses_limit_price_or_last(gate: RiskGate):
    rej = check(gate, order(size=60), last=1_000)
    assert rej is not None and rej.rule == 'max_notional'
    assert '60 x 1000' in rej.reason and '(risk.max_notional)' in rej.reason
    assert check(gate, order(size=49), last=1_000) is None
    rej = check(gate, order(size=51, kind='limit', price=1_000), last=990)
    assert rej is not None and rej.rule == 'max_notional'


def test_orders_per_minute_counts_only_accepted_in_sliding_window(gate: RiskGate):
    for i in range(3):
        assert check(gate, order(), now_ns=T0 + i * SEC_NS) is None
        gate.record_accept(T0 + i * SEC_NS)
    # rejected checks do not count
    for _ in range(5):
        assert check(gate, order(size=1e6)) is not None
    rej = check(gate, order(), now_ns=T0 + 30 * SEC_NS)
    assert rej is not None and rej.rule == 'max_orders_per_min'
    assert '(risk.max_orders_per_min)' in rej.reason
    # the first accept leaves the window 60 s later
    assert check(gate, order(), now_ns=T0 + 60 * SEC_NS) is None
    assert gate.statistics(T0 + 60 * SEC_NS).orders_last_min == 2


def test_price_band_rejects_far_limit_and_stop(gate: RiskGate):
    for kind in ('limit', 'stop'):
        rej = check(gate, order(kind=kind, price=106), last=100)
        assert rej is not None and rej.rule == 'price_band', kind
        assert '6.00% from the last price 100' in rej.reason
        assert '(risk.price_band_frac)' in rej.reason
        assert check(gate, order(kind=kind, price=95.5), last=100) is None


def test_no_quote_rejects_market_order_naming_the_market(gate: RiskGate):
    rej = check(gate, order(), last=None)
    assert rej is not None and rej.rule == 'no_quote'
    assert rej.reason.startswith('no quote yet for btcusd.sim')
    rej = check(gate, order(kind='limit', price=100), last=None)
    assert rej is not None and rej.rule == 'no_quote'


def test_invalid_orders_are_rejected(gate: RiskGate):
    for bad in (order(size=0), order(size=float('nan')), order(kind='limit', price=None)):
        rej = check(gate, bad)
        assert rej is not None and rej.rule == 'invalid_order'


def test_cancels_are_never_gated(gate: RiskGate):
    gate.halt('maintenance', by='ops', now_ns=T0)
    assert gate.check(Cancel(oid='o1'), last_price=None, exposure=Exposure(position=1e9),
                      now_ns=T0) is None


def test_daily_loss_limit_halts_and_rejects_everything(gate: RiskGate):
    assert gate.update_pnl(-999.0, T0) is False
    assert not gate.halted
    assert gate.update_pnl(-1_000.0, T0) is True
    assert gate.halted
    rej = check(gate, order(size=1))
    assert rej is not None and rej.rule == 'halted'
    assert 'risk.daily_loss_limit' in rej.reason
    assert '2023-11-14T22:13:20+00:00' in rej.reason
    stats = gate.statistics()
    assert stats.halted and stats.rejected_by_rule == {'halted': 1}
    assert stats.last_day_pnl == -1_000.0


def test_halt_persists_across_a_new_instance_until_resumed(tmp_path: Path):
    path = tmp_path / 'state' / 'risk.toml'
    first = RiskGate(CFG, path)
    first.update_pnl(-5_000, T0)
    assert read_toml(path)['halted'] is True

    second = RiskGate(CFG, path)
    assert second.halted
    assert second.halt_state is not None
    assert second.halt_state.by == 'risk.daily_loss_limit'
    assert second.halt_state.since_ns == T0
    rej = check(second, order())
    assert rej is not None and rej.rule == 'halted'

    second.resume(by='alice', now_ns=T0 + SEC_NS)
    assert not second.halted and check(second, order()) is None
    third = RiskGate(CFG, path)
    assert not third.halted
    assert read_toml(path)['resumed_by'] == 'alice'


def test_operator_halt_and_resume(gate: RiskGate):
    gate.halt('broker outage', by='bob', now_ns=T0)
    rej = check(gate, order())
    assert rej is not None and 'broker outage' in rej.reason and 'bob' in rej.reason
    gate.resume(by='bob')
    assert check(gate, order()) is None
    # still beyond the limit: the next P&L update halts again
    assert gate.update_pnl(-2_000, T0) is True


def test_alerts_skip_trading_rules(gate: RiskGate):
    assert check(gate, order(size=1e6, kind='alert', price=500), last=None) is None


# -- worst case on each side (issue 11: resting orders offset the other side) ----

def test_working_orders_on_one_side_never_offset_the_other(gate: RiskGate):
    # net 0 (-100 held, 100 in resting buys) but the sells could take it to -160
    rej = check(gate, order(size=60, action='sell'), pos=-100, buys=100)
    assert rej is not None and rej.rule == 'max_position'
    assert 'would be -160' in rej.reason and 'if every working sell fills' in rej.reason
    assert '(risk.max_position)' in rej.reason
    # ... and resting sells never make room for buys
    rej = check(gate, order(size=60), pos=100, sells=100)
    assert rej is not None and rej.rule == 'max_position' and 'would be 160' in rej.reason
    # working orders on the same side count in full
    rej = check(gate, order(size=20), pos=100, buys=40)
    assert rej is not None and 'other working buys 40, this order 20' in rej.reason
    assert check(gate, order(size=10), pos=100, buys=40) is None
    assert check(gate, order(size=100, action='sell'), pos=100, buys=40) is None


def test_a_modify_replaces_its_own_old_remainder(gate: RiskGate):
    # 100 held, this order's 40 working: it may grow to 50 but not 51
    assert check(gate, order(size=50), pos=100, buys=40, replaces=40) is None
    rej = check(gate, order(size=51), pos=100, buys=40, replaces=40)
    assert rej is not None and 'would be 151' in rej.reason
    # a partly filled order works only its new size less what filled
    assert check(gate, order(size=60), pos=100, buys=40, replaces=40, adds=50) is None
    # over the limit (e.g. lowered): shrinking a working buy still passes
    assert check(gate, order(size=5), pos=200, buys=10, replaces=10) is None
    assert check(gate, order(size=10), pos=200, buys=10, replaces=10) is None
    rej = check(gate, order(size=11), pos=200, buys=10, replaces=10)
    assert rej is not None and rej.rule == 'max_position'


def test_flatten_stays_possible_but_crossing_flat_counts_as_growing(tmp_path: Path):
    big = RiskGate(msgspec.structs.replace(CFG, max_order_size=1_000), tmp_path / 'h.toml')
    # 400 short against 150: any buy that shrinks the worst case passes
    assert check(big, order(size=400), pos=-400) is None
    assert check(big, order(size=100), pos=-400, buys=250) is None
    assert check(big, order(size=500), pos=-400) is None            # lands at +100
    rej = check(big, order(size=600), pos=-400)                     # lands at +200
    assert rej is not None and rej.rule == 'max_position' and 'would be 200' in rej.reason


def test_max_notional_holds_the_worst_case_of_each_side(gate: RiskGate):
    # 40 held at 1000 (40000) and 9 in working buys: 2 more would be 51000
    rej = check(gate, order(size=2), pos=40, buys=9, last=1_000)
    assert rej is not None and rej.rule == 'max_notional'
    assert 'would be 51000 (51 x 1000' in rej.reason and '(risk.max_notional)' in rej.reason
    assert check(gate, order(size=1), pos=40, buys=9, last=1_000) is None
    # resting sells do not make room
    rej = check(gate, order(size=11), pos=40, sells=40, last=1_000)
    assert rej is not None and rej.rule == 'max_notional'
    # a sell shrinks the long side and the short side stays small
    assert check(gate, order(size=49, action='sell'), pos=40, buys=9, last=1_000) is None
    # a buy limit above the last price is valued at its price
    rej = check(gate, order(size=50, kind='limit', price=1_020), last=1_000)
    assert rej is not None and '50 x 1020' in rej.reason


# -- limits that cannot be compared never switch a rule off ------------------------

@pytest.mark.parametrize('value', [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize('name', ['max_order_size', 'max_position', 'max_notional',
                                  'max_orders_per_min', 'price_band_frac',
                                  'daily_loss_limit'])
def test_a_non_finite_limit_refuses_every_order_naming_the_setting(
    tmp_path: Path, name: str, value: float,
):
    bad = RiskGate(msgspec.structs.replace(CFG, **{name: value}), tmp_path / 'h.toml')
    for o in (order(size=1), order(size=1, action='sell'), order(kind='limit', price=100)):
        rej = check(bad, o)
        assert rej is not None and rej.rule == 'bad_limit'
        assert f'risk.{name} = {value!r} is not a finite number' in rej.reason
        assert 'bot.toml [risk]' in rej.reason


# -- a halt file that cannot be read keeps trading halted --------------------------

UNREADABLE_HALT_FILES = {
    'empty': (b'', 'it is empty'),
    'binary': (bytes(range(256)) * 4, 'not UTF-8 text'),
    'garbage_toml': (b'halted = = yes\n[[[', 'corrupt state file'),
    'halted_not_bool': (b'halted = "no"\n', "`halted` must be true or false, found 'no'"),
    'halted_missing': (b'reason = "maintenance"\n', 'no `halted` field'),
    'halt_record_wrong_type': (b'halted = true\n[halt]\nreason = 1\nby = "ops"\nsince_ns = 0\n',
                               'the [halt] record is unreadable'),
}


@pytest.mark.parametrize('case', sorted(UNREADABLE_HALT_FILES))
def test_an_unreadable_halt_file_means_halted_naming_the_file_and_the_fix(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture,
):
    payload, problem = UNREADABLE_HALT_FILES[case]
    path = tmp_path / 'risk' / 'halt.toml'
    path.parent.mkdir()
    path.write_bytes(payload)
    caplog.set_level(logging.INFO)
    gate = RiskGate(CFG, path)
    assert gate.halted
    rej = check(gate, order())
    assert rej is not None and rej.rule == 'halted'
    assert str(path) in rej.reason and problem in rej.reason
    assert 'restore it, or run `piker bot resume` to clear it' in rej.reason
    errors = [r.msg for r in caplog.records if r.levelno >= logging.ERROR]
    assert [e['event'] for e in errors] == ['risk.halt_file_unreadable']
    assert errors[0]['path'] == str(path) and errors[0]['fix'].startswith('restore it')
    assert path.read_bytes() == payload          # evidence is left alone
    # an operator's resume rewrites it properly
    gate.resume(by='alice')
    assert read_toml(path)['halted'] is False
    assert not RiskGate(CFG, path).halted


def test_a_halt_file_that_is_a_directory_means_halted(tmp_path: Path):
    path = tmp_path / 'halt.toml'
    path.mkdir()
    gate = RiskGate(CFG, path)
    assert gate.halted and gate.halt_state is not None
    assert str(path) in gate.halt_state.reason and 'cannot be read' in gate.halt_state.reason


def test_an_absent_or_resumed_halt_file_means_not_halted(tmp_path: Path):
    path = tmp_path / 'halt.toml'
    assert not RiskGate(CFG, path).halted
    path.write_text('halted = false\nresumed_by = "alice"\n')
    assert not RiskGate(CFG, path).halted
