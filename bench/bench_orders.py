"""Order -> fill round trip through the real tree, and sustained orders/s.

client -> emsd -> paperboi.sim -> emsd -> client, market orders on the sim
backend. Latency: one order at a time, from ``send`` until the client holds
the ``filled`` status. Throughput: a window of orders in flight, until every
one is filled. Run with ``uv run python bench/bench_orders.py``.

Each paper fill is fsynced to the ledger before it is sent, so the state
directory's fsync cost is part of the round trip: the bench runs once on a
tmpfs state dir (the actor path alone) and once on the disk (``--disk-dir``).

Targets: p50 <= 1.5 ms, p99 <= 5 ms, >= 500 orders/s.
"""
from __future__ import annotations

# ruff: noqa: I001  (piker first: it silences tractor's MultiError deprecation noise)
import piker  # noqa: F401

import argparse
import os
import socket
import statistics
import tempfile
import time

import trio

FQME = 'btcusd.sim'
RISK = {'max_orders_per_min': 1_000_000, 'max_position': 1e9, 'max_notional': 1e12,
        'max_order_size': 1e9}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(ems, n: int) -> list[float]:
    out = []
    for i in range(n):
        order = ems.order(FQME, 'buy' if i % 2 == 0 else 'sell', 0.001)
        t0 = time.perf_counter()
        await ems.send(order)
        status = await ems.wait(order.oid)
        out.append(time.perf_counter() - t0)
        assert status.state == 'filled', status
    return out


async def throughput(ems, n: int, window: int) -> float:
    limiter = trio.Semaphore(window)
    done = trio.Event()
    left = n

    async def waiter(oid: str) -> None:
        nonlocal left
        status = await ems.wait(oid)
        assert status.state == 'filled', status
        limiter.release()
        left -= 1
        if left == 0:
            done.set()

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            await limiter.acquire()
            order = ems.order(FQME, 'buy' if i % 2 == 0 else 'sell', 0.001)
            nursery.start_soon(waiter, order.oid)
            await ems.send(order)
        await done.wait()
    return n / (time.perf_counter() - t0)


async def run(state_dir: str, n_latency: int, n_rate: int, window: int) -> dict[str, float]:
    import msgspec

    from piker.clearing import open_ems
    from piker.config import BrokersCfg
    from piker.service import open_runtime

    reg = ('127.0.0.1', free_port())
    async with open_runtime('bench', reg, state_dir=state_dir, loglevel='warning'):
        async with open_ems(backend_cfgs=msgspec.to_builtins(BrokersCfg()), risk_cfg=RISK,
                            backends=['sim']) as ems:
            await ems.warm([FQME])
            await latency(ems, 50)  # warm up both feeds and every code path
            lat = await latency(ems, n_latency)
            rate = await throughput(ems, n_rate, window)
    return {
        'p50_ms': pct(lat, 0.50) * 1e3,
        'p99_ms': pct(lat, 0.99) * 1e3,
        'mean_ms': statistics.fmean(lat) * 1e3,
        'orders_per_sec': rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--orders', type=int, default=1000, help='latency samples')
    parser.add_argument('--rate-orders', type=int, default=3000, help='throughput orders')
    parser.add_argument('--window', type=int, default=64, help='orders in flight')
    parser.add_argument('--disk-dir', default=tempfile.gettempdir(),
                        help='where the on-disk run keeps its state')
    args = parser.parse_args()
    runs = [('tmpfs', '/dev/shm'), ('disk', args.disk_dir)]
    for label, base in runs:
        if not os.path.isdir(base):
            print(f'{label}: skipped ({base} missing)')
            continue
        with tempfile.TemporaryDirectory(dir=base, prefix='piker-bench-') as state_dir:
            r = trio.run(run, state_dir, args.orders, args.rate_orders, args.window)
        print(
            f'{label:5} state ({base}): round trip p50 {r["p50_ms"]:.3f} ms, '
            f'p99 {r["p99_ms"]:.3f} ms, mean {r["mean_ms"]:.3f} ms '
            f'({args.orders} orders); sustained {r["orders_per_sec"]:.0f} orders/s '
            f'({args.rate_orders} orders, {args.window} in flight)'
        )
    print('targets: p50 <= 1.5 ms, p99 <= 5 ms, >= 500 orders/s')


if __name__ == '__main__':
    os.environ.setdefault('PIKER_LOG_LEVEL', 'warning')
    main()
