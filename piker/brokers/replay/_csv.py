"""OHLCV bars from CSV files, validated, and the ticks that replay each bar.

File format (UTF-8, a BOM is tolerated, blank lines are skipped)::

    time,open,high,low,close,volume
    1700000000,101.5,102.0,101.0,101.8,1200
    2023-11-14T22:14:20Z,101.8,102.4,101.7,102.3,800

- The header names exactly these six columns, in any order.
- ``time`` is the bar's open: whole epoch seconds, or ISO-8601 in UTC
  (``Z`` or ``+00:00`` suffix; a time without offset is read as UTC; other
  offsets are refused rather than guessed). Strictly increasing; gaps are fine.
- ``open``/``high``/``low``/``close`` are finite numbers > 0 with
  ``low <= open, close <= high``; ``volume`` is finite and >= 0.

Every violation raises :class:`ReplayFileError` naming file, line and column,
e.g. ``bars.csv:17: column `high`: 101.2 is below `open` 101.5``.

Replay turns a bar into four trade ticks at 0, 1/4, 1/2 and 3/4 of the bar:
``open, low, high, close`` for an up bar (close >= open) and
``open, high, low, close`` for a down bar, i.e. the path visits the extreme
nearest the open first. The volume is split in four so that summing the sizes
in order gives back the bar's volume exactly (see :func:`_split_volume`); the
bar rebuilt from the ticks (first, max, min, last, sum) equals the file's bar.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np

from piker.data._shm import ohlc_dtype

COLUMNS = ('time', 'open', 'high', 'low', 'close', 'volume')
_PRICE_COLUMNS = ('open', 'high', 'low', 'close')
_EXPECTED_HEADER = ','.join(COLUMNS)


class ReplayFileError(ValueError):
    """A replay file that cannot be used as is; the text says where and why."""

    def __init__(self, path: str, line: int | None, message: str, column: str | None = None):
        self.path, self.line, self.column = path, line, column
        where = f'{path}:{line}' if line is not None else path
        col = f' column `{column}`:' if column else ''
        super().__init__(f'{where}:{col} {message}')


class ReplayTick(NamedTuple):
    offset_secs: float  # since the bar's open
    price: float
    size: float


def read_ohlc_csv(path: str | Path) -> np.ndarray:
    """Parse and validate a bar file into ``ndarray[ohlc_dtype]`` (index = row number)."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding='utf-8-sig')
    except OSError as exc:
        raise ReplayFileError(name, None, f'cannot read the file: {exc.strerror}') from None
    except UnicodeDecodeError as exc:
        raise ReplayFileError(name, None, f'not UTF-8 text ({exc.reason})') from None
    return parse_ohlc_csv(text.splitlines(), name)


def parse_ohlc_csv(lines: Iterable[str], name: str = '<csv>') -> np.ndarray:
    """As :func:`read_ohlc_csv`, from lines already in memory (``name`` for errors)."""
    reader = csv.reader(lines)
    header = _read_header(reader, name)
    rows: list[tuple] = []
    prev: tuple[int, int] | None = None  # (time, line)
    for fields in reader:
        if not any(f.strip() for f in fields):
            continue
        line = reader.line_num
        if len(fields) != len(COLUMNS):
            raise ReplayFileError(
                name, line, f'expected {len(COLUMNS)} fields ({_EXPECTED_HEADER}), '
                f'found {len(fields)}')
        raw = {col: fields[i].strip() for col, i in header.items()}
        row = _parse_row(raw, name, line)
        if prev is not None and row[0] <= prev[0]:
            raise ReplayFileError(
                name, line, f"{raw['time']} is not after the previous bar's time "
                f'{prev[0]} (line {prev[1]}): bars must be in strictly increasing time order',
                'time')
        prev = (row[0], line)
        rows.append((len(rows), *row))
    if not rows:
        raise ReplayFileError(name, None, 'no bars after the header')
    return np.array(rows, dtype=ohlc_dtype)


