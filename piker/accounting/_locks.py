"""Who holds a lock on a file: ``/proc/locks`` (Linux), for error messages.

Each held lock is one line, e.g. ``1: FLOCK  ADVISORY  WRITE 1234 fe:00:2147262 0 EOF``
(pid, then the locked inode as ``major:minor:inode`` with the device numbers in
hex); a ``->`` after the ordinal marks a waiter, not a holder. A file is matched
by its ``st_dev``/``st_ino``, so renames and hard links don't matter.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

PROC_LOCKS = '/proc/locks'
_ARGS_MAX = 80


def lock_holders(path: str | os.PathLike[str], proc_locks: str = PROC_LOCKS) -> list[int]:
    """Pids holding a lock (flock, POSIX or OFD) on ``path``; [] when unknown
    (no such file, no ``/proc``, or the holder is in another pid namespace)."""
    try:
        st = os.stat(path)
        with open(proc_locks) as fh:
            lines = fh.readlines()
    except OSError:
        return []
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    pids: list[int] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] == '->':
            continue
        try:
            pid = int(fields[4])
            major, minor, ino = fields[5].split(':')
            where = (int(major, 16), int(minor, 16), int(ino))
        except ValueError:
            continue
        if where == want and pid > 0 and pid not in pids:
            pids.append(pid)
    return pids


def describe_pid(pid: int) -> str:
    """One line naming process ``pid``: its command line, shortened; a tractor
    child as ``python -m tractor._child <actor name>``."""
    try:
        raw = Path(f'/proc/{pid}/cmdline').read_bytes()
    except OSError:
        return 'no longer running'
    argv = [a.decode(errors='replace') for a in raw.split(b'\0') if a]
    if not argv:
        return 'no command line'
    argv[0] = os.path.basename(argv[0])
    text = ' '.join(argv)
    actor = re.search(r"tractor\._child --uid \(\s*'([^']+)'", text)
    if actor:
        text = f'{argv[0]} -m tractor._child {actor.group(1)}'
    text = ' '.join(text.split())  # one line, whatever the arguments held
    return text if len(text) <= _ARGS_MAX else text[:_ARGS_MAX - 1] + '…'


def locked_by_message(path: str | os.PathLike[str]) -> str | None:
    """``<path> is locked by pid N (<cmd>), still running ...`` (one line), or
    None when the holder cannot be found."""
    pids = lock_holders(path)
    if not pids:
        return None
    if pids == [os.getpid()]:
        return (f'{path} is locked by this process (pid {pids[0]}): it is already open '
                'here; open it once and share it')
    who = ', '.join(f'{pid} ({describe_pid(pid)})' for pid in pids)
    kill = ' '.join(str(pid) for pid in pids)
    them = 'it' if len(pids) == 1 else 'them'
    return (f'{path} is locked by pid{"s" if len(pids) > 1 else ""} {who}, still running '
            f'from an earlier run; stop {them} (kill {kill}) or choose another state dir')
