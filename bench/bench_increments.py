"""Increment delivery latency after the boundary (wall clock, 1 s period).

A wall-clock samplerd with a datad (sim, every market, 1 s and 1 m buffers)
linked as buffer owner, so each boundary includes datad opening its rows;
subscribers in the root (which also consumes the quotes) and in two other
actors record ``time the increment is yielded - boundary epoch``. samplerd
sends ~8 ms ahead and ``IncrementStream`` holds each increment until its
boundary, so this is the release precision plus any lateness.

    uv run python bench/bench_increments.py [--boundaries 20]
"""
from __future__ import annotations

# ruff: noqa: I001  (piker first: it silences tractor's MultiError deprecation noise)
import piker  # noqa: F401

import argparse
import os
import socket
import time

import numpy as np
import tractor
import trio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


async def measure(period_secs: int, boundaries: int) -> list[float]:
    """Latency (s) of each of ``boundaries`` increments, first one skipped."""
    from piker.data import open_sample_stream
    lags = []
    async with open_sample_stream(period_secs) as incs:
        await incs.receive()  # the first may race the subscription
        for _ in range(boundaries):
            inc = await incs.receive()
            lags.append(time.time() - inc.epoch)
    return lags


def summary(name: str, lags: list[float]) -> str:
    ms = np.array(lags) * 1e3
    return (f'  {name:<12} n={len(ms):<3} p50 {np.percentile(ms, 50):6.3f} ms   '
            f'p99 {np.percentile(ms, 99):6.3f} ms   max {ms.max():6.3f} ms')


async def main(args: argparse.Namespace) -> None:
    from piker.brokers.sim import list_fqmes
    from piker.data import clock_info, open_feed
    from piker.service import open_runtime
    addr = ('127.0.0.1', free_port())
    async with open_runtime('bench', addr, loglevel='warning'):
        async with open_feed(list_fqmes(), timeframes=[1, 60]) as feed:
            info = await clock_info()
            print(f'samplerd clock={info["clock"]}, owners={info["owners"]}, '
                  f'{len(feed.fqmes)} markets streaming; {args.boundaries} boundaries of 1 s')
            results: dict[str, list[float]] = {}
            async with tractor.open_nursery() as an:
                portals = {
                    f'actor{k}': await an.run_in_actor(
                        measure, period_secs=1, boundaries=args.boundaries, name=f'sub{k}')
                    for k in range(2)
                }
                results['root'] = await measure(1, args.boundaries)
                for name, portal in portals.items():
                    results[name] = await portal.result()
            info = await clock_info()
    print('increment delivery latency after the boundary:')
    for name, lags in results.items():
        print(summary(name, lags))
    print(summary('all', [x for lags in results.values() for x in lags]))
    print('samplerd (sends ahead; subscribers release each increment at its boundary):')
    print(summary('owner acks', [x / 1e3 for x in info['owner_ack_ms']]))
    print(summary('sent ahead', [x / 1e3 for x in info['send_lead_ms']]))


if __name__ == '__main__':
    os.environ.setdefault('PIKER_LOG_FORMAT', 'json')
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--boundaries', type=int, default=20)
    trio.run(main, parser.parse_args())
