"""The trio → asyncio method proxy, in a real ``infect_asyncio`` actor."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import tractor
import trio

MOD = 'tests._ib_proxy_actor'


@asynccontextmanager
async def infected_actor(reg_addr: tuple[str, int]) -> AsyncIterator[tractor.Portal]:
    async with tractor.open_nursery(arbiter_addr=reg_addr, loglevel='error') as an:
        portal = await an.start_actor('ib_proxy_probe', enable_modules=[MOD],
                                      infect_asyncio=True)
        try:
            yield portal
        finally:
            await an.cancel()


async def test_cancelled_caller_late_reply_is_dropped_not_given_to_next_caller(reg_addr):
    with trio.fail_after(20):
        async with infected_actor(reg_addr) as portal:
            out = await portal.run_from_ns(MOD, 'cancelled_caller_then_next_call')
    assert out['first_cancelled'] is True
    assert out['second'] == 'B'
    assert out['third'] == 'C'
    assert out['dropped'] == 1  # A's reply arrived and was matched to nobody
    assert out['pending'] == 0


async def test_overlapping_calls_each_get_their_own_result(reg_addr):
    with trio.fail_after(20):
        async with infected_actor(reg_addr) as portal:
            results = await portal.run_from_ns(MOD, 'concurrent_callers')
    assert len(results) == 300
    assert all(i == value for i, value in results)
    # they really finished out of order
    assert [i for i, _ in results] != sorted(i for i, _ in results)


async def test_failing_calls_raise_in_caller_and_relay_keeps_serving(reg_addr):
    with trio.fail_after(20):
        async with infected_actor(reg_addr) as portal:
            out = await portal.run_from_ns(MOD, 'failures_do_not_kill_relay')
    assert out['boom'] == ['ValueError', 'bad input 42']
    assert out['sync_boom'] == ['KeyError', "'sync-side failure'"]
    assert out['missing'][0] == 'AttributeError' and 'no_such_method' in out['missing'][1]
    assert out['private'][0] == 'AttributeError' and 'private' in out['private'][1]
    assert 'y' in out['arity']
    for name in ('boom', 'sync_boom', 'missing', 'private'):
        assert out[f'after_{name}'] == 5
    assert out['after_arity'] == 'still alive'
    assert "cannot call 'echo'" in out['closed']


async def test_pushed_events_arrive_in_order_without_loss(reg_addr):
    with trio.fail_after(20):
        async with infected_actor(reg_addr) as portal:
            events = await portal.run_from_ns(MOD, 'pushed_events_in_order')
    assert [e['seq'] for e in events] == list(range(1000))
