"""A child actor ends the moment its parent is gone.

tractor 0.1.0a5 children never notice a dead parent: SIGKILL of pikerd (or a
SIGTERM without a handler) leaves every daemon running, still trading and
still holding its state files. Two guards, both armed from
:func:`~piker.service._lifetime.daemon_lifetime` in every child actor:

1. the OS: ``prctl(PR_SET_PDEATHSIG)`` (Linux) makes the kernel signal the
   child when its parent dies; :func:`arm_parent_death`.
2. a trio task polling ``os.getppid()`` every 0.2 s against the pid recorded
   at start; :func:`watch_parent`.

Either exits the process at once with :data:`ORPHANED_EXIT_CODE` after one log
line (``actor.orphaned``); nothing is cleaned up, exactly as after a SIGKILL
(the ledger journal is written before a fill is acknowledged; ``flock``\\s go
with the process).

Why the death signal is not SIGKILL: the kernel sends it when the *thread*
that forked the child exits, not the process. trio spawns from a worker
thread (``trio.lowlevel.open_process`` runs ``Popen`` in ``to_thread``) that
idles out after 10 s, so ``PDEATHSIG=SIGKILL`` kills every daemon 10 s after
it was spawned (reproduced). The child therefore asks for
:data:`PARENT_DEATH_SIGNAL` and its handler exits only if ``getppid()``
changed; a dying spawn thread leaves the child with the same parent process.
The handler runs between two Python bytecodes of the main thread, so no
further strategy or order code runs after it.

Roots (pikerd, ``piker bot run``, CLI roots) are never guarded: a root whose
shell exits keeps running (:func:`is_child_actor`).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, NoReturn

import tractor
import trio
from tractor import _state

from ..log import get_logger

log = get_logger(__name__)

# exit status of an actor that ended because its parent was gone
ORPHANED_EXIT_CODE = 86
# what the kernel sends when the parent (thread) dies; see the module doc
PARENT_DEATH_SIGNAL = signal.SIGUSR2
POLL_SECS = 0.2

_PR_SET_PDEATHSIG = 1
_guarded_parent: int | None = None


def is_child_actor() -> bool:
    """True only inside a tractor subactor; False in a root or with no runtime."""
    actor = tractor.current_actor(err_on_no_runtime=False)
    if actor is None or _state._runtime_vars.get('_is_root', False):
        return False
    return getattr(actor, '_parent_chan', None) is not None


def _parent_gone(parent_pid: int) -> bool:
    """True once this process no longer has ``parent_pid`` as its parent.

    Also True when ``parent_pid`` itself looks like an adoptive parent (init,
    or a reaper outside our session), i.e. the real parent died before it was
    recorded: tractor spawns children without a new session, so a live parent
    is always in the child's session."""
    if os.getppid() != parent_pid or parent_pid <= 1:
        return True
    try:
        return os.getsid(parent_pid) != os.getsid(0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False


def _die(parent_pid: int, how: str) -> NoReturn:
    try:
        log.critical('actor.orphaned', parent_pid=parent_pid, ppid_now=os.getppid(),
                     noticed_by=how, exit_code=ORPHANED_EXIT_CODE,
                     hint='the parent actor is gone; exiting so nothing trades unsupervised')
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 (e.g. a re-entrant write from a signal handler)
        pass
    finally:
        os._exit(ORPHANED_EXIT_CODE)


def _on_death_signal(signum: int, frame: FrameType | None) -> None:
    parent = _guarded_parent
    if parent is not None and _parent_gone(parent):
        _die(parent, 'pdeathsig')
    # else: only the thread that spawned us exited, or a stray signal


def _set_pdeathsig(signum: int) -> bool:
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if not ok:
        log.warning('orphan.pdeathsig_failed', errno=ctypes.get_errno())
    return ok


def arm_parent_death(parent_pid: int) -> bool:
    """Have the kernel end this process when ``parent_pid`` (recorded as early
    as possible, before this call) dies; exit at once if it already has.

    Must run in the main thread (it installs a signal handler); returns False
    where the OS guard is unavailable (not Linux, not the main thread), leaving
    :func:`watch_parent` as the only guard."""
    global _guarded_parent
    armed = False
    if threading.current_thread() is threading.main_thread():
        _guarded_parent = parent_pid
        signal.signal(PARENT_DEATH_SIGNAL, _on_death_signal)
        armed = _set_pdeathsig(PARENT_DEATH_SIGNAL)
    # the parent may have died before prctl: then no signal ever comes
    if _parent_gone(parent_pid):
        _die(parent_pid, 'arm')
    return armed


async def watch_parent(parent_pid: int, period_secs: float = POLL_SECS, *,
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Poll ``os.getppid()``; exit the process once ``parent_pid`` is gone.

    The second guard: catches what the signal cannot (no ``prctl``, handler not
    installable) and runs even in an asyncio-hosted (``infect_asyncio``) actor."""
    if _parent_gone(parent_pid):
        _die(parent_pid, 'poll')
    task_status.started(parent_pid)
    while True:
        await trio.sleep(period_secs)
        if _parent_gone(parent_pid):
            _die(parent_pid, 'poll')


async def exit_with_parent(parent_pid: int | None = None, *,
                           task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Both guards for the current actor: ``await nursery.start(exit_with_parent)``.

    ``parent_pid``: the parent as recorded at the actor's earliest point
    (default: now). Started value: the guarded parent pid, or None in a root,
    where this is a no-op that returns at once (a root never exits with its
    shell)."""
    if parent_pid is None:
        parent_pid = os.getppid()
    if not is_child_actor():
        task_status.started(None)
        return
    # Ctrl-C signals the whole process group: only the root acts on it (and
    # stops the tree in order); a child that took it as KeyboardInterrupt
    # would end before the root could ask it for its final summary
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    armed = arm_parent_death(parent_pid)
    log.debug('orphan.guarded', parent_pid=parent_pid, pdeathsig=armed)
    await watch_parent(parent_pid, task_status=task_status)

