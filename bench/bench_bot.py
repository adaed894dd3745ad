"""Bar close -> order received by paperboi, with 1 and with 4 strategy actors.

The real product command runs the tree: ``python -m piker bot run`` with a
bench config (paper mode, sim backend, samplerd on the wall clock, 1 s bars),
each strategy actor running ``bench/strategies/every_bar.py``, which sends a
market order on every bar close. No product code is changed or hooked.

Per order, two clocks of the same host (CLOCK_REALTIME):
- bar close: the increment's boundary epoch (closed bar's open time + 1 s),
  noted by the strategy together with its own ``on_bar`` wall time;
- received: the ``ts_ns`` paperboi stamps on the fill as its engine takes the
  order (``time.time_ns()`` at ``PaperEngine.submit``, before the ledger
  fsync), read back from the ledger in the state dir after the run.
The strategy logs its note only when the fill returns (``bench.sample``); the
emsd stage comes from emsd's ``order.accepted`` log timestamp (microseconds).

Run: ``uv run python bench/bench_bot.py [--secs 120] [--actors 1 4]``.
Targets: p50 <= 1.5 ms, p99 <= 5 ms.
"""
from __future__ import annotations

# ruff: noqa: I001  (piker first: it silences tractor's MultiError deprecation noise)
import piker  # noqa: F401

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_STRATEGIES = REPO / 'bench' / 'strategies'
MARKETS = ['btcusd.sim', 'ethusd.sim', 'eurusd.sim', 'spy.sim']
# generous limits: the bench measures the path, not the risk gate's refusals
RISK = {'max_order_size': 1e9, 'max_position': 1e9, 'max_notional': 1e15,
        'max_orders_per_min': 1_000_000, 'daily_loss_limit': 1e15}
WARMUP_SECS = 5
NS = 1_000_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return '[' + ', '.join(toml_value(v) for v in value) + ']'
    if isinstance(value, dict):
        return '{ ' + ', '.join(f'{k} = {toml_value(v)}' for k, v in value.items()) + ' }'
    return repr(value)


def bench_config(strategies: list[dict[str, Any]], backend_cfg: dict[str, Any],
                 backend: str = 'sim', log_level: str = 'info') -> str:
    """A paper-mode bot.toml for a bench tree (TOML written by hand: the
    values are plain numbers, strings, lists and flat tables)."""
    lines = [
        'name = "bench"', 'mode = "paper"', f'backend = {toml_value(backend)}',
        f'log_level = {toml_value(log_level)}',
        f'strategies_dir = {toml_value(str(BENCH_STRATEGIES))}',
        f'[brokers.{backend}]', *(f'{k} = {toml_value(v)}' for k, v in backend_cfg.items()),
        '[risk]', *(f'{k} = {toml_value(v)}' for k, v in RISK.items()),
    ]
    for strat in strategies:
        lines.append('[[strategies]]')
        lines += [f'{k} = {toml_value(v)}' for k, v in strat.items()]
    return '\n'.join(lines) + '\n'


# -- the tree as a subprocess --------------------------------------------------

def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat', 'rb') as fh:
                stat = fh.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b')') + 2:].split()
        if rest[0] in (b'Z', b'X'):
            continue
        children.setdefault(int(rest[1]), []).append(int(entry))
    return children


def tree_pids(root: int) -> list[int]:
    """``root`` and its live descendants, from /proc."""
    children = _proc_children()
    out, todo = [root], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _start_time(pid: int) -> int | None:
    try:
        with open(f'/proc/{pid}/stat', 'rb') as fh:
            stat = fh.read()
    except OSError:
        return None
    rest = stat[stat.rfind(b')') + 2:].split()
    return None if rest[0] in (b'Z', b'X') else int(rest[19])


