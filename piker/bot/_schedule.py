"""Trading windows and cron jobs, evaluated inside trio.

Only APScheduler's *triggers* are used, as a pure calendar: its schedulers run
jobs on threads or asyncio, a second concurrency model we do not want inside a
trio actor. :func:`run_jobs` is a small trio loop around
``CronTrigger.get_next_fire_time`` with an injectable clock, so whole weeks
(DST changes included) can be tested deterministically under a ``MockClock``.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import trio
from apscheduler.triggers.cron import CronTrigger

from piker.config import ConfigError, CronJobCfg, WindowCfg
from piker.log import get_logger

log = get_logger(__name__)

DAY_NAMES = ('mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun')
_HHMM = re.compile(r'^(\d{2}):(\d{2})$')

# a wall-clock step (NTP, suspend) is noticed within this many seconds
MAX_SLEEP_SECS = 30.0
# a job whose fire time passed longer ago than this is skipped, not run late
DEFAULT_GRACE_SECS = 60.0


def _zone(name: str, where: str, fix: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f'unknown timezone {name!r} - at `{where}.timezone` '
            f"(use an IANA name such as 'America/New_York' or 'UTC'; {fix})"
        ) from None


def parse_days(spec: str, where: str = '$.window') -> frozenset[int]:
    """``'mon-fri'``, ``'mon,wed,fri'``, ``'fri-mon'`` (wraps) or ``'*'`` as
    weekday numbers (Monday = 0)."""
    text = spec.strip().lower()
    if text in ('*', 'all'):
        return frozenset(range(7))
    days: set[int] = set()
    for item in text.split(','):
        first, _, last = item.strip().partition('-')
        ends = [first, last] if last else [first]
        bad = [d for d in ends if d not in DAY_NAMES]
        if bad or not item.strip():
            raise ConfigError(
                f'bad day spec {spec!r} - at `{where}.days`: expected day names '
                f"{', '.join(DAY_NAMES)} as a list or range like 'mon-fri' or 'mon,wed', "
                f'got {item.strip()!r} (fix it in bot.toml)'
            )
        lo = DAY_NAMES.index(first)
        hi = DAY_NAMES.index(last) if last else lo
        span = (hi - lo) % 7
        days.update((lo + k) % 7 for k in range(span + 1))
    return frozenset(days)


def _parse_hhmm(text: str, where: str, allow_24: bool = False) -> time | None:
    """``None`` stands for ``24:00`` (end of day)."""
    m = _HHMM.match(text.strip())
    if m:
        hh, mm = int(m[1]), int(m[2])
        if allow_24 and (hh, mm) == (24, 0):
            return None
        if hh < 24 and mm < 60:
            return time(hh, mm)
    raise ConfigError(
        f"bad time {text!r} - at `{where}`: expected 'HH:MM' on a 24 h clock "
        f"(e.g. '09:30'{', or 24:00 for end of day' if allow_24 else ''}; fix it in bot.toml)"
    )


class TradingWindow:
    """When a strategy may open new orders: days and a local-time session.

    Times are wall-clock times in ``tz``; a session whose end is before its start
    runs overnight and belongs to the day it starts on (``sun-thu 18:00-17:00``).
    """

    def __init__(
        self, days: frozenset[int], start: time, end: time | None, tz: ZoneInfo,
        spec: WindowCfg | None = None,
    ) -> None:
        self.days = days
        self.start = start
        self.end = end  # None: midnight at the end of the day
        self.tz = tz
        self._spec = spec

    @classmethod
    def from_cfg(cls, cfg: WindowCfg, where: str = '$.schedule.window') -> TradingWindow:
        fix = f'fix `{where}` in bot.toml'
        days = parse_days(cfg.days, where)
        start = _parse_hhmm(cfg.start, f'{where}.start')
        end = _parse_hhmm(cfg.end, f'{where}.end', allow_24=True)
        if start == end:
            raise ConfigError(
                f'empty trading window {cfg.start}-{cfg.end} - at `{where}`: start and end '
                "must differ (use start = '00:00', end = '24:00' for the whole day)"
            )
        assert start is not None
        return cls(days, start, end, _zone(cfg.timezone, where, fix), spec=cfg)

    def is_open(self, dt_utc: datetime) -> bool:
        if dt_utc.tzinfo is None:
            raise ValueError(f'TradingWindow.is_open needs an aware datetime, got naive {dt_utc!r}')
        local = dt_utc.astimezone(self.tz)
        day, now = local.weekday(), local.time()
        if self.end is None:
            return day in self.days and now >= self.start
        if self.start < self.end:
            return day in self.days and self.start <= now < self.end
        # overnight: the evening part today, or the morning part of yesterday's session
        return (day in self.days and now >= self.start) or (
            (day - 1) % 7 in self.days and now < self.end
        )

    def describe(self) -> str:
        if self._spec is not None:
            days = self._spec.days
        else:
            days = ','.join(DAY_NAMES[d] for d in sorted(self.days))
        end = '24:00' if self.end is None else self.end.strftime('%H:%M')
        return f'{days} {self.start.strftime("%H:%M")}-{end} {self.tz.key}'

    def __repr__(self) -> str:
        return f'TradingWindow({self.describe()!r})'


def cron_trigger(job: CronJobCfg, where: str = '$.schedule.jobs[0]') -> CronTrigger:
    """The trigger for ``job``; bad fields or zones give a ConfigError naming ``where``."""
    tz = _zone(job.timezone, where, f'fix `{where}` in bot.toml')
    try:
        return CronTrigger(
            day_of_week=job.day_of_week, hour=job.hour, minute=job.minute,
            second=job.second, timezone=tz,
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f'bad cron job - at `{where}`: {err} (crontab fields day_of_week, hour, '
            "minute, second as APScheduler's CronTrigger takes them, e.g. hour = '9-16', "
            "minute = '*/5'; fix it in bot.toml)"
        ) from None


async def run_jobs(
    jobs: list[CronJobCfg],
    fire: Callable[[CronJobCfg], None],
    *,
    now_fn: Callable[[], datetime],
    grace_secs: float = DEFAULT_GRACE_SECS,
    where: str = '$.schedule.jobs',
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``fire(job)`` at each of the jobs' fire times, forever.

    Sleeps in chunks of at most ``MAX_SLEEP_SECS`` and re-reads ``now_fn`` (aware
    datetimes) each time, so clock steps are noticed. A fire time found more than
    ``grace_secs`` in the past (suspend, clock jump) is skipped and logged as
    ``job.misfire``. Triggers are built before ``started()``, so bad jobs fail
    ``nursery.start``.
    """
    triggers = [cron_trigger(job, f'{where}[{i}]') for i, job in enumerate(jobs)]
    now = _aware(now_fn())
    next_fire = [t.get_next_fire_time(None, now) for t in triggers]
    task_status.started()
    while True:
        now = _aware(now_fn())
        for i, due in enumerate(next_fire):
            if due is None or due > now:
                continue
            late_secs = (now - due).total_seconds()
            if late_secs > grace_secs:
                log.warning(
                    'job.misfire', action=jobs[i].action, due=due.isoformat(),
                    late_secs=round(late_secs, 3), grace_secs=grace_secs,
                )
                next_fire[i] = triggers[i].get_next_fire_time(None, now)
                continue
            log.info('job.fire', action=jobs[i].action, due=due.isoformat(),
                     late_secs=round(late_secs, 3))
            fire(jobs[i])
            next_fire[i] = triggers[i].get_next_fire_time(due, now)
        pending = [d for d in next_fire if d is not None]
        if not pending:
            await trio.sleep_forever()
        wait_secs = (min(pending) - now).total_seconds()
        # never a zero sleep: a fire time a float-rounding hair ahead must not spin
        await trio.sleep(min(max(wait_secs, 1e-3), MAX_SLEEP_SECS))


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError(f'run_jobs: now_fn must return an aware datetime, got naive {now!r}')
    return now


def next_fire_times(
    job: CronJobCfg, after: datetime, count: int, where: str = '$.schedule.jobs[0]',
) -> list[datetime]:
    """The next ``count`` fire times of ``job`` after ``after`` (for ``bot check``)."""
    trigger = cron_trigger(job, where)
    out: list[datetime] = []
    prev = None
    now = after + timedelta(microseconds=1)
    for _ in range(count):
        nxt = trigger.get_next_fire_time(prev, now)
        if nxt is None:
            break
        out.append(nxt)
        prev = now = nxt
    return out
