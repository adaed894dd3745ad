"""The ib backend: pure parts, then real ``brokerd.ib`` / ``datad.ib`` actors
(ib_async 2.1 on asyncio in ``infect_asyncio`` actors) against the fake TWS
gateway running in this process."""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import tractor
import trio

from piker.brokers.ib._link import backoff_secs
from piker.brokers.ib._orders import AccountMap, OrderBook, map_status
from piker.brokers.ib.api import IbError, OrderReport, classify, client_ids
from piker.brokers.ib.feed import bar_size_for, bars_array, duration_for
from piker.brokers.ib.symbols import (
    ContractCache,
    ContractInfo,
    ContractSpec,
    resolve_fqme_contract,
    select,
    specs_for,
)
from piker.clearing import open_ems
from piker.clearing._dialog import decode_events, open_broker_dialog
from piker.clearing._messages import (
    BrokerdCancel,
    BrokerdError,
    BrokerdFill,
    BrokerdOrder,
    BrokerdOrderAck,
    BrokerdPosition,
    BrokerdStatus,
    BrokerdWarm,
    BrokerdWarmed,
    to_wire,
)
from piker.data import open_feed, search
from piker.service import maybe_spawn_daemon, open_runtime
from piker.types import FqmeError
from tests.fake_tws import FakeGateway, demo_scenario, open_fake_gateway

ACCOUNT = 'DU1234567'
BROKERD = 'piker.brokers.ib.broker:brokerd_init'
BROKER_MOD = 'piker.brokers.ib.broker'
BROKERD_IDS = range(100, 116)


# -- pure parts ------------------------------------------------------------------------

def _info(fqme: str, con_id: int, sec_type: str = 'STK', last: str = '') -> ContractInfo:
    sym, venue, _ = fqme.split('.')
    return ContractInfo(fqme=fqme, con_id=con_id, symbol=sym.upper(), sec_type=sec_type,
                        venue=venue.upper(), route_exchange='SMART', currency='USD',
                        tick_size=0.01, last_trade_date=last)


def test_client_ids_are_role_blocks_and_unknown_role_is_named():
    assert list(client_ids(100, 'brokerd')) == list(range(100, 116))
    assert client_ids(100, 'datad').start == 116
    assert client_ids(100, 'adhoc').start == 132
    with pytest.raises(ValueError, match="unknown IB actor role 'feed'"):
        client_ids(100, 'feed')  # type: ignore[arg-type]


def test_error_codes_classified():
    assert {classify(c) for c in (2104, 2106, 2158)} == {'info'}
    assert {classify(c) for c in (1100, 1101, 1102)} == {'connectivity'}
    assert classify(201) == 'request' and classify(2103) == 'warning'
    assert classify(504) == 'error'


def test_backoff_doubles_up_to_the_cap():
    assert [backoff_secs(i, 3.0) for i in range(6)] == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]


def test_specs_per_venue_kind():
    assert specs_for('gld.arca.ib') == [ContractSpec(
        symbol='GLD', sec_type='STK', exchange='SMART', primary_exchange='ARCA')]
    assert specs_for('mnq.cme.ib') == [ContractSpec(symbol='MNQ', sec_type='FUT',
                                                    exchange='CME')]
    assert specs_for('eurusd.idealpro.ib') == [ContractSpec(
        symbol='EUR', currency='USD', sec_type='CASH', exchange='IDEALPRO')]
    assert [s.sec_type for s in specs_for('gld.ib')] == ['STK', 'FUT']
    with pytest.raises(FqmeError, match='not an ib market'):
        specs_for('btcusd.sim')


def test_select_ambiguous_names_the_fqmes_and_futures_pick_front_month():
    infos = [_info('gld.arca.ib', 1), _info('gld.venture.ib', 2)]
    with pytest.raises(ValueError, match="use 'gld.arca.ib' or 'gld.venture.ib'"):
        select('gld.ib', infos)
    assert select('gld.venture.ib', infos).con_id == 2
    futs = [_info('mnq.cme.ib', 3, 'FUT', '20260320'), _info('mnq.cme.ib', 4, 'FUT', '20260618'),
            _info('mnq.cme.ib', 5, 'FUT', '20251219')]
    assert select('mnq.cme.ib', futs, today=dt.date(2026, 1, 5)).con_id == 3
    with pytest.raises(FqmeError, match='unknown market'):
        select('nope.arca.ib', [])


