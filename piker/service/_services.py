"""pikerd's service manager: starts daemons, owns their lives, restarts them.

One :class:`Services` instance lives in the pikerd process (created by the
runtime, never a class-level singleton). Every daemon is a ``start_actor``
child of pikerd's actor nursery kept alive by a *lifetime context*: pikerd
opens the kind's ``_setup_persistent_<kind>`` fixture and holds it open in a
task of its own nursery, so the daemon outlives whichever client asked for it.

Supervision follows OTP's one-for-one model. pikerd keeps the spec (and so the
config) of every daemon it started; when one exits without being asked to, it
is started again from that spec after a backoff that doubles with each recent
death. More than ``max_restarts`` deaths of one daemon within ``window_secs``
*escalate*: :attr:`Services.escalated` is set and the runtime ends the root
with a non-zero exit, so systemd restarts the whole unit from clean state.
"""
from __future__ import annotations

import builtins
import collections
import os
import signal
from collections import defaultdict
from typing import Any, Literal

import msgspec
import tractor
import trio

from ..config import SupervisionCfg
from ..log import get_logger
from ._proc import pid_alive, wait_pid_exit
from ._spec import DaemonSpec, config_diff, import_path

log = get_logger(__name__)

START_TIMEOUT_SECS = 30.0
CHILD_BIND_ADDR = ('127.0.0.1', 0)
STOP_TIMEOUT_SECS = 5.0

ServiceState = Literal['running', 'restarting', 'failed', 'stopped']


def restart_delay_secs(policy: SupervisionCfg, recent_deaths: int) -> float:
    """The backoff before restarting a daemon with ``recent_deaths`` deaths
    within the policy's window: doubling from ``backoff_secs``."""
    return min(policy.backoff_secs * 2 ** max(recent_deaths - 1, 0), policy.max_backoff_secs)


class ServiceInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str
    pid: int
    addr: tuple[str, int]
    tier: int
    critical: bool
    started: Any = None
    restarts: int = 0


class ServiceRecord(msgspec.Struct, kw_only=True):
    """What pikerd remembers of one daemon across its incarnations."""
    name: str
    kind: str
    state: ServiceState = 'running'
    pid: int | None = None
    restarts: int = 0
    last_exit: str | None = None
    critical: bool = True
    tier: int = 0


class SpawnError(RuntimeError):
    """A daemon whose lifetime fixture failed before it was up; the text holds
    the remote error's last line."""


class ConfigMismatch(RuntimeError):
    """A daemon asked for with a config other than the one it runs with."""


class Escalation(RuntimeError):
    """A daemon kept dying: the restart intensity was exceeded."""


