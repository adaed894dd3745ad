"""Opening the actor runtime: become pikerd, or attach to the running one.

``open_runtime()`` probes the registry address. Nothing answering means this
process becomes **pikerd**: the tractor registry, the service manager
(:class:`Services`) and the health daemon. Otherwise it joins the running tree
as an ordinary root, and daemons it asks for are still started (and owned) by
pikerd.
"""
from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import tractor
import trio

from ..log import get_logger, setup_logging
from ._health import healthd_init, run_heartbeat
from ._services import Services

log = get_logger(__name__)

PIKERD = 'pikerd'
STARTUP_TIMEOUT_SECS = 30.0

# modules pikerd exposes over RPC (the minimum: spawn/list/stop services)
PIKERD_MODULES = ['piker.service._rpc']

_services: Services | None = None


class RuntimeStartupError(RuntimeError):
    """The runtime could not start; the text names the cause and the fix."""


class Runtime(msgspec.Struct, kw_only=True):
    name: str
    registry_addr: tuple[str, int]
    is_pikerd: bool
    services: Services | None = None


def get_services() -> Services | None:
    """This process's service manager, when this process is pikerd."""
    return _services


def registry_answers(addr: tuple[str, int], timeout_secs: float = 0.5) -> bool:
    """Whether something accepts TCP connections on the registry address."""
    try:
        with socket.create_connection(addr, timeout=timeout_secs):
            return True
    except OSError:
        return False


def registry_is_tractor(addr: tuple[str, int], timeout_secs: float = 3.0) -> bool:
    """Whether the listener on ``addr`` speaks tractor: a tractor actor sends
    its uid (a length-prefixed msgpack ``[name, uuid]``) as soon as a peer
    connects. Anything else would make ``open_root_actor`` hang forever."""
    import struct

    import msgspec
    try:
        with socket.create_connection(addr, timeout=timeout_secs) as sock:
            sock.settimeout(timeout_secs)
            head = _recv_exact(sock, 4)
            (size,) = struct.unpack('<I', head)
            if not 0 < size < 4096:
                return False
            uid = msgspec.msgpack.decode(_recv_exact(sock, size))
    except (OSError, ValueError, msgspec.DecodeError):
        return False
    return isinstance(uid, list) and len(uid) == 2 and all(isinstance(x, str) for x in uid)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b''
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ValueError('connection closed')
        buf += chunk
    return buf


def _export_env(loglevel: str | None, heartbeat_secs: float | None,
                state_dir: str | None) -> None:
    # children inherit the environment at spawn time
    if loglevel:
        os.environ['PIKER_LOG_LEVEL'] = loglevel
    if heartbeat_secs:
        os.environ['PIKER_HEARTBEAT_SECS'] = str(heartbeat_secs)
    if state_dir:
        os.environ['PIKER_STATE_DIR'] = str(state_dir)


@asynccontextmanager
async def open_runtime(
    name: str,
    registry_addr: tuple[str, int],
    *,
    loglevel: str | None = None,
    heartbeat_secs: float = 1.0,
    stale_after_secs: float = 5.0,
    state_dir: str | None = None,
    require_pikerd: bool = False,
    stop_timeout_secs: float = 20.0,
    enable_modules: list[str] | None = None,
) -> AsyncIterator[Runtime]:
    """Open this process's root actor on ``registry_addr`` (see module doc).

    ``require_pikerd``: fail if a pikerd already answers (``piker pikerd``).
    On exit as pikerd, daemons are stopped tier by tier within
    ``stop_timeout_secs``.
    """
    global _services
    registry_addr = (registry_addr[0], int(registry_addr[1]))
    _export_env(loglevel, heartbeat_secs, state_dir)
    setup_logging(loglevel, actor=name)
    attach = registry_answers(registry_addr)
    if attach and not registry_is_tractor(registry_addr):
        raise RuntimeStartupError(
            f'the registry address {registry_addr[0]}:{registry_addr[1]} is held by a program '
            'that is not a piker tree; choose another port (`registry.port` in bot.toml '
            'or `--registry HOST:PORT`)'
        )
    if attach and require_pikerd:
        raise RuntimeStartupError(
            f'a pikerd already answers on {registry_addr[0]}:{registry_addr[1]}; stop it first '
            'or choose another registry port (`registry.port` in bot.toml or `--registry`)'
        )
    root_name = name if attach else PIKERD
    modules = list(enable_modules or [])
    if not attach:
        modules += PIKERD_MODULES
    try:
        async with tractor.open_root_actor(
            name=root_name, arbiter_addr=registry_addr, loglevel='error',
            enable_modules=modules,
        ) as actor:
            setup_logging(loglevel, actor=root_name)
            if not actor.is_arbiter:
                log.info('runtime.attached',
                         registry=f'{registry_addr[0]}:{registry_addr[1]}')
                yield Runtime(name=root_name, registry_addr=registry_addr, is_pikerd=False)
            else:
                async with _open_pikerd(registry_addr, heartbeat_secs, stale_after_secs,
                                        stop_timeout_secs) as rt:
                    yield rt
    finally:
        _services = None


async def _own_heartbeat(period_secs: float, *,
                         task_status: Any = trio.TASK_STATUS_IGNORED,
                         ) -> None:
    with trio.CancelScope() as scope:
        await run_heartbeat(PIKERD, PIKERD, period_secs, task_status=_Started(task_status, scope))


class _Started:
    """Reports ``value`` to ``task_status`` whatever the inner task passes."""

    def __init__(self, task_status: Any, value: object) -> None:
        self._ts, self._value = task_status, value

    def started(self, _: object = None) -> None:
        self._ts.started(self._value)


@asynccontextmanager
async def _open_pikerd(registry_addr: tuple[str, int], heartbeat_secs: float,
                       stale_after_secs: float, stop_timeout_secs: float,
                       ) -> AsyncIterator[Runtime]:
    global _services
    log.info('pikerd.starting', registry=f'{registry_addr[0]}:{registry_addr[1]}',
             pid=os.getpid())
    async with tractor.open_nursery() as an:
        try:
            async with trio.open_nursery() as nursery:
                services = Services(an, nursery)
                _services = services
                with trio.fail_after(STARTUP_TIMEOUT_SECS):
                    await services.ensure(healthd_init(
                        stale_after_secs=stale_after_secs, heartbeat_secs=heartbeat_secs))
                beat_scope = await nursery.start(_own_heartbeat, heartbeat_secs)
                log.info('pikerd.ready', registry=f'{registry_addr[0]}:{registry_addr[1]}')
                try:
                    yield Runtime(name=PIKERD, registry_addr=registry_addr,
                                  is_pikerd=True, services=services)
                finally:
                    beat_scope.cancel()
                    with trio.CancelScope(shield=True):
                        log.info('pikerd.stopping', services=len(services.list()))
                        await services.shutdown(stop_timeout_secs)
                        nursery.cancel_scope.cancel()
        finally:
            _services = None
            with trio.CancelScope(shield=True), trio.move_on_after(stop_timeout_secs):
                await an.cancel()
    log.info('pikerd.stopped')
