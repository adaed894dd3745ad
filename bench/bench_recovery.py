"""Recovery after a SIGKILL, per actor kind: kill -> first new fill.

Runs the real product command, ``python -m piker bot run`` (paper mode, sim
backend, wall clock), with one strategy actor running
``bench/strategies/every_bar.py`` (a market order on every 1 s bar close).
For each actor kind in turn (bot, emsd, paperboi, datad, samplerd, healthd)
it SIGKILLs the live actor of that kind ``--kills`` times, and measures the
time from the kill to the first fill written to the ledger after it (the
fill's ``ts_ns`` is paperboi's clock, the same host clock as the kill).
Between kills it waits for two more fills, so each kill hits a trading tree.

It also checks, at the end, that no fill id is in the ledger twice and that
the tree never exited.

Run: ``uv run python bench/bench_recovery.py [--kills 5]``.
Targets: p50 <= 3 s, max <= 10 s per kind.
"""
from __future__ import annotations

# ruff: noqa: I001  (piker first: it silences tractor's MultiError deprecation noise)
import piker  # noqa: F401

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from bench_bot import Tree, bench_config, pct, run_tree, tree_pids, wait_ready
from bench_soak import _actor_name

KINDS = {
    'bot': 'bot.recover',
    'emsd': 'emsd',
    'paperboi': 'paperboi.sim',
    'datad': 'datad.sim',
    'samplerd': 'samplerd',
    'healthd': 'healthd',
}
NS = 1_000_000_000


def ledger_fills(state_dir: Path) -> list[tuple[str, int]]:
    """(fill_id, ts_ns) of every fill on disk (snapshot plus journal), read
    without the ledger's lock (paperboi holds it)."""
    out: list[tuple[str, int]] = []
    base = state_dir / 'accounting' / 'sim' / 'paper'
    try:
        doc = tomllib.loads((base / 'ledger.toml').read_text())
        out += [(f['fill_id'], int(f.get('ts_ns', 0))) for f in doc.get('fills', [])]
    except (OSError, tomllib.TOMLDecodeError):
        pass
    try:
        for line in (base / 'journal.jsonl').read_bytes().splitlines():
            try:
                fill = json.loads(line)
            except ValueError:
                continue
            out.append((fill['fill_id'], int(fill.get('ts_ns', 0))))
    except OSError:
        pass
    return out


def actor_pid(tree: Tree, name: str) -> int | None:
    for pid in tree_pids(tree.pid)[1:]:
        if _actor_name(pid) == name:
            return pid
    return None


def fills_after(state_dir: Path, ts_ns: int) -> int:
    return len({fid for fid, ts in ledger_fills(state_dir) if ts > ts_ns})


def wait_for(cond: Callable[[], bool], timeout_secs: float, tree: Tree, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if tree.proc.poll() is not None:
            raise RuntimeError(f'the tree exited ({tree.proc.returncode}) waiting for {what}')
        if time.monotonic() - t0 > timeout_secs:
            raise RuntimeError(f'no {what} within {timeout_secs:g}s')
        time.sleep(0.02)
    return time.monotonic() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--kills', type=int, default=5, help='kills per actor kind')
    p.add_argument('--kinds', nargs='+', default=list(KINDS), choices=list(KINDS))
    p.add_argument('--timeout-secs', type=float, default=30.0)
    args = p.parse_args()
    strategy = {'name': 'recover', 'strategy': 'every_bar', 'markets': ['btcusd.sim'],
                'timeframe_secs': 1, 'params': {'size': 1.0}}
    config = bench_config([strategy], {'seed': 7, 'quote_rate_hz': 10})
    # enough restart budget for 5 kills of one kind within a minute
    config += '[supervision]\nmax_restarts = 20\nwindow_secs = 60\n'
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix='bench-recovery-') as tmp:
        work = Path(tmp)
        with run_tree(config, work, for_secs=None) as tree:
            wait_ready(tree)
            state = tree.state_dir
            wait_for(lambda: fills_after(state, 0) >= 2, 30, tree, 'first fills')
            for kind in args.kinds:
                name = KINDS[kind]
                results[kind] = []
                for _ in range(args.kills):
                    wait_for(lambda n=name: actor_pid(tree, n) is not None, args.timeout_secs,
                             tree, f'a live {name}')
                    pid = actor_pid(tree, name)
                    assert pid is not None
                    kill_ns = time.time_ns()
                    t_kill = time.monotonic()
                    os.kill(pid, signal.SIGKILL)
                    wait_for(lambda k=kill_ns: fills_after(state, k) >= 1, args.timeout_secs,
                             tree, f'a fill after killing {name}')
                    took = time.monotonic() - t_kill
                    results[kind].append(took)
                    print(f'  {kind:9s} pid {pid:>7}: first fill {took:5.2f} s after SIGKILL',
                          flush=True)
                    # a trading tree again before the next kill
                    settled_ns = time.time_ns()
                    wait_for(lambda k=settled_ns: fills_after(state, k) >= 2, args.timeout_secs,
                             tree, 'two more fills')
            fills = ledger_fills(state)
            ids = [fid for fid, _ in fills]
            dup = len(ids) - len(set(ids))
            alive = tree.proc.poll() is None
            rc = tree.stop()
    print('\nrecovery after SIGKILL (kill -> first new fill in the ledger)')
    print(f'{"kind":10s} {"kills":>5s} {"p50 s":>7s} {"max s":>7s}   target p50 <= 3 s, max <= 10 s')
    ok = True
    for kind, secs in results.items():
        met = pct(secs, 0.5) <= 3.0 and max(secs) <= 10.0
        ok &= met
        print(f'{kind:10s} {len(secs):5d} {pct(secs, 0.5):7.2f} {max(secs):7.2f}   '
              f'{"met" if met else "MISSED"}')
    print(f'fills {len(set(ids))}, duplicated fill ids {dup}, tree alive through all kills: '
          f'{alive}, exit on SIGTERM: {rc}')
    sys.exit(0 if ok and dup == 0 and alive and rc == 0 else 1)


if __name__ == '__main__':
    main()
