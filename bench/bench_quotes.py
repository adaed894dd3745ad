"""Quote throughput datad -> 1 and -> 4 consumer actors (quotes/s, batched).

The source is the replay backend replaying generated bar files far faster than
real time (each bar is four trade ticks), so datad always has fresh quotes;
each consumer actor counts the quotes it receives over a fixed window. A
consumer that cannot keep up is conflated, which the figures show.

    uv run python bench/bench_quotes.py [--markets 10] [--bars 40000] [--speed 225000]
                                        [--bars-tf 60]
"""
from __future__ import annotations

# ruff: noqa: I001  (piker first: it silences tractor's MultiError deprecation noise)
import piker  # noqa: F401

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import tractor
import trio

START = 1_700_006_400
WARMUP_SECS = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def write_bars(data_dir: Path, markets: int, bars: int) -> list[str]:
    rng = np.random.default_rng(7)
    fqmes = []
    for m in range(markets):
        close = 100 + np.cumsum(rng.normal(0, 0.1, bars)).round(2)
        close = np.maximum(close, 1.0)
        opens = np.r_[close[0], close[:-1]]
        high = np.maximum(opens, close) + 0.05
        low = np.minimum(opens, close) - 0.05
        vol = rng.integers(1, 500, bars)
        times = START + 60 * np.arange(bars)
        lines = ['time,open,high,low,close,volume']
        lines += [f'{t},{o:.2f},{h:.2f},{lo:.2f},{c:.2f},{v}'
                  for t, o, h, lo, c, v in zip(times, opens, high, low, close, vol, strict=True)]
        (data_dir / f'm{m:03d}.csv').write_text('\n'.join(lines) + '\n')
        fqmes.append(f'm{m:03d}.replay')
    return fqmes


async def count_quotes(fqmes: list[str], backend_cfg: dict, window_secs: float,
                       timeframes: list[int]) -> dict:
    """A consumer actor: quotes received over ``window_secs`` after a warm-up."""
    from piker.data import open_feed
    async with open_feed(fqmes, backend_cfg=backend_cfg, timeframes=timeframes) as feed:
        stream = feed.stream

        async def drain() -> None:
            async for _ in stream:
                pass

        async with trio.open_nursery() as n:
            n.start_soon(drain)
            await trio.sleep(WARMUP_SECS)
            q0, b0, c0 = stream.received_quotes, stream.received_batches, stream.conflated
            t0 = time.perf_counter()
            await trio.sleep(window_secs)
            elapsed = time.perf_counter() - t0
            stats = {
                'quotes': stream.received_quotes - q0,
                'batches': stream.received_batches - b0,
                'client_conflations': stream.conflated - c0,
                'secs': elapsed,
            }
            n.cancel_scope.cancel()
    return stats


async def run_case(consumers: int, fqmes: list[str], cfg: dict, window_secs: float,
                   timeframes: list[int]) -> None:
    from piker.data import maybe_spawn_datad
    from piker.service import open_runtime
    addr = ('127.0.0.1', free_port())
    async with open_runtime('bench', addr, loglevel='warning'):
        results = []
        async with tractor.open_nursery() as an:
            portals = [
                await an.run_in_actor(count_quotes, fqmes=fqmes, backend_cfg=cfg,
                                      window_secs=window_secs, timeframes=timeframes,
                                      name=f'consumer{k}')
                for k in range(consumers)
            ]
            for portal in portals:
                results.append(await portal.result())
        async with maybe_spawn_datad('replay', cfg) as portal:
            status = await portal.run_from_ns('piker.data._feed', 'feed_status')
    ticks = sum(f['ticks'] for f in status['feeds'].values())
    conflated = sum(c.get('conflated', 0) for c in status['consumers'].values())
    for k, r in enumerate(results):
        rate = r['quotes'] / r['secs']
        print(f'  consumer {k}: {rate:>10,.0f} quotes/s  {r["batches"] / r["secs"]:>7,.0f} '
              f'batches/s  ({r["quotes"] / max(r["batches"], 1):,.0f} quotes/batch)')
    total = sum(r['quotes'] / r['secs'] for r in results)
    print(f'  total {total:,.0f} quotes/s to {consumers} consumer(s); datad ingested '
          f'{ticks:,} ticks; conflations datad={conflated} '
          f'client={sum(r["client_conflations"] for r in results)}')


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix='bench-quotes-') as tmp:
        t0 = time.perf_counter()
        fqmes = write_bars(Path(tmp), args.markets, args.bars)
        print(f'{args.markets} markets x {args.bars:,} bars (x4 ticks) written in '
              f'{time.perf_counter() - t0:.1f} s; replay speed {args.speed:,.0f}x '
              f'= {4 * args.speed / 60 * args.markets:,.0f} ticks/s offered')
        cfg = {'data_dir': tmp, 'timeframe_secs': 60, 'speed': args.speed}
        tfs = [args.bars_tf] if args.bars_tf else []
        what = f'{args.bars_tf} s bars written too' if tfs else 'quotes only, no bar buffers'
        for consumers in args.consumers:
            print(f'datad -> {consumers} consumer actor(s), {args.window:.0f} s window ({what}):')
            await run_case(consumers, fqmes, cfg, args.window, tfs)


if __name__ == '__main__':
    os.environ.setdefault('PIKER_LOG_FORMAT', 'json')
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--markets', type=int, default=10)
    parser.add_argument('--bars', type=int, default=40_000)
    # 10 markets x 4 ticks per 60 s bar at 225,000x = 150,000 ticks/s offered
    parser.add_argument('--speed', type=float, default=225_000.0)
    parser.add_argument('--bars-tf', type=int, default=0,
                        help='also write bars of this timeframe (each file bar is 4 ticks, so '
                        'a fast replay opens a bar every 4 ticks: a worst case for datad)')
    parser.add_argument('--window', type=float, default=5.0)
    parser.add_argument('--consumers', type=int, nargs='+', default=[1, 4])
    trio.run(main, parser.parse_args())
