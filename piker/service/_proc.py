"""Process-exit waiting without touching tractor's private process table.

A SIGKILLed actor never tells anyone: portals to it hang forever. pikerd
therefore watches each daemon's pid through a pidfd, which becomes readable
the moment the process exits (zombie or reaped).
"""
from __future__ import annotations

import os
import signal

import trio


async def wait_pid_exit(pid: int) -> str:
    """Return once process ``pid`` has exited, with how it ended as far as
    this process can tell (``'killed by SIGKILL'``, ``'exited with code 1'``).
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 'exited'
    try:
        await trio.lowlevel.wait_readable(fd)
        return exit_reason(fd)
    finally:
        os.close(fd)


async def cancel_when_gone(pid: int | None, scope: trio.CancelScope,
                           died: list[int] | None = None) -> None:
    """Cancel ``scope`` once process ``pid`` exits (noting it in ``died``).

    A stream or context with a SIGKILLed actor never ends by itself (tractor
    waits forever): run this beside it, watching the peer's pid."""
    if not pid:
        return
    await wait_pid_exit(pid)
    if died is not None:
        died.append(pid)
    scope.cancel()


def exit_reason(pidfd: int) -> str:
    """How the exited process behind ``pidfd`` ended, read without reaping
    it (``WNOWAIT``: its parent still collects it). Only a parent can ask; for
    any other process, or one already reaped, the answer is just ``'exited'``."""
    try:
        info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOWAIT)  # type: ignore[attr-defined]
    except (ChildProcessError, OSError, AttributeError):
        return 'exited'
    if info is None:
        return 'exited'
    if info.si_code == os.CLD_EXITED:
        return f'exited with code {info.si_status}'
    try:
        name = signal.Signals(info.si_status).name
    except ValueError:
        name = f'signal {info.si_status}'
    return f'killed by {name}'


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead)."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as fh:
            stat = fh.read()
    except FileNotFoundError:
        return False
    # the state letter follows the parenthesised command name
    return stat[stat.rfind(b')') + 2:][:1] not in (b'Z', b'X')
