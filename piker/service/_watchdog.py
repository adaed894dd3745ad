"""The semantic systemd watchdog: ``WATCHDOG=1`` only while the tree is healthy.

A timer that pings unconditionally would keep a service with a hung strategy
or a dead feed "alive" forever. Here each ping is earned: healthd's table must
show a fresh heartbeat from every critical actor, and no critical daemon may
be missing. Otherwise the ping is withheld (and the reason logged once per
change), so systemd's ``WatchdogSec`` expires and ``Restart=on-failure``
restarts the unit.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from ..log import get_logger
from ._discovery import find_service
from ._health import health_snapshot
from ._ipc import call_ctx
from ._sdnotify import SdNotifier

log = get_logger(__name__)


async def health_rows(timeout_secs: float = 2.0) -> list[dict[str, Any]] | None:
    """healthd's report, or None when healthd cannot be reached in time."""
    with trio.move_on_after(timeout_secs):
        async with find_service('healthd') as portal:
            if portal is None:
                return None
            return await call_ctx(portal, health_snapshot)
    return None


def unhealthy(rows: list[dict[str, Any]] | None, critical: Iterable[str]) -> list[str]:
    """Why the tree is not healthy (empty: healthy)."""
    if rows is None:
        return ['healthd: unreachable']
    by_name = {r['name']: r for r in rows}
    problems = []
    for name in sorted(set(critical)):
        row = by_name.get(name)
        if row is None:
            problems.append(f'{name}: no heartbeat')
        elif row['state'] != 'ok':
            problems.append(f"{name}: {row['state']} ({row['age_secs']:.1f}s)")
    return problems


def _without_ages(problems: list[str]) -> list[str]:
    # a stale actor's age grows every beat: that alone is no news worth a record
    return [p.split(' (', 1)[0] for p in problems]


async def run_watchdog(
    sd: SdNotifier,
    critical: Callable[[], Iterable[str]],
    status_line: Callable[[], Awaitable[str]] | None = None,
    *,
    period_secs: float | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping systemd every ``period_secs`` (default WATCHDOG_USEC/2) while
    healthy; refresh ``STATUS=`` from ``status_line`` on the same beat."""
    period = period_secs or sd.watchdog_interval_secs or 5.0
    task_status.started()
    last_problems: list[str] = []
    while True:
        beat_start = trio.current_time()
        rows = await health_rows(timeout_secs=max(period / 2, 0.5))
        problems = unhealthy(rows, critical())
        if problems:
            if _without_ages(problems) != _without_ages(last_problems):
                log.error('watchdog.withheld', problems=problems,
                          hint='systemd restarts the unit when WatchdogSec passes without a ping')
        else:
            if last_problems:
                log.info('watchdog.recovered')
            sd.watchdog()
        last_problems = problems
        if status_line is not None:
            try:
                text = await status_line()
            except trio.Cancelled:
                raise
            except Exception as err:  # a status line must never stop the watchdog
                text = f'status unavailable: {type(err).__name__}'
            if problems:
                text = f'UNHEALTHY {"; ".join(problems)} | {text}'
            sd.status(text)
        # the beat's own RPCs count towards the period, so pings keep to it
        await trio.sleep_until(beat_start + period)
