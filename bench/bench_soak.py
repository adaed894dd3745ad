"""RSS of the whole bot tree at steady state and its growth over a long run.

Runs ``python -m piker bot run`` (paper, wall clock) with one strategy actor
(``bench/strategies/quote_soak.py``) that takes every quote of several markets
and trades now and then.

Quote load: the sim model has a 100 ms grid (``quote_rate_hz`` is capped at
10 per market) and 7 markets, so ``--backend sim`` tops out near 90 quotes/s
(quotes plus trades). ``--backend replay`` reaches ~1k quotes/s: generated
1 s bar files (4 trade ticks per bar) for ``--markets`` markets replayed at
``--replay-speed`` x real time, i.e. 4 x markets x speed ticks/s (the
default). The replay datad holds every tick of its files in memory, so its
RSS (~170 MB for a 30 min run) is larger than the sim datad's (~60 MB).

Every ``--sample-secs`` it sums, over the root process and all its descendants
(from /proc), VmRSS (the target's measure) and Pss (shared pages such as the
shm OHLC buffers and the interpreter's mapped files split between every
process mapping them, so other trees on the host move it), and prints
the strategy's quote rate from its ``bench.quotes`` log records.

The start figure is the first sample after ``--warmup-secs`` past ``bot.ready``;
the final line prints start RSS, end RSS and growth %.

Run: ``uv run python bench/bench_soak.py [--minutes 30]``.
Targets: total RSS <= 500 MB with one strategy; growth <= 5 %.
"""
from __future__ import annotations

# ruff: noqa: I001  (piker first: it silences tractor's MultiError deprecation noise)
import piker  # noqa: F401

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_bot import Tree, bench_config, run_tree, wait_ready

SIM_MARKETS = ['btcusd.sim', 'ethusd.sim', 'eurusd.sim', 'spy.sim', 'mnq.cme.sim',
               'gld.arca.sim', 'gld.venture.sim']
# the sim model's grid is 100 ms: feed.py caps quote_rate_hz here
SIM_MAX_RATE_HZ = 10.0
MB = 1024 * 1024


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f'/proc/{pid}/status') as fh:
            for line in fh:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f'/proc/{pid}/smaps_rollup') as fh:
            for line in fh:
                if line.startswith('Pss:'):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _actor_name(pid: int) -> str:
    """The tractor actor name from a child's ``--uid ('name', '...')`` argument."""
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as fh:
            argv = fh.read().split(b'\0')
    except OSError:
        return '?'
    for i, arg in enumerate(argv[:-1]):
        if arg == b'--uid':
            return argv[i + 1].decode(errors='replace').split("'")[1]
    return 'root'


class Sample:
    def __init__(self, tree: Tree, t0: float) -> None:
        self.elapsed_secs = time.monotonic() - t0
        self.pids = tree.pids()
        self.by_actor = {f'{_actor_name(p)}[{p}]': _status_kb(p, 'VmRSS') for p in self.pids}
        self.rss_mb = sum(self.by_actor.values()) / 1024
        self.pss_mb = sum(_pss_kb(p) for p in self.pids) / 1024


def quote_rate(tree: Tree) -> tuple[float | None, int]:
    """The latest ``bench.quotes`` rate and the total quotes seen so far."""
    rate, total = None, 0
    for rec in tree.records():
        if rec.get('event') == 'bench.quotes':
            rate, total = rec.get('quotes_per_sec'), rec.get('total', 0)
    return rate, total


def out(line: str) -> None:
    print(line, flush=True)


