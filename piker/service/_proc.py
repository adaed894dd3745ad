"""Process-exit waiting without touching tractor's private process table.

A SIGKILLed actor never tells anyone: portals to it hang forever. pikerd
therefore watches each daemon's pid through a pidfd, which becomes readable
the moment the process exits (zombie or reaped).
"""
from __future__ import annotations

import os

import trio


async def wait_pid_exit(pid: int) -> None:
    """Return once process ``pid`` has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead)."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as fh:
            stat = fh.read()
    except FileNotFoundError:
        return False
    # the state letter follows the parenthesised command name
    return stat[stat.rfind(b')') + 2:][:1] not in (b'Z', b'X')
