"""Paper trading end to end on the real tree: client -> emsd -> paperboi.sim,
quotes from datad.sim. Every actor here is a real process."""
from __future__ import annotations

import os
import signal

import pytest
import trio
import trio.lowlevel

from piker.accounting import Fill, Position, apply_fill
from piker.clearing import BrokerdError, BrokerdOrder, Status, new_oid, open_ems, to_wire
from piker.clearing._dialog import decode_events, open_broker_dialog
from piker.clearing._ledger_view import ledger_dirs, read_fills, read_positions
from piker.service import find_service, open_runtime
from tests.test_ems import BACKENDS, last_price, place, service_names

FQME = 'btcusd.sim'


def expected_position(fills: list[Status]) -> Position:
    pos = Position(fqme=FQME)
    for st in fills:
        signed = st.fill_size if st.action == 'buy' else -st.fill_size
        pos = apply_fill(pos, Fill(fill_id=st.fill_id, fqme=FQME, size=signed,
                                   price=st.fill_price))
    return pos


async def test_buy_sell_flip_sequence_ends_at_right_size_and_avg_price(reg_addr, state_dir):
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)):
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim']) as ems:
                fills: list[Status] = []
                for action, size, want_size in [('buy', 2, 2), ('buy', 1, 3), ('sell', 4, -1),
                                                ('sell', 0.5, -1.5), ('buy', 1.5, 0)]:
                    st = await place(ems, FQME, action, size)
                    assert st.state == 'filled', st
                    assert (st.filled, st.remaining, st.avg_price) == (size, 0, st.fill_price)
                    fills.append(st)
                    want = expected_position(fills)
                    assert want.size == want_size
                    # paperboi's position reached this client before the fill's status
                    assert ems.position(FQME) == pytest.approx(want.size)
                    pos = next((p for p in ems.positions if p.fqme == FQME), None)
                    if want_size:
                        assert pos.avg_price == pytest.approx(want.avg_price)
                    else:
                        assert pos is None
                # a buy fills at the ask, a sell at the bid: never inside the spread
                buys = [f.fill_price for f in fills if f.action == 'buy']
                sells = [f.fill_price for f in fills if f.action == 'sell']
                assert min(buys) > 0 and min(sells) > 0
        # the ledger agrees, fill for fill
        (path,) = ledger_dirs(state_dir, 'sim', 'paper')
        ledger_fills = read_fills(path)
        assert [f.fill_id for f in ledger_fills] == [s.fill_id for s in fills]
        assert read_positions(path)[FQME].size == 0
        assert read_positions(path)[FQME].realized_pnl == pytest.approx(
            expected_position(fills).realized_pnl)


async def test_resting_limit_is_canceled_and_survives_nothing_after(reg_addr, state_dir):
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)):
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim']) as ems:
                last = await last_price(ems, FQME)
                order = ems.order(FQME, 'buy', 0.1, kind='limit', price=round(last * 0.97))
                await ems.send(order)
                st = await ems.wait(order.oid, states={'open', 'filled', 'rejected', 'error'})
                assert st.state == 'open', st
                working = (await ems.ems_status())['open_orders']
                assert [o['oid'] for o in working] == [order.oid]
                await ems.cancel(order.oid)
                st = await ems.wait(order.oid)
                assert st.state == 'canceled' and st.filled == 0
                # a second cancel is refused with the reason, not an error state
                await ems.cancel(order.oid)
                await trio.sleep(0.2)
                assert ems.orders[order.oid].state == 'canceled'
        orders_file = state_dir / 'paper' / 'sim' / 'orders.toml'
        assert order.oid not in orders_file.read_text()


async def test_resting_limit_survives_a_tree_restart_then_cancels(reg_addr, state_dir):
    with trio.fail_after(90):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)):
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim']) as ems:
                last = await last_price(ems, FQME)
                order = ems.order(FQME, 'sell', 0.2, kind='limit', price=round(last * 1.03))
                await ems.send(order)
                assert (await ems.wait(order.oid, states={'open', 'error'})).state == 'open'
        # a new tree: paperboi reloads the order, emsd learns it at dialog start
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)):
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim']) as ems:
                restored = {s.oid: s for s in ems.open_orders}
                assert restored[order.oid].state == 'open'
                assert restored[order.oid].size == 0.2
                await ems.cancel(order.oid)
                assert (await ems.wait(order.oid)).state == 'canceled'


async def test_paper_mode_runs_with_zero_brokerd_processes(reg_addr, state_dir):
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)) as rt:
            async with open_ems(backend_cfgs=BACKENDS) as ems:
                assert 'paperboi.sim' not in service_names(rt)  # lazily, on first need
                assert (await place(ems, FQME, 'buy', 0.1)).state == 'filled'
                assert (await place(ems, 'ethusd.sim', 'buy', 1)).state == 'filled'
                # a venue-less fqme resolves to its one listing
                st = await place(ems, 'mnq.sim', 'buy', 1)
                assert (st.state, st.fqme) == ('filled', 'mnq.cme.sim')
                st = await place(ems, 'gld.sim', 'buy', 1)
                assert st.state == 'rejected'
                assert 'gld.arca.sim' in st.reason and 'gld.venture.sim' in st.reason
                names = service_names(rt)
                assert 'emsd' in names and 'paperboi.sim' in names
                assert not [n for n in names if n.startswith('brokerd')]
                registry = await tractor_registry()
                assert not [n for n in registry if n.startswith('brokerd')]


