"""The time a backend's quote stream follows inside datad.

A backend stream is a loop of ``now = await clock.sleep_until_ns(t)`` followed
by publishing every event with ``ts_ns <= now``. The clock decides what "now"
is:

- :class:`WallClock`: real time (sim, ib under a wall-clock samplerd);
- :class:`ScaledClock`: file time replayed at ``speed`` x real time (replay);
- :class:`DrivenClock`: time moves only when samplerd's driven clock is
  advanced; :meth:`DrivenClock.advance_to_ns` returns once every attached
  stream has published up to the new time and sleeps again, which is how
  datad guarantees a bar's ticks are in the buffer before its increment.
  So a stream must always wait *on the clock*, even when it has nothing more
  to publish (``sleep_until_ns(FOREVER_NS)``).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import trio

_NS = 1_000_000_000
# a stream with nothing left to publish sleeps until this instant
FOREVER_NS = 2**63 - 1
_MAX_SLEEP_NS = 86_400 * _NS


class FeedClock(Protocol):
    driven: bool

    def now_ns(self) -> int: ...

    async def sleep_until_ns(self, t_ns: int) -> int:
        """Return once the clock reads at least ``t_ns``; returns the time then."""
        ...


class WallClock:
    driven = False

    def now_ns(self) -> int:
        return time.time_ns()

    async def sleep_until_ns(self, t_ns: int) -> int:
        while True:
            now = time.time_ns()
            if now >= t_ns:
                await trio.lowlevel.checkpoint()
                return now
            await trio.sleep(min(t_ns - now, _MAX_SLEEP_NS) / _NS)


class ScaledClock:
    """``start_ns`` of file time maps to the first reading; then ``speed`` x real time.

    A sleep lasts at least ``min_sleep_secs`` of real time, so a fast replay
    wakes its streams a bounded number of times and publishes in batches.
    """

    driven = False

    def __init__(self, start_ns: int, speed: float, min_sleep_secs: float = 0.0) -> None:
        if not speed > 0:
            raise ValueError(f'replay speed must be > 0, found {speed!r}')
        self.start_ns = start_ns
        self.speed = speed
        self.min_sleep_secs = min_sleep_secs
        self._wall0_ns: int | None = None

    def now_ns(self) -> int:
        wall = time.monotonic_ns()
        if self._wall0_ns is None:
            self._wall0_ns = wall
        return self.start_ns + int((wall - self._wall0_ns) * self.speed)

    async def sleep_until_ns(self, t_ns: int) -> int:
        while True:
            now = self.now_ns()
            if now >= t_ns:
                await trio.lowlevel.checkpoint()
                return now
            delay_secs = min((t_ns - now) / self.speed, _MAX_SLEEP_NS) / _NS
            await trio.sleep(max(delay_secs, self.min_sleep_secs))


class DrivenClock:
    """Time that only moves through :meth:`advance_to_ns`."""

    driven = True

    def __init__(self, now_ns: int) -> None:
        self._now_ns = now_ns
        self._attached = 0
        self._sleeping: list[tuple[int, trio.Event]] = []
        self._quiet = trio.Event()
        self._quiet.set()

    def now_ns(self) -> int:
        return self._now_ns

    @contextmanager
    def attach(self) -> Iterator[None]:
        """Count a stream task: advances wait for it to go back to sleep."""
        self._attached += 1
        self._check_quiet()
        try:
            yield
        finally:
            self._attached -= 1
            self._check_quiet()

    def _check_quiet(self) -> None:
        if len(self._sleeping) >= self._attached:
            self._quiet.set()
        elif self._quiet.is_set():
            self._quiet = trio.Event()

    async def sleep_until_ns(self, t_ns: int) -> int:
        if t_ns <= self._now_ns:
            await trio.lowlevel.checkpoint()
            return self._now_ns
        entry = (t_ns, trio.Event())
        self._sleeping.append(entry)
        self._check_quiet()
        try:
            await entry[1].wait()
        finally:
            if entry in self._sleeping:
                self._sleeping.remove(entry)
                self._check_quiet()
        return self._now_ns

    async def advance_to_ns(self, t_ns: int, timeout_secs: float = 10.0) -> bool:
        """Move to ``t_ns`` (never backwards) and wait until every attached stream
        has published up to it; False if one did not settle in time."""
        self._now_ns = max(self._now_ns, t_ns)
        due = [e for e in self._sleeping if e[0] <= self._now_ns]
        for entry in due:
            self._sleeping.remove(entry)
            entry[1].set()
        self._check_quiet()
        with trio.move_on_after(timeout_secs):
            await self._quiet.wait()
            return True
        return False
