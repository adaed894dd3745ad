"""The fake TWS gateway driven by the real ib_async 2.1 client.

The gateway runs on the test's trio loop; each ib_async client runs in a
worker thread with its own asyncio loop (``trio.to_thread.run_sync(asyncio.run,
...)``). From inside a client coroutine, gateway methods are called through
``trio.from_thread.run_sync``. Every test fails if ib_async's decoder logged
an error or the fake saw a protocol error: wrong bytes never pass silently.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import ib_async
import msgspec
import pytest
import trio

from tests.fake_tws import (
    FakeGateway,
    Scenario,
    demo_scenario,
    open_fake_gateway,
)
from tests.fake_tws._market import history_bars, match_listings
from tests.fake_tws._requests import ContractQuery
from tests.fake_tws._wire import FrameReader, frame

REPO = Path(__file__).resolve().parent.parent
GLD_ARCA = 51529211
GLD_VENTURE = 1400025


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def decoder_errors():
    """ib_async swallows decode failures into ERROR logs: turn them into failures."""
    handler = _Collect()
    watched = [logging.getLogger('ib_async.Decoder'), logging.getLogger('ib_async.wrapper')]
    for lg in watched:
        lg.addHandler(handler)
    yield handler
    for lg in watched:
        lg.removeHandler(handler)
    bad = [
        r.getMessage() for r in handler.records
        if r.name == 'ib_async.Decoder'
        or 'No order found' in r.getMessage() or 'Unknown reqId' in r.getMessage()
    ]
    assert not bad, f'ib_async could not digest the fake output: {bad}'


@pytest.fixture
async def gw():
    async with open_fake_gateway(demo_scenario(tick_interval_secs=0.05)) as gw:
        yield gw
        assert gw.protocol_errors == []


async def in_client(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    """Run an asyncio coroutine function in a worker thread with its own loop."""
    return await trio.to_thread.run_sync(asyncio.run, fn(*args), abandon_on_cancel=True)


def on_gw(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """From a client thread: call a gateway method on the trio thread."""
    return trio.from_thread.run_sync(lambda: fn(*args, **kwargs))


async def connect(port: int, client_id: int = 1, timeout_secs: float = 3) -> ib_async.IB:
    ib = ib_async.IB()
    # raiseSyncErrors: every connect-time sync request must be answered
    await ib.connectAsync('127.0.0.1', port, clientId=client_id, timeout=timeout_secs,
                          raiseSyncErrors=True)
    return ib


async def until(pred: Callable[[], bool], timeout_secs: float = 3.0, what: str = '') -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_secs
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f'timed out waiting for {what or pred}')
        await asyncio.sleep(0.01)


def error_log(ib: ib_async.IB) -> list[tuple[int, int, str]]:
    errors: list[tuple[int, int, str]] = []
    ib.errorEvent += lambda req_id, code, msg, contract: errors.append((req_id, code, msg))
    return errors


# -- pure helpers (no sockets) ------------------------------------------------------


def test_frame_reader_splits_chunked_stream_into_fields():
    data = b'API\0' + frame('v157..178') + frame(71, 2, 5, '') + frame(1.5, True, None)
    reader = FrameReader()
    got: list[list[str]] = []
    for i in range(0, len(data), 3):  # arrive in awkward 3-byte pieces
        got += reader.feed(data[i:i + 3])
    assert got == [['v157..178'], ['71', '2', '5', ''], ['1.5', '1', '']]


def test_history_bars_same_request_same_bars():
    lst = next(x for x in demo_scenario().listings if x.con_id == GLD_ARCA)
    a = history_bars(lst, 1_767_000_000, '1 D', '5 mins', 1)
    b = history_bars(lst, 1_767_000_000, '1 D', '5 mins', 1)
    assert a == b and len(a[2]) == 288
    assert all(lo <= min(o, c) and hi >= max(o, c) for _, o, hi, lo, c, *_ in a[2])


def test_match_listings_venue_less_gld_is_ambiguous():
    listings = demo_scenario().listings
    both = match_listings(listings, ContractQuery(symbol='GLD', sec_type='STK'))
    assert {x.con_id for x in both} == {GLD_ARCA, GLD_VENTURE}
    usd = match_listings(listings, ContractQuery(symbol='GLD', exchange='SMART', currency='USD'))
    assert [x.con_id for x in usd] == [GLD_ARCA]


# -- against the real client ----------------------------------------------------------


async def test_handshake_connect_sync_and_managed_accounts(gw: FakeGateway):
    async def client(port: int):
        ib = await connect(port, client_id=3)
        try:
            clients = on_gw(lambda: gw.clients)
            return ib.managedAccounts(), ib.client.serverVersion(), ib.client._reqIdSeq, clients
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        accounts, sv, next_id, clients = await in_client(client, gw.port)
    assert accounts == ['DU1234567']
    assert sv == 178
    assert next_id >= 100  # the scenario's next valid id
    assert clients == [3]
    names = [r.name for r in gw.requests]
    assert names[0] == 'startApi' and gw.requests[0].req.client_id == 3
    for sync in ('reqPositions', 'reqOpenOrders', 'reqCompletedOrders', 'reqAccountUpdates',
                 'reqAccountUpdatesMulti', 'reqExecutions'):
        assert sync in names, f'{sync} missing from the connect-time sync: {names}'
    await gw.wait_until(lambda: gw.clients == [])


async def test_contract_details_two_venues_and_unknown_error_200(gw: FakeGateway):
    async def client(port: int):
        ib = await connect(port)
        errors = error_log(ib)
        try:
            gld = await ib.reqContractDetailsAsync(ib_async.Stock('GLD'))
            ambiguous = await ib.qualifyContractsAsync(ib_async.Stock('GLD', 'SMART'))
            choices = await ib.qualifyContractsAsync(ib_async.Stock('GLD', 'SMART'),
                                                     returnAll=True)
            arca, mnq = await ib.qualifyContractsAsync(
                ib_async.Stock('GLD', 'SMART', 'USD'), ib_async.Future('MNQ', exchange='CME'))
            unknown = await ib.reqContractDetailsAsync(ib_async.Stock('NOPE', 'SMART', 'USD'))
            found = await ib.reqMatchingSymbolsAsync('gl')
            return gld, ambiguous, choices, arca, mnq, unknown, found, errors
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        gld, ambiguous, choices, arca, mnq, unknown, found, errors = await in_client(
            client, gw.port)
    venues = {(d.contract.primaryExchange, d.contract.currency, d.contract.conId) for d in gld}
    assert venues == {('ARCA', 'USD', GLD_ARCA), ('VENTURE', 'CAD', GLD_VENTURE)}
    assert all(d.longName and d.minTick > 0 and d.validExchanges for d in gld)
    assert ambiguous == [None]
    assert {c.conId for c in choices[0]} == {GLD_ARCA, GLD_VENTURE}
    assert arca.conId == GLD_ARCA and arca.primaryExchange == 'ARCA'
    assert (mnq.conId, mnq.secType, mnq.multiplier, mnq.lastTradeDateOrContractMonth) == (
        711280073, 'FUT', '2', '20261218')
    assert unknown == []
    assert [code for _, code, _ in errors if code == 200] == [200]
    assert {(d.contract.symbol, d.contract.primaryExchange) for d in found} == {
        ('GLD', 'ARCA'), ('GLD', 'VENTURE')}


async def test_positions_account_values_and_portfolio(gw: FakeGateway):
    async def client(port: int):
        ib = await connect(port)
        try:
            positions = await ib.reqPositionsAsync()
            summary = await ib.accountSummaryAsync()
            return positions, ib.accountValues(), summary, ib.portfolio()
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        positions, values, summary, portfolio = await in_client(client, gw.port)
    held = {(p.contract.symbol, p.position, p.avgCost) for p in positions}
    assert held == {('SPY', 10.0, 550.0), ('MNQ', 1.0, 41800.0)}  # futures: price x mult
    by_tag = {(v.tag, v.currency): v.value for v in values if not v.modelCode}
    assert by_tag[('NetLiquidation', 'USD')] == '100000.00'
    assert any(v.tag == 'BuyingPower' for v in summary)
    assert {item.contract.symbol for item in portfolio} == {'SPY', 'MNQ'}


async def test_historical_bars_are_deterministic_and_bad_bar_size_errors(gw: FakeGateway):
    end = '20261120 21:00:00 UTC'

    async def client(port: int):
        ib = await connect(port)
        errors = error_log(ib)
        try:
            [c] = await ib.qualifyContractsAsync(ib_async.Stock('GLD', 'SMART', 'USD'))
            a = await ib.reqHistoricalDataAsync(c, end, '2 D', '1 hour', 'TRADES', True)
            b = await ib.reqHistoricalDataAsync(c, end, '2 D', '1 hour', 'TRADES', True)
            daily = await ib.reqHistoricalDataAsync(c, end, '10 D', '1 day', 'TRADES', True)
            bad = await ib.reqHistoricalDataAsync(c, end, '1 D', '7 mins', 'TRADES', True)
            return list(a), list(b), list(daily), list(bad), errors
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        a, b, daily, bad, errors = await in_client(client, gw.port)
    assert len(a) == 48 and a == b
    assert str(a[-1].date) == '2026-11-20 20:00:00+00:00'
    assert all(bar.low <= bar.open <= bar.high and bar.volume > 0 for bar in a)
    assert len(daily) == 10 and not hasattr(daily[0].date, 'hour')
    assert bad == [] and any(code == 162 for _, code, _ in errors)


async def test_streaming_ticks_update_ticker_until_cancelled(gw: FakeGateway):
    async def client(port: int):
        ib = await connect(port)
        try:
            [c] = await ib.qualifyContractsAsync(ib_async.Stock('SPY', 'SMART', 'USD'))
            ticker = ib.reqMktData(c)
            updates: list[float] = []
            ticker.updateEvent += lambda t: updates.append(t.bid)
            await until(lambda: len(updates) >= 4, what='4 ticker updates')
            snap = (ticker.bid, ticker.ask, ticker.last, ticker.bidSize, ticker.close)
            on_gw(gw.set_price, 600.0, symbol='SPY')
            await until(lambda: abs(ticker.bid - 600.0) < 0.05, what='bid near 600')
            ib.cancelMktData(c)
            await asyncio.sleep(0.05)
            n = len(updates)
            await asyncio.sleep(0.25)  # five tick intervals: nothing should arrive
            return snap, n, len(updates)
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        (bid, ask, last, bid_size, close), n_cancelled, n_later = await in_client(
            client, gw.port)
    assert 0 < bid < ask and ask - bid == pytest.approx(0.01)
    assert not math.isnan(last) and bid_size == 100 and close == 560.0
    assert n_later == n_cancelled
    assert gw.requests_named('cancelMktData')


async def test_market_order_fills_with_order_ref_echoed_and_commission(gw: FakeGateway):
    async def client(port: int):
        ib = await connect(port)
        commissions: list[float] = []
        ib.commissionReportEvent += lambda trade, fill, report: commissions.append(
            report.commission)
        positions: list[tuple[str, float]] = []
        ib.positionEvent += lambda p: positions.append((p.contract.symbol, p.position))
        try:
            [c] = await ib.qualifyContractsAsync(ib_async.Stock('GLD', 'SMART', 'USD'))
            trade = ib.placeOrder(c, ib_async.MarketOrder('BUY', 10, orderRef='oid-full-1'))
            await until(trade.isDone, what='fill')
            await until(lambda: commissions and positions, what='commission + position')
            completed = await ib.reqCompletedOrdersAsync(False)
            return trade, commissions, positions, completed
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        trade, commissions, positions, completed = await in_client(client, gw.port)
    assert trade.orderStatus.status == 'Filled' and trade.orderStatus.filled == 10
    assert trade.order.orderRef == 'oid-full-1'
    [fill] = trade.fills
    assert fill.execution.orderRef == 'oid-full-1' and fill.execution.side == 'BOT'
    assert fill.execution.price == 240.01  # the ask
    assert fill.commissionReport.commission == commissions[0] == 1.0
    assert ('GLD', 10.0) in positions
    refs = {t.order.orderRef: t.orderStatus.status for t in completed}
    assert refs['oid-full-1'] == 'Filled'
    [placed] = gw.requests_named('placeOrder')
    assert placed.fields[26] == 'oid-full-1' and placed.req.order_ref == 'oid-full-1'


async def test_partial_mode_fills_in_several_executions(gw: FakeGateway):
    gw.set_fill_mode('partial', order_ref='oid-part')

    async def client(port: int):
        ib = await connect(port)
        try:
            [c] = await ib.qualifyContractsAsync(ib_async.Stock('AAPL', 'SMART', 'USD'))
            trade = ib.placeOrder(c, ib_async.LimitOrder('SELL', 7, 150.0, orderRef='oid-part'))
            statuses: list[tuple[str, float]] = []
            trade.statusEvent += lambda t: statuses.append(
                (t.orderStatus.status, t.orderStatus.filled))
            fills: list[float] = []
            trade.fillEvent += lambda t, f: fills.append(f.execution.shares)
            await until(trade.isDone, what='all chunks')
            return trade, fills, statuses
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        trade, fills, statuses = await in_client(client, gw.port)
    assert fills == [3.0, 4.0]
    assert ('Submitted', 3.0) in statuses and statuses[-1] == ('Filled', 7.0)
    assert [f.execution.cumQty for f in trade.fills] == [3.0, 7.0]
    assert {f.execution.orderRef for f in trade.fills} == {'oid-part'}


async def test_reject_mode_sends_error_201_and_cancels_trade(gw: FakeGateway):
    gw.set_fill_mode('reject', symbol='AAPL', reason='insufficient margin (test)')

    async def client(port: int):
        ib = await connect(port)
        errors = error_log(ib)
        try:
            [c] = await ib.qualifyContractsAsync(ib_async.Stock('AAPL', 'SMART', 'USD'))
            trade = ib.placeOrder(c, ib_async.LimitOrder('BUY', 1, 190.0, orderRef='oid-rej'))
            await until(trade.isDone, what='rejection')
            return trade, errors
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        trade, errors = await in_client(client, gw.port)
    assert trade.orderStatus.status == 'Cancelled' and not trade.fills
    assert (trade.order.orderId, 201,
            'Order rejected - reason:insufficient margin (test)') in errors


async def test_resting_order_cancels_and_unknown_cancel_errors(gw: FakeGateway):
    async def client(port: int):
        ib = await connect(port)
        errors = error_log(ib)
        try:
            [c] = await ib.qualifyContractsAsync(ib_async.Stock('SPY', 'SMART', 'USD'))
            trade = ib.placeOrder(c, ib_async.LimitOrder('BUY', 2, 500.0, orderRef='oid-rest'))
            await until(lambda: trade.orderStatus.status == 'Submitted', what='Submitted')
            open_refs = {t.order.orderRef for t in await ib.reqOpenOrdersAsync()}
            ib.cancelOrder(trade.order)
            await until(trade.isDone, what='cancel')
            ib.client.cancelOrder(424242)
            await until(lambda: any(code == 10147 for _, code, _ in errors), what='10147')
            return trade, open_refs, errors
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        trade, open_refs, errors = await in_client(client, gw.port)
    assert {'oid-rest', 'demo-open-1'} <= open_refs
    assert trade.orderStatus.status == 'Cancelled' and not trade.fills
    assert any(code == 202 and rid == trade.order.orderId for rid, code, _ in errors)
    assert gw.order(order_ref='oid-rest').status == 'Cancelled'


async def test_resting_limits_fill_on_price_move_modify_and_manual_fill(gw: FakeGateway):
    gw.set_fill_mode('partial_rest', order_ref='oid-pr')

    async def client(port: int):
        ib = await connect(port)
        try:
            [c] = await ib.qualifyContractsAsync(ib_async.Stock('GLD', 'SMART', 'USD'))
            dip = ib.placeOrder(c, ib_async.LimitOrder('BUY', 2, 230.0, orderRef='oid-dip'))
            high = ib.placeOrder(c, ib_async.LimitOrder('SELL', 1, 300.0, orderRef='oid-mod'))
            pr = ib.placeOrder(c, ib_async.LimitOrder('BUY', 4, 100.0, orderRef='oid-pr'))
            await until(lambda: pr.orderStatus.filled == 2 and high.orderStatus.status
                        == 'Submitted', what='orders working')
            on_gw(gw.set_price, 229.0, symbol='gld.arca')
            await until(dip.isDone, what='dip buy filled by the price move')
            high.order.lmtPrice = 200.0
            ib.placeOrder(c, high.order)  # modify: now marketable
            await until(high.isDone, what='modified sell filled')
            on_gw(gw.fill_order, order_ref='oid-pr')
            await until(pr.isDone, what='manual fill of the remainder')
            return dip, high, pr
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        dip, high, pr = await in_client(client, gw.port)
    assert [f.execution.price for f in dip.fills] == [229.01]  # the ask after the move
    assert high.orderStatus.status == 'Filled' and high.fills[0].execution.price == 229.0
    assert [f.execution.shares for f in pr.fills] == [2.0, 2.0]
    assert pr.orderStatus.status == 'Filled'


async def test_open_and_completed_orders_come_back_on_connect(gw: FakeGateway):
    async def client(port: int):
        ib = await connect(port, client_id=1)
        try:
            return ib.openTrades(), await ib.reqCompletedOrdersAsync(False)
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        open_trades, completed = await in_client(client, gw.port)
    [resting] = open_trades
    assert (resting.order.orderRef, resting.order.orderId, resting.order.lmtPrice) == (
        'demo-open-1', 7, 150.0)
    assert resting.orderStatus.status == 'Submitted'
    [done] = completed
    assert (done.order.orderRef, done.orderStatus.status, done.order.permId) == (
        'demo-done-1', 'Filled', 900000006)


async def test_execution_while_disconnected_shows_after_reconnect(gw: FakeGateway):
    async def place_and_leave(port: int) -> int:
        ib = await connect(port, client_id=5)
        try:
            [c] = await ib.qualifyContractsAsync(ib_async.Stock('AAPL', 'SMART', 'USD'))
            trade = ib.placeOrder(c, ib_async.LimitOrder('BUY', 4, 100.0, orderRef='oid-away'))
            await until(lambda: trade.orderStatus.status == 'Submitted', what='Submitted')
            return trade.order.orderId
        finally:
            ib.disconnect()

    async def come_back(port: int):
        ib = await connect(port, client_id=5)
        try:
            on_connect = {f.execution.orderRef: f for f in ib.fills()}
            fills = await ib.reqExecutionsAsync()
            return on_connect, fills, ib.openTrades()
        finally:
            ib.disconnect()

    with trio.fail_after(15):
        order_id = await in_client(place_and_leave, gw.port)
        await gw.wait_until(lambda: gw.clients == [])
        ex = gw.add_execution(order_ref='oid-away', shares=4, price=99.5)
        on_connect, fills, open_trades = await in_client(come_back, gw.port)
    assert ex.order_id == order_id
    assert 'oid-away' in on_connect
    [away] = [f for f in fills if f.execution.orderRef == 'oid-away']
    assert (away.execution.shares, away.execution.price, away.execution.orderId) == (
        4.0, 99.5, order_id)
    # ib_async attaches commission reports to the fills it stored first (connect-time sync)
    assert on_connect['oid-away'].commissionReport.commission == 1.0
    assert 'oid-away' not in {t.order.orderRef for t in open_trades}


async def test_connectivity_errors_1100_1101_1102_reach_error_event(gw: FakeGateway):
    async def client(port: int):
        ib = await connect(port)
        errors = error_log(ib)
        try:
            on_gw(gw.lose_connectivity)
            on_gw(gw.restore_connectivity, data_lost=True)
            on_gw(gw.restore_connectivity, data_lost=False)
            on_gw(gw.send_error, 2104, 'Market data farm connection is OK:usfarm')
            await until(lambda: len(errors) >= 4, what='4 errors')
            # ib_async re-syncs the account summary on 1102 by itself
            await until(lambda: on_gw(gw.requests_named, 'reqAccountSummary'), what='summary')
            return errors
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        errors = await in_client(client, gw.port)
    assert [code for _, code, _ in errors[:4]] == [1100, 1101, 1102, 2104]
    assert all(rid == -1 for rid, _, _ in errors[:4])


async def test_refused_and_duplicate_client_ids_get_error_326(gw: FakeGateway):
    gw.refuse_client_id(9)

    async def client(port: int):
        codes: list[int] = []
        refused = ib_async.IB()
        refused.errorEvent += lambda rid, code, msg, c: codes.append(code)
        with pytest.raises(asyncio.TimeoutError):
            await refused.connectAsync('127.0.0.1', port, clientId=9, timeout=1)
        first = await connect(port, client_id=4)
        try:
            dup = ib_async.IB()
            dup.errorEvent += lambda rid, code, msg, c: codes.append(code)
            with pytest.raises(asyncio.TimeoutError):
                await dup.connectAsync('127.0.0.1', port, clientId=4, timeout=1)
            return codes, first.isConnected()
        finally:
            first.disconnect()

    with trio.fail_after(10):
        codes, first_still_up = await in_client(client, gw.port)
    assert codes == [326, 326]
    assert first_still_up


async def test_dropped_socket_disconnects_client_and_reconnect_resyncs(gw: FakeGateway):
    async def client(port: int):
        ib = await connect(port)
        gone = asyncio.Event()
        ib.disconnectedEvent += gone.set
        try:
            assert on_gw(gw.drop_connections) == 1
            await asyncio.wait_for(gone.wait(), 3)
            was_connected = ib.isConnected()
            await ib.connectAsync('127.0.0.1', port, clientId=1, timeout=3,
                                  raiseSyncErrors=True)
            return was_connected, ib.isConnected(), len(ib.positions())
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        was_connected, again, n_positions = await in_client(client, gw.port)
    assert not was_connected and again and n_positions == 2


async def test_two_clients_get_only_their_own_fills(gw: FakeGateway):
    async def client(port: int):
        a = await connect(port, client_id=11)
        b = await connect(port, client_id=12)
        try:
            ids = on_gw(lambda: gw.clients)
            [c] = await a.qualifyContractsAsync(ib_async.Stock('SPY', 'SMART', 'USD'))
            ta = a.placeOrder(c, ib_async.MarketOrder('BUY', 1, orderRef='oid-a'))
            tb = b.placeOrder(c, ib_async.MarketOrder('SELL', 2, orderRef='oid-b'))
            await until(lambda: ta.isDone() and tb.isDone(), what='both fills')
            await asyncio.sleep(0.05)
            return ids, [f.execution.orderRef for f in a.fills()], [
                f.execution.orderRef for f in b.fills()]
        finally:
            a.disconnect()
            b.disconnect()

    with trio.fail_after(10):
        ids, fills_a, fills_b = await in_client(client, gw.port)
    assert ids == [11, 12]
    assert 'oid-a' in fills_a and 'oid-b' not in fills_a
    assert 'oid-b' in fills_b and 'oid-a' not in fills_b


async def test_what_if_order_returns_margin_without_placing(gw: FakeGateway):
    async def client(port: int):
        ib = await connect(port)
        try:
            [c] = await ib.qualifyContractsAsync(ib_async.Future('MNQ', exchange='CME'))
            return await asyncio.wait_for(
                ib.whatIfOrderAsync(c, ib_async.MarketOrder('BUY', 1)), 3)
        finally:
            ib.disconnect()

    with trio.fail_after(10):
        state = await in_client(client, gw.port)
    assert float(state.initMarginChange) > 0
    assert set(gw.broker.orders) == {(1, 6), (1, 7)}  # only the scenario's; nothing placed


@pytest.mark.parametrize('server_version', [157, 163, 166, 170, 176])
async def test_older_server_versions_decode_cleanly(server_version: int):
    """The layouts gated on server version (contract details, openOrder,
    completedOrder, execDetails, errors) all still decode."""
    scenario = demo_scenario(server_version=server_version, tick_interval_secs=0)
    async with open_fake_gateway(scenario) as gw:
        async def client(port: int):
            ib = await connect(port)
            errors = error_log(ib)
            try:
                [c] = await ib.qualifyContractsAsync(ib_async.Stock('SPY', 'SMART', 'USD'))
                trade = ib.placeOrder(c, ib_async.MarketOrder('SELL', 3, orderRef='oid-sv'))
                await until(trade.isDone, what='fill')
                done = await ib.reqCompletedOrdersAsync(False)
                await ib.reqContractDetailsAsync(ib_async.Stock('NOPE'))
                return ib.client.serverVersion(), c.conId, trade, done, errors
            finally:
                ib.disconnect()

        with trio.fail_after(10):
            sv, con_id, trade, done, errors = await in_client(client, gw.port)
        assert gw.protocol_errors == []
    assert sv == server_version and con_id == 756733
    assert trade.orderStatus.status == 'Filled' and trade.fills[0].execution.orderRef == 'oid-sv'
    assert {t.order.orderRef for t in done} == {'demo-done-1', 'oid-sv'}
    assert any(code == 200 for _, code, _ in errors)


async def test_standalone_module_prints_port_and_serves_a_client():
    proc = await trio.lowlevel.open_process(
        [sys.executable, '-m', 'tests.fake_tws', '--port', '0', '--scenario', 'demo'],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(20):
            buf = b''
            while b'\n' not in buf:
                chunk = await proc.stdout.receive_some(1024)
                assert chunk, f'fake-tws exited early, output so far: {buf!r}'
                buf += chunk
            line = buf.split(b'\n', 1)[0].decode()
            m = re.fullmatch(r'fake-tws listening on 127\.0\.0\.1:(\d+)', line)
            assert m, f'unexpected first line {line!r}'

            async def client(port: int):
                ib = await connect(port)
                try:
                    return ib.managedAccounts(), len(ib.positions())
                finally:
                    ib.disconnect()

            accounts, n_positions = await in_client(client, int(m.group(1)))
            assert accounts == ['DU1234567'] and n_positions == 2
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_custom_scenario_overrides_and_missing_accounts_error():
    scenario = msgspec.structs.replace(
        demo_scenario(), accounts=('DU1', 'DU2'), positions=(), open_orders=(),
        completed_orders=(), executions=(), connect_warnings=(), tick_interval_secs=0,
    )
    async with open_fake_gateway(scenario) as gw:
        async def client(port: int):
            ib = await connect(port)
            try:
                return ib.managedAccounts(), ib.positions(), ib.openTrades()
            finally:
                ib.disconnect()

        with trio.fail_after(10):
            accounts, positions, trades = await in_client(client, gw.port)
    assert accounts == ['DU1', 'DU2'] and positions == [] and trades == []
    with pytest.raises(ValueError, match='accounts is empty'):
        FakeGateway(Scenario(accounts=()))