async def test_cache_writes_both_keys_and_asks_ib_once():
    asked: list[ContractSpec] = []

    async def details(spec: ContractSpec) -> list[ContractInfo]:
        asked.append(spec)
        return [_info('spy.arca.ib', 756733)]

    cache = ContractCache()
    info = await resolve_fqme_contract(cache, 'spy.arca.ib', details)
    assert cache.get('spy.arca.ib') is info and cache.get('spy.arca') is info
    assert cache.by_con_id(756733) is info
    await resolve_fqme_contract(cache, 'SPY.ARCA.IB', details)
    assert len(asked) == 1


def test_account_aliases_map_both_ways_and_unknown_alias_names_the_fix():
    accounts = AccountMap({'live': ACCOUNT})
    accounts.managed = [ACCOUNT, 'DU7']
    assert accounts.code_for('live') == ACCOUNT and accounts.code_for('DU7') == 'DU7'
    assert accounts.alias_for(ACCOUNT) == 'live' and accounts.aliases() == ['DU7', 'live']
    with pytest.raises(ValueError, match=r'\[brokers.ib.accounts\]'):
        accounts.code_for('paper')


def _report(status: str, code: int | None = None, **kw: Any) -> OrderReport:
    fields: dict[str, Any] = dict(
        order_id=7, client_id=100, perm_id=99, order_ref='o-1', account=ACCOUNT, con_id=1,
        action='BUY', qty=5.0, order_type='LMT', lmt_price=10.0, status=status, filled=0.0,
        remaining=5.0, avg_fill_price=0.0, error_code=code, error_text='why' if code else '')
    fields.update(kw)
    return OrderReport(**fields)


def test_order_book_maps_ib_outcomes_to_dialog_messages():
    assert map_status('Submitted', None) == 'open'
    assert map_status('Cancelled', 202) == 'canceled'
    assert map_status('Cancelled', 201) == 'error'
    assert map_status('Inactive', None) == 'error'

    book = OrderBook()
    book.track(BrokerdOrder(oid='o-1', account='live', fqme='gld.arca.ib', action='buy',
                            size=5, kind='limit', price=10.0))
    book.placed('o-1', 7, 100)
    assert book.on_report(_report('Submitted')) == []
    [err] = book.on_report(_report('Cancelled', 201))
    assert isinstance(err, BrokerdError) and err.code == 201 and err.reason == 'IB 201: why'
    assert book.on_report(_report('Cancelled', 201)) == []  # reported once

    book.track(BrokerdOrder(oid='o-2', account='live', fqme='gld.arca.ib', action='buy', size=5))
    book.placed('o-2', 8, 100)
    # matched by permId when IB reports it without our orderRef
    [st] = book.on_report(_report('Cancelled', 202, order_ref='', order_id=8, perm_id=55))
    assert isinstance(st, BrokerdStatus) and st.state == 'canceled' and st.oid == 'o-2'

    book.track(BrokerdOrder(oid='o-3', account='live', fqme='gld.arca.ib', action='buy', size=5))
    book.placed('o-3', 9, 100)
    assert book.on_error(IbError(req_id=9, code=161, text='not cancellable', kind='request'),
                         100) == []  # no cancel pending: IB's report will say it
    book.get('o-3').cancel_requested = True  # type: ignore[union-attr]
    [err] = book.on_error(IbError(req_id=9, code=161, text='not cancellable', kind='request'), 100)
    assert err.oid == 'o-3' and err.code == 161
    book.on_fill('o-3', 5)
    assert book.get('o-3').state == 'filled'  # type: ignore[union-attr]


def test_history_helpers():
    assert bar_size_for(60) == '1 min' and bar_size_for(86400) == '1 day'
    with pytest.raises(ValueError, match='IB has no 7s bars'):
        bar_size_for(7)
    assert duration_for(3600) == '3600 S' and duration_for(86_401) == '2 D'
    rows = [(float(t), 1.0, 2.0, 0.5, 1.5, 10.0) for t in (0, 60, 120, 180)]
    arr = bars_array(rows, end_epoch=150, count=2)
    assert list(arr['time']) == [60, 120] and list(arr['index']) == [0, 1]


