"""Trading windows and cron jobs (virtual time via pytest-trio's autojump clock)."""
from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
import trio

from piker.bot._schedule import TradingWindow, next_fire_times, parse_days, run_jobs
from piker.config import ConfigError, CronJobCfg, WindowCfg

NY = 'America/New_York'


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize('when, expected', [
    (utc(2026, 3, 6, 14, 29), False),   # Fri 09:29 EST
    (utc(2026, 3, 6, 14, 30), True),    # Fri 09:30 EST
    (utc(2026, 3, 6, 20, 59), True),    # Fri 15:59 EST
    (utc(2026, 3, 6, 21, 0), False),    # Fri 16:00 EST: end is exclusive
    (utc(2026, 3, 7, 15, 0), False),    # Saturday
    (utc(2026, 3, 9, 13, 29), False),   # Mon 09:29 EDT (after the 03-08 DST change)
    (utc(2026, 3, 9, 13, 30), True),    # Mon 09:30 EDT
    (utc(2026, 3, 9, 19, 59), True),    # Mon 15:59 EDT
    (utc(2026, 3, 9, 20, 0), False),    # Mon 16:00 EDT
])
def test_window_follows_local_time_across_dst(when, expected) -> None:
    window = TradingWindow.from_cfg(WindowCfg())
    assert window.is_open(when) is expected
    assert window.describe() == 'mon-fri 09:30-16:00 America/New_York'


@pytest.mark.parametrize('when, expected', [
    (utc(2026, 3, 8, 22, 0), True),     # Sun 18:00 EDT: session opens
    (utc(2026, 3, 9, 20, 59), True),    # Mon 16:59 EDT: Sunday's session still open
    (utc(2026, 3, 9, 21, 0), False),    # Mon 17:00: daily break
    (utc(2026, 3, 13, 20, 0), True),    # Fri 16:00: Thursday's session
    (utc(2026, 3, 13, 22, 0), False),   # Fri 18:00: no Friday session
    (utc(2026, 3, 14, 12, 0), False),   # Saturday
])
def test_overnight_window_belongs_to_its_start_day(when, expected) -> None:
    window = TradingWindow.from_cfg(WindowCfg(days='sun-thu', start='18:00', end='17:00'))
    assert window.is_open(when) is expected


def test_day_specs_and_end_of_day() -> None:
    assert parse_days('mon-fri') == frozenset(range(5))
    assert parse_days('fri-mon') == frozenset({4, 5, 6, 0})
    assert parse_days('mon, wed,sat') == frozenset({0, 2, 5})
    assert parse_days('*') == frozenset(range(7))
    window = TradingWindow.from_cfg(WindowCfg(days='sat', start='00:00', end='24:00',
                                              timezone='UTC'))
    assert window.is_open(utc(2026, 3, 7, 23, 59)) and not window.is_open(utc(2026, 3, 8, 0, 0))
    with pytest.raises(ValueError, match='aware datetime'):
        window.is_open(datetime(2026, 3, 7, 12, 0))


@pytest.mark.parametrize('cfg, needle', [
    (WindowCfg(days='mon-fry'), "bad day spec 'mon-fry' - at `$.strategies[2].schedule.window.days`"),
    (WindowCfg(start='9:30'), "bad time '9:30' - at `$.strategies[2].schedule.window.start`"),
    (WindowCfg(end='16:60'), "bad time '16:60' - at `$.strategies[2].schedule.window.end`"),
    (WindowCfg(timezone='Mars/Olympus'),
     "unknown timezone 'Mars/Olympus' - at `$.strategies[2].schedule.window.timezone`"),
    (WindowCfg(start='10:00', end='10:00'), 'empty trading window 10:00-10:00'),
])
def test_bad_window_is_config_error_naming_path(cfg, needle) -> None:
    with pytest.raises(ConfigError) as err:
        TradingWindow.from_cfg(cfg, '$.strategies[2].schedule.window')
    assert needle in str(err.value)


def virtual_now(start: datetime, offset_secs: list[float] | None = None):
    """A wall clock that follows trio's (mock) clock from ``start``; ``offset_secs[0]``
    simulates a clock step."""
    base = trio.current_time()
    offset = offset_secs if offset_secs is not None else [0.0]
    return lambda: start + timedelta(seconds=trio.current_time() - base + offset[0])