def write_replay_files(data_dir: Path, n_markets: int, n_bars: int, start_epoch: int) -> list[str]:
    """``n_markets`` random-walk files of ``n_bars`` 1 s bars from ``start_epoch``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    fqmes = []
    times = np.arange(start_epoch, start_epoch + n_bars)
    for k in range(n_markets):
        close = 100.0 * np.exp(np.cumsum(rng.normal(0, 2e-4, n_bars)))
        open_ = np.r_[close[0], close[:-1]]
        high = np.maximum(open_, close) * 1.0001
        low = np.minimum(open_, close) * 0.9999
        rows = np.column_stack([times, open_, high, low, close, np.full(n_bars, 4.0)])
        np.savetxt(data_dir / f'r{k}.csv', rows, delimiter=',', comments='',
                   header='time,open,high,low,close,volume',
                   fmt=['%d', '%.6f', '%.6f', '%.6f', '%.6f', '%.1f'])
        fqmes.append(f'r{k}.replay')
    return fqmes


def soak(args: argparse.Namespace, workdir: Path) -> int:
    params = {'report_secs': args.sample_secs, 'trade_every_secs': args.trade_every_secs}
    if args.backend == 'sim':
        markets = SIM_MARKETS[: args.markets]
        backend_cfg = {'seed': 7, 'quote_rate_hz': args.rate_hz}
        load = f'{len(markets)} sim markets at {args.rate_hz:g} Hz (sim cap {SIM_MAX_RATE_HZ:g})'
    else:
        total_secs = args.warmup_secs + args.minutes * 60 + 600
        n_bars = int(total_secs * args.replay_speed) + 60
        # file time starts now: the replay clock maps the earliest bar to its first reading
        markets = write_replay_files(workdir / 'replay', args.markets, n_bars, int(time.time()))
        backend_cfg = {'data_dir': str(workdir / 'replay'), 'speed': args.replay_speed,
                       'timeframe_secs': 1}
        load = (f'{len(markets)} replay markets of {n_bars} 1 s bars at {args.replay_speed:g}x '
                f'(~{4 * len(markets) * args.replay_speed:.0f} ticks/s)')
    tf = args.timeframe_secs or (1 if args.backend == 'sim' else 60)
    strategy = {'name': 'soak', 'strategy': 'quote_soak', 'markets': markets,
                'timeframe_secs': tf, 'params': params}
    text = bench_config([strategy], backend_cfg, backend=args.backend)
    trades = (f'a market order every {args.trade_every_secs:g} s' if args.trade_every_secs
              else 'no orders')
    out(f'soak: {args.minutes:g} min, 1 strategy on {load}, {tf} s bars, {trades}, '
        f'sample every {args.sample_secs:g} s, warm-up {args.warmup_secs:g} s; workdir {workdir}')
    with run_tree(text, workdir, for_secs=None) as tree:
        wait_ready(tree)
        t0 = time.monotonic()
        ready = Sample(tree, t0)
        out(f'ready: {len(ready.pids)} processes, RSS {ready.rss_mb:.1f} MB, '
            f'PSS {ready.pss_mb:.1f} MB')
        time.sleep(max(args.warmup_secs, 1))
        start = last = Sample(tree, t0)
        end_at = t0 + args.warmup_secs + args.minutes * 60
        while True:
            rate, total = quote_rate(tree)
            rate_txt = f'{rate:.0f} quotes/s' if rate is not None else 'quotes/s n/a'
            out(f't={last.elapsed_secs:7.0f}s procs {len(last.pids):2d} '
                f'RSS {last.rss_mb:7.1f} MB  PSS {last.pss_mb:7.1f} MB  '
                f'{rate_txt} (total {total})')
            if tree.proc.poll() is not None:
                out(f'the tree exited early ({tree.proc.returncode}): see {tree.out_path}')
                return 1
            if time.monotonic() >= end_at:
                break
            time.sleep(min(args.sample_secs, max(end_at - time.monotonic(), 0.1)))
            last = Sample(tree, t0)
        out('per actor RSS MB (start -> end): ' + ', '.join(
            f'{k} {start.by_actor.get(k, 0) / 1024:.1f} -> {v / 1024:.1f}'
            for k, v in sorted(last.by_actor.items())))
        code = tree.stop()
    errors = sum(1 for r in tree.records() if r.get('level') in ('error', 'critical'))
    growth = (last.rss_mb - start.rss_mb) / start.rss_mb * 100
    pss_growth = (last.pss_mb - start.pss_mb) / start.pss_mb * 100
    out(f'tree exit {code}; error records {errors}')
    out(f'RESULT start RSS {start.rss_mb:.1f} MB, end RSS {last.rss_mb:.1f} MB, '
        f'growth {growth:+.2f} % over {(last.elapsed_secs - start.elapsed_secs) / 60:.1f} min '
        f'(PSS {start.pss_mb:.1f} -> {last.pss_mb:.1f} MB, {pss_growth:+.2f} %); '
        'targets: RSS <= 500 MB, growth <= 5 %')
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--minutes', type=float, default=30.0, help='soak length after warm-up')
    parser.add_argument('--sample-secs', type=float, default=30.0)
    parser.add_argument('--warmup-secs', type=float, default=60.0,
                        help='after bot.ready, before the start sample')
    parser.add_argument('--backend', choices=['sim', 'replay'], default='replay',
                        help='replay (default) reaches ~1k quotes/s; sim tops out near 90')
    parser.add_argument('--markets', type=int, default=None,
                        help='markets the strategy subscribes to (sim: 1..7, default 7; '
                        'replay: default 5)')
    parser.add_argument('--rate-hz', type=float, default=SIM_MAX_RATE_HZ,
                        help='sim: [brokers.sim] quote_rate_hz (capped by the sim at 10)')
    parser.add_argument('--replay-speed', type=float, default=50.0,
                        help='replay: x real time (ticks/s = 4 x markets x speed)')
    parser.add_argument('--trade-every-secs', type=float, default=10.0, help='0: never trade')
    parser.add_argument('--timeframe-secs', type=int, default=None,
                        help='bar timeframe of the strategy (default: sim 1, replay 60: '
                        'a fast replay writes one bar row per file-time period, which '
                        'at 1 s would add ~14 KB/s of shm rows that are no leak)')
    parser.add_argument('--keep', action='store_true',
                        help="keep the workdir (the tree's JSON log and state)")
    args = parser.parse_args()
    if args.markets is None:
        args.markets = len(SIM_MARKETS) if args.backend == 'sim' else 5
    if args.backend == 'sim' and not 1 <= args.markets <= len(SIM_MARKETS):
        parser.error(f'--markets: the sim has {len(SIM_MARKETS)} markets, found {args.markets}')
    if args.keep:
        code = soak(args, Path(tempfile.mkdtemp(prefix='piker-soak-')))
    else:
        with tempfile.TemporaryDirectory(prefix='piker-soak-') as tmp:
            code = soak(args, Path(tmp))
    sys.exit(code)


if __name__ == '__main__':
    main()
