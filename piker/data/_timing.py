"""Sampling arithmetic: periods, boundaries and where a bar lives in a buffer.

Pure functions shared by samplerd and datad so both compute the same answer.

Buffer layout: every OHLC buffer of period ``p`` has one row per period,
contiguous in time, and the row of the bar opening at ``t`` sits at::

    position(t) = HISTORY_ROWS + (t - origin_p) // p

where ``origin_p`` is samplerd's origin (a UTC midnight, floored to ``p``).
So every buffer of a period, in every datad of the tree, holds a given bar at
the same position, and samplerd can broadcast that position as the
increment's ``index`` without asking anyone.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator

MIN_PERIOD_SECS = 1
MAX_PERIOD_SECS = 86_400
DAY_SECS = 86_400

# rows kept in front of the origin for history loaded at subscription
HISTORY_ROWS = 100_000
# live rows after the origin: at least this many, or 90 days of bars;
# segments are sparse, so unused rows cost no memory
MIN_LIVE_ROWS = 100_000
LIVE_SPAN_SECS = 90 * DAY_SECS

_TIMEFRAME_RE = re.compile(r'(\d+)\s*([smhd]?)')
_UNIT_SECS = {'': 1, 's': 1, 'm': 60, 'h': 3600, 'd': 86_400}


class PeriodError(ValueError):
    """A sampling period that samplerd cannot serve."""


def check_period(period_secs: object) -> int:
    """``period_secs`` as an int in 1 .. 86400, or a :class:`PeriodError`."""
    if isinstance(period_secs, bool) or not isinstance(period_secs, int):
        raise PeriodError(
            f'sampling period must be whole seconds (int), found {period_secs!r}')
    if not MIN_PERIOD_SECS <= period_secs <= MAX_PERIOD_SECS:
        raise PeriodError(
            f'sampling period must be within {MIN_PERIOD_SECS}..{MAX_PERIOD_SECS} s, '
            f'found {period_secs}')
    return period_secs


def parse_timeframe(text: str) -> int:
    """``'1m'`` -> 60; accepts ``<n>[s|m|h|d]`` or plain seconds."""
    match = _TIMEFRAME_RE.fullmatch(text.strip().lower())
    if match is None:
        raise PeriodError(
            f'bad timeframe {text!r}: expected <n>[s|m|h|d] such as 1s, 5m, 1h, 1d or seconds')
    return check_period(int(match.group(1)) * _UNIT_SECS[match.group(2)])


def floor_to(epoch: float, period_secs: int) -> int:
    """Open time of the bar of ``period_secs`` containing ``epoch``."""
    return int(math.floor(epoch / period_secs)) * period_secs


def next_boundary(now_epoch: float, periods: Iterable[int]) -> tuple[int, list[int]] | None:
    """The first boundary strictly after ``now_epoch`` and the periods ending there."""
    periods = sorted(set(periods))
    if not periods:
        return None
    epoch = min(floor_to(now_epoch, p) + p for p in periods)
    return epoch, [p for p in periods if epoch % p == 0]


def boundaries_between(
    after_epoch: float,
    until_epoch: float,
    periods: Iterable[int],
) -> Iterator[tuple[int, list[int]]]:
    """Every boundary ``b`` with ``after < b <= until``, in order, with its periods."""
    periods = sorted(set(periods))
    now = after_epoch
    while True:
        nxt = next_boundary(now, periods)
        if nxt is None or nxt[0] > until_epoch:
            return
        yield nxt
        now = nxt[0]


def origin_for(epoch: float) -> int:
    """samplerd's origin for a clock starting at ``epoch``: that UTC midnight."""
    return floor_to(epoch, DAY_SECS)


def capacity_rows(period_secs: int) -> int:
    return HISTORY_ROWS + max(MIN_LIVE_ROWS, math.ceil(LIVE_SPAN_SECS / period_secs))


def row_position(bar_epoch: int, period_secs: int, origin_epoch: int) -> int:
    """Buffer position of the bar opening at ``bar_epoch`` (see module doc)."""
    origin_p = floor_to(origin_epoch, period_secs)
    return HISTORY_ROWS + (floor_to(bar_epoch, period_secs) - origin_p) // period_secs