def remote_error_line(err: tractor.RemoteActorError) -> str:
    """The ``Type: message`` line a remote traceback ends with."""
    tb = (err.msgdata or {}).get('tb_str', '') or str(err)
    lines = [ln.strip() for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else repr(err)


class _Exited(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Running:
    """Book-keeping for one live incarnation of a daemon (pikerd-internal)."""

    def __init__(self, spec: DaemonSpec, info: ServiceInfo, portal: tractor.Portal,
                 scope: trio.CancelScope) -> None:
        self.spec = spec
        self.info = info
        self.portal = portal
        self.scope = scope
        self.stopping = False
        self.exited = trio.Event()


class Services:
    """Start, find, supervise and stop daemons under pikerd."""

    def __init__(self, actor_nursery: tractor.ActorNursery, nursery: trio.Nursery,
                 policy: SupervisionCfg | None = None) -> None:
        self._an = actor_nursery
        self._nursery = nursery
        self.policy = policy or SupervisionCfg()
        self._locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self._running: dict[str, _Running] = {}
        # every daemon pikerd ever started: its latest spec, restart history
        self._specs: dict[str, DaemonSpec] = {}
        self.records: dict[str, ServiceRecord] = {}
        self._deaths: dict[str, collections.deque[float]] = defaultdict(collections.deque)
        self._closing = False
        self.escalated = trio.Event()
        self.escalation: str | None = None

    # -- queries --------------------------------------------------------------
    def list(self) -> list[ServiceInfo]:
        return [r.info for r in self._running.values()]

    def get(self, name: str) -> ServiceInfo | None:
        run = self._running.get(name)
        return run.info if run else None

    @property
    def deaths(self) -> builtins.list[str]:
        """Names of daemons that died unasked and do not run (yet) again."""
        return [n for n, r in self.records.items() if r.state in ('restarting', 'failed')]

    # -- start ----------------------------------------------------------------
    async def ensure(self, spec: DaemonSpec, *, match_config: bool = False) -> ServiceInfo:
        """Find-or-spawn ``spec.name``; concurrent callers get the same daemon.

        A running daemon whose config differs from ``spec``'s raises
        :class:`ConfigMismatch` naming the keys when ``match_config``, and is
        logged otherwise (the caller attaches to what runs).

        Shielded: a requesting client that goes away mid-spawn must not take the
        half-started daemon with it.
        """
        with trio.CancelScope(shield=True):
            async with self._locks[spec.name]:
                if self._closing:
                    raise SpawnError(f'{spec.name}: not started, pikerd is stopping')
                run = self._running.get(spec.name)
                if run is not None and not pid_alive(run.info.pid):
                    # died a moment ago: let its supervisor book the death first
                    with trio.move_on_after(STOP_TIMEOUT_SECS):
                        await run.exited.wait()
                    run = self._running.get(spec.name)
                if run is not None and not run.stopping:
                    _check_config(run.spec, spec, match_config, 'already runs')
                    return run.info
                owned = self._specs.get(spec.name)
                record = self.records.get(spec.name)
                if owned is not None and record is not None and record.state == 'restarting':
                    # died and due for a restart: pikerd's spec wins over the asker's
                    _check_config(owned, spec, match_config, 'is being restarted')
                    spec = owned
                with trio.fail_after(START_TIMEOUT_SECS):
                    info = await self._nursery.start(self._supervise, spec)
            if self._closing:
                # shutdown began while this one was starting: it passed it by
                await self.stop(spec.name)
                raise SpawnError(f'{spec.name}: stopped again, pikerd is stopping')
            return info

    async def _supervise(self, spec: DaemonSpec, *,
                         task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run one incarnation of ``spec``'s daemon until it exits."""
        fixture = import_path(spec.fixture)
        portal = await self._an.start_actor(
            spec.name,
            # loopback whatever the registry host: tractor RPC has no authentication
            bind_addr=CHILD_BIND_ADDR,
            enable_modules=spec.enable_modules,
            infect_asyncio=spec.infect_asyncio,
        )
        run: _Running | None = None
        exit_reason = 'its lifetime context ended'
        started = False
        try:
            with trio.CancelScope() as scope:
                async with portal.open_context(fixture, **spec.fixture_kwargs) as (ctx, first):
                    first = first or {}
                    record = self._book_start(spec, int(first['pid']))
                    info = ServiceInfo(
                        name=spec.name, kind=spec.kind, pid=int(first['pid']),
                        addr=tuple(portal.channel.raddr), tier=spec.tier,
                        critical=spec.critical, started=first, restarts=record.restarts,
                    )
                    run = _Running(spec, info, portal, scope)
                    self._running[spec.name] = run
                    log.info('service.started', service=spec.name, pid=info.pid,
                             addr=f'{info.addr[0]}:{info.addr[1]}', restarts=record.restarts)
                    task_status.started(info)
                    started = True
                    # leave by raising: a normal exit of open_context would
                    # wait for the dead callee's return forever (tractor wart 7)
                    raise _Exited(await wait_pid_exit(info.pid))
        except _Exited as exited:
            exit_reason = exited.reason
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
            exit_reason = f'crashed: {reason}'
            log.error('service.crashed', service=spec.name, error=reason,
                      remote_tb=err.msgdata.get('tb_str', '')[-4000:])
            if not run.stopping:
                # the old process must be gone before a new one is started
                # (its ledger locks, its registry name)
                await _end_process(portal, run.info.pid)
        except BaseException:
            if not started:
                # cancelled or failed before `started` (a start timeout): nobody
                # else knows this actor, so end it rather than leak it under its name
                await _end_process(portal, None)
            raise
        finally:
            booked = self.records.get(spec.name)
            if (booked is not None and run is not None and booked.pid == run.info.pid
                    and not pid_alive(run.info.pid)):
                booked.pid = None
        if run is not None:
            self._running.pop(spec.name, None)
            if not run.stopping:
                with trio.CancelScope(shield=True):
                    await self._forget(portal)
                self._on_death(spec, run.info.pid, exit_reason)
            run.exited.set()

    def _book_start(self, spec: DaemonSpec, pid: int) -> ServiceRecord:
        self._specs[spec.name] = spec
        record = self.records.get(spec.name)
        if record is None:
            record = self.records[spec.name] = ServiceRecord(
                name=spec.name, kind=spec.kind, critical=spec.critical, tier=spec.tier)
        elif record.state in ('restarting', 'failed'):
            record.restarts += 1
        record.state = 'running'
        record.pid = pid
        return record

    def _on_death(self, spec: DaemonSpec, pid: int, reason: str) -> None:
        """Book an unasked exit; restart after a backoff, or escalate."""
        record = self.records[spec.name]
        record.last_exit = reason
        record.pid = None
        now = trio.current_time()
        deaths = self._deaths[spec.name]
        deaths.append(now)
        while deaths and deaths[0] < now - self.policy.window_secs:
            deaths.popleft()
        if self._closing:
            record.state = 'stopped'
            return
        log.error('service.died', service=spec.name, pid=pid, reason=reason,
                  recent_deaths=len(deaths), restarts=record.restarts)
        if len(deaths) > self.policy.max_restarts:
            record.state = 'failed'
            self._escalate(
                f'{spec.name} died {len(deaths)} times within {self.policy.window_secs:g}s '
                f'(last: {reason}); the restart limit is {self.policy.max_restarts} '
                '([supervision] max_restarts / window_secs in bot.toml)')
            return
        record.state = 'restarting'
        delay = restart_delay_secs(self.policy, len(deaths))
        log.warning('service.restarting', service=spec.name, in_secs=delay,
                    restart=record.restarts + 1)
        self._nursery.start_soon(self._restart, spec.name, delay)

    async def _restart(self, name: str, delay_secs: float) -> None:
        await trio.sleep(delay_secs)
        record = self.records[name]
        if self._closing or record.state != 'restarting':
            return
        if name in self._running:
            # a client's find-or-spawn brought it back meanwhile
            return
        try:
            info = await self.ensure(self._specs[name])
        except trio.Cancelled:
            raise
        except Exception as err:
            if self._closing:
                return
            self._on_death(self._specs[name], 0, f'restart failed: {err}')
            return
        log.warning('service.restarted', service=name, pid=info.pid, restarts=info.restarts)

    def _escalate(self, reason: str) -> None:
        if self.escalated.is_set():
            return
        self.escalation = reason
        log.critical('service.escalated', reason=reason,
                     hint='the root exits non-zero; systemd restarts the unit')
        self.escalated.set()

    async def _forget(self, portal: tractor.Portal) -> None:
        """Drop a dead actor's registry entry so lookups don't connect to a corpse."""
        actor = tractor.current_actor()
        uid = portal.channel.uid
        if getattr(actor, 'is_arbiter', False) and uid is not None:
            try:
                await actor.unregister_actor(uid)  # type: ignore[attr-defined]
            except KeyError:
                pass  # it exited cleanly (a crash we cancelled) and unregistered itself

    # -- stop -----------------------------------------------------------------
    async def stop(self, name: str, timeout_secs: float = STOP_TIMEOUT_SECS) -> bool:
        """Cancel the daemon's lifetime fixture (its cleanup runs), then the actor.

        A stopped daemon is not restarted."""
        record = self.records.get(name)
        if record is not None and record.state != 'running':
            record.state = 'stopped'
        run = self._running.get(name)
        if run is None:
            return False
        run.stopping = True
        if record is not None:
            record.state = 'stopped'
        pid = run.info.pid
        with trio.move_on_after(max(timeout_secs, 0)) as cs:
            run.scope.cancel()
            if pid_alive(pid):
                await run.portal.cancel_actor()
            await wait_pid_exit(pid)
            await run.exited.wait()
        if cs.cancelled_caught and pid_alive(pid):
            log.warning('service.kill', service=name, pid=pid,
                        reason=f'did not exit within {timeout_secs:.1f}s')
            _kill(pid)
        self._running.pop(name, None)
        log.info('service.stopped', service=name, pid=pid)
        return True

    async def shutdown(self, deadline: float) -> None:
        """Stop every daemon, tier by tier (strategies first, health last),
        all within one ``deadline`` (trio time): what is left at it is killed."""
        self._closing = True
        for tier in sorted({r.spec.tier for r in self._running.values()}):
            names = [n for n, r in self._running.items() if r.spec.tier == tier]
            left = deadline - trio.current_time()
            async with trio.open_nursery() as n:
                for name in names:
                    n.start_soon(self.stop, name, left)


def _check_config(running: DaemonSpec, asked: DaemonSpec, strict: bool, what: str) -> None:
    """Raise :class:`ConfigMismatch` (``strict``) or log when configs differ."""
    diff = config_diff(running.config, asked.config)
    if diff and strict:
        raise ConfigMismatch(
            f'{running.name} {what} with another config: {"; ".join(diff)} '
            '(stop the running tree, or use the config it was started with)')
    if diff:
        log.warning('service.config_differs', service=running.name, keys=diff,
                    hint='the daemon keeps the config it was started with')


async def _end_process(portal: tractor.Portal, pid: int | None) -> None:
    """Cancel an actor and wait (bounded) for its process to exit; SIGKILL it
    when it does not."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(STOP_TIMEOUT_SECS / 2):
            await portal.cancel_actor()
        if pid is not None:
            with trio.move_on_after(STOP_TIMEOUT_SECS):
                await wait_pid_exit(pid)
            if pid_alive(pid):
                _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
