"""emsd: the pure parts (dark book, day P&L, audit, quote and dialog decoding)
and the real tree (client -> emsd -> paperboi.sim -> client over datad.sim)."""
from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
import pytest
import trio

from piker.clearing import (
    BrokerdFill,
    BrokerdOrderAck,
    DarkBook,
    DayPnl,
    Order,
    Status,
    open_ems,
    read_audit,
)
from piker.clearing._audit import AuditLog
from piker.clearing._dialog import decode_events
from piker.clearing._messages import TERMINAL_STATES, BadMessage, to_wire
from piker.clearing._quotes import normalize_batch
from piker.config import BrokersCfg
from piker.service import open_runtime

DAY_NS = 86_400 * 10**9
T0 = int(datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()) * 10**9


def order(oid='o1', action='buy', size=1.0, kind='stop', price=100.0, fqme='x.sim') -> Order:
    return Order(oid=oid, fqme=fqme, action=action, size=size, kind=kind, price=price)


# -- pure --------------------------------------------------------------------------

def test_dark_book_buy_stop_fires_when_last_rises_to_price():
    book = DarkBook()
    book.add(order('b', 'buy', price=101.0))
    book.add(order('s', 'sell', price=99.0))
    assert book.triggered('x.sim', 100.5) == []
    assert [o.oid for o in book.triggered('x.sim', 101.0)] == ['b']
    assert 'b' not in book and len(book) == 1
    assert [o.oid for o in book.triggered('x.sim', 98.0)] == ['s']
    assert len(book) == 0


def test_dark_book_modify_replaces_and_bad_kind_is_refused():
    book = DarkBook()
    book.add(order('a', 'buy', price=101.0))
    book.add(order('a', 'buy', price=105.0))
    assert book.triggered('x.sim', 102.0) == []
    assert book.remove('a').price == 105.0
    with pytest.raises(ValueError, match='expected kind stop/alert'):
        book.add(order('m', kind='market', price=None))


def test_day_pnl_marks_fills_and_fees_and_rebases_at_utc_midnight():
    pnl = DayPnl()
    pnl.on_fill('paper', 'x.sim', 2.0, 100.0, 1.0, T0)
    assert pnl.total(T0) == pytest.approx(-1.0)          # only the fee
    pnl.on_mark('x.sim', 103.0, T0)
    assert pnl.total(T0) == pytest.approx(5.0)           # 2 * 3 - 1
    pnl.on_fill('paper', 'x.sim', -2.0, 104.0, 1.0, T0)
    pnl.on_mark('x.sim', 90.0, T0)
    assert pnl.total(T0) == pytest.approx(6.0)           # flat: 2 * 4 - 2
    # next UTC day: a fresh baseline
    assert pnl.total(T0 + DAY_NS) == pytest.approx(0.0)


def test_day_pnl_prior_position_counts_from_its_first_mark():
    pnl = DayPnl()
    pnl.start_position('paper', 'x.sim', 3.0)
    assert pnl.total(T0) == 0.0
    pnl.on_mark('x.sim', 10.0, T0)
    pnl.on_mark('x.sim', 8.0, T0)
    assert pnl.total(T0) == pytest.approx(-6.0)


def test_audit_appends_json_lines_and_skips_torn_tail(tmp_path):
    audit = AuditLog(tmp_path / 'audit.jsonl')
    audit.record('halt', by='ops', reason='test')
    audit.record('resume', by='ops')
    with open(tmp_path / 'audit.jsonl', 'ab') as fh:
        fh.write(b'{"action": "tor')
    rows = read_audit(tmp_path / 'audit.jsonl')
    assert [(r['action'], r['by']) for r in rows] == [('halt', 'ops'), ('resume', 'ops')]
    assert rows[0]['reason'] == 'test' and rows[0]['ts'].endswith('+00:00')


