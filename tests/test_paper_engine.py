"""Paper clearing against quotes, with the ledger and resting orders on disk."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from piker.accounting import Ledger
from piker.clearing._messages import (
    BrokerdCancel,
    BrokerdError,
    BrokerdFill,
    BrokerdOrder,
    BrokerdOrderAck,
    BrokerdPosition,
    BrokerdStatus,
)
from piker.clearing._paper_engine import PaperEngine
from piker.config import FeesCfg, PaperCfg

FQME = 'btcusd.sim'
T = 1_700_000_000_000_000_000


class Ledgers:
    """Opens one real ledger per account on demand (what paperboi will do)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.open: dict[str, Ledger] = {}

    def __call__(self, account: str) -> Ledger:
        if account not in self.open:
            self.open[account] = Ledger.open(self.state_dir, 'sim', account)
        return self.open[account]

    def close(self) -> None:
        for led in self.open.values():
            led.close()
        self.open.clear()


@pytest.fixture
def ledgers(tmp_path: Path) -> Iterator[Ledgers]:
    led = Ledgers(tmp_path)
    yield led
    led.close()


def engine(tmp_path: Path, ledgers: Ledgers, fees: PaperCfg | None = None) -> PaperEngine:
    return PaperEngine('sim', fees or PaperCfg(), tmp_path, ledgers)


def order(oid: str = 'o1', action: str = 'buy', size: float = 2, kind: str = 'market',
          price: float | None = None, fqme: str = FQME) -> BrokerdOrder:
    return BrokerdOrder(oid=oid, account='paper', fqme=fqme, action=action, size=size,
                        kind=kind, price=price)


def kinds(events: list) -> list[type]:
    return [type(e) for e in events]


def only(events: list, kind: type):
    found = [e for e in events if isinstance(e, kind)]
    assert len(found) == 1, events
    return found[0]


def test_market_buy_fills_at_ask_and_sell_at_bid(tmp_path: Path, ledgers: Ledgers):
    eng = engine(tmp_path, ledgers)
    assert eng.on_quote(FQME, 99.0, 101.0, 100.0, T) == []
    events = eng.submit(order('b1', 'buy', 2), now_ns=T)
    assert kinds(events) == [BrokerdOrderAck, BrokerdFill, BrokerdStatus, BrokerdPosition]
    fill = only(events, BrokerdFill)
    assert (fill.price, fill.size, fill.fill_id, fill.reqid) == (101.0, 2, 'paper-b1-1', 'paper-b1')
    assert only(events, BrokerdStatus).state == 'filled'
    events = eng.submit(order('s1', 'sell', 1), now_ns=T)
    assert only(events, BrokerdFill).price == 99.0
    pos = only(events, BrokerdPosition)
    assert (pos.size, pos.avg_price) == (1, 101.0)
    # the ledger holds both fills, durably, before they were returned
    assert [f.fill_id for f in ledgers('paper').fills()] == ['paper-b1-1', 'paper-s1-1']
    assert ledgers('paper').position(FQME).realized_pnl == -2.0
    assert eng.positions('paper', now_ns=T) == [BrokerdPosition(
        broker='sim', account='paper', fqme=FQME, size=1, avg_price=101.0, realized_pnl=-2.0,
        ts_ns=T)]


def test_no_quote_is_a_brokerd_error_with_reason(tmp_path: Path, ledgers: Ledgers):
    eng = engine(tmp_path, ledgers)
    for o in (order(), order(kind='limit', price=100)):
        err = only(eng.submit(o), BrokerdError)
        assert err.reason.startswith('no quote for btcusd.sim yet')
    assert ledgers('paper').fills() == []


def test_limit_rests_then_fills_at_limit_when_crossed(tmp_path: Path, ledgers: Ledgers):
    eng = engine(tmp_path, ledgers)
    eng.on_quote(FQME, 99.0, 101.0, 100.0, T)
    events = eng.submit(order('l1', 'buy', 3, 'limit', 100.0), now_ns=T)
    assert kinds(events) == [BrokerdOrderAck, BrokerdStatus]
    assert only(events, BrokerdStatus).state == 'open'
    assert [o.oid for o in eng.open_orders()] == ['l1']
    events += eng.submit(order('l2', 'sell', 1, 'limit', 103.0), now_ns=T)
    # not crossed yet: ask above the buy limit, bid below the sell limit
    assert eng.on_quote(FQME, 99.5, 100.5, 100.0, T + 1) == []
    events = eng.on_quote(FQME, 99.0, 99.8, 99.4, T + 2)
    fill = only(events, BrokerdFill)
    assert (fill.oid, fill.price, fill.ts_ns) == ('l1', 100.0, T + 2)
    assert [o.oid for o in eng.open_orders()] == ['l2']
    fill = only(eng.on_quote(FQME, 103.2, 104.0, 103.5, T + 3), BrokerdFill)
    assert (fill.oid, fill.action, fill.price) == ('l2', 'sell', 103.0)
    assert eng.open_orders() == []


def test_marketable_limit_fills_at_the_touch(tmp_path: Path, ledgers: Ledgers):
    eng = engine(tmp_path, ledgers)
    eng.on_quote(FQME, 99.0, 101.0, 100.0, T)
    assert only(eng.submit(order('l1', 'buy', 1, 'limit', 105.0)), BrokerdFill).price == 101.0
    assert only(eng.submit(order('l2', 'sell', 1, 'limit', 95.0)), BrokerdFill).price == 99.0


