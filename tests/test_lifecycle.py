"""The order lifecycle table, exhaustively, and OrderTrack's status output."""
from __future__ import annotations

import itertools

import pytest

from piker.clearing._lifecycle import (
    EVENTS,
    STATES,
    TRANSITIONS,
    InvalidTransition,
    OrderTrack,
    transition,
)
from piker.clearing._messages import TERMINAL_STATES, BrokerdFill, BrokerdStatus, Order

# the whole intended table, written out independently of the implementation
EXPECTED: dict[tuple[str, str], str] = {
    ('pending', 'ack'): 'open',
    ('pending', 'fill_partial'): 'partial',
    ('pending', 'fill_full'): 'filled',
    ('pending', 'cancel_ack'): 'canceled',
    ('pending', 'reject'): 'rejected',
    ('pending', 'error'): 'error',
    ('pending', 'modify'): 'pending',
    ('dark', 'trigger'): 'triggered',
    ('dark', 'submit'): 'pending',
    ('dark', 'cancel_ack'): 'canceled',
    ('dark', 'reject'): 'rejected',
    ('dark', 'error'): 'error',
    ('dark', 'modify'): 'dark',
    ('open', 'ack'): 'open',
    ('open', 'fill_partial'): 'partial',
    ('open', 'fill_full'): 'filled',
    ('open', 'cancel_ack'): 'canceled',
    ('open', 'reject'): 'rejected',
    ('open', 'error'): 'error',
    ('open', 'modify'): 'open',
    ('partial', 'ack'): 'partial',
    ('partial', 'fill_partial'): 'partial',
    ('partial', 'fill_full'): 'filled',
    ('partial', 'cancel_ack'): 'canceled',
    ('partial', 'reject'): 'rejected',
    ('partial', 'error'): 'error',
    ('partial', 'modify'): 'partial',
}


@pytest.mark.parametrize(('state', 'event'), list(itertools.product(STATES, EVENTS)))
def test_every_state_event_pair_matches_the_table(state: str, event: str):
    want = EXPECTED.get((state, event))
    if want is None:
        with pytest.raises(InvalidTransition) as exc:
            transition(state, event)  # type: ignore[arg-type]
        assert str(exc.value) == f'{state} -> {event}'
    else:
        assert transition(state, event) == want  # type: ignore[arg-type]


def test_terminal_states_accept_no_event():
    assert set(TERMINAL_STATES) <= set(STATES)
    for state in TERMINAL_STATES:
        assert TRANSITIONS[state] == {}
    with pytest.raises(InvalidTransition, match='^filled -> cancel_ack$'):
        transition('filled', 'cancel_ack')


def test_unknown_names_are_value_errors_listing_choices():
    with pytest.raises(ValueError, match='unknown order state'):
        transition('working', 'ack')  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='unknown order event'):
        transition('open', 'fill')  # type: ignore[arg-type]


def _order(size: float = 10, **kw) -> Order:
    return Order(oid='o1', fqme='btcusd.sim', action='buy', size=size, kind='limit',
                 price=100.0, source='sma', **kw)


def _fill(fid: str, size: float, price: float) -> BrokerdFill:
    return BrokerdFill(oid='o1', reqid='r1', fill_id=fid, account='paper',
                       fqme='btcusd.sim', action='buy', size=size, price=price, ts_ns=5)


def test_track_ack_partial_fills_then_full():
    track = OrderTrack(_order())
    assert track.state == 'pending'
    st = track.on_ack('r1', ts_ns=1)
    assert (st.state, st.reqid, st.remaining, st.source) == ('open', 'r1', 10, 'sma')
    st = track.on_fill(_fill('f1', 4, 100))
    assert st is not None
    assert (st.state, st.filled, st.remaining, st.avg_price) == ('partial', 4, 6, 100)
    assert (st.fill_id, st.fill_size, st.fill_price) == ('f1', 4, 100)
    assert track.on_fill(_fill('f1', 4, 100)) is None  # duplicate fill id
    st = track.on_fill(_fill('f2', 6, 105))
    assert st is not None and st.state == 'filled' and st.remaining == 0
    assert st.avg_price == pytest.approx(103)
    assert track.terminal
    with pytest.raises(InvalidTransition, match='filled -> cancel_ack'):
        track.on_cancel_ack()


def test_track_overfill_is_an_error():
    track = OrderTrack(_order(size=1))
    with pytest.raises(ValueError, match='overfills'):
        track.on_fill(_fill('f1', 2, 100))


def test_track_status_filled_before_fill_messages_still_records_fills():
    track = OrderTrack(_order(size=2))
    track.on_ack('r1')
    st = track.on_status(BrokerdStatus(oid='o1', reqid='r1', account='paper', state='filled'))
    assert st is not None and st.state == 'filled'
    st = track.on_fill(_fill('f1', 2, 99))
    assert st is not None and st.state == 'filled' and st.filled == 2 and st.avg_price == 99


def test_track_late_fill_after_cancel_is_recorded_without_reopening():
    track = OrderTrack(_order(size=5))
    track.on_ack('r1')
    track.on_fill(_fill('f1', 2, 100))
    assert track.on_cancel_ack('user').state == 'canceled'
    st = track.on_fill(_fill('f2', 1, 101))
    assert st is not None and st.state == 'canceled' and st.filled == 3


def test_track_on_status_maps_broker_states():
    track = OrderTrack(_order())
    st = track.on_status(BrokerdStatus(oid='o1', reqid='r9', account='paper', state='open'))
    assert st is not None and st.state == 'open' and st.reqid == 'r9'
    # a repeated open report changes nothing
    assert track.on_status(BrokerdStatus(oid='o1', reqid='r9', account='paper', state='open')) is None
    st = track.on_status(BrokerdStatus(
        oid='o1', reqid='r9', account='paper', state='error', reason='margin', code=201))
    assert st is not None and (st.state, st.reason, st.code) == ('error', 'margin', 201)


def test_track_rejected_by_broker():
    track = OrderTrack(_order())
    st = track.on_status(BrokerdStatus(
        oid='o1', reqid='r1', account='paper', state='rejected', reason='no permissions'))
    assert st is not None and st.state == 'rejected' and st.reason == 'no permissions'


def test_track_dark_stop_submits_and_alert_triggers():
    stop = OrderTrack(_order(), dark=True)
    assert stop.state == 'dark'
    assert stop.on_submit().state == 'pending'
    assert stop.on_ack('r1').state == 'open'
    alert = OrderTrack(_order(), dark=True)
    st = alert.on_trigger(ts_ns=9)
    assert st.state == 'triggered' and st.ts_ns == 9 and alert.terminal


def test_track_modify_replaces_terms_and_keeps_state():
    track = OrderTrack(_order(size=10))
    track.on_ack('r1')
    track.on_fill(_fill('f1', 3, 100))
    st = track.on_modify(_order(size=8))
    assert (st.state, st.size, st.remaining) == ('partial', 8, 5)
    with pytest.raises(ValueError, match='already filled'):
        track.on_modify(_order(size=2))
