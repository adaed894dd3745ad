"""datad endpoints of the ``replay`` backend: bar files served as history and
replayed as trade ticks.

``[brokers.replay] data_dir`` holds one ``<symbol>.csv`` per market (format in
``_csv``), served as fqme ``<symbol>.replay``; every file holds bars of
``timeframe_secs``. Each bar is replayed as the four trades of
:func:`ticks_for_bar`, so the bars rebuilt from the ticks equal the file.

Time: under a driven samplerd the replay follows the driven clock (bars and
increments line up exactly). Under a wall-clock samplerd it runs on its own
:class:`ScaledClock` - file time from the earliest bar of the directory, at
``speed`` x real time - and datad builds its bars from the tick times alone.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import trio

from piker.config import ReplayCfg
from piker.data._clocks import FOREVER_NS, ScaledClock
from piker.data._shm import ohlc_dtype
from piker.data._types import Tick
from piker.log import get_logger
from piker.types import Fqme, FqmeError, resolve_fqme

from ._csv import ReplayFileError, read_ohlc_csv, ticks_for_bar

log = get_logger(__name__)

BACKEND = 'replay'
# a fast wall-clock replay publishes in batches at most this often per market
MIN_SLEEP_SECS = 0.005
_NS = 1_000_000_000
_cache: dict[tuple[str, float], np.ndarray] = {}


class ReplayConfigError(ValueError):
    """A replay setting that does not match the files."""


def _data_dir(cfg: ReplayCfg) -> Path:
    path = Path(cfg.data_dir).expanduser()
    if not path.is_dir():
        raise ReplayConfigError(
            f'replay data_dir {str(path)!r} is not a directory (cwd {os.getcwd()}): '
            'set [brokers.replay] data_dir in bot.toml to the folder of <symbol>.csv files')
    return path


def _listing(cfg: ReplayCfg) -> dict[str, Path]:
    """fqme -> file for every usable ``<symbol>.csv`` in the data dir."""
    out: dict[str, Path] = {}
    for path in sorted(_data_dir(cfg).glob('*.csv')):
        try:
            fqme = Fqme.parse(f'{path.stem}.{BACKEND}').key
        except FqmeError:
            log.warning('replay.file_skipped', file=str(path),
                        reason='the file name is not a valid symbol')
            continue
        out[fqme] = path
    return out


def _resolve(fqme: str, cfg: ReplayCfg) -> tuple[str, Path]:
    listing = _listing(cfg)
    key = resolve_fqme(fqme, list(listing))
    return key, listing[key]


def _bars(path: Path, cfg: ReplayCfg) -> np.ndarray:
    """The validated bars of ``path`` (cached until the file changes)."""
    key = (str(path), path.stat().st_mtime)
    bars = _cache.get(key)
    if bars is None:
        bars = read_ohlc_csv(path)
        tf = cfg.timeframe_secs
        off_grid = bars['time'] % tf != 0
        if off_grid.any():
            row = int(np.argmax(off_grid))
            raise ReplayFileError(
                str(path), None,
                f'bar {row + 1} opens at {int(bars["time"][row])}, not on a {tf} s boundary: '
                f'set [brokers.replay] timeframe_secs to the bar period of the files',
                'time')
        _cache[key] = bars
    return bars


def _ticks(bars: np.ndarray, tf_secs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ts_ns, price, size) arrays of every replayed trade, in time order."""
    ts, prices, sizes = [], [], []
    for bar in bars:
        base_ns = int(bar['time']) * _NS
        for tick in ticks_for_bar(bar, tf_secs):
            ts.append(base_ns + round(tick.offset_secs * _NS))
            prices.append(tick.price)
            sizes.append(tick.size)
    return (np.array(ts, dtype=np.int64), np.array(prices, dtype=np.float64),
            np.array(sizes, dtype=np.float64))


def _resample(bars: np.ndarray, tf_secs: int) -> np.ndarray:
    """Aggregate bars into ``tf_secs`` bars (first/max/min/last/sum)."""
    if len(bars) == 0:
        return bars
    keys = bars['time'] - bars['time'] % tf_secs
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(bars)] - 1
    out = np.zeros(len(starts), dtype=ohlc_dtype)
    out['index'] = np.arange(len(out))
    out['time'] = keys[starts]
    out['open'] = bars['open'][starts]
    out['high'] = np.maximum.reduceat(bars['high'], starts)
    out['low'] = np.minimum.reduceat(bars['low'], starts)
    out['close'] = bars['close'][ends]
    out['volume'] = np.add.reduceat(bars['volume'], starts)
    return out