def test_cancel_removes_resting_order(tmp_path: Path, ledgers: Ledgers):
    eng = engine(tmp_path, ledgers)
    eng.on_quote(FQME, 99.0, 101.0, 100.0, T)
    eng.submit(order('l1', 'buy', 1, 'limit', 90.0))
    st = only(eng.cancel(BrokerdCancel(oid='l1', account='paper'), now_ns=T), BrokerdStatus)
    assert (st.state, st.reqid, st.remaining) == ('canceled', 'paper-l1', 1)
    assert eng.open_orders() == []
    assert eng.on_quote(FQME, 80.0, 81.0, 80.5, T + 1) == []
    err = only(eng.cancel(BrokerdCancel(oid='l1', account='paper')), BrokerdError)
    assert 'no resting paper order' in err.reason


def test_modify_by_resubmitting_same_oid(tmp_path: Path, ledgers: Ledgers):
    eng = engine(tmp_path, ledgers)
    eng.on_quote(FQME, 99.0, 101.0, 100.0, T)
    eng.submit(order('l1', 'buy', 1, 'limit', 90.0))
    events = eng.submit(order('l1', 'buy', 4, 'limit', 95.0))
    assert kinds(events) == [BrokerdOrderAck, BrokerdStatus]
    assert only(events, BrokerdOrderAck).reqid == 'paper-l1'
    [rest] = eng.open_orders()
    assert (rest.size, rest.price, rest.reqid) == (4, 95.0, 'paper-l1')
    fill = only(eng.on_quote(FQME, 94.0, 94.5, 94.2, T + 1), BrokerdFill)
    assert (fill.size, fill.price) == (4, 95.0)
    # modify into a marketable price fills at once and leaves nothing resting
    eng.submit(order('l2', 'buy', 1, 'limit', 90.0))
    assert only(eng.submit(order('l2', 'buy', 1, 'limit', 200.0)), BrokerdFill).price == 94.5
    assert eng.open_orders() == []


def test_fees_per_market_schedule(tmp_path: Path, ledgers: Ledgers):
    fees = PaperCfg(
        fees=FeesCfg(per_order=1.0),
        fees_by_market={'eth.sim': FeesCfg(per_unit=0.5, per_order=2.0, bps=10.0)},
    )
    eng = engine(tmp_path, ledgers, fees)
    eng.on_quote(FQME, 99.0, 100.0, 100.0, T)
    eng.on_quote('eth.sim', 1_999.0, 2_000.0, 2_000.0, T)
    assert only(eng.submit(order('a', size=3)), BrokerdFill).fee == 1.0
    # 0.5 * 4 + 2 + 10bps of 8000
    fill = only(eng.submit(order('b', size=4, fqme='eth.sim')), BrokerdFill)
    assert fill.fee == pytest.approx(2.0 + 2.0 + 8.0)
    assert ledgers('paper').position('eth.sim').realized_pnl == pytest.approx(-12.0)


def test_restart_keeps_resting_orders(tmp_path: Path, ledgers: Ledgers):
    eng = engine(tmp_path, ledgers)
    eng.on_quote(FQME, 99.0, 101.0, 100.0, T)
    eng.submit(order('l1', 'buy', 2, 'limit', 98.0))
    eng.submit(order('l2', 'sell', 1, 'limit', 104.0))
    eng.submit(order('l3', 'sell', 1, 'limit', 105.0))
    eng.cancel(BrokerdCancel(oid='l3', account='paper'))
    assert (tmp_path / 'paper' / 'sim' / 'orders.toml').exists()
    ledgers.close()

    again = engine(tmp_path, ledgers)
    assert [(o.oid, o.price, o.reqid) for o in again.open_orders()] == [
        ('l1', 98.0, 'paper-l1'), ('l2', 104.0, 'paper-l2')]
    fill = only(again.on_quote(FQME, 97.0, 97.5, 97.2, T + 5), BrokerdFill)
    assert (fill.oid, fill.price) == ('l1', 98.0)
    assert [o.oid for o in engine(tmp_path, ledgers).open_orders()] == ['l2']


def test_restart_after_crash_between_ledger_and_orders_file_never_double_fills(
    tmp_path: Path, ledgers: Ledgers,
):
    eng = engine(tmp_path, ledgers)
    eng.on_quote(FQME, 99.0, 101.0, 100.0, T)
    eng.submit(order('l1', 'buy', 2, 'limit', 98.0))
    orders_file = tmp_path / 'paper' / 'sim' / 'orders.toml'
    before_fill = orders_file.read_bytes()
    eng.on_quote(FQME, 97.0, 97.5, 97.2, T + 1)
    # simulate dying after the ledger write but before the orders file update
    orders_file.write_bytes(before_fill)
    again = engine(tmp_path, ledgers)
    assert again.open_orders() == []
    assert len(ledgers('paper').fills()) == 1
    err = only(again.submit(order('l1', 'buy', 2, 'limit', 98.0)), BrokerdError)
    assert 'already filled' in err.reason


def test_bad_orders_are_refused(tmp_path: Path, ledgers: Ledgers):
    eng = engine(tmp_path, ledgers)
    eng.on_quote(FQME, 99.0, 101.0, 100.0, T)
    assert 'positive number' in only(eng.submit(order(size=0)), BrokerdError).reason
    assert '`price`' in only(eng.submit(order(kind='limit')), BrokerdError).reason
