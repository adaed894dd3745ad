"""Opening the actor runtime: become pikerd, or attach to the running one.

``open_runtime()`` probes the registry address. Nothing answering means this
process becomes **pikerd**: the tractor registry, the service manager
(:class:`Services`) and the health daemon. Otherwise it joins the running tree
as an ordinary root, and daemons it asks for are still started (and owned) by
pikerd.
"""
from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import Any

import msgspec
import tractor
import trio

from ..config import SupervisionCfg, is_loopback_host
from ..log import get_logger, setup_logging
from ._health import healthd_init, run_heartbeat
from ._services import Services

log = get_logger(__name__)

PIKERD = 'pikerd'
STARTUP_TIMEOUT_SECS = 30.0

# modules pikerd exposes over RPC (the minimum: spawn/list/stop services)
PIKERD_MODULES = ['piker.service._rpc']

_services: Services | None = None
_strategy_code: StrategyCode | None = None


class StrategyCode(msgspec.Struct, frozen=True, kw_only=True):
    """Where this tree may load strategy code from: pikerd's own config.

    A bot spec a client sends over RPC must name this ``strategies_dir``; a
    dotted-path strategy must be one of ``modules`` or under piker's daemon
    prefixes. RPC is unauthenticated, so no argument may choose code to run.
    """
    strategies_dir: str | None = None
    modules: list[str] = msgspec.field(default_factory=list)


class RuntimeStartupError(RuntimeError):
    """The runtime could not start; the text names the cause and the fix."""


# a root that escalated (a daemon kept dying) exits with this code
EXIT_ESCALATED = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Runtime:
    """This process's place in the tree, and its one stop request.

    Whatever ends the session (a signal, the end of ``--for``, an escalation,
    no strategy left) goes through :meth:`request_stop`; the first reason wins.
    Shutdown then runs against a single deadline (:meth:`begin_stop`), so
    the steps of a stop never add up past ``stop_timeout_secs``.
    """

    def __init__(self, name: str, registry_addr: tuple[str, int], is_pikerd: bool,
                 services: Services | None = None, stop_timeout_secs: float = 20.0) -> None:
        self.name = name
        self.registry_addr = registry_addr
        self.is_pikerd = is_pikerd
        self.services = services
        self.stop_timeout_secs = stop_timeout_secs
        self.stop_requested = trio.Event()
        self.stop_reason: str | None = None
        self.exit_code = 0
        self.deadline: float | None = None
        # shutdown steps under way: a second signal cuts each one short
        self._stop_scopes: set[trio.CancelScope] = set()

    def request_stop(self, reason: str, exit_code: int = 0) -> None:
        if self.stop_requested.is_set():
            return
        self.stop_reason = reason
        self.exit_code = exit_code
        log.info('runtime.stop_requested', reason=reason, exit_code=exit_code)
        self.stop_requested.set()

    def begin_stop(self) -> float:
        """Start the stop clock (once); returns the trio-time deadline."""
        if self.deadline is None:
            self.deadline = trio.current_time() + self.stop_timeout_secs
        return self.deadline

    def time_left(self) -> float:
        return max(self.begin_stop() - trio.current_time(), 0.0)

    def stop_step(self, timeout_secs: float) -> trio.CancelScope:
        """A scope for one shutdown step: ends at ``timeout_secs``, at the stop
        deadline, or at once on a second signal (:meth:`hurry`), whichever
        comes first. Use as ``with rt.stop_step(secs): ...``."""
        scope = trio.CancelScope(
            deadline=min(trio.current_time() + timeout_secs, self.begin_stop()))
        if self.deadline is not None and self.deadline <= trio.current_time():
            scope.cancel()
        self._stop_scopes.add(scope)
        return scope

    def hurry(self) -> None:
        """The second signal: the stop deadline is now, every step ends."""
        self.deadline = trio.current_time()
        for scope in list(self._stop_scopes):
            scope.cancel()


def get_services() -> Services | None:
    """This process's service manager, when this process is pikerd."""
    return _services


# the name our probes give in the handshake; never registered anywhere
PROBE_NAME = 'piker-probe'


def get_strategy_code() -> StrategyCode | None:
    """pikerd's :class:`StrategyCode`, when this process is pikerd."""
    return _strategy_code