def test_quote_batches_normalise_dicts_lists_and_skip_priceless():
    batch = {
        'a.sim': {'fqme': 'a.sim', 'bid': 1.0, 'ask': 1.2, 'last': None, 'ts_ns': 5},
        'b.sim': {'fqme': 'b.sim', 'bid': None, 'ask': None, 'last': None, 'ts_ns': 5},
    }
    (q,) = normalize_batch(batch)
    assert (q.fqme, q.bid, q.ask, q.last, q.mark) == ('a.sim', 1.0, 1.2, None, 1.1)
    (q2,) = normalize_batch([{'fqme': 'c.sim', 'last': 7.0, 'ts_ns': 1}])
    assert q2.mark == 7.0


def test_dialog_batch_decoding_keeps_good_events_around_a_bad_one():
    good = to_wire(BrokerdOrderAck(oid='o1', reqid='r1'))
    bad = {'type': 'brokerd_fill', 'oid': 'o1', 'reqid': 'r1', 'fill_id': 'f',
           'account': 'paper', 'fqme': 'x.sim', 'action': 'buy', 'size': 'lots', 'price': 1.0}
    events = decode_events([good, bad, good])
    assert isinstance(events[0], BrokerdOrderAck) and isinstance(events[2], BrokerdOrderAck)
    assert isinstance(events[1], BadMessage)
    assert '$.size' in str(events[1])
    assert isinstance(decode_events(to_wire(BrokerdFill(
        oid='o', reqid='r', fill_id='f', account='a', fqme='x.sim', action='buy',
        size=1, price=2)))[0], BrokerdFill)


# -- helpers for the tree tests (also used by test_paper_tree / test_order_cli) ----

BACKENDS = msgspec.to_builtins(BrokersCfg())


async def place(ems, fqme: str, action: str, size: float, *, kind: str = 'market',
                price: float | None = None, timeout_secs: float = 20) -> Status:
    """Send an order and return its first settled status."""
    order = ems.order(fqme, action, size, kind=kind, price=price)
    await ems.send(order)
    settled = TERMINAL_STATES | ({'open'} if kind == 'limit' else set()) | (
        {'dark'} if kind in ('stop', 'alert') else set())
    return await ems.wait(order.oid, states=settled, timeout_secs=timeout_secs)


async def last_price(ems, fqme: str) -> float:
    """emsd's last price for ``fqme`` (warming subscribes emsd to it)."""
    await ems.warm([fqme])
    with trio.fail_after(20):
        while True:
            marks = (await ems.ems_status())['marks']
            if fqme in marks:
                return marks[fqme]
            await trio.sleep(0.05)


def service_names(rt) -> list[str]:
    return [s.name for s in rt.services.list()]