async def test_week_across_dst_fires_exactly_the_weekday_jobs(autojump_clock) -> None:
    start = utc(2026, 3, 5)  # Thursday 00:00Z; DST starts Sunday 2026-03-08
    now_fn = virtual_now(start)
    jobs = [
        CronJobCfg(action='resume', day_of_week='mon-fri', hour='9', minute='30', timezone=NY),
        CronJobCfg(action='flatten', day_of_week='mon-fri', hour='15', minute='55', timezone=NY),
    ]
    fired: list[tuple[datetime, str]] = []
    wall_start = time.monotonic()
    # fail_after runs on the virtual clock here: it bounds the simulated span
    with trio.fail_after(8 * 86_400):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(
                run_jobs, jobs, lambda job: fired.append((now_fn(), job.action)), now_fn=now_fn,
            ))
            await trio.sleep(7 * 86_400)
            nursery.cancel_scope.cancel()
    expected = []
    for day, open_hour in ((5, 14), (6, 14), (9, 13), (10, 13), (11, 13)):  # EST, then EDT
        expected.append((utc(2026, 3, day, open_hour, 30), 'resume'))
        expected.append((utc(2026, 3, day, open_hour + 6, 55), 'flatten'))
    assert [a for _, a in fired] == [a for _, a in expected]
    for (got, _), (want, _) in zip(fired, expected, strict=True):
        assert timedelta(0) <= got - want < timedelta(seconds=1), (got, want)
    assert time.monotonic() - wall_start < 10


async def test_clock_jump_skips_misfires_then_resumes(autojump_clock, caplog) -> None:
    caplog.set_level(logging.INFO)
    step = [0.0]
    now_fn = virtual_now(utc(2026, 3, 9, 12, 0, 30), step)
    fired: list[datetime] = []

    def fire(job: CronJobCfg) -> None:
        fired.append(now_fn().replace(microsecond=0))
        if len(fired) == 2:
            step[0] = 3600.0  # the wall clock leaps an hour (suspend, NTP step)

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(
                run_jobs, [CronJobCfg(action='cancel_all', minute='*')], fire,
                now_fn=now_fn, grace_secs=30.0,
            ))
            await trio.sleep(240)
            nursery.cancel_scope.cancel()
    assert fired == [utc(2026, 3, 9, 12, 1), utc(2026, 3, 9, 12, 2),
                     utc(2026, 3, 9, 13, 3), utc(2026, 3, 9, 13, 4)]
    misfires = [r.msg for r in caplog.records
                if isinstance(r.msg, dict) and r.msg.get('event') == 'job.misfire']
    assert len(misfires) == 1 and misfires[0]['due'] == '2026-03-09T12:03:00+00:00'


async def test_bad_cron_job_fails_start_naming_its_path() -> None:
    jobs = [CronJobCfg(action='flatten'), CronJobCfg(action='halt', hour='25')]
    with trio.fail_after(5):
        with pytest.raises(ConfigError) as err:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(
                    run_jobs, jobs, lambda job: None, now_fn=lambda: datetime.now(UTC),
                    where='$.strategies[0].schedule.jobs',
                ))
    assert 'bad cron job - at `$.strategies[0].schedule.jobs[1]`' in str(err.value)
    assert 'higher than the maximum value (23)' in str(err.value)


def test_bad_cron_timezone_names_path() -> None:
    with pytest.raises(ConfigError, match=r'unknown timezone .*`\$.strategies\[1\].schedule.jobs\[0\].timezone`'):
        next_fire_times(CronJobCfg(action='halt', timezone='Nowhere/Land'), utc(2026, 1, 1), 1,
                        '$.strategies[1].schedule.jobs[0]')


def test_next_fire_times_lists_upcoming_fires() -> None:
    job = CronJobCfg(action='flatten', day_of_week='fri', hour='15', minute='55', timezone=NY)
    fires = next_fire_times(job, utc(2026, 3, 1), 2)
    assert [f.astimezone(UTC) for f in fires] == [utc(2026, 3, 6, 20, 55), utc(2026, 3, 13, 19, 55)]