def registry_answers(addr: tuple[str, int], timeout_secs: float = 0.5) -> bool:
    """Whether something accepts TCP connections on the registry address.

    A tractor registry is greeted with a full handshake (see
    :func:`probe_registry`), so probing leaves nothing in its log."""
    return probe_registry(addr, connect_timeout_secs=timeout_secs,
                          handshake_timeout_secs=timeout_secs) != 'none'


def registry_is_tractor(addr: tuple[str, int], timeout_secs: float = 3.0) -> bool:
    """Whether the listener on ``addr`` speaks tractor: a tractor actor sends
    its uid (a length-prefixed msgpack ``[name, uuid]``) as soon as a peer
    connects. Anything else would make ``open_root_actor`` hang forever."""
    return probe_registry(addr, connect_timeout_secs=timeout_secs,
                          handshake_timeout_secs=timeout_secs) == 'tractor'


def probe_registry(addr: tuple[str, int], *, connect_timeout_secs: float = 0.5,
                   handshake_timeout_secs: float = 2.0) -> str:
    """``'none'`` (nothing accepts connections), ``'tractor'`` or ``'foreign'``.

    A peer that connects and leaves without sending its own uid makes the
    registry log ``Channel ... failed to handshake`` at WARNING (once per
    connection: 2-4 per CLI call). So the probe completes the handshake the
    way a real peer does, with our uid, then says goodbye with tractor's
    msg-loop terminate sentinel (``None``) and waits for the registry to
    close its side: it sees an ordinary peer come and go."""
    import struct
    import uuid

    import msgspec
    try:
        sock = socket.create_connection(addr, timeout=connect_timeout_secs)
    except OSError:
        return 'none'
    with sock:
        try:
            sock.settimeout(handshake_timeout_secs)
            (size,) = struct.unpack('<I', _recv_exact(sock, 4))
            if not 0 < size < 4096:
                return 'foreign'
            uid = msgspec.msgpack.decode(_recv_exact(sock, size))
        except (OSError, ValueError, msgspec.DecodeError):
            return 'foreign'
        if not (isinstance(uid, list) and len(uid) == 2 and all(isinstance(x, str) for x in uid)):
            return 'foreign'
        frames = b''
        for msg in ([PROBE_NAME, str(uuid.uuid4())], None):
            raw = msgspec.msgpack.encode(msg)
            frames += struct.pack('<I', len(raw)) + raw
        try:
            sock.sendall(frames)
            sock.shutdown(socket.SHUT_WR)
            # drain until the registry closes: closing first with its
            # goodbye unread would reset the connection under it
            while sock.recv(4096):
                pass
        except OSError:
            pass
    return 'tractor'


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
    handle_signals: bool = False,
    supervision: SupervisionCfg | None = None,
    strategy_code: StrategyCode | None = None,
) -> AsyncIterator[Runtime]:
    """Open this process's root actor on ``registry_addr`` (see module doc).

    ``require_pikerd``: fail if a pikerd already answers (``piker pikerd``).
    ``handle_signals``: SIGTERM/SIGINT/SIGHUP become ``rt.request_stop`` (the
    one place a long-running root handles them); a second signal cuts the
    stop deadline short. As pikerd, a supervision escalation does the same
    with exit code :data:`EXIT_ESCALATED`. On exit as pikerd, daemons are
    stopped tier by tier within what is left of the stop deadline.
    ``strategy_code``: as pikerd, where strategies a client asks for may
    come from (none without it).

    Children always bind loopback; this root binds the registry host, which
    the config allows off loopback only with ``[registry] allow_remote``.
    """
    global _services, _strategy_code
    registry_addr = (registry_addr[0], int(registry_addr[1]))
    _export_env(loglevel, heartbeat_secs, state_dir)
    setup_logging(loglevel, actor=name)
    if not is_loopback_host(registry_addr[0]):
        log.warning('runtime.remote_exposed', host=registry_addr[0], port=registry_addr[1],
                    hint='tractor RPC has no authentication: anyone reaching this address '
                         'can call the tree; set by `[registry] allow_remote = true`')
    with trio.open_signal_receiver(*STOP_SIGNALS) if handle_signals else nullcontext() as sigs:
        attach = registry_answers(registry_addr)
        if attach and not registry_is_tractor(registry_addr):
            raise RuntimeStartupError(
                f'the registry address {registry_addr[0]}:{registry_addr[1]} is held by a '
                'program that is not a piker tree; choose another port (`registry.port` in '
                'bot.toml or `--registry HOST:PORT`)'
            )
        if attach and require_pikerd:
            raise RuntimeStartupError(
                f'a pikerd already answers on {registry_addr[0]}:{registry_addr[1]}; stop it '
                'first or choose another registry port (`registry.port` in bot.toml or '
                '`--registry`)'
            )
        root_name = name if attach else PIKERD
        modules = list(enable_modules or [])
        if not attach:
            modules += PIKERD_MODULES
        try:
            async with tractor.open_root_actor(
                name=root_name, arbiter_addr=registry_addr, loglevel='error',
                enable_modules=modules,
            ) as actor, trio.open_nursery() as watchers:
                setup_logging(loglevel, actor=root_name)
                if not actor.is_arbiter:
                    log.info('runtime.attached',
                             registry=f'{registry_addr[0]}:{registry_addr[1]}')
                    rt = Runtime(root_name, registry_addr, False,
                                 stop_timeout_secs=stop_timeout_secs)
                    if sigs is not None:
                        watchers.start_soon(_watch_signals, sigs, rt)
                    yield rt
                else:
                    _strategy_code = strategy_code
                    rt = Runtime(PIKERD, registry_addr, True,
                                 stop_timeout_secs=stop_timeout_secs)
                    if sigs is not None:
                        watchers.start_soon(_watch_signals, sigs, rt)
                    async with _open_pikerd(rt, heartbeat_secs, stale_after_secs,
                                            supervision) as rt:
                        watchers.start_soon(_watch_escalation, rt)
                        yield rt
                watchers.cancel_scope.cancel()
        finally:
            _services = _strategy_code = None


