"""datad with the sim backend: bars from ticks, fan-out, slow and killed
consumers, shared-memory cleanup. Real actors throughout."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tractor
import trio

from piker.brokers import BackendError, backend_endpoints, get_backend
from piker.brokers.sim import get_market, quotes_between
from piker.brokers.sim import history as sim_history
from piker.data import (
    FeedError,
    advance_clock,
    datad_init,
    maybe_spawn_datad,
    maybe_spawn_samplerd,
    open_feed,
    open_sample_stream,
    search,
)
from piker.data._bus import MAX_PENDING_ROWS, Consumer, MarketFeed
from piker.data._types import Tick
from piker.data._wire import decode_batch, join_rows
from piker.service import get_services, open_runtime
from piker.types import FqmeError
from tests.conftest import pid_alive, spawn_piker
from tests.test_sampler import pid_of_actor
from tests.test_service import wait_registry

START = 1_700_006_400  # a UTC midnight
NS = 1_000_000_000
SIM_CFG = {'seed': 3, 'quote_rate_hz': 10.0}
SHM = Path('/dev/shm')


async def feed_status(backend: str = 'sim') -> dict:
    async with maybe_spawn_datad(backend, SIM_CFG) as portal:
        return await portal.run_from_ns('piker.data._feed', 'feed_status')


def assert_bars_equal(got: np.ndarray, expected: np.ndarray) -> None:
    assert got['time'].tolist() == expected['time'].tolist()
    for field in ('open', 'high', 'low', 'close'):
        assert got[field].tolist() == expected[field].tolist(), field
    # sizes are summed in a different order than the model's integer lots
    np.testing.assert_allclose(got['volume'], expected['volume'], rtol=1e-12, atol=1e-12)


# -- the endpoint table ------------------------------------------------------------

def test_endpoint_table_gates_what_datad_enables():
    eps = backend_endpoints('sim', 'datad')
    assert eps.module == 'piker.brokers.sim.feed'
    assert set(eps.endpoints) >= {'market_info', 'history', 'stream_quotes', 'search'}
    spec = datad_init('replay', {'data_dir': '/tmp'})
    assert spec.name == 'datad.replay'
    assert spec.enable_modules == ['piker.data._feed', 'piker.brokers.replay.feed']
    with pytest.raises(BackendError, match=r"unknown backend 'foo': choose one of .*replay.*sim"):
        get_backend('foo')
    with pytest.raises(BackendError, match="backend 'sim' has no brokerd endpoints"):
        backend_endpoints('sim', 'brokerd')
    with pytest.raises(Exception, match=r'\[brokers.sim\].*quote_rate_hz'):
        datad_init('sim', {'quote_rate_hz': 'fast'})


# -- bars ---------------------------------------------------------------------------

async def test_bars_built_from_driven_ticks_match_the_sim_model(reg_addr, state_dir):
    market = get_market('btcusd.sim', seed=SIM_CFG['seed'])
    begin = START + 30  # mid-bar: the 60 s bar at START joins history and live ticks
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr):
            async with maybe_spawn_samplerd(clock='driven', start_epoch=begin):
                pass
            async with (
                open_feed(['btcusd.sim'], backend_cfg=SIM_CFG, timeframes=[1, 60]) as feed,
                open_sample_stream(60) as incs,
            ):
                first = feed.first_quotes['btcusd.sim']
                assert first['bid'] < first['ask'] and first['ts_ns'] <= begin * NS
                shm60, shm1 = feed.attach('btcusd.sim', 60), feed.attach('btcusd.sim', 1)
                assert shm60.readonly
                for k in (1, 2):
                    await advance_clock(START + 60 * k)
                    inc = await incs.receive()
                    assert (inc.period_secs, inc.epoch) == (60, START + 60 * k)
                    # the closed bar is complete when its increment arrives
                    closed = shm60.array[shm60.array['index'] == inc.index - 1]
                    assert_bars_equal(closed, sim_history(market, inc.epoch, 60, 1))
                    assert shm60.array['time'][-1] == inc.epoch
                span = shm1.array[(shm1.array['time'] >= begin - 30)
                                  & (shm1.array['time'] < START + 120)]
                assert_bars_equal(span, sim_history(market, START + 120, 1, 120))
                # a timeframe added while the market streams: history up to the last
                # published second, then the trades since, then live
                await advance_clock(START + 122.5)
                async with open_feed(['btcusd.sim'], backend_cfg=SIM_CFG,
                                     timeframes=[5], start_stream=False) as late:
                    await advance_clock(START + 140)
                    shm5 = late.attach('btcusd.sim', 5)
                    got = shm5.array[shm5.array['time'] < START + 140][-10:]
                    assert_bars_equal(got, sim_history(market, START + 140, 5, 10))
                status = await feed_status()
                segments = status['segments']
                assert len(segments) == 3 and all((SHM / s).exists() for s in segments)
        # datad unlinks its segments when the tree stops
        assert not [s for s in segments if (SHM / s).exists()]


async def test_ambiguous_or_unknown_fqme_errors_name_the_choices(reg_addr, state_dir):
    with trio.fail_after(40):
        async with open_runtime('tester', reg_addr):
            with pytest.raises(FqmeError, match="use 'gld.arca.sim' or 'gld.venture.sim'"):
                async with open_feed(['gld.sim'], backend_cfg=SIM_CFG):
                    pass
            with pytest.raises(FqmeError, match='span backends replay, sim'):
                async with open_feed(['btcusd.sim', 'x.replay']):
                    pass
            async with open_feed(['gld.arca.sim'], backend_cfg=SIM_CFG) as feed:
                assert feed.fqmes == ['gld.arca.sim']
                assert feed.attach('gld.sim').readonly  # venue-less, unambiguous in the feed


# -- consumers ---------------------------------------------------------------------

async def test_a_consumer_that_cannot_drain_is_conflated_to_the_latest_quote_per_market():
    feeds = {f: MarketFeed(f, {}, 0) for f in ('a.sim', 'b.sim')}
    fast, stuck = Consumer(1, list(feeds)), Consumer(2, list(feeds))
    for feed in feeds.values():
        feed.consumers |= {fast, stuck}
    n = MAX_PENDING_ROWS // 2 + 1
    for k in range(n):
        for feed in feeds.values():
            feed.publish([Tick(fqme=feed.fqme, ts_ns=k, bid=1.0, ask=2.0, bid_size=1.0,
                               ask_size=1.0, last=1.5, last_size=1.0)])
        assert len(fast.take(feeds)) == 2  # keeps up: gets every quote
    rows = decode_batch(join_rows(stuck.take(feeds)))
    assert sorted((q['fqme'], q['ts_ns'], q['volume']) for q in rows) == [
        ('a.sim', n - 1, float(n)), ('b.sim', n - 1, float(n))]
    assert stuck.conflated == 1 and not stuck.take(feeds)


async def consume(fqmes: list[str], block_secs: float = 0.0) -> None:
    """A consumer actor's main task; ``block_secs`` stalls the whole actor per batch."""
    async with open_feed(fqmes, backend_cfg=SIM_CFG, timeframes=[60]) as feed:
        async for _ in feed.stream:
            if block_secs:
                time.sleep(block_secs)  # noqa: ASYNC251 - a stalled actor on purpose


