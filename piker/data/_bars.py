"""Building OHLC bars in a shared buffer: the one writer of each buffer.

A buffer holds one row per period, contiguous in time (see ``_timing``).
Rows are created three ways, all through :class:`BarWriter`:

- history, prepended once at subscription (gaps filled with flat rows);
- a trade whose bar is after the last row (the rows up to it are added);
- samplerd's boundary request (``ensure_until``), idempotent with the above.

A new row starts flat at the previous close with zero volume; its first trade
sets open/high/low/close to the trade price, later trades extend high/low and
move the close. So a bar built from ticks equals first/max/min/last/sum of its
trades, exactly as the backends compute history.
"""
from __future__ import annotations

import math

import numpy as np

from piker.log import get_logger

from ._shm import ShmArray, ShmError, ohlc_dtype
from ._timing import floor_to, row_position

log = get_logger(__name__)

_NS = 1_000_000_000


class BarError(ValueError):
    """History rows that cannot be laid out as contiguous bars."""


def fill_gaps(bars: np.ndarray, period_secs: int) -> np.ndarray:
    """``bars`` (sorted, aligned to the period) with a flat zero-volume row at
    the previous close for every missing period."""
    if len(bars) == 0:
        return np.zeros(0, dtype=ohlc_dtype)
    times = bars['time'].astype(np.int64)
    misaligned = times % period_secs != 0
    if misaligned.any():
        bad = int(times[misaligned][0])
        raise BarError(
            f'bar time {bad} is not a multiple of the {period_secs} s period: '
            f'bars must open on period boundaries (epoch % {period_secs} == 0)')
    steps = np.diff(times)
    if (steps <= 0).any():
        raise BarError('bar times must be strictly increasing')
    slots = (times - times[0]) // period_secs
    out = np.zeros(int(slots[-1]) + 1, dtype=ohlc_dtype)
    out['time'] = times[0] + period_secs * np.arange(len(out), dtype=np.int64)
    present = np.zeros(len(out), dtype=bool)
    present[slots] = True
    for field in ('open', 'high', 'low', 'close', 'volume'):
        out[field][slots] = bars[field]
    if not present.all():
        latest = np.maximum.accumulate(np.where(present, np.arange(len(out)), 0))
        carry = out['close'][latest]
        missing = ~present
        for field in ('open', 'high', 'low', 'close'):
            out[field][missing] = carry[missing]
    out['index'] = np.arange(len(out))
    return out


class BarWriter:
    """Owner-side writer of one OHLC buffer of ``period_secs`` bars."""

    def __init__(self, shm: ShmArray, period_secs: int, origin_epoch: int, *,
                 fqme: str = '') -> None:
        self.shm = shm
        self.period_secs = period_secs
        self.origin_epoch = origin_epoch
        self.fqme = fqme
        self.late_ticks = 0
        self.full = False
        self._first_pos = self._last_pos = -1
        self._last_time = -1
        self._traded_pos = -1  # the last row that has seen a trade
        self._o = self._h = self._l = self._c = math.nan
        self._v = 0.0
        self._view = shm.array
        self._one_row = np.zeros(1, dtype=ohlc_dtype)

    # -- layout ---------------------------------------------------------------

    def position(self, bar_epoch: int) -> int:
        return row_position(bar_epoch, self.period_secs, self.origin_epoch)

    @property
    def last_time(self) -> int:
        return self._last_time

    @property
    def last_position(self) -> int:
        return self._last_pos

    def _refresh(self) -> None:
        self._view = self.shm.array
        self._first_pos, stop = self.shm.span
        self._last_pos = stop - 1

    # -- history --------------------------------------------------------------

    def open(self, live_epoch: float, history: np.ndarray) -> None:
        """Lay out ``history`` (bars before and at ``live_epoch``) and the live row."""
        p = self.period_secs
        live_bar = floor_to(live_epoch, p)
        first, stop = self.shm.span
        if first != stop or first != self.position(live_bar):
            raise BarError(
                f'buffer {self.shm.name} must be empty and start at row '
                f'{self.position(live_bar)} for bar {live_bar}, found rows {first}:{stop}')
        bars = np.sort(history[history['time'] <= live_bar], order='time')
        traded = bool(len(bars)) and bars['time'][-1] == live_bar and bars['volume'][-1] > 0
        if not len(bars) or bars['time'][-1] < live_bar:
            close = float(bars['close'][-1]) if len(bars) else math.nan
            flat = np.array([(0, live_bar, close, close, close, close, 0.0)], dtype=ohlc_dtype)
            bars = np.concatenate([bars, flat])
        bars = fill_gaps(bars, p)
        hist, current = bars[:-1], bars[-1:].copy()
        if len(hist) > first:
            log.warning('bars.history_clipped', fqme=self.fqme, period_secs=p,
                        bars=len(hist), room=first)
            hist = hist[len(hist) - first:]
        if len(hist):
            self.shm.prepend(np.ascontiguousarray(hist))
        self.shm.push(current)
        self._last_time = live_bar
        self._refresh()
        if traded:
            self._traded_pos = self._last_pos
            r = current[0]
            self._o, self._h, self._l, self._c, self._v = (
                float(r['open']), float(r['high']), float(r['low']), float(r['close']),
                float(r['volume']))

    # -- live -----------------------------------------------------------------

    def ensure_until(self, epoch: float) -> int:
        """Add flat rows until the row of ``epoch`` exists; returns its position
        (the last row's position when ``epoch`` is older)."""
        p = self.period_secs
        bar = floor_to(epoch, p)
        if bar <= self._last_time or self.full:
            return self._last_pos
        n = (bar - self._last_time) // p
        close = float(self._view['close'][-1])
        if n == 1:
            rows = self._one_row  # the common case: reuse one row
            rows[0] = (0, bar, close, close, close, close, 0.0)
        else:
            rows = np.zeros(n, dtype=ohlc_dtype)
            rows['time'] = self._last_time + p * np.arange(1, n + 1, dtype=np.int64)
            for field in ('open', 'high', 'low', 'close'):
                rows[field] = close
        try:
            stop = self.shm.push(rows)
        except ShmError as err:
            self.full = True
            log.error('bars.buffer_full', fqme=self.fqme, period_secs=p, error=str(err),
                      hint='the buffer stops updating; restart datad to start a new one')
            return self._last_pos
        self._last_time = bar
        self._last_pos = stop - 1
        self._view = self.shm.array
        return self._last_pos

    def apply_trade(self, ts_ns: int, price: float, size: float) -> None:
        """Fold one trade into the row its timestamp belongs to."""
        secs = ts_ns // _NS
        bar = secs - secs % self.period_secs
        if bar > self._last_time:
            self.ensure_until(bar)
            if self.full:
                return
        pos = self._last_pos - (self._last_time - bar) // self.period_secs
        if pos < self._traded_pos or pos < self._first_pos:
            self.late_ticks += 1
            return
        if pos == self._traded_pos:
            if price > self._h:
                self._h = price
            if price < self._l:
                self._l = price
            self._c = price
            self._v += size
        else:
            self._traded_pos = pos
            self._o = self._h = self._l = self._c = price
            self._v = size
        view = self._view
        k = pos - self._first_pos
        view[k] = (pos, bar, self._o, self._h, self._l, self._c, self._v)
        if pos < self._last_pos:
            # flat rows already opened after this bar carry its new close
            for field in ('open', 'high', 'low', 'close'):
                view[field][k + 1:] = price