def log_records(text: str, event: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if f'"event":"{event}"' in line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


# -- the real tree ---------------------------------------------------------------------

RULES_RISK = {
    'max_order_size': 5, 'max_position': 8, 'max_notional': 6000,
    'max_orders_per_min': 8, 'price_band_frac': 0.05, 'daily_loss_limit': 1e9,
}


async def test_every_risk_rule_rejects_what_it_should_through_emsd(reg_addr, state_dir, capfd):
    spy = 'spy.sim'
    rejected: dict[str, str] = {}  # oid -> rule

    async def expect(action, size, rule=None, fqme=spy, kind='market', price=None):
        st = await place(ems, fqme, action, size, kind=kind, price=price)
        if rule is None:
            assert st.state in ('filled', 'open'), st
        else:
            assert st.state == 'rejected', st
            assert f'({rule})' in st.reason or rule in st.reason, st.reason
            rejected[st.oid] = rule
        return st

    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)):
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim'],
                                risk_cfg=RULES_RISK) as ems:
                last = await last_price(ems, spy)
                assert 400 < last < 700
                await expect('buy', 6, 'max_order_size')
                # notional holds the worst-case position: 8 spy (~4200) fit
                await expect('buy', 3, 'max_notional', fqme='ethusd.sim')  # 3 x ~3000
                await expect('buy', 3)                           # 1 accepted
                await expect('buy', 3)                           # 2: position 6
                await expect('buy', 3, 'max_position')           # would be 9 > 8
                await expect('buy', 2)                           # 3: position 8
                await expect('sell', 3)                          # 4: reducing always passes
                await expect('buy', 1, 'price_band', kind='limit', price=round(last * 0.9, 2))
                resting = await expect('buy', 1, kind='limit', price=round(last * 0.98, 2))  # 5
                st = await place(ems, 'nope.sim', 'buy', 1)
                assert st.state == 'rejected' and 'nope.sim' in st.reason
                rejected[st.oid] = 'no_quote'
                st = await place(ems, 'bad fqme', 'buy', 1)
                assert st.state == 'rejected' and 'bad fqme' in st.reason
                rejected[st.oid] = 'invalid_order'
                await expect('buy', 1)                           # 6
                await expect('sell', 1)                          # 7
                await expect('buy', 1)                           # 8: the limit
                await expect('buy', 1, 'max_orders_per_min')
                # cancels are never gated
                await ems.cancel(resting.oid)
                assert (await ems.wait(resting.oid)).state == 'canceled'
                stats = (await ems.ems_status())['risk']
                assert stats['orders_last_min'] == 8
                assert stats['rejected_by_rule']['max_orders_per_min'] == 1
                assert ems.position(spy) == pytest.approx(6)
        await trio.sleep(0.2)
    # every rejection is a structured log record naming the rule
    records = {r['oid']: r for r in log_records(capfd.readouterr().out, 'order.rejected')}
    for oid, rule in rejected.items():
        assert records[oid]['rule'] == rule
        assert records[oid]['reason']
        assert records[oid]['actor'] == 'emsd'


async def test_dark_stop_and_alert_trigger_inside_emsd(reg_addr, state_dir):
    fqme = 'btcusd.sim'
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)):
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim']) as ems:
                last = await last_price(ems, fqme)
                seen: dict[str, list[str]] = {}

                async def watch() -> None:
                    async for st in ems.statuses:
                        seen.setdefault(st.oid, []).append(st.state)

                async with trio.open_nursery() as n:
                    n.start_soon(watch)
                    # a buy stop the market is already above fires at once
                    stop = await place(ems, fqme, 'buy', 0.1, kind='stop',
                                       price=round(last * 0.99))
                    assert stop.state == 'dark'
                    assert (await ems.wait(stop.oid, timeout_secs=10)).state == 'filled'
                    # a sell alert above the market fires and only reports
                    alert = await place(ems, fqme, 'sell', 1, kind='alert',
                                        price=round(last * 1.01))
                    assert (await ems.wait(alert.oid, timeout_secs=10)).state == 'triggered'
                    # a far sell stop rests dark until canceled; modifying keeps it dark
                    far = await place(ems, fqme, 'sell', 0.1, kind='stop',
                                      price=round(last * 0.96))
                    await ems.send(ems.order(fqme, 'sell', 0.2, kind='stop',
                                             price=round(last * 0.955), oid=far.oid))
                    await trio.sleep(0.5)
                    assert ems.orders[far.oid].state == 'dark'
                    assert ems.orders[far.oid].size == 0.2
                    await ems.cancel(far.oid)
                    assert (await ems.wait(far.oid)).state == 'canceled'
                    n.cancel_scope.cancel()
                assert seen[stop.oid] == ['dark', 'pending', 'open', 'filled']
                assert seen[alert.oid] == ['dark', 'triggered']
                assert seen[far.oid] == ['dark', 'dark', 'canceled']
                assert ems.position(fqme) == pytest.approx(0.1)