# -- real actors against the fake gateway ------------------------------------------------

def ib_cfg(gw: FakeGateway, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        'host': '127.0.0.1', 'ports': [gw.port], 'base_client_id': 100,
        'connect_timeout_secs': 2.0, 'reconnect_max_backoff_secs': 0.5,
        'accounts': {'live': ACCOUNT},
    }
    cfg.update(over)
    return cfg


class Dialog:
    """emsd's side of a broker dialog, recording every event."""

    def __init__(self, start: Any, stream: tractor.MsgStream) -> None:
        self.start = start
        self.stream = stream
        self.events: list[Any] = []
        self._changed = trio.Event()

    async def pump(self) -> None:
        async for raw in self.stream:
            self.events.extend(decode_events(raw))
            self._changed.set()
            self._changed = trio.Event()

    async def send(self, msg: Any) -> None:
        await self.stream.send(to_wire(msg))

    def of(self, kind: type, oid: str | None = None) -> list[Any]:
        return [e for e in self.events
                if isinstance(e, kind) and (oid is None or getattr(e, 'oid', None) == oid)]

    async def wait_until(self, pred: Callable[[], bool], timeout_secs: float = 5.0) -> None:
        with trio.fail_after(timeout_secs):
            while not pred():
                await self._changed.wait()

    async def wait_for(self, kind: type, oid: str | None = None, n: int = 1,
                       timeout_secs: float = 5.0) -> list[Any]:
        await self.wait_until(lambda: len(self.of(kind, oid)) >= n, timeout_secs)
        return self.of(kind, oid)


@asynccontextmanager
async def ib_tree(reg_addr: tuple[str, int], gw: FakeGateway, **cfg_over: Any,
                  ) -> AsyncIterator[tractor.Portal]:
    async with open_runtime('tester', reg_addr):
        async with maybe_spawn_daemon(BROKERD, backend='ib',
                                      backend_cfg=ib_cfg(gw, **cfg_over)) as portal:
            yield portal


@asynccontextmanager
async def dialog(portal: tractor.Portal, accounts: list[str] | None = None,
                 ) -> AsyncIterator[Dialog]:
    async with open_broker_dialog(portal, accounts or ['live']) as (start, stream):
        d = Dialog(start, stream)
        async with trio.open_nursery() as n:
            n.start_soon(d.pump)
            yield d
            n.cancel_scope.cancel()


async def link_status(portal: tractor.Portal) -> dict[str, Any]:
    return await portal.run_from_ns(BROKER_MOD, 'link_status')


async def wait_status(portal: tractor.Portal, pred: Callable[[dict[str, Any]], bool],
                      timeout_secs: float = 10.0) -> dict[str, Any]:
    with trio.fail_after(timeout_secs):
        while True:
            status = await link_status(portal)
            if pred(status):
                return status
            await trio.sleep(0.05)


def ledger_fill_ids(state_dir: Path, account: str = 'live') -> list[str]:
    """Fill ids recorded in the ledger (journal + snapshot), with repeats."""
    path = state_dir / 'accounting' / 'ib' / account
    ids: list[str] = []
    journal = path / 'journal.jsonl'
    if journal.exists():
        ids += [json.loads(line)['fill_id'] for line in journal.read_text().splitlines() if line]
    snap = path / 'ledger.toml'
    if snap.exists():
        import tomllib
        ids += [f['fill_id'] for f in tomllib.loads(snap.read_text()).get('fills', [])]
    return ids


def order(oid: str, fqme: str, size: float, action: str = 'buy', price: float | None = None,
          ) -> BrokerdOrder:
    return BrokerdOrder(oid=oid, account='live', fqme=fqme, action=action,  # type: ignore[arg-type]
                        size=size, kind='limit' if price else 'market', price=price)