class Tree:
    """One ``python -m piker bot run`` process tree; every pid it ever had is
    remembered (with its start time) so that none outlives the bench."""

    def __init__(self, proc: subprocess.Popen[bytes], out_path: Path, state_dir: Path) -> None:
        self.proc = proc
        self.out_path = out_path
        self.state_dir = state_dir
        self.seen: dict[int, int] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        pids = tree_pids(self.pid) if self.proc.poll() is None else []
        for pid in pids:
            started = _start_time(pid)
            if started is not None:
                self.seen.setdefault(pid, started)
        return pids

    def records(self) -> Iterator[dict[str, Any]]:
        with open(self.out_path, 'rb') as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    yield rec

    def wait(self, timeout_secs: float) -> int | None:
        deadline = time.monotonic() + timeout_secs
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self.proc.returncode
            self.pids()
            time.sleep(0.5)
        return None

    def stop(self, timeout_secs: float = 60.0) -> int | None:
        self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_secs)

    def reap(self) -> list[int]:
        """SIGKILL the root and any remembered pid still alive (same start time)."""
        self.pids()
        killed = []
        for pid, started in [(self.pid, _start_time(self.pid)), *self.seen.items()]:
            if started is not None and _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        return killed


@contextmanager
def run_tree(config_text: str, workdir: Path, for_secs: float | None,
             log_path: Path | None = None, state_dir: Path | None = None) -> Iterator[Tree]:
    """Start the bot tree on a free registry port and a private state dir."""
    cfg_path = workdir / 'bench.toml'
    cfg_path.write_text(config_text)
    state_dir = state_dir or workdir / 'state'
    state_dir.mkdir(exist_ok=True)
    out_path = log_path or workdir / 'tree.jsonl'
    args = [sys.executable, '-m', 'piker', 'bot', 'run', '-c', str(cfg_path),
            '--registry', f'127.0.0.1:{free_port()}', '--state-dir', str(state_dir)]
    if for_secs:
        args += ['--for', f'{for_secs:g}s']
    env = dict(os.environ, PIKER_LOG_FORMAT='json')
    env.pop('NOTIFY_SOCKET', None)
    with open(out_path, 'wb') as out, open(workdir / 'tree.stderr', 'wb') as err:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL)
    tree = Tree(proc, out_path, state_dir)
    try:
        yield tree
    finally:
        if tree.proc.poll() is None:
            tree.stop()
        leftover = tree.reap()
        if leftover:
            print(f'  (killed {len(leftover)} leftover tree processes: {leftover})')