def _partial(bar: np.ndarray, tf_secs: int, end_epoch: int) -> np.ndarray | None:
    """``bar`` as built from its replayed trades before ``end_epoch`` (None if none)."""
    done = [t for t in ticks_for_bar(bar, tf_secs) if int(bar['time']) + t.offset_secs < end_epoch]
    if not done:
        return None
    prices = [t.price for t in done]
    out = np.zeros(1, dtype=ohlc_dtype)
    out[0] = (0, bar['time'], prices[0], max(prices), min(prices), prices[-1],
              sum(t.size for t in done))
    return out


# -- endpoints --------------------------------------------------------------------

async def market_info(fqme: str, cfg: ReplayCfg) -> dict[str, Any]:
    key, path = _resolve(fqme, cfg)
    parsed = Fqme.parse(key)
    return {
        'fqme': key, 'symbol': parsed.symbol, 'venue': None, 'backend': BACKEND,
        'currency': '', 'tick_size': 0.0, 'lot_size': 0.0,
        'description': f'replay of {path}',
    }


async def history(fqme: str, cfg: ReplayCfg, *, timeframe_secs: int, end_epoch: int,
                  count: int) -> np.ndarray:
    _, path = _resolve(fqme, cfg)
    src_tf = cfg.timeframe_secs
    if timeframe_secs % src_tf:
        raise ReplayConfigError(
            f'replay files hold {src_tf} s bars: timeframe {timeframe_secs} s must be a '
            f'multiple of it (or change [brokers.replay] timeframe_secs)')
    bars = _bars(path, cfg)
    whole = bars[bars['time'] + src_tf <= end_epoch]
    live = bars[(bars['time'] < end_epoch) & (bars['time'] + src_tf > end_epoch)]
    parts = [whole]
    if len(live):
        partial = _partial(live[0], src_tf, end_epoch)
        if partial is not None:
            parts.append(partial)
    done = np.concatenate(parts) if len(parts) > 1 else whole
    return _resample(done, timeframe_secs)[-count:]


async def search(pattern: str, cfg: ReplayCfg) -> list[str]:
    needle = pattern.strip().lower()
    return [f for f in _listing(cfg) if needle in f]


def wall_clock(cfg: ReplayCfg) -> ScaledClock:
    """File time from the directory's earliest bar, at ``speed`` x real time."""
    starts = []
    for fqme, path in _listing(cfg).items():
        try:
            starts.append(int(_bars(path, cfg)['time'][0]))
        except ReplayFileError as err:
            log.warning('replay.file_unusable', fqme=fqme, error=str(err))
    if not starts:
        raise ReplayConfigError(
            f'replay data_dir {cfg.data_dir!r} holds no usable <symbol>.csv files')
    return ScaledClock(min(starts) * _NS, cfg.speed, min_sleep_secs=MIN_SLEEP_SECS)


async def stream_quotes(
    fqme: str,
    cfg: ReplayCfg,
    *,
    clock: Any,
    publish: Callable[[Sequence[Any]], None],
    start_ns: int,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    key, path = _resolve(fqme, cfg)
    ts, prices, sizes = _ticks(_bars(path, cfg), cfg.timeframe_secs)
    i = int(np.searchsorted(ts, start_ns, 'left'))
    first = i - 1 if i > 0 else 0
    task_status.started({
        'fqme': key, 'ts_ns': int(ts[first]), 'bid': float(prices[first]),
        'ask': float(prices[first]), 'bid_size': None, 'ask_size': None,
        'last': float(prices[first]) if i > 0 else None,
        'last_size': float(sizes[first]) if i > 0 else None,
    })
    while i < len(ts):
        now_ns = await clock.sleep_until_ns(int(ts[i]))
        j = int(np.searchsorted(ts, now_ns, 'right'))
        publish([
            Tick(fqme=key, ts_ns=t, bid=p, ask=p, bid_size=None, ask_size=None,
                 last=p, last_size=s)
            for t, p, s in zip(ts[i:j].tolist(), prices[i:j].tolist(), sizes[i:j].tolist(),
                               strict=True)
        ])
        i = j
    log.info('replay.finished', fqme=key, ticks=len(ts))
    # idle on the clock, not off it: a driven clock waits for its streams to sleep
    await clock.sleep_until_ns(FOREVER_NS)
