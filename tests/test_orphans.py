"""No orphans: a child actor exits as soon as its parent is gone, and a state
file still locked by a process from an earlier run names that process.

All real processes: a ``python -m piker bot run`` tree whose root is SIGKILLed
mid-trade, small python parent/child pairs for the guard itself, and a helper
process holding a ledger journal's ``flock``.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from piker.accounting import Ledger, LedgerError
from piker.accounting._ledger import JOURNAL_NAME, LEDGER_NAME, ledger_dir
from tests.conftest import REPO, descendants, free_port, pid_alive
from tests.test_ops import events, start_bot, stop_and_check_exit, wait_until, write_bot_toml

STARTUP_SECS = 40.0
ORPHAN_EXIT_SECS = 2.0

# trades on every 1 s bar: buys when flat, sells when long
FLIP_SOURCE = '''
from piker.bot import Strategy


class Flip(Strategy):

    def on_bar(self, ctx, fqme, bars):
        if ctx.open_orders(fqme):
            return
        if ctx.position(fqme) > 0:
            ctx.sell(fqme, 1.0)
        else:
            ctx.buy(fqme, 1.0)
'''
FLIP = {'name': 'flip', 'strategy': 'flip', 'markets': ['btcusd.sim'], 'timeframe_secs': 1}


def cmdline(pid: int) -> str:
    try:
        return Path(f'/proc/{pid}/cmdline').read_bytes().replace(b'\0', b' ').decode()[:120]
    except OSError:
        return '?'


def ledger_fills(state: Path) -> dict[str, int]:
    """fill_id -> ts_ns of every fill on disk under ``state``: the journal's
    whole lines plus the last ``ledger.toml`` snapshot."""
    out: dict[str, int] = {}
    for snap in state.glob(f'accounting/*/*/{LEDGER_NAME}'):
        try:
            doc = tomllib.loads(snap.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        for fill in doc.get('fills', []):
            out[fill['fill_id']] = int(fill.get('ts_ns', 0))
    for journal in state.glob(f'accounting/*/*/{JOURNAL_NAME}'):
        for line in journal.read_bytes().splitlines():
            try:
                fill = json.loads(line)
            except ValueError:
                continue  # a torn last line
            out[fill['fill_id']] = int(fill.get('ts_ns', 0))
    return out


def wait_gone(pids: list[int], secs: float) -> list[int]:
    deadline = time.monotonic() + secs
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- the whole tree ---------------------------------------------------------------

def test_root_sigkill_mid_trade_children_exit_no_more_fills_restart_trades(
    tmp_path, piker_procs,
):
    strategies = tmp_path / 'strategies'
    strategies.mkdir()
    (strategies / 'flip.py').write_text(FLIP_SOURCE)
    cfg = write_bot_toml(tmp_path, [FLIP], strategies)
    state = tmp_path / 'state'

    proc = start_bot(piker_procs, tmp_path, cfg, ('127.0.0.1', free_port()))
    wait_until(lambda: events(proc, 'bot.ready'), STARTUP_SECS, 'bot.ready', proc)
    wait_until(lambda: len(ledger_fills(state)) >= 2, 20, 'two fills in the ledger', proc)
    tree = descendants(proc.pid)
    assert len(tree) >= 5, [cmdline(p) for p in tree]

    t_kill_ns = time.time_ns()
    os.kill(proc.pid, signal.SIGKILL)
    proc.proc.wait(5)
    left = wait_gone(tree, ORPHAN_EXIT_SECS)
    try:
        assert left == [], ('children alive 2 s after the root was SIGKILLed: '
                            f'{[(p, cmdline(p)) for p in left]}')
    finally:
        kill_all(left)
    orphaned = [r for r in events(proc, 'actor.orphaned')]
    assert orphaned, 'no child logged why it exited'

    # nothing traded after the kill: no fill stamped later than the kill (one
    # already in flight may land a moment after), and none written later on
    fills = ledger_fills(state)
    late = {fid: (ts - t_kill_ns) / 1e9 for fid, ts in fills.items() if ts > t_kill_ns + 0.2e9}
    assert late == {}, f'fills after the kill (secs after it): {late}'
    time.sleep(3)
    assert ledger_fills(state) == fills

    # the same state dir starts again (the ledger lock is free) and trades
    again = start_bot(piker_procs, tmp_path, cfg, ('127.0.0.1', free_port()))
    wait_until(lambda: events(again, 'bot.ready'), STARTUP_SECS, 'bot.ready on restart', again)
    wait_until(lambda: set(ledger_fills(state)) - set(fills), 20, 'a new fill after restart',
               again)
    stop_and_check_exit(again, descendants(again.pid))


# -- the guard in isolation ------------------------------------------------------

# the middle process: spawns the grandchild from a short-lived thread (like
# trio's spawn worker, whose exit must not count as the parent dying), prints
# its pid, then waits to be killed
MIDDLE = '''
import subprocess, sys, threading, time
kids = []
t = threading.Thread(target=lambda: kids.append(subprocess.Popen([sys.executable, '-c', *sys.argv[1:]])))
t.start()
t.join()
print(kids[0].pid, flush=True)
time.sleep(60)
'''
# only the OS: PDEATHSIG armed, then a blocking sleep (no event loop to poll)
GRAND_OS = '''
import os, time
from piker.service._orphan import arm_parent_death
arm_parent_death(os.getppid())
print('armed', flush=True)
time.sleep(60)
'''
# only the polling task, no PDEATHSIG
GRAND_POLL = '''
import os, trio
from piker.service._orphan import watch_parent
async def main():
    async with trio.open_nursery() as n:
        await n.start(watch_parent, os.getppid())
        print('armed', flush=True)
trio.run(main)
'''
# a tractor root: the guard must leave it alone when its own parent exits
GRAND_ROOT = '''
import sys, trio, tractor
from piker.service._orphan import exit_with_parent
async def main():
    async with tractor.open_root_actor(name='root', arbiter_addr=('127.0.0.1', int(sys.argv[1]))):
        async with trio.open_nursery() as n:
            armed = await n.start(exit_with_parent)
            print('armed' if armed else 'root', flush=True)
            await trio.sleep(60)
trio.run(main)
'''


def read_line(proc: subprocess.Popen[bytes], secs: float = 15.0) -> str:
    """The next line ``proc`` prints (its stdout unbuffered), bounded."""
    assert proc.stdout is not None
    line = b''
    deadline = time.monotonic() + secs
    while not line.endswith(b'\n'):
        ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f'no whole line within {secs}s (got {line!r})'
        byte = proc.stdout.read(1)
        if not byte:
            break
        line += byte
    return line.decode().strip()


def start_pair(grand: str, *args: str) -> tuple[subprocess.Popen[bytes], int, str]:
    """(middle, grandchild pid, the grandchild's first line)."""
    middle = subprocess.Popen(
        [sys.executable, '-c', MIDDLE, grand, *args], cwd=REPO, bufsize=0,
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    grand_pid = int(read_line(middle))
    return middle, grand_pid, read_line(middle)


@pytest.mark.parametrize('grand', [GRAND_OS, GRAND_POLL], ids=['pdeathsig', 'poll'])
def test_guard_ends_the_child_when_its_parent_is_killed(grand):
    middle, grand_pid, first = start_pair(grand)
    try:
        assert first == 'armed'
        # the thread that spawned it is long gone: that alone is no parent death
        time.sleep(0.5)
        assert pid_alive(grand_pid)
        middle.kill()
        middle.wait(5)
        assert wait_gone([grand_pid], ORPHAN_EXIT_SECS) == []
    finally:
        middle.kill()
        middle.wait(5)
        kill_all([grand_pid])
        if middle.stdout:
            middle.stdout.close()


def test_guard_is_a_no_op_in_a_root():
    middle, grand_pid, first = start_pair(GRAND_ROOT, str(free_port()))
    try:
        assert first == 'root'
        middle.kill()
        middle.wait(5)
        time.sleep(1.0)
        assert pid_alive(grand_pid), 'a root actor exited with its parent'
    finally:
        middle.kill()
        middle.wait(5)
        kill_all([grand_pid])
        if middle.stdout:
            middle.stdout.close()


# -- a state file locked by an earlier run ------------------------------------------

HOLD_LOCK = '''
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print('locked', flush=True)
time.sleep(60)
'''


def test_ledger_locked_by_a_live_process_names_its_pid(tmp_path):
    state = tmp_path / 'state'
    journal = ledger_dir(state, 'sim', 'paper') / JOURNAL_NAME
    journal.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(journal)], bufsize=0,
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert read_line(holder) == 'locked'
        with pytest.raises(LedgerError) as info:
            Ledger.open(state, 'sim', 'paper')
        msg = str(info.value)
        assert f'locked by pid {holder.pid} ' in msg, msg
        assert 'still running from an earlier run' in msg, msg
        assert f'kill {holder.pid}' in msg, msg
        assert str(journal) in msg, msg
        assert '\n' not in msg, msg
    finally:
        holder.kill()
        holder.wait(5)
        if holder.stdout:
            holder.stdout.close()
    # released with its holder: opens now
    Ledger.open(state, 'sim', 'paper').close()