async def test_brokerd_startup_positions_orders_and_eager_contract_warmup(reg_addr, state_dir):
    async with open_fake_gateway() as gw:
        with trio.fail_after(40):
            async with ib_tree(reg_addr, gw) as portal, dialog(portal) as d:
                start = d.start
                assert start.broker == 'ib' and start.accounts == ['live']
                pos = {p.fqme: (p.size, p.avg_price, p.account) for p in start.positions}
                assert pos == {'spy.arca.ib': (10.0, 550.0, 'live'),
                               'mnq.cme.ib': (1.0, 20900.0, 'live')}
                [open_order] = start.open_orders
                assert (open_order.oid, open_order.fqme, open_order.reqid, open_order.price) == (
                    'demo-open-1', 'aapl.nasdaq.ib', '7', 150.0)
                status = await link_status(portal)
                # warmed for positions and orders before any order, under both keys
                for key in ('spy.arca.ib', 'spy.arca', 'mnq.cme.ib', 'aapl.nasdaq.ib'):
                    assert key in status['contracts']
                assert 'gld.arca.ib' not in status['contracts']

                await d.send(BrokerdWarm(reqid='w1', fqmes=['gld.arca.ib', 'gld.ib',
                                                            'nope.arca.ib']))
                [warmed] = await d.wait_for(BrokerdWarmed)
                assert warmed.fqmes == ['gld.arca.ib']
                assert "use 'gld.arca.ib' or 'gld.venture.ib'" in warmed.errors['gld.ib']
                assert 'unknown market' in warmed.errors['nope.arca.ib']
                assert {'gld.arca.ib', 'gld.arca'} <= set((await link_status(portal))['contracts'])


async def test_brokerd_order_for_uncached_contract_filled_and_ledgered_once(reg_addr, state_dir):
    async with open_fake_gateway() as gw:
        with trio.fail_after(40):
            async with ib_tree(reg_addr, gw) as portal, dialog(portal) as d:
                assert 'gld.arca.ib' not in (await link_status(portal))['contracts']
                await d.send(order('buy-1', 'gld.arca.ib', 3))
                [ack] = await d.wait_for(BrokerdOrderAck, 'buy-1')
                [fill] = await d.wait_for(BrokerdFill, 'buy-1')
                assert (fill.fqme, fill.action, fill.size, fill.account) == (
                    'gld.arca.ib', 'buy', 3.0, 'live')
                assert fill.reqid == ack.reqid and fill.fee > 0
                placed = gw.order(order_ref='buy-1')
                assert placed is not None and str(placed.order_id) == ack.reqid
                assert fill.fill_id == gw.executions[-1].exec_id
                await d.wait_until(lambda: any(
                    p.fqme == 'gld.arca.ib' and p.size == 3.0 for p in d.of(BrokerdPosition)))
                assert ledger_fill_ids(state_dir).count(fill.fill_id) == 1
                # an ambiguous market is refused with the choices, nothing reaches IB
                await d.send(order('amb-1', 'gld.ib', 1))
                [err] = await d.wait_for(BrokerdError, 'amb-1')
                assert "use 'gld.arca.ib' or 'gld.venture.ib'" in err.reason
                assert gw.order(order_ref='amb-1') is None
        # the demo's pre-existing execution was booked too, each exactly once
        ids = ledger_fill_ids(state_dir)
        assert sorted(ids) == sorted(set(ids)) and len(ids) == 2


async def test_brokerd_cancel_and_reject_with_ib_code(reg_addr, state_dir):
    async with open_fake_gateway() as gw:
        gw.set_fill_mode('rest', symbol='SPY')
        gw.set_fill_mode('reject', symbol='AAPL', reason='insufficient margin')
        with trio.fail_after(40):
            async with ib_tree(reg_addr, gw) as portal, dialog(portal) as d:
                await d.send(order('rest-1', 'spy.arca.ib', 2, price=500.0))
                await d.wait_for(BrokerdOrderAck, 'rest-1')
                await d.send(BrokerdCancel(oid='rest-1', account='live'))
                [st] = await d.wait_for(BrokerdStatus, 'rest-1')
                assert st.state == 'canceled' and st.filled == 0.0
                assert gw.order(order_ref='rest-1').status == 'Cancelled'  # type: ignore[union-attr]

                await d.send(order('rej-1', 'aapl.nasdaq.ib', 1))
                [err] = await d.wait_for(BrokerdError, 'rej-1')
                assert err.code == 201 and err.reason.startswith('IB 201: Order rejected')
                assert 'insufficient margin' in err.reason

                await d.send(BrokerdCancel(oid='never-sent', account='live'))
                [err] = await d.wait_for(BrokerdError, 'never-sent')
                assert 'unknown order' in err.reason
                assert not d.of(BrokerdFill)