async def tractor_registry() -> list[str]:
    import tractor
    actor = tractor.current_actor()
    return [key.rsplit('.', 1)[0] for key in (await actor.get_registry())]


async def test_sigkill_paperboi_mid_session_keeps_every_acked_fill(reg_addr, state_dir):
    """Orders stream in while paperboi is SIGKILLed: every fill a client saw is
    in the ledger, in-flight orders end in `error`, and the next order brings
    paperboi back with its ledger intact."""
    with trio.fail_after(90):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)) as rt:
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim'],
                                risk_cfg={'max_orders_per_min': 10_000}) as ems:
                assert (await place(ems, FQME, 'buy', 0.01)).state == 'filled'
                victim = rt.services.get('paperboi.sim').pid
                sent: list[str] = []

                async def blast() -> None:
                    for _ in range(400):
                        sent.append(await ems.send(ems.order(FQME, 'buy', 0.01)))
                        await trio.lowlevel.checkpoint()

                async with trio.open_nursery() as n:
                    n.start_soon(blast)
                    while sum(s.state == 'filled' for s in ems.orders.values()) < 30:
                        await trio.sleep(0.001)
                    os.kill(victim, signal.SIGKILL)
                final = [await ems.wait(oid, timeout_secs=20) for oid in sent]
                acked = {s.fill_id for s in ems.orders.values() if s.state == 'filled'}
                assert len(acked) >= 30
                assert {s.state for s in final} <= {'filled', 'error'}
                # every order either filled or was told its broker died
                assert any(s.state == 'error' for s in final), 'kill landed after the burst'
                (path,) = ledger_dirs(state_dir, 'sim', 'paper')
                on_disk = {f.fill_id for f in read_fills(path)}
                assert acked <= on_disk
                # paperboi comes back on the next order, with the same ledger
                st = await place(ems, FQME, 'sell', 0.01)
                assert st.state == 'filled', st
                assert rt.services.get('paperboi.sim').pid != victim
                await trio.sleep(0.2)
                assert ems.position(FQME) == pytest.approx(0.01 * (len(on_disk) - 1), abs=1e-9)


async def test_malformed_messages_get_error_status_naming_the_field(reg_addr, state_dir):
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)):
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim']) as ems:
                # client -> emsd
                await ems.send_raw({'type': 'order', 'oid': 'bad-1', 'fqme': FQME,
                                    'action': 'buy', 'size': 'ten'})
                st = await ems.wait('bad-1')
                assert st.state == 'error'
                assert '$.size' in st.reason and 'Expected `float`, got `str`' in st.reason
                await ems.send_raw({'type': 'order', 'oid': 'bad-2', 'fqme': FQME,
                                    'action': 'hold', 'size': 1})
                assert '$.action' in (await ems.wait('bad-2')).reason
                # the dialog lives on
                assert (await place(ems, FQME, 'buy', 0.01)).state == 'filled'

                # emsd -> paperboi: a second dialog straight to the broker
                async with find_service('paperboi.sim') as portal:
                    async with open_broker_dialog(portal, ['paper']) as (start, stream):
                        assert start.broker == 'sim'
                        bad = to_wire(BrokerdOrder(oid='bad-3', account='paper', fqme=FQME,
                                                   action='buy', size=1))
                        bad['size'] = None
                        await stream.send(bad)
                        with trio.fail_after(5):
                            events = decode_events(await stream.receive())
                        (err,) = events
                        assert isinstance(err, BrokerdError) and err.oid == 'bad-3'
                        assert '$.size' in err.reason
                        good = to_wire(BrokerdOrder(oid=new_oid(), account='paper', fqme=FQME,
                                                    action='buy', size=0.01))
                        await stream.send(good)
                        with trio.fail_after(5):
                            kinds = [type(e).__name__ for e in decode_events(await stream.receive())]
                        assert kinds[:2] == ['BrokerdOrderAck', 'BrokerdFill']


async def test_warm_resolves_known_markets_and_names_unknown_ones(reg_addr, state_dir):
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr, state_dir=str(state_dir)):
            async with open_ems(backend_cfgs=BACKENDS) as ems:
                warmed = await ems.warm(['btcusd.sim', 'mnq.cme.sim', 'nope.sim', 'x.nobackend'])
                assert warmed == ['btcusd.sim', 'mnq.cme.sim']
                assert 'nope' in ems.warm_errors['nope.sim']
                assert "unknown backend 'nobackend'" in ems.warm_errors['x.nobackend']
