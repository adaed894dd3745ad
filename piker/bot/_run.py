"""``piker bot run``: start (or join) the tree and run the configured strategies.

This process becomes pikerd when none answers on the registry address,
otherwise it attaches and has the running pikerd start its strategy actors.
It owns the session: on ``--for`` expiry, SIGTERM or Ctrl-C it stops its
strategies first (their stop policy runs), prints a summary and leaves; when
it is pikerd the rest of the tree is then torn down tier by tier. All of that
runs against one deadline, ``stop_timeout_secs``.

The session is honest about its outcome (:class:`RunOutcome`): it fails
(exit 1) when no strategy runs or waits at the end of startup, or when every
strategy has failed later; pikerd's supervision escalating makes it exit 3.
A strategy whose market or broker is not reachable yet *waits* (its actor
retries with backoff and shows ``waiting: <reason>``); that is not a failure.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec
import trio

from ..config import BotCfg
from ..log import get_logger
from ..service import (
    EXIT_ESCALATED,
    PIKERD,
    ConfigMismatch,
    Runtime,
    SdNotifier,
    StrategyCode,
    find_service,
    open_runtime,
    registry_answers,
    request_spawn,
)
from ..service._watchdog import run_watchdog
from ._summary import RunSummary, collect_summary, strategy_summary

log = get_logger(__name__)

BOT_INIT = 'piker.bot._actor:bot_init'
EMSD_INIT = 'piker.clearing._ems:emsd_init'
DATAD_INIT = 'piker.data._feed:datad_init'
STARTUP_TIMEOUT_SECS = 120.0
# how often the session checks that some strategy still runs
MONITOR_PERIOD_SECS = 1.0
# shares of the stop deadline: the strategies' own stop policy (on_stop,
# cancels), then ending their actors; the rest of the tree keeps the remainder
# (at least 45 %) to stop in order, whatever the strategies did
STRATEGY_STOP_SHARE = 0.4
STRATEGY_CANCEL_SHARE = 0.15

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

# phases a strategy actor reports (piker.bot._actor.bot_summary()['phase'])
SETTLED = ('running', 'waiting', 'failed', 'stopped')
ALIVE = ('running', 'waiting', 'connecting')


class StartupFailed(RuntimeError):
    """The session cannot start (a config conflict with the running tree)."""


class RunOutcome(msgspec.Struct, frozen=True, kw_only=True):
    summary: RunSummary
    exit_code: int
    reason: str


def emsd_kwargs(cfg: BotCfg) -> dict[str, Any]:
    return {
        'risk_cfg': msgspec.to_builtins(cfg.risk),
        'paper_cfg': msgspec.to_builtins(cfg.paper),
        'backend_cfgs': msgspec.to_builtins(cfg.brokers),
        'mode': cfg.mode,
    }


def bot_kwargs(cfg: BotCfg, index: int, strategies_dir: Path, clock: str) -> dict[str, Any]:
    return {
        'strategy_cfg': msgspec.to_builtins(cfg.strategies[index]),
        'bot_cfg': msgspec.to_builtins(cfg), 'strategies_dir': str(strategies_dir),
        'index': index, 'clock': clock,
    }


def phase_of(summary: dict[str, Any] | None) -> str:
    """A strategy actor's phase; ``'gone'`` when it did not answer (dead, or
    being restarted by pikerd)."""
    if summary is None:
        return 'gone'
    if summary.get('state') == 'failed':
        return 'failed'
    return str(summary.get('phase') or ('running' if summary.get('state') == 'running'
                                        else 'connecting'))


def describe(name: str, summary: dict[str, Any] | None) -> str:
    phase = phase_of(summary)
    why = (summary or {}).get('reason') or (summary or {}).get('error')
    return f'{name}: {phase}' + (f' ({why})' if why else '')


async def run_bot(
    cfg: BotCfg,
    *,
    registry: tuple[str, int],
    strategies_dir: Path,
    state_dir: Path,
    duration_secs: float | None = None,
    clock: str = 'wall',
    sd: SdNotifier | None = None,
    replay_span: tuple[int, int] | None = None,
    strategy_code: StrategyCode | None = None,
) -> RunOutcome:
    """Run every ``[[strategies]]`` entry until ``duration_secs`` passes, a stop
    signal arrives or nothing runs any more; return the outcome."""
    sd = sd or SdNotifier(None)
    names = [f'bot.{s.name}' for s in cfg.strategies]
    async with open_runtime(
        f'bot-run.{cfg.name}', registry, loglevel=cfg.log_level,
        heartbeat_secs=cfg.health.heartbeat_secs,
        stale_after_secs=cfg.health.stale_after_secs,
        state_dir=str(state_dir), stop_timeout_secs=cfg.stop_timeout_secs,
        handle_signals=True,
        supervision=cfg.supervision,
        strategy_code=strategy_code,
    ) as rt:
        async with trio.open_nursery() as nursery:
            started = False
            with trio.CancelScope() as startup:
                nursery.start_soon(_cancel_on_stop, rt, startup)
                with trio.move_on_after(STARTUP_TIMEOUT_SECS) as timer:
                    started = await _start_session(rt, cfg, names, strategies_dir, clock,
                                                   replay_span)
                if timer.cancelled_caught:
                    log.error('bot.startup_timeout', secs=STARTUP_TIMEOUT_SECS)
                    rt.request_stop(f'startup did not finish within {STARTUP_TIMEOUT_SECS:g}s',
                                    EXIT_FAILED)
            if started and not rt.stop_requested.is_set():
                sd.ready(status=f'{cfg.mode} trading {", ".join(names)}')
                log.info('bot.ready', strategies=names, mode=cfg.mode, backend=cfg.backend)
                watchdog = trio.CancelScope()

                async def watch() -> None:
                    with watchdog:
                        await run_watchdog(sd, _critical_fn(rt, names),
                                           lambda: _status_line(cfg, names))

                nursery.start_soon(watch)
                nursery.start_soon(_monitor, rt, names)
                if replay_span is not None:
                    nursery.start_soon(_drive_replay, cfg, replay_span, rt)
                with trio.move_on_after(duration_secs if duration_secs else math.inf):
                    await rt.stop_requested.wait()
                if not rt.stop_requested.is_set():
                    rt.request_stop(f'--for {duration_secs:g}s passed')
                watchdog.cancel()
            sd.stopping(status='stopping strategies')
            deadline = rt.begin_stop()
            final: RunSummary | None = None
            with trio.CancelScope(shield=True):
                finals = await _stop_strategies(
                    names, rt, timeout_secs=rt.stop_timeout_secs * STRATEGY_STOP_SHARE)
                await _stop_services(names, rt, rt.stop_timeout_secs * STRATEGY_CANCEL_SHARE)
                with trio.move_on_after(max(deadline - trio.current_time(), 0.5)):
                    final = await collect_summary(cfg, [], strategies=finals,
                                                  timeout_secs=max(rt.time_left() / 2, 0.5))
            nursery.cancel_scope.cancel()
    if final is None:
        final = RunSummary(name=cfg.name, mode=cfg.mode, strategies=finals, positions=[])
    return RunOutcome(summary=final, exit_code=rt.exit_code, reason=rt.stop_reason or '')


async def _cancel_on_stop(rt: Runtime, scope: trio.CancelScope) -> None:
    await rt.stop_requested.wait()
    scope.cancel()


def _critical_fn(rt: Runtime, names: list[str]) -> Any:
    """What the watchdog needs fresh heartbeats from: pikerd, healthd, the
    strategies and every critical daemon that runs or is being restarted."""
    if rt.services is None:
        return lambda: set(names)
    services = rt.services

    def critical_now() -> set[str]:
        supervised = {n for n, r in services.records.items()
                      if r.critical and r.state in ('running', 'restarting')}
        return {PIKERD, 'healthd', *names, *supervised}

    return critical_now


async def _start_session(rt: Runtime, cfg: BotCfg, names: list[str], strategies_dir: Path,
                         clock: str, replay_span: tuple[int, int] | None) -> bool:
    """Start the daemons the strategies need, then the strategies; wait until
    each has settled (running, waiting or failed). False (and a stop request
    with exit 1 or 2) when none runs or waits."""
    try:
        if replay_span is not None:
            from ..data import maybe_spawn_samplerd
            async with maybe_spawn_samplerd(clock='driven', start_epoch=replay_span[0]):
                pass
        await request_spawn(EMSD_INIT, emsd_kwargs(cfg), match_config=True)
        # the market data of this config, not whatever another bot.toml started
        await request_spawn(DATAD_INIT, {
            'backend': cfg.backend,
            'backend_cfg': msgspec.to_builtins(getattr(cfg.brokers, cfg.backend)),
        }, match_config=True)
    except ConfigMismatch as err:
        log.error('bot.config_conflict', error=str(err))
        rt.request_stop(str(err), EXIT_CONFIG)
        return False
    except Exception as err:
        log.error('bot.start_failed', error=str(err)[-2000:])
        rt.request_stop(f'a daemon could not start: {str(err)[-500:]}', EXIT_FAILED)
        return False
    spawn_errors: dict[str, str] = {}
    conflicts: list[str] = []

    async def start_one(i: int) -> None:
        try:
            await request_spawn(BOT_INIT, bot_kwargs(cfg, i, strategies_dir, clock),
                                match_config=True)
        except trio.Cancelled:
            raise
        except ConfigMismatch as err:
            conflicts.append(str(err))
        except Exception as err:
            spawn_errors[names[i]] = str(err)[-2000:]
            log.error('bot.start_failed', strategy=cfg.strategies[i].name,
                      error=spawn_errors[names[i]])

    async with trio.open_nursery() as n:
        for i in range(len(cfg.strategies)):
            n.start_soon(start_one, i)
    if conflicts:
        log.error('bot.config_conflict', errors=conflicts)
        rt.request_stop('; '.join(conflicts), EXIT_CONFIG)
        return False
    summaries = await _wait_settled([n for n in names if n not in spawn_errors])
    states = {n: describe(n, summaries.get(n)) for n in names if n not in spawn_errors}
    states.update({n: f'{n}: failed to start ({e})' for n, e in spawn_errors.items()})
    alive = [n for n in names if n not in spawn_errors and phase_of(summaries.get(n)) in ALIVE]
    log.info('bot.startup_done', strategies=list(states.values()))
    if not alive:
        reason = 'no strategy is running after startup: ' + '; '.join(states.values())
        log.error('bot.no_strategy_running', reason=reason)
        rt.request_stop(reason, EXIT_FAILED)
        return False
    return True


async def _wait_settled(names: list[str], poll_secs: float = 0.2) -> dict[str, Any]:
    """Each strategy's summary once its phase is settled (or the caller's
    timeout ends the wait: the last answers are what they are)."""
    latest: dict[str, Any] = {}
    pending = set(names)
    while pending:
        for name in sorted(pending):
            summary = await strategy_summary(name, 2.0)
            latest[name] = summary
            if phase_of(summary) in SETTLED:
                pending.discard(name)
        if pending:
            await trio.sleep(poll_secs)
    return latest


async def _monitor(rt: Runtime, names: list[str]) -> None:
    """End the session (exit 1) once every strategy has failed; as an
    attached client, once pikerd is gone."""
    while not rt.stop_requested.is_set():
        await trio.sleep(MONITOR_PERIOD_SECS)
        if rt.stop_requested.is_set():
            return
        if not rt.is_pikerd and not registry_answers(rt.registry_addr):
            rt.request_stop('pikerd is gone: its strategies died with it', EXIT_FAILED)
            return
        summaries = {n: await strategy_summary(n, 2.0) for n in names}
        phases = {n: phase_of(s) for n, s in summaries.items()}
        if all(p in ('failed', 'stopped') for p in phases.values()):
            reason = 'every strategy has stopped: ' + '; '.join(
                describe(n, summaries[n]) for n in names)
            log.error('bot.no_strategy_running', reason=reason)
            rt.request_stop(reason, EXIT_FAILED)
            return


async def _drive_replay(cfg: BotCfg, span: tuple[int, int], rt: Runtime) -> None:
    """Advance samplerd's driven clock through the replay files, one step of
    the shortest strategy timeframe per ``step / speed`` seconds; the session
    ends when the files do."""
    step = min(s.timeframe_secs for s in cfg.strategies)
    pause_secs = step / cfg.brokers.replay.speed
    start, end = span
    epoch = start
    log.info('replay.start', start_epoch=start, end_epoch=end, step_secs=step,
             speed=cfg.brokers.replay.speed)
    while epoch < end and not rt.stop_requested.is_set():
        epoch = min(epoch + step, end)
        await _advance(epoch)
        await trio.sleep(pause_secs)
    # one more step lets the last bar's increment reach the strategies
    await _advance(epoch + step)
    await trio.sleep(max(pause_secs, 0.5))
    log.info('replay.finished', end_epoch=end)
    rt.request_stop('the replay files ended')


async def _advance(epoch: float, timeout_secs: float = 30.0) -> None:
    """One driven-clock step; a samplerd that died mid-call (the call would
    wait forever) is asked again once pikerd has restarted it."""
    from ..data import advance_clock
    while True:
        with trio.move_on_after(timeout_secs):
            try:
                await advance_clock(epoch)
                return
            except trio.Cancelled:
                raise
            except Exception as err:
                log.warning('replay.advance_failed', epoch=epoch, error=str(err)[:300])
                await trio.sleep(1.0)
                continue
        log.warning('replay.advance_timeout', epoch=epoch, secs=timeout_secs)


async def _stop_strategies(names: list[str], rt: Runtime, timeout_secs: float,
                           ) -> list[dict[str, Any]]:
    """Stop every strategy concurrently; each answers with its final summary."""
    finals: dict[str, dict[str, Any]] = {}

    async def stop_one(name: str) -> None:
        with rt.stop_step(timeout_secs):
            try:
                async with find_service(name) as portal:
                    if portal is not None:
                        finals[name] = await portal.run_from_ns(
                            'piker.bot._actor', 'stop_strategy')
            except trio.Cancelled:
                raise
            except Exception as err:
                log.warning('bot.stop_failed', service=name, error=repr(err)[:500])

    async with trio.open_nursery() as n:
        for name in names:
            n.start_soon(stop_one, name)
    return [finals[n] for n in names if n in finals]


async def _stop_services(names: list[str], rt: Runtime, timeout_secs: float) -> None:
    """Stop this session's strategy actors, all at once, within ``timeout_secs``
    (those that do not exit by then are killed)."""
    services = rt.services
    if services is not None:
        # a second signal cuts this short too: each stop then kills at once
        timeout_secs = min(timeout_secs, rt.time_left())
        async with trio.open_nursery() as n:
            for name in names:
                n.start_soon(services.stop, name, timeout_secs)
        return
    with rt.stop_step(timeout_secs):
        async with find_service(PIKERD) as pikerd:
            if pikerd is None:
                return

            async def stop_one(name: str) -> None:
                await pikerd.run_from_ns('piker.service._rpc', 'stop_service', name=name)

            async with trio.open_nursery() as n:
                for name in names:
                    n.start_soon(stop_one, name)


async def _status_line(cfg: BotCfg, names: list[str]) -> str:
    summary = await collect_summary(cfg, names, timeout_secs=2.0)
    markets = ' '.join(sorted({m for s in cfg.strategies for m in s.markets}))
    waiting = [describe(s.get('strategy', '?'), s) for s in summary.strategies
               if phase_of(s) != 'running']
    extra = f' | {"; ".join(waiting)}' if waiting else ''
    return f'{summary.status_line()} | markets {markets}{extra}'


__all__ = ['run_bot', 'RunOutcome', 'EXIT_OK', 'EXIT_FAILED', 'EXIT_CONFIG', 'EXIT_ESCALATED']
