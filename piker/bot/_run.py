"""``piker bot run``: start (or join) the tree and run the configured strategies.

This process becomes pikerd when none answers on the registry address,
otherwise it attaches and has the running pikerd start its strategy actors.
It owns the session: on ``--for`` expiry, SIGTERM or Ctrl-C it stops its
strategies first (their stop policy runs), prints a summary and leaves; when
it is pikerd the rest of the tree is then torn down tier by tier.
"""
from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import msgspec
import trio

from ..config import BotCfg
from ..log import get_logger
from ..service import PIKERD, SdNotifier, find_service, open_runtime, request_spawn
from ..service._watchdog import run_watchdog
from ._summary import RunSummary, collect_summary

log = get_logger(__name__)

BOT_INIT = 'piker.bot._actor:bot_init'
EMSD_INIT = 'piker.clearing._ems:emsd_init'
STARTUP_TIMEOUT_SECS = 120.0


def emsd_kwargs(cfg: BotCfg) -> dict[str, Any]:
    return {
        'risk_cfg': msgspec.to_builtins(cfg.risk),
        'paper_cfg': msgspec.to_builtins(cfg.paper),
        'backend_cfgs': msgspec.to_builtins(cfg.brokers),
        'mode': cfg.mode,
    }


async def _stop_service(name: str) -> None:
    from ..service import get_services
    services = get_services()
    if services is not None:
        await services.stop(name)
        return
    async with find_service(PIKERD) as pikerd:
        if pikerd is not None:
            with trio.move_on_after(30):
                await pikerd.run_from_ns('piker.service._rpc', 'stop_service', name=name)


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
) -> RunSummary:
    """Run every ``[[strategies]]`` entry until ``duration_secs`` passes or a
    stop signal arrives; return the session summary."""
    sd = sd or SdNotifier(None)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async with open_runtime(
            f'bot-run.{cfg.name}', registry, loglevel=cfg.log_level,
            heartbeat_secs=cfg.health.heartbeat_secs,
            stale_after_secs=cfg.health.stale_after_secs,
            state_dir=str(state_dir), stop_timeout_secs=cfg.stop_timeout_secs,
        ) as rt:
            names = [f'bot.{s.name}' for s in cfg.strategies]
            async with trio.open_nursery() as nursery:
                stop = trio.Event()

                async def watch_signals() -> None:
                    async for signum in sigs:
                        log.info('bot.signal', signal=signal.Signals(signum).name)
                        stop.set()
                        return

                nursery.start_soon(watch_signals)
                if replay_span is not None:
                    from ..data import maybe_spawn_samplerd
                    async with maybe_spawn_samplerd(clock='driven', start_epoch=replay_span[0]):
                        pass
                with trio.move_on_after(STARTUP_TIMEOUT_SECS) as startup:
                    started = await _start_all(cfg, names, strategies_dir, clock, stop)
                if startup.cancelled_caught:
                    log.error('bot.startup_timeout', secs=STARTUP_TIMEOUT_SECS)
                    started = False
                if started and not stop.is_set():
                    critical = {PIKERD, 'healthd', *names} if rt.is_pikerd else set(names)
                    if rt.services is not None:
                        services = rt.services
                        ever_critical: set[str] = set()

                        def critical_now() -> set[str]:
                            running = {s.name for s in services.list() if s.critical}
                            ever_critical.update(running)
                            # a dead daemon leaves the service list: it stays
                            # critical (so pings stop) until it runs again
                            dead = ever_critical & set(services.deaths)
                            return critical | running | dead
                    else:
                        def critical_now() -> set[str]:
                            return critical
                    sd.ready(status=f'{cfg.mode} trading {", ".join(names)}')
                    log.info('bot.ready', strategies=names, mode=cfg.mode, backend=cfg.backend)
                    watchdog = trio.CancelScope()

                    async def watch() -> None:
                        with watchdog:
                            await run_watchdog(sd, critical_now,
                                               lambda: _status_line(cfg, names))

                    nursery.start_soon(watch)
                    if replay_span is not None:
                        nursery.start_soon(_drive_replay, cfg, replay_span, stop)
                    with trio.move_on_after(duration_secs if duration_secs else math.inf):
                        await stop.wait()
                    watchdog.cancel()
                sd.stopping(status='stopping strategies')
                with trio.CancelScope(shield=True):
                    finals = await _stop_strategies(names)
                    for name in names:
                        await _stop_service(name)
                    final = await collect_summary(cfg, [], strategies=finals)
                nursery.cancel_scope.cancel()
    return final


async def _drive_replay(cfg: BotCfg, span: tuple[int, int], stop: trio.Event) -> None:
    """Advance samplerd's driven clock through the replay files, one step of
    the shortest strategy timeframe per ``step / speed`` seconds; the session
    ends when the files do."""
    from ..data import advance_clock
    step = min(s.timeframe_secs for s in cfg.strategies)
    pause_secs = step / cfg.brokers.replay.speed
    start, end = span
    epoch = start
    log.info('replay.start', start_epoch=start, end_epoch=end, step_secs=step,
             speed=cfg.brokers.replay.speed)
    while epoch < end and not stop.is_set():
        epoch = min(epoch + step, end)
        await advance_clock(epoch)
        await trio.sleep(pause_secs)
    # one more step lets the last bar's increment reach the strategies
    await advance_clock(epoch + step)
    await trio.sleep(max(pause_secs, 0.5))
    log.info('replay.finished', end_epoch=end)
    stop.set()


async def _stop_strategies(names: list[str], timeout_secs: float = 15.0,
                           ) -> list[dict[str, Any]]:
    """Stop every strategy concurrently; each answers with its final summary."""
    finals: dict[str, dict[str, Any]] = {}

    async def stop_one(name: str) -> None:
        with trio.move_on_after(timeout_secs):
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


async def _start_all(cfg: BotCfg, names: list[str], strategies_dir: Path, clock: str,
                     stop: trio.Event) -> bool:
    await request_spawn(EMSD_INIT, emsd_kwargs(cfg))
    bot_cfg = msgspec.to_builtins(cfg)
    ok = True

    async def start_one(i: int) -> None:
        nonlocal ok
        scfg = cfg.strategies[i]
        try:
            await request_spawn(BOT_INIT, {
                'strategy_cfg': msgspec.to_builtins(scfg), 'bot_cfg': bot_cfg,
                'strategies_dir': str(strategies_dir), 'index': i, 'clock': clock,
            })
        except trio.Cancelled:
            raise
        except Exception as err:
            ok = False
            log.error('bot.start_failed', strategy=scfg.name, error=str(err)[-2000:])

    async with trio.open_nursery() as n:
        for i in range(len(cfg.strategies)):
            n.start_soon(start_one, i)
    return ok and not stop.is_set()


async def _status_line(cfg: BotCfg, names: list[str]) -> str:
    summary = await collect_summary(cfg, names, timeout_secs=2.0)
    markets = ' '.join(sorted({m for s in cfg.strategies for m in s.markets}))
    return f'{summary.status_line()} | markets {markets}'