async def test_brokerd_modify_resting_order_and_unknown_account(reg_addr, state_dir):
    async with open_fake_gateway() as gw:
        gw.set_fill_mode('rest', symbol='SPY')
        with trio.fail_after(40):
            async with ib_tree(reg_addr, gw) as portal, dialog(portal) as d:
                await d.send(order('mod-1', 'spy.arca.ib', 2, price=500.0))
                [ack] = await d.wait_for(BrokerdOrderAck, 'mod-1')
                # re-sending a working oid modifies it in place at IB
                await d.send(order('mod-1', 'spy.arca.ib', 3, price=501.0))
                acks = await d.wait_for(BrokerdOrderAck, 'mod-1', n=2)
                assert acks[1].reqid == ack.reqid
                with trio.fail_after(5):
                    while gw.order(order_ref='mod-1').lmt_price != 501.0:  # type: ignore[union-attr]
                        await trio.sleep(0.02)
                assert gw.order(order_ref='mod-1').qty == 3.0  # type: ignore[union-attr]

                await d.send(BrokerdOrder(oid='acct-1', account='paper', fqme='spy.arca.ib',
                                          action='buy', size=1))
                [err] = await d.wait_for(BrokerdError, 'acct-1')
                assert "unknown IB account 'paper'" in err.reason
                assert '[brokers.ib.accounts]' in err.reason


async def test_brokerd_starts_without_gateway_and_connects_when_it_appears(
    reg_addr, state_dir,
):
    from tests.conftest import free_port
    port = free_port()
    with trio.fail_after(40):
        async with open_runtime('tester', reg_addr):
            cfg = {'ports': [port], 'connect_timeout_secs': 1.0,
                   'reconnect_max_backoff_secs': 0.5, 'accounts': {'live': ACCOUNT}}
            async with maybe_spawn_daemon(BROKERD, backend='ib', backend_cfg=cfg) as portal:
                status = await link_status(portal)
                assert status['state'] == 'down' and 'ConnectionRefusedError' in status['reason']
                async with dialog(portal) as d:
                    assert d.start.positions == []
                    await d.send(order('early', 'spy.arca.ib', 1))
                    [err] = await d.wait_for(BrokerdError, 'early')
                    assert 'not connected to IB' in err.reason
                    async with open_fake_gateway(port=port) as gw:
                        await wait_status(portal, lambda s: s['state'] == 'up' and s['synced'])
                        # positions appear once IB is there
                        await d.wait_until(lambda: any(
                            p.fqme == 'spy.arca.ib' and p.size == 10 for p in d.of(BrokerdPosition)))
                        await d.send(order('late', 'spy.arca.ib', 1))
                        await d.wait_for(BrokerdFill, 'late')
                        assert gw.clients == [100]


async def test_brokerd_partial_fills_each_reported_and_ledgered(reg_addr, state_dir):
    scenario = msgspec.structs.replace(demo_scenario(), partial_chunks=3)
    async with open_fake_gateway(scenario) as gw:
        gw.set_fill_mode('partial', symbol='SPY')
        with trio.fail_after(40):
            async with ib_tree(reg_addr, gw) as portal, dialog(portal) as d:
                await d.send(order('part-1', 'spy.arca.ib', 9, action='sell'))
                fills = await d.wait_for(BrokerdFill, 'part-1', n=3)
                assert [f.size for f in fills] == [3.0, 3.0, 3.0]
                assert {f.action for f in fills} == {'sell'}
                assert len({f.fill_id for f in fills}) == 3
                await trio.sleep(0.3)
                assert len(d.of(BrokerdFill, 'part-1')) == 3
                assert not d.of(BrokerdError, 'part-1')
        ids = ledger_fill_ids(state_dir)
        assert all(ids.count(f.fill_id) == 1 for f in fills)


