"""Daemon kinds that crash their actor in the ways that print raw text
(tests/test_log_journal.py): ``crasher.<how>``.

Each one comes up (``ctx.started``), then fails on a background trio task, a
thread, the asyncio loop, the warnings module, an unraisable exception or a
record no handler takes, the way real third-party code does.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

import msgspec
import tractor
import trio

from piker.service import DaemonSpec, daemon_lifetime

HOW = (
    'raise',          # an exception escapes the daemon's fixture (tractor: Actor crashed)
    'raise_early',    # ... before the fixture set up logging
    'thread',         # an uncaught exception on a thread (threading.excepthook)
    'unraisable',     # an exception in __del__ (sys.unraisablehook)
    'warn',           # warnings.warn(...) and a record from a handlerless logger
    'aio',            # an asyncio task error nobody awaited (loop exception handler)
    'print',          # print() to stdout and stderr, traceback.print_exc()
    'sigint',         # KeyboardInterrupt in the actor's trio loop
    'excepthook',     # an exception escaping trio.run (sys.excepthook)
)
SECRET = 'CRASHER-SECRET-LOCAL'


class _Noisy:
    def __del__(self) -> None:
        raise RuntimeError('crasher.unraisable: boom in __del__')


def _fail(what: str) -> None:
    token = SECRET  # noqa: F841  (a local that must never reach the logs)
    raise RuntimeError(f'crasher.{what}: boom')


async def _aio_fail() -> None:
    _fail('aio')


async def _aio_orphan() -> None:
    task = asyncio.get_running_loop().create_task(_aio_fail())
    await asyncio.sleep(0.05)
    del task
    gc.collect()
    await asyncio.sleep(0.05)


def _crash(how: str) -> None:
    if how == 'thread':
        t = threading.Thread(target=_fail, args=(how,), name='crasher-thread')
        t.start()
        t.join()
    elif how == 'unraisable':
        _Noisy()
        gc.collect()
    elif how == 'warn':
        warnings.warn('crasher.warn: a deprecated thing', DeprecationWarning, stacklevel=1)
        warnings.warn('crasher.warn: a user warning', UserWarning, stacklevel=1)
        # a logger whose records reach no handler: logging.lastResort
        orphan = logging.getLogger('crasher.orphan')
        orphan.propagate = False
        orphan.warning('crasher.warn: to nobody')
    elif how == 'print':
        print('crasher.print: to stdout')
        print('crasher.print: to stderr', file=sys.stderr)
        try:
            _fail(how)
        except RuntimeError:
            traceback.print_exc()
    elif how == 'sigint':
        os.kill(os.getpid(), signal.SIGINT)
    elif how == 'excepthook':
        _escape_trio_run()


@tractor.context
async def _setup_persistent_crasher(ctx: tractor.Context, how: str, marker_dir: str) -> None:
    """Crashes the first time only (``marker_dir/<how>`` remembers), so a
    restarted one just stays up."""
    marker = Path(marker_dir) / how
    first = not marker.exists()
    marker.touch()
    if how == 'raise_early' and first:
        _fail(how)
    async with daemon_lifetime('crasher', heartbeat=False):
        await ctx.started({'pid': os.getpid()})
        if first:
            await trio.sleep(0.2)
            if how == 'raise':
                _fail(how)
            elif how == 'aio':
                await tractor.to_asyncio.run_task(_aio_orphan)
            else:
                _crash(how)
        await trio.sleep_forever()


def _escape_trio_run() -> None:
    # what tractor's child entry point does with an error out of trio.run:
    # nothing, Python prints it (sys.excepthook) and the process exits 1
    try:
        _fail('excepthook')
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
        os._exit(1)


class CrasherCfg(msgspec.Struct, frozen=True, kw_only=True):
    how: str
    marker_dir: str


def crasher_init(how: str = 'raise', marker_dir: str = '/nonexistent') -> DaemonSpec:
    if how not in HOW:
        raise ValueError(f'crasher: how must be one of {HOW}, found {how!r}')
    return DaemonSpec(
        name=f'crasher.{how}', kind='crasher',
        fixture='tests._crashers:_setup_persistent_crasher',
        enable_modules=['tests._crashers'],
        config=CrasherCfg(how=how, marker_dir=marker_dir),
        infect_asyncio=how == 'aio',
        critical=False,
    )