async def test_loss_limit_halt_persists_across_tree_restart_until_resumed(reg_addr, state_dir):
    fqme = 'btcusd.sim'
    with trio.fail_after(90):
        # a 5.0 fee per order against a 1.0 daily loss limit: the first fill halts
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)):
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim'],
                                risk_cfg={'daily_loss_limit': 1.0},
                                paper_cfg={'fees': {'per_order': 5.0}}) as ems:
                assert (await place(ems, fqme, 'buy', 0.01)).state == 'filled'
                with trio.fail_after(5):
                    while not (await ems.ems_status())['halted']:
                        await trio.sleep(0.05)
                st = await place(ems, fqme, 'buy', 0.01)
                assert st.state == 'rejected' and 'halted' in st.reason
                assert 'risk.daily_loss_limit' in st.reason
        assert (state_dir / 'risk' / 'halt.toml').exists()
        # a new tree (default limits) is still halted
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)):
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim']) as ems:
                assert ems.halted_at_start
                st = await place(ems, fqme, 'sell', 0.01)
                assert st.state == 'rejected' and 'halted' in st.reason
                status = await ems.resume(by='test-operator')
                assert not status['halted']
                assert (await place(ems, fqme, 'sell', 0.01)).state == 'filled'
    audit = read_audit(state_dir / 'audit.jsonl')
    assert [(r['action'], r['by']) for r in audit] == [
        ('halt', 'risk.daily_loss_limit'), ('resume', 'test-operator')]


async def test_operator_halt_cancel_all_and_flatten_are_audited(reg_addr, state_dir):
    fqme = 'ethusd.sim'
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)):
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim']) as ems:
                last = await last_price(ems, fqme)
                assert (await place(ems, fqme, 'buy', 2)).state == 'filled'
                limit = await place(ems, fqme, 'buy', 1, kind='limit', price=round(last * 0.97, 2))
                stop = await place(ems, fqme, 'sell', 1, kind='stop', price=round(last * 0.96, 2))
                assert (limit.state, stop.state) == ('open', 'dark')
                await ems.halt('maintenance window', by='ops')
                st = await place(ems, fqme, 'buy', 1)
                assert st.state == 'rejected' and 'maintenance window' in st.reason
                assert sorted(await ems.cancel_all(by='ops')) == sorted([limit.oid, stop.oid])
                assert (await ems.wait(limit.oid)).state == 'canceled'
                assert (await ems.wait(stop.oid)).state == 'canceled'
                # flatten works while halted: it only reduces risk
                (flat_oid,) = await ems.flatten(fqme=fqme, by='ops')
                st = await ems.wait(flat_oid, timeout_secs=10)
                assert st.state == 'filled' and st.action == 'sell' and st.size == 2
                with trio.fail_after(5):
                    while ems.position(fqme) != 0:
                        await trio.sleep(0.05)
                status = await ems.ems_status()
                assert status['halted'] and status['open_orders'] == []
    audit = read_audit(state_dir / 'audit.jsonl')
    assert [r['action'] for r in audit] == ['halt', 'cancel_all', 'flatten']
    assert audit[2]['positions'] == {fqme: 2.0} and audit[2]['oids'] == [flat_oid]


async def test_slow_client_loses_others_statuses_but_never_its_own():
    from piker.clearing._links import SLOW_CLIENT_BACKLOG, ClientLink
    link = ClientLink(1, 'slow')
    mine = Status(oid='mine', state='pending')
    theirs = Status(oid='theirs', state='pending')
    for _ in range(SLOW_CLIENT_BACKLOG):
        link.push(theirs, owned=False)
    link.push(theirs, owned=False)
    link.push(mine, owned=True)
    assert link.backlog() == SLOW_CLIENT_BACKLOG + 1
    assert link.dropped == 1


async def test_live_mode_without_a_broker_backend_errors_the_order(reg_addr, state_dir):
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)) as rt:
            async with open_ems(mode='live', backend_cfgs=BACKENDS) as ems:
                st = await place(ems, 'btcusd.sim', 'buy', 0.01)
                assert st.state == 'error'
                assert "backend 'sim' has no live order side" in st.reason
                assert "mode = 'paper'" in st.reason
                assert not [n for n in service_names(rt) if n.startswith(('brokerd', 'paperboi'))]
