"""The ib backend against the fake TWS gateway (in this process, on loopback):

1. order -> fill round trip through brokerd.ib: a market order sent on the
   broker dialog until its BrokerdFill comes back (ib_async on asyncio, the
   method proxy, the TWS wire both ways, the ledger's fsync), p50/p99, and
   the rate of a burst of orders;
2. quote throughput ib -> datad.ib -> one consumer (``open_feed``): the fake
   streams ticks for several contracts as fast as its ticker allows; reported
   are the quotes the consumer received, the trades the fake printed in that
   time (from the volume), and how often the consumer fell behind and got
   conflated quotes.

ib_async paces what it sends to 45 requests/s (TWS disconnects clients above
50 msg/s), so latency is measured at a paced rate and a burst shows the cap.

Run: uv run python bench/bench_ib.py [--orders N] [--rate HZ] [--burst N] [--quote-secs S]
"""
from __future__ import annotations

# ruff: noqa: I001  (piker first: it silences tractor's MultiError deprecation noise)
import piker  # noqa: F401

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

# isort: off
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.fake_tws
os.environ.setdefault('PIKER_LOG_LEVEL', 'warning')
os.environ.setdefault('PIKER_LOG_FORMAT', 'json')
os.environ.setdefault('PIKER_EXTRA_DAEMON_PREFIXES', 'tests')
from piker.clearing._dialog import decode_events, open_broker_dialog  # noqa: E402
from piker.clearing._messages import BrokerdFill, BrokerdOrder, to_wire  # noqa: E402
from piker.data import open_feed  # noqa: E402
from piker.service import maybe_spawn_daemon, open_runtime  # noqa: E402
from tests.fake_tws import demo_scenario, open_fake_gateway  # noqa: E402
# isort: on

BROKERD = 'piker.brokers.ib.broker:brokerd_init'
FQMES = ['spy.arca.ib', 'gld.arca.ib', 'aapl.nasdaq.ib', 'mnq.cme.ib', 'gld.venture.ib']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cfg(port: int) -> dict[str, Any]:
    return {'ports': [port], 'connect_timeout_secs': 3.0, 'accounts': {'live': 'DU1234567'}}


async def _fill_of(stream: Any, oids: set[str]) -> None:
    """Read the dialog until every oid in ``oids`` has a fill."""
    while oids:
        for ev in decode_events(await stream.receive()):
            if isinstance(ev, BrokerdFill):
                oids.discard(ev.oid)


def _order(oid: str, i: int) -> dict[str, Any]:
    return to_wire(BrokerdOrder(oid=oid, account='live', fqme='spy.arca.ib',
                                action='buy' if i % 2 else 'sell', size=1))


async def bench_orders(n: int, rate_hz: float, burst: int) -> dict[str, float]:
    scenario = msgspec.structs.replace(demo_scenario(), tick_interval_secs=0)
    async with open_fake_gateway(scenario) as gw:
        async with open_runtime('bench', ('127.0.0.1', _free_port())):
            async with maybe_spawn_daemon(BROKERD, backend='ib', backend_cfg=_cfg(gw.port)) as p:
                async with open_broker_dialog(p, ['live']) as (_start, stream):
                    lat_ms: list[float] = []
                    period = 1 / rate_hz
                    t_start = trio.current_time()
                    for i in range(n + 5):
                        await trio.sleep_until(t_start + i * period)
                        oid = f'paced-{i}'
                        t0 = time.perf_counter()
                        await stream.send(_order(oid, i))
                        await _fill_of(stream, {oid})
                        if i >= 5:  # the first ones warm caches
                            lat_ms.append((time.perf_counter() - t0) * 1e3)
                    await trio.sleep(1.5)  # let ib_async's request window empty
                    oids = {f'burst-{i}' for i in range(burst)}
                    t0 = time.perf_counter()
                    for i, oid in enumerate(sorted(oids)):
                        await stream.send(_order(oid, i))
                    await _fill_of(stream, oids)
                    burst_secs = time.perf_counter() - t0
    return {'orders': n, 'rate_hz': rate_hz, 'p50_ms': _pct(lat_ms, 0.5),
            'p99_ms': _pct(lat_ms, 0.99), 'max_ms': max(lat_ms),
            'burst': burst, 'burst_per_s': burst / burst_secs}


async def bench_quotes(secs: float, tick_interval_secs: float) -> dict[str, float]:
    scenario = msgspec.structs.replace(demo_scenario(), tick_interval_secs=tick_interval_secs)
    async with open_fake_gateway(scenario) as gw:
        async with open_runtime('bench', ('127.0.0.1', _free_port())):
            async with open_feed(FQMES, backend_cfg=_cfg(gw.port), timeframes=[60]) as feed:
                stream = feed.stream
                assert stream is not None
                first = await stream.receive()
                vol0 = {q['fqme']: q.get('volume', 0.0) for q in first}
                quotes = batches = 0
                conflated0 = stream.conflated
                last: dict[str, dict[str, Any]] = {}
                t0 = time.perf_counter()
                with trio.move_on_after(secs):
                    async for batch in stream:
                        batches += 1
                        quotes += len(batch)
                        last.update((q['fqme'], q) for q in batch)
                elapsed = time.perf_counter() - t0
                conflations = stream.conflated - conflated0
    # each fake tick prints one trade of `quote_size / 10` (see tests/fake_tws/_market.py)
    lots = {lst.symbol: max(1.0, round(lst.quote_size / 10)) for lst in scenario.listings}
    trades = sum((q['volume'] - vol0.get(f, 0.0)) / lots[f.split('.')[0].upper()]
                 for f, q in last.items())
    return {'secs': elapsed, 'markets': len(FQMES), 'batches_per_s': batches / elapsed,
            'quotes_per_s': quotes / elapsed, 'upstream_trades_per_s': trades / elapsed,
            'conflations': conflations}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--orders', type=int, default=300)
    ap.add_argument('--rate', type=float, default=30.0,
                    help='paced orders per second (ib_async throttles at 45 requests/s)')
    ap.add_argument('--burst', type=int, default=200)
    ap.add_argument('--quote-secs', type=float, default=5.0)
    ap.add_argument('--tick-interval', type=float, default=0.0005,
                    help="the fake's seconds between tick rounds (all subscribed contracts)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ['PIKER_STATE_DIR'] = tmp
        orders = trio.run(bench_orders, args.orders, args.rate, args.burst)
        print(f'order->fill round trip via brokerd.ib ({orders["orders"]} market orders at '
              f'{orders["rate_hz"]:g}/s): p50 {orders["p50_ms"]:.2f} ms  '
              f'p99 {orders["p99_ms"]:.2f} ms  max {orders["max_ms"]:.2f} ms')
        print(f'burst of {orders["burst"]} orders: {orders["burst_per_s"]:.1f} orders/s '
              '(bounded by ib_async\'s 45 requests/s pacing, below TWS\'s 50 msg/s limit)')
        quotes = trio.run(bench_quotes, args.quote_secs, args.tick_interval)
        print(f'quotes ib -> datad.ib -> consumer ({quotes["markets"]} markets, '
              f'{quotes["secs"]:.1f} s): {quotes["quotes_per_s"]:.0f} quotes/s in '
              f'{quotes["batches_per_s"]:.0f} batches/s, upstream '
              f'{quotes["upstream_trades_per_s"]:.0f} trades/s, '
              f'{quotes["conflations"]} conflations')


if __name__ == '__main__':
    main()
