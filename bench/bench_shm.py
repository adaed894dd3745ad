"""Throughput of the shm OHLC buffer's writer calls, and what a reader pays to look.

Run: ``uv run python bench/bench_shm.py``. Prints rows/s (or calls/s) per case.
"""
from __future__ import annotations

# ruff: noqa: I001  (piker first: it silences tractor's MultiError deprecation noise)
import piker  # noqa: F401

import time

import numpy as np

from piker.data._shm import ShmArray, ohlc_dtype, open_shm_array

CAPACITY_ROWS = 2_000_000


def _rate(
    label: str, calls: int, elapsed_secs: float, rows_per_call: int = 1, unit: str = 'rows/s',
) -> None:
    per_sec = calls * rows_per_call / elapsed_secs
    per_call_us = elapsed_secs / calls * 1e6
    print(f'{label:<40} {per_sec:>14,.0f} {unit:<7}   {per_call_us:8.2f} us/call')


def bench_push(shm: ShmArray, batch_rows: int, calls: int) -> None:
    rows = np.zeros(batch_rows, dtype=ohlc_dtype)
    start = time.perf_counter()
    for _ in range(calls):
        shm.push(rows)
    _rate(f'push, {batch_rows} row(s) per call', calls, time.perf_counter() - start, batch_rows)


def bench_update_last(shm: ShmArray, calls: int) -> None:
    start = time.perf_counter()
    for i in range(calls):
        shm.update_last(close=float(i), volume=float(i))
    _rate('update_last(close, volume)', calls, time.perf_counter() - start)


def bench_reader(shm: ShmArray, calls: int) -> None:
    reader = ShmArray.attach(shm.token)
    try:
        start = time.perf_counter()
        for _ in range(calls):
            reader.array[-1]['close']
        _rate('reader .array[-1] (view, no copy)', calls, time.perf_counter() - start, unit='calls/s')
        start = time.perf_counter()
        for _ in range(calls):
            reader.last(100)
        _rate('reader .last(100) (view, no copy)', calls, time.perf_counter() - start, unit='calls/s')
    finally:
        reader.close()


def main() -> None:
    with open_shm_array('bench', CAPACITY_ROWS, start=0) as shm:
        bench_push(shm, 1, 200_000)
        bench_push(shm, 100, 5_000)
        bench_push(shm, 10_000, 50)
        bench_update_last(shm, 200_000)
        bench_reader(shm, 200_000)
        print(f'rows used {len(shm):,} of {shm.capacity:,}')


if __name__ == '__main__':
    main()