async def test_brokerd_disconnect_refuses_orders_and_applies_missed_execution_once(
    reg_addr, state_dir,
):
    async with open_fake_gateway() as gw:
        gw.set_fill_mode('rest', symbol='GLD')
        with trio.fail_after(60):
            async with ib_tree(reg_addr, gw) as portal, dialog(portal) as d:
                await d.send(order('away-1', 'gld.arca.ib', 4, price=230.0))
                await d.wait_for(BrokerdOrderAck, 'away-1')

                # the socket drops and IB refuses the role's ids for a while
                for cid in BROKERD_IDS:
                    gw.refuse_client_id(cid)
                gw.drop_connections(client_id=100)
                await wait_status(portal, lambda s: s['state'] == 'down')
                await d.send(order('while-down', 'spy.arca.ib', 1))
                [err] = await d.wait_for(BrokerdError, 'while-down')
                assert 'not connected to IB' in err.reason
                assert gw.order(order_ref='while-down') is None

                # the resting order fills while brokerd is away
                missed = gw.add_execution(order_ref='away-1', shares=4, price=229.5)
                await trio.sleep(0.5)
                assert not d.of(BrokerdFill)
                for cid in BROKERD_IDS:
                    gw.accept_client_id(cid)
                await wait_status(portal, lambda s: s['state'] == 'up' and s['synced']
                                  and s['syncs'] == 2)
                [fill] = await d.wait_for(BrokerdFill, 'away-1')
                assert (fill.fill_id, fill.size, fill.price) == (missed.exec_id, 4.0, 229.5)

                # another reconnect re-reads the same execution: nothing new
                gw.drop_connections()
                await wait_status(portal, lambda s: s['syncs'] == 3 and s['synced'])
                await trio.sleep(0.3)
                assert len(d.of(BrokerdFill, 'away-1')) == 1
                # and orders flow again
                await d.send(order('after', 'spy.arca.ib', 1))
                await d.wait_for(BrokerdFill, 'after')
        assert ledger_fill_ids(state_dir).count(missed.exec_id) == 1


async def test_brokerd_connectivity_loss_1100_degrades_until_restored(reg_addr, state_dir):
    async with open_fake_gateway() as gw:
        with trio.fail_after(40):
            async with ib_tree(reg_addr, gw) as portal, dialog(portal) as d:
                gw.lose_connectivity()
                await wait_status(portal, lambda s: s['state'] == 'degraded')
                await d.send(order('lost-1', 'spy.arca.ib', 1))
                [err] = await d.wait_for(BrokerdError, 'lost-1')
                assert err.code == 1100 and 'TWS lost its connection to IB' in err.reason
                gw.restore_connectivity()
                await wait_status(portal, lambda s: s['state'] == 'up' and s['synced'])
                await d.send(order('back-1', 'spy.arca.ib', 1))
                await d.wait_for(BrokerdFill, 'back-1')


async def test_326_retries_next_client_id_and_info_codes_logged_once(
    reg_addr, state_dir, capfd,
):
    async with open_fake_gateway() as gw:
        gw.refuse_client_id(100)
        with trio.fail_after(40):
            async with ib_tree(reg_addr, gw) as portal:
                status = await wait_status(portal, lambda s: s['synced'])
                assert status['client_id'] == 101 and gw.clients == [101]
                gw.drop_connections()  # the reconnect gets 2104/2106/2158 again
                await wait_status(portal, lambda s: s['syncs'] == 2 and s['synced'])
    records = [json.loads(line) for line in capfd.readouterr().out.splitlines()
               if line.startswith('{')]
    mine = [r for r in records if r.get('actor') == 'brokerd.ib']
    info = [r['code'] for r in mine if r['event'] == 'ib.info']
    assert sorted(info) == [2104, 2106, 2158]
    assert all(r['level'] == 'info' for r in mine if r['event'] == 'ib.info')
    assert [r['client_id'] for r in mine if r['event'] == 'ib.connect.client_id_in_use'] == [100]
    noisy = [r for r in mine if r['level'] in ('warning', 'error', 'critical')
             and any(str(c) in json.dumps(r) for c in (2104, 2106, 2158))]
    assert not noisy, noisy


