"""emsd: the pure parts (dark book, day P&L, audit, quote and dialog decoding)
and the real tree (client -> emsd -> paperboi.sim -> client over datad.sim)."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from piker.clearing import (
    BrokerdFill,
    BrokerdOrderAck,
    DarkBook,
    DayPnl,
    Order,
    read_audit,
)
from piker.clearing._audit import AuditLog
from piker.clearing._dialog import decode_events
from piker.clearing._messages import BadMessage, to_wire
from piker.clearing._quotes import normalize_batch

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