def wait_ready(tree: Tree, timeout_secs: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_secs
    while time.monotonic() < deadline:
        if tree.proc.poll() is not None:
            raise RuntimeError(f'the tree exited early ({tree.proc.returncode}): '
                               f'see {tree.out_path} and its .stderr')
        if any(r.get('event') == 'bot.ready' for r in tree.records()):
            return
        tree.pids()
        time.sleep(0.5)
    raise RuntimeError(f'no bot.ready within {timeout_secs:.0f} s: see {tree.out_path}')


# -- the latency run ------------------------------------------------------------

def _iso_ns(stamp: str) -> int:
    dt = datetime.fromisoformat(stamp)
    return int(dt.timestamp()) * NS + dt.microsecond * 1000


def ledger_receive_ns(state_dir: Path) -> dict[str, int]:
    """oid -> paperboi's ts_ns of the fill (its receive time for a market order)."""
    from piker.accounting import Ledger
    out: dict[str, int] = {}
    with Ledger.open(state_dir, 'sim', 'paper') as ledger:
        for fill in ledger.fills():
            out[fill.oid] = fill.ts_ns
    return out


def measure(n_actors: int, secs: float, log_level: str = 'info',
            state_base: str | None = None) -> dict[str, Any]:
    strategies = [
        {'name': f'bar-{i}', 'strategy': 'every_bar', 'markets': [MARKETS[i % len(MARKETS)]],
         'timeframe_secs': 1, 'params': {'size': 1.0}}
        for i in range(n_actors)
    ]
    text = bench_config(strategies, {'seed': 7, 'quote_rate_hz': 10}, log_level=log_level)
    with (tempfile.TemporaryDirectory(prefix='piker-bench-bot-') as tmp,
          tempfile.TemporaryDirectory(prefix='piker-bench-state-', dir=state_base) as state):
        with run_tree(text, Path(tmp), for_secs=secs, state_dir=Path(state)) as tree:
            load_before = os.getloadavg()[0]
            code = tree.wait(secs + 180)
            load_after = os.getloadavg()[0]
            if code is None:
                raise RuntimeError(f'the tree did not end within {secs + 180:.0f} s')
            records = list(tree.records())
            received = ledger_receive_ns(tree.state_dir)
    notes = {r['oid']: r for r in records if r.get('event') == 'bench.sample'}
    accepted = {r['oid']: _iso_ns(r['timestamp']) for r in records
                if r.get('event') == 'order.accepted' and r.get('actor') == 'emsd'}
    sends = {r['oid']: _iso_ns(r['timestamp']) for r in records
             if r.get('event') == 'order.send' and str(r.get('actor')).startswith('bot.')}
    # order.send is an info record: unknown when the tree logs at warning
    sent = len(sends) if sends else 'n/a'
    first_close = min((n['bar_close_ns'] for n in notes.values()), default=0)
    total, to_bar, bar_to_send, send_to_ems, ems_to_paper = [], [], [], [], []
    for oid, note in notes.items():
        close_ns = note['bar_close_ns']
        if close_ns < first_close + WARMUP_SECS * NS or oid not in received:
            continue
        total.append((received[oid] - close_ns) / 1e6)
        to_bar.append((note['on_bar_ns'] - close_ns) / 1e6)
        if oid in accepted and oid in sends:
            bar_to_send.append((sends[oid] - note['on_bar_ns']) / 1e6)
            send_to_ems.append((accepted[oid] - sends[oid]) / 1e6)
            ems_to_paper.append((received[oid] - accepted[oid]) / 1e6)
    if not total:
        raise RuntimeError('no samples: the strategies sent no filled orders')
    late = sum(1 for r in records if r.get('event') == 'sampler.boundary_late')
    errors = [r for r in records if r.get('level') in ('error', 'critical')]
    warnings = [r for r in records
                if r.get('level') == 'warning' and r.get('event') != 'bench.sample']
    return {
        'actors': n_actors, 'exit': code, 'orders_sent': sent, 'samples': len(total),
        'total': total, 'to_bar': to_bar, 'bar_to_send': bar_to_send,
        'send_to_ems': send_to_ems,
        'ems_to_paper': ems_to_paper, 'late_boundaries': late, 'errors': len(errors),
        'warnings': len(warnings), 'load': (load_before, load_after),
    }


def describe(label: str, ms: list[float]) -> str:
    if not ms:
        return f'{label}: no samples'
    return (f'{label}: p50 {pct(ms, 0.50):.3f} ms, p99 {pct(ms, 0.99):.3f} ms, '
            f'max {max(ms):.3f} ms')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--secs', type=float, default=120.0,
                        help='length of each run (1 s bars: ~1 sample/s per actor)')
    parser.add_argument('--actors', type=int, nargs='+', default=[1, 4],
                        help='strategy actor counts to run (max 4 distinct markets reused)')
    parser.add_argument('--log-level', default='info',
                        choices=['debug', 'info', 'warning', 'error'],
                        help="the tree's log_level (bot.toml default: info)")
    parser.add_argument('--state-base', default='/dev/shm',
                        help='where the state dir is made; paperboi fsyncs each fill to '
                        'the ledger there (default tmpfs: the actor path alone; pass a disk '
                        'directory to include the fsyncs that queue up behind each other)')
    args = parser.parse_args()
    if not os.path.isdir(args.state_base):
        parser.error(f'--state-base {args.state_base!r} is not a directory')
    print(f'bar close -> paperboi receives the order; {args.secs:g} s per run, 1 s bars, '
          f'first {WARMUP_SECS} s dropped; log_level {args.log_level}; '
          f'state under {args.state_base}; '
          f'host has {os.cpu_count()} CPUs')
    for n in args.actors:
        r = measure(n, args.secs, args.log_level, args.state_base)
        print(f'{n} strategy actor(s): {r["samples"]} samples, {r["orders_sent"]} orders sent, '
              f'exit {r["exit"]}, late boundaries {r["late_boundaries"]}, '
              f'error/warning records {r["errors"]}/{r["warnings"]}, '
              f'load avg {r["load"][0]:.2f} -> {r["load"][1]:.2f}')
        print('  ' + describe('bar close -> paperboi   ', r['total']))
        print('  ' + describe('  bar close -> on_bar   ', r['to_bar']))
        print('  ' + describe('  on_bar -> bot sends   ', r['bar_to_send']))
        print('  ' + describe('  bot sends -> emsd acc.', r['send_to_ems']))
        print('  ' + describe('  emsd acc. -> paperboi ', r['ems_to_paper']))
    print('targets: bar close -> paperboi p50 <= 1.5 ms, p99 <= 5 ms')


if __name__ == '__main__':
    main()