def _read_header(reader, name: str) -> dict[str, int]:
    for fields in reader:
        if any(f.strip() for f in fields):
            break
    else:
        raise ReplayFileError(name, 1, f'empty file: expected the header {_EXPECTED_HEADER}')
    found = [f.strip().lower() for f in fields]
    line = reader.line_num
    for col in found:
        if col not in COLUMNS:
            raise ReplayFileError(
                name, line, f'unexpected column `{col}`: expected the header '
                f'{_EXPECTED_HEADER} (any order), found {",".join(found)}')
    for col in COLUMNS:
        if col not in found:
            raise ReplayFileError(
                name, line, f'missing column `{col}`: expected the header '
                f'{_EXPECTED_HEADER} (any order), found {",".join(found)}')
    if len(set(found)) != len(found):
        raise ReplayFileError(name, line, f'repeated column in header {",".join(found)}')
    return {col: found.index(col) for col in COLUMNS}


def _parse_row(raw: dict[str, str], name: str, line: int) -> tuple:
    time = _parse_time(raw['time'], name, line)
    values = {col: _parse_number(raw[col], col, name, line) for col in COLUMNS[1:]}
    for col in _PRICE_COLUMNS:
        if values[col] <= 0:
            raise ReplayFileError(name, line, f'{raw[col]} must be > 0', col)
    if values['volume'] < 0:
        raise ReplayFileError(name, line, f"{raw['volume']} must be >= 0", 'volume')
    for other in ('open', 'close'):
        if values['high'] < values[other]:
            raise ReplayFileError(
                name, line, f"{raw['high']} is below `{other}` {raw[other]}", 'high')
        if values['low'] > values[other]:
            raise ReplayFileError(
                name, line, f"{raw['low']} is above `{other}` {raw[other]}", 'low')
    return (time, *(values[col] for col in COLUMNS[1:]))


def _parse_number(text: str, col: str, name: str, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ReplayFileError(name, line, f'{text!r} is not a number', col) from None
    if not math.isfinite(value):
        raise ReplayFileError(name, line, f'{text!r} is not a finite number', col)
    return value


def _parse_time(text: str, name: str, line: int) -> int:
    if text.isdigit():
        return int(text)
    try:
        stamp = datetime.fromisoformat(text.replace('Z', '+00:00'))
    except ValueError:
        raise ReplayFileError(
            name, line, f'{text!r} is neither whole epoch seconds nor an ISO-8601 UTC time '
            '(e.g. 1700000000 or 2023-11-14T22:13:20Z)', 'time') from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    elif stamp.utcoffset() != timedelta(0):
        raise ReplayFileError(
            name, line, f'{text!r} is not UTC: convert it and write it with Z or +00:00', 'time')
    if stamp.microsecond:
        raise ReplayFileError(name, line, f'{text!r}: bar times must be whole seconds', 'time')
    return int(stamp.timestamp())


def infer_timeframe_secs(bars: np.ndarray) -> int:
    """The bar period: the smallest gap between consecutive bar times."""
    if len(bars) < 2:
        raise ValueError(
            f'cannot infer a timeframe from {len(bars)} bar(s): pass timeframe_secs explicitly')
    return int(np.diff(bars['time']).min())


def _split_volume(volume: float) -> list[float]:
    """Four equal sizes whose running sum gives back ``volume`` bit for bit.

    ``q = volume / 4`` is exact and so is ``2q``; ``3q`` rounds by at most half
    of volume's ulp, and ``fl(3q) + q`` rounds back to ``volume`` (a tie can only
    arise when volume's mantissa is even, and round-half-even keeps it).
    """
    return [volume / 4] * 4


def ticks_for_bar(bar, timeframe_secs: float) -> list[ReplayTick]:
    """The four trades that replay ``bar`` (a row of ``ohlc_dtype``); see module doc."""
    o, h, lo, c = (float(bar[f]) for f in _PRICE_COLUMNS)
    path = (o, lo, h, c) if c >= o else (o, h, lo, c)
    sizes = _split_volume(float(bar['volume']))
    return [
        ReplayTick(offset_secs=timeframe_secs * k / 4, price=price, size=size)
        for k, (price, size) in enumerate(zip(path, sizes, strict=True))
    ]


def replay_ticks(bars: np.ndarray, timeframe_secs: float) -> Iterator[tuple[float, float, float]]:
    """``(epoch_secs, price, size)`` trades replaying ``bars`` in order."""
    for bar in bars:
        for tick in ticks_for_bar(bar, timeframe_secs):
            yield float(bar['time']) + tick.offset_secs, tick.price, tick.size