async def _watch_signals(sigs: Any, rt: Runtime) -> None:
    async for signum in sigs:
        name = signal.Signals(signum).name
        log.info('runtime.signal', signal=name, root=rt.name)
        if rt.stop_requested.is_set():
            log.warning('runtime.signal_again', signal=name,
                        hint='stopping now: what is left of the shutdown is cut short')
            rt.hurry()
            continue
        rt.request_stop(f'signal {name}')


async def _watch_escalation(rt: Runtime) -> None:
    assert rt.services is not None
    await rt.services.escalated.wait()
    rt.request_stop(f'supervision escalated: {rt.services.escalation}', EXIT_ESCALATED)


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
async def _open_pikerd(rt: Runtime, heartbeat_secs: float, stale_after_secs: float,
                       supervision: SupervisionCfg | None) -> AsyncIterator[Runtime]:
    global _services
    registry_addr = rt.registry_addr
    log.info('pikerd.starting', registry=f'{registry_addr[0]}:{registry_addr[1]}',
             pid=os.getpid())
    async with tractor.open_nursery() as an:
        services: Services | None = None
        try:
            async with trio.open_nursery() as nursery:
                services = Services(an, nursery, supervision)
                rt.services = _services = services
                with trio.fail_after(STARTUP_TIMEOUT_SECS):
                    await services.ensure(healthd_init(
                        stale_after_secs=stale_after_secs, heartbeat_secs=heartbeat_secs))
                beat_scope = await nursery.start(_own_heartbeat, heartbeat_secs)
                log.info('pikerd.ready', registry=f'{registry_addr[0]}:{registry_addr[1]}')
                try:
                    yield rt
                finally:
                    beat_scope.cancel()
                    with trio.CancelScope(shield=True):
                        log.info('pikerd.stopping', services=len(services.list()),
                                 secs_left=round(rt.time_left(), 3))
                        with rt.stop_step(rt.time_left()):
                            await services.shutdown(rt.begin_stop())
                        nursery.cancel_scope.cancel()
        finally:
            _services = None
            with trio.CancelScope(shield=True):
                with trio.move_on_after(max(rt.time_left(), 0.5)):
                    await an.cancel(hard_kill=rt.time_left() <= 0)
                if services is not None:
                    _kill_leftovers(services)
    log.info('pikerd.stopped')


def _kill_leftovers(services: Services) -> None:
    """SIGKILL any daemon still alive once the stop deadline passed: leaving
    the actor nursery with a live child would hang forever (tractor wart 4)."""
    from ._proc import pid_alive
    for record in services.records.values():
        pid = record.pid
        if pid and pid_alive(pid):
            log.warning('pikerd.kill_leftover', service=record.name, pid=pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