async def test_consumers_share_one_upstream_and_slow_or_killed_ones_do_not_stall_others(
    reg_addr, state_dir,
):
    fqme = 'ethusd.sim'
    market = get_market(fqme, seed=SIM_CFG['seed'])
    with trio.fail_after(90):
        async with open_runtime('tester', reg_addr):
            async with maybe_spawn_samplerd(clock='driven', start_epoch=START):
                pass
            async with (
                open_feed([fqme], backend_cfg=SIM_CFG) as feed,
                tractor.open_nursery() as an,
            ):
                await an.run_in_actor(consume, fqmes=[fqme], block_secs=1.0, name='slowpoke')
                await an.run_in_actor(consume, fqmes=[fqme], name='victim')
                while (await feed_status())['feeds'][fqme]['consumers'] < 3:
                    await trio.sleep(0.05)
                assert (await feed_status())['feeds'][fqme]['upstream_starts'] == 1
                victim = pid_of_actor('victim')

                t0 = time.monotonic()
                for k in range(1, 21):
                    if k == 5:
                        os.kill(victim, signal.SIGKILL)
                    await advance_clock(START + k)
                    with trio.fail_after(2):
                        batch = await feed.stream.receive()
                    # every quote of the second is here when the advance returns
                    ticks = quotes_between(market, (START + k - 1) * NS + 1, (START + k) * NS + 1,
                                           SIM_CFG['quote_rate_hz'])
                    assert [q['ts_ns'] for q in batch] == [t.ts_ns for t in ticks]
                    assert batch[-1]['ts_ns'] == (START + k) * NS
                elapsed = time.monotonic() - t0
                # the slow actor (1 s per batch) would need 20 s had it held anyone up
                assert elapsed < 8, elapsed

                status = await feed_status()
                assert status['feeds'][fqme]['upstream_starts'] == 1
                with trio.fail_after(10):
                    while (await feed_status())['feeds'][fqme]['consumers'] > 2:
                        await advance_clock(START + 21)
                        await trio.sleep(0.1)
                assert not pid_alive(victim)
                await an.cancel()


async def test_sigterm_and_killed_reader_leave_no_segments(reg_addr, tmp_path, piker_procs):
    pikerd = spawn_piker(piker_procs, tmp_path, 'pikerd', '--registry',
                         f'{reg_addr[0]}:{reg_addr[1]}')
    await wait_registry(reg_addr)
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr):
            async with tractor.open_nursery() as an:
                await an.run_in_actor(consume, fqmes=['spy.sim'], name='reader')
                while not (await feed_status())['feeds'].get('spy.sim', {}).get('consumers'):
                    await trio.sleep(0.05)
                segments = (await feed_status())['segments']
                os.kill(pid_of_actor('reader'), signal.SIGKILL)
                await an.cancel()
            assert all((SHM / s).exists() for s in segments)
        rc = await trio.to_thread.run_sync(pikerd.stop, signal.SIGTERM)
    assert rc == 0, pikerd.stderr[-2000:]
    assert segments and not [s for s in segments if (SHM / s).exists()]


async def test_a_killed_datad_fails_open_feeds_fast_and_its_segments_are_swept(
    reg_addr, state_dir,
):
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr):
            services = get_services()
            with pytest.raises(FeedError, match=r'datad.sim \(pid \d+\) died'):
                async with open_feed(['spy.sim'], backend_cfg=SIM_CFG) as feed:
                    segments = (await feed_status())['segments']
                    victim = services.get('datad.sim').pid
                    os.kill(victim, signal.SIGKILL)
                    async for _ in feed.stream:  # would hang forever on a dead peer
                        pass
            while services.get('datad.sim') is not None:
                await trio.sleep(0.05)
            assert all((SHM / s).exists() for s in segments)
            async with maybe_spawn_datad('sim', SIM_CFG):
                pass
            assert not [s for s in segments if (SHM / s).exists()]
            assert await search('sim', 'gld', SIM_CFG) == ['gld.arca.sim', 'gld.venture.sim']
