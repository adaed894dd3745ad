"""pikerd's service manager: starts daemons, owns their lives, notices deaths.

One :class:`Services` instance lives in the pikerd process (created by the
runtime, never a class-level singleton). Every daemon is a ``start_actor``
child of pikerd's actor nursery kept alive by a *lifetime context*: pikerd
opens the kind's ``_setup_persistent_<kind>`` fixture and holds it open in a
task of its own nursery, so the daemon outlives whichever client asked for it.
"""
from __future__ import annotations

import os
import signal
from collections import defaultdict
from typing import Any

import msgspec
import tractor
import trio

from ..log import get_logger
from ._proc import pid_alive, wait_pid_exit
from ._spec import DaemonSpec, import_path

log = get_logger(__name__)

START_TIMEOUT_SECS = 30.0
STOP_TIMEOUT_SECS = 5.0


class ServiceInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str
    pid: int
    addr: tuple[str, int]
    tier: int
    critical: bool
    started: Any = None


class SpawnError(RuntimeError):
    """A daemon whose lifetime fixture failed before it was up; the text holds
    the remote error's last line."""


def remote_error_line(err: tractor.RemoteActorError) -> str:
    """The ``Type: message`` line a remote traceback ends with."""
    tb = (err.msgdata or {}).get('tb_str', '') or str(err)
    lines = [ln.strip() for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else repr(err)


class ServiceDied(Exception):
    """A daemon's process exited without pikerd asking it to."""


class _Running:
    """Book-keeping for one live daemon (pikerd-internal)."""

    def __init__(self, spec: DaemonSpec, info: ServiceInfo, portal: tractor.Portal,
                 scope: trio.CancelScope) -> None:
        self.spec = spec
        self.info = info
        self.portal = portal
        self.scope = scope
        self.stopping = False
        self.exited = trio.Event()


class Services:
    """Start, find and stop daemons under pikerd."""

    def __init__(self, actor_nursery: tractor.ActorNursery, nursery: trio.Nursery) -> None:
        self._an = actor_nursery
        self._nursery = nursery
        self._locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self._running: dict[str, _Running] = {}
        self.deaths: list[str] = []

    # -- queries --------------------------------------------------------------
    def list(self) -> list[ServiceInfo]:
        return [r.info for r in self._running.values()]

    def get(self, name: str) -> ServiceInfo | None:
        run = self._running.get(name)
        return run.info if run else None

    # -- start ----------------------------------------------------------------
    async def ensure(self, spec: DaemonSpec) -> ServiceInfo:
        """Find-or-spawn ``spec.name``; concurrent callers get the same daemon.

        Shielded: a requesting client that goes away mid-spawn must not take the
        half-started daemon with it.
        """
        with trio.CancelScope(shield=True):
            async with self._locks[spec.name]:
                run = self._running.get(spec.name)
                if run is not None and not pid_alive(run.info.pid):
                    # died a moment ago: let its supervisor unregister it first
                    with trio.move_on_after(STOP_TIMEOUT_SECS):
                        await run.exited.wait()
                    run = self._running.get(spec.name)
                if run is not None and not run.stopping:
                    return run.info
                with trio.fail_after(START_TIMEOUT_SECS):
                    return await self._nursery.start(self._supervise, spec)

    async def _supervise(self, spec: DaemonSpec, *,
                         task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        fixture = import_path(spec.fixture)
        portal = await self._an.start_actor(
            spec.name,
            enable_modules=spec.enable_modules,
            infect_asyncio=spec.infect_asyncio,
        )
        run: _Running | None = None
        try:
            with trio.CancelScope() as scope:
                async with portal.open_context(fixture, **spec.fixture_kwargs) as (ctx, first):
                    first = first or {}
                    info = ServiceInfo(
                        name=spec.name, kind=spec.kind, pid=int(first['pid']),
                        addr=tuple(portal.channel.raddr), tier=spec.tier,
                        critical=spec.critical, started=first,
                    )
                    run = _Running(spec, info, portal, scope)
                    self._running[spec.name] = run
                    log.info('service.started', service=spec.name, pid=info.pid,
                             addr=f'{info.addr[0]}:{info.addr[1]}')
                    task_status.started(info)
                    await wait_pid_exit(info.pid)
                    if not run.stopping:
                        raise ServiceDied(spec.name)
        except ServiceDied:
            pass
        except tractor.ContextCancelled:
            if run is None or not run.stopping:
                raise
        except tractor.RemoteActorError as err:
            reason = remote_error_line(err)
            if run is None:
                # failed while starting: nobody else holds this actor, end it
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT_SECS):
                    await portal.cancel_actor()
                log.error('service.start_failed', service=spec.name, error=reason)
                raise SpawnError(f'{spec.name} failed to start: {reason}') from None
            log.error('service.crashed', service=spec.name, error=reason,
                      remote_tb=err.msgdata.get('tb_str', '')[-4000:])
            if not run.stopping:
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT_SECS):
                    await portal.cancel_actor()
        if run is not None:
            self._running.pop(spec.name, None)
            if not run.stopping:
                self.deaths.append(spec.name)
                log.error('service.died', service=spec.name, pid=run.info.pid,
                          hint='the daemon exited unexpectedly; '
                          'it will be started again on next use')
                with trio.CancelScope(shield=True):
                    await self._forget(portal)
            run.exited.set()

    async def _forget(self, portal: tractor.Portal) -> None:
        """Drop a dead actor's registry entry so lookups don't connect to a corpse."""
        actor = tractor.current_actor()
        uid = portal.channel.uid
        if getattr(actor, 'is_arbiter', False) and uid is not None:
            await actor.unregister_actor(uid)  # type: ignore[attr-defined]

    # -- stop -----------------------------------------------------------------
    async def stop(self, name: str, timeout_secs: float = STOP_TIMEOUT_SECS) -> bool:
        """Cancel the daemon's lifetime fixture (its cleanup runs), then the actor."""
        run = self._running.get(name)
        if run is None:
            return False
        run.stopping = True
        pid = run.info.pid
        with trio.move_on_after(timeout_secs) as cs:
            run.scope.cancel()
            if pid_alive(pid):
                await run.portal.cancel_actor()
            await wait_pid_exit(pid)
            await run.exited.wait()
        if cs.cancelled_caught and pid_alive(pid):
            log.warning('service.kill', service=name, pid=pid,
                        reason=f'did not exit within {timeout_secs}s')
            _kill(pid)
        self._running.pop(name, None)
        log.info('service.stopped', service=name, pid=pid)
        return True

    async def shutdown(self, timeout_secs: float) -> None:
        """Stop every daemon, tier by tier (strategies first, health last)."""
        deadline = trio.current_time() + timeout_secs
        for tier in sorted({r.spec.tier for r in self._running.values()}):
            names = [n for n, r in self._running.items() if r.spec.tier == tier]
            left = max(deadline - trio.current_time(), 0.5)
            async with trio.open_nursery() as n:
                for name in names:
                    n.start_soon(self.stop, name, left)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
