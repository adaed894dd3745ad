"""How long Ledger.apply() takes per fill (fsync included), and what a
compaction and a reload cost, on this machine's disk.

Run: uv run python bench/bench_ledger.py [--fills N] [--compact-every K] [--dir PATH]
"""
from __future__ import annotations

# ruff: noqa: I001  (piker first: it silences tractor's MultiError deprecation noise)
import piker  # noqa: F401

import argparse
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

from piker.accounting import Fill, Ledger


def _pct(samples_ns: list[int], q: float) -> float:
    ordered = sorted(samples_ns)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--fills', type=int, default=2_000)
    ap.add_argument('--compact-every', type=int, default=500)
    ap.add_argument('--dir', type=Path, default=None, help='state dir (default: a temp dir)')
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)

    rng = random.Random(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        led = Ledger.open(tmp, 'bench', 'paper', compact_every=args.compact_every)
        compact_ns: list[int] = []
        compact = led.compact

        def timed_compact() -> None:
            t0 = time.perf_counter_ns()
            compact()
            compact_ns.append(time.perf_counter_ns() - t0)

        led.compact = timed_compact  # type: ignore[method-assign]
        apply_ns: list[int] = []
        for i in range(args.fills):
            fill = Fill(
                fill_id=f'f{i}', fqme=rng.choice(['btcusd.sim', 'eth.sim', 'mnq.cme.ib']),
                size=rng.choice([-1, 1]) * rng.randint(1, 10), price=rng.uniform(90, 110),
                fee=0.25, ts_ns=time.time_ns(),
            )
            t0 = time.perf_counter_ns()
            led.apply(fill)
            apply_ns.append(time.perf_counter_ns() - t0)

        t0 = time.perf_counter_ns()
        led.close()
        close_ms = (time.perf_counter_ns() - t0) / 1e6
        t0 = time.perf_counter_ns()
        again = Ledger.open(tmp, 'bench', 'paper')
        reopen_ms = (time.perf_counter_ns() - t0) / 1e6
        assert len(again) == args.fills
        again._release()

    in_apply = compact_ns[:-1]  # the last one ran in close()
    print(f'Ledger.apply over {args.fills} fills (compact_every={args.compact_every}, '
          f'{len(in_apply)} snapshots taken inside apply):')
    print(f'  p50   {_pct(apply_ns, 0.50):9.1f} us')
    print(f'  p99   {_pct(apply_ns, 0.99):9.1f} us')
    print(f'  p99.9 {_pct(apply_ns, 0.999):9.1f} us')
    print(f'  max   {max(apply_ns) / 1e3:9.1f} us   mean {statistics.fmean(apply_ns) / 1e3:.1f} us')
    if in_apply:
        print(f'  snapshot inside apply: max {max(in_apply) / 1e6:.1f} ms')
    print(f'close (snapshot of {args.fills} fills to TOML): {close_ms:.1f} ms')
    print(f'open (load snapshot, recompute positions):      {reopen_ms:.1f} ms')


if __name__ == '__main__':
    main()