async def test_datad_market_info_history_quotes_and_ambiguous_error(reg_addr, state_dir):
    async with open_fake_gateway() as gw:
        cfg = ib_cfg(gw)
        with trio.fail_after(40):
            async with open_runtime('tester', reg_addr):
                async with open_feed(['gld.arca.ib', 'mnq.cme.ib'], backend_cfg=cfg,
                                     timeframes=[60]) as feed:
                    info = feed.market_info['mnq.cme.ib']
                    assert (info['tick_size'], info['multiplier'], info['sec_type']) == (
                        0.25, 2.0, 'FUT')
                    assert feed.market_info['gld.arca.ib']['description'] == 'SPDR GOLD SHARES'
                    first = feed.first_quotes['gld.arca.ib']
                    assert first['bid'] < first['ask']
                    bars = feed.attach('gld.arca.ib', 60).array
                    assert len(bars) > 100
                    assert (bars['time'] % 60 == 0).all() and (bars['high'] >= bars['low']).all()
                    seen: set[str] = set()
                    async for batch in feed.stream:  # type: ignore[union-attr]
                        seen |= {q['fqme'] for q in batch}
                        if seen == {'gld.arca.ib', 'mnq.cme.ib'}:
                            break
                with pytest.raises(FqmeError, match="use 'gld.arca.ib' or 'gld.venture.ib'"):
                    async with open_feed(['gld.ib'], backend_cfg=cfg):
                        pass
                found = await search('ib', 'gl', backend_cfg=cfg)
                assert {'gld.arca.ib', 'gld.venture.ib'} <= set(found)


async def test_two_ib_actors_have_distinct_client_ids_and_quotes_resume_after_drop(
    reg_addr, state_dir,
):
    async with open_fake_gateway() as gw:
        cfg = ib_cfg(gw)
        with trio.fail_after(60):
            async with open_runtime('tester', reg_addr):
                async with maybe_spawn_daemon(BROKERD, backend='ib', backend_cfg=cfg) as portal:
                    await wait_status(portal, lambda s: s['synced'])
                    async with open_feed(['spy.arca.ib'], backend_cfg=cfg) as feed:
                        assert gw.clients == [100, 116]
                        await feed.stream.receive()  # type: ignore[union-attr]
                        gw.drop_connections(client_id=116)
                        with trio.fail_after(10):
                            while 116 not in gw.clients:
                                await trio.sleep(0.05)
                        # resubscribed: fresh quotes arrive after the reconnect
                        with trio.fail_after(5):
                            while len(gw.requests_named('reqMktData', client_id=116)) < 2:
                                await trio.sleep(0.05)
                        mark = trio.current_time()
                        while True:
                            batch = await feed.stream.receive()  # type: ignore[union-attr]
                            fresh = trio.current_time() - mark > 0.3
                            if fresh and any(q['fqme'] == 'spy.arca.ib' for q in batch):
                                break
                        # TWS back with its market data lost (1101): subscribe again
                        gw.lose_connectivity()
                        gw.restore_connectivity(data_lost=True)
                        with trio.fail_after(5):
                            while len(gw.requests_named('reqMktData', client_id=116)) < 3:
                                await trio.sleep(0.05)
                    assert gw.clients == [100, 116]


async def test_emsd_live_mode_orders_fill_and_reject_through_brokerd_ib(reg_addr, state_dir):
    async with open_fake_gateway() as gw:
        gw.set_fill_mode('reject', symbol='AAPL', reason='no trading permissions')
        with trio.fail_after(90):
            async with open_runtime('tester', reg_addr):
                async with open_ems(mode='live', backend_cfgs={'ib': ib_cfg(gw)},
                                    account='live', source='test', backends=['ib']) as ems:
                    assert ems.position('spy.arca.ib') == 10.0
                    assert await ems.warm(['gld.arca.ib']) == ['gld.arca.ib']
                    oid = await ems.send(ems.order('gld.arca.ib', 'buy', 2))
                    done = await ems.wait(oid, timeout_secs=20)
                    assert (done.state, done.filled) == ('filled', 2.0)
                    rej = await ems.send(ems.order('aapl.nasdaq.ib', 'buy', 1))
                    bad = await ems.wait(rej, timeout_secs=20)
                    assert bad.state == 'error' and bad.code == 201
                    assert 'no trading permissions' in bad.reason
                    assert gw.order(order_ref=oid) is not None  # the oid is IB's orderRef
        fills = [ex for ex in gw.executions if ex.order_ref == oid]
        assert [ledger_fill_ids(state_dir).count(ex.exec_id) for ex in fills] == [1]
