"""Listings lookup, quotes and deterministic historical bars (all sync, no I/O)."""
from __future__ import annotations

import hashlib
import math
import random
import time as _time
from collections.abc import Sequence
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ._requests import ContractQuery
from ._scenario import Listing

BAR_SIZES_SECS: dict[str, int] = {
    '1 secs': 1, '5 secs': 5, '10 secs': 10, '15 secs': 15, '30 secs': 30,
    '1 min': 60, '2 mins': 120, '3 mins': 180, '5 mins': 300, '10 mins': 600,
    '15 mins': 900, '20 mins': 1200, '30 mins': 1800, '1 hour': 3600, '2 hours': 7200,
    '3 hours': 10800, '4 hours': 14400, '8 hours': 28800, '1 day': 86400,
    '1 week': 604800, '1 month': 2592000,
}
DURATION_UNIT_SECS = {'S': 1, 'D': 86400, 'W': 604800, 'M': 2592000, 'Y': 31536000}
MAX_BARS = 20_000


class HistoryError(ValueError):
    """A historical-data request the fake refuses.

    Sent as error 162 (HMDS error): ib_async treats 321 as a warning and would
    leave the request hanging until its own 60 s timeout.
    """

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code


def match_listings(listings: Sequence[Listing], q: ContractQuery) -> list[Listing]:
    """Listings a contract query selects, as TWS would for reqContractDetails.

    A conId selects exactly that listing; otherwise every non-empty field of the
    query must agree, and ``exchange`` must be one of the listing's valid venues
    (so ``SMART`` matches every SMART-routable stock listing).
    """
    if q.con_id:
        return [lst for lst in listings if lst.con_id == q.con_id]
    if not (q.symbol or q.local_symbol):
        return []

    def ok(lst: Listing) -> bool:
        if q.symbol and q.symbol.upper() != lst.symbol.upper():
            return False
        if q.local_symbol and q.local_symbol.upper() != lst.local.upper():
            return False
        if q.sec_type and q.sec_type.upper() != lst.sec_type:
            return False
        if q.currency and q.currency.upper() != lst.currency:
            return False
        if q.exchange and q.exchange.upper() not in lst.venues:
            return False
        if q.primary_exchange and q.primary_exchange.upper() != lst.exchange:
            return False
        if q.last_trade and not lst.last_trade_date.startswith(q.last_trade):
            return False
        if q.trading_class and q.trading_class.upper() != lst.tclass.upper():
            return False
        if q.multiplier and lst.multiplier and float(q.multiplier) != lst.mult:
            return False
        return True

    return [lst for lst in listings if ok(lst)]


def detail_exchange(q: ContractQuery, lst: Listing) -> str:
    """The exchange echoed in contract details: the requested one, else the venue."""
    return q.exchange.upper() if q.exchange else lst.exchange


def round_tick(price: float, tick: float) -> float:
    return round(round(price / tick) * tick, 10)


class Quote:
    """Live top of book for one listing; a seeded walk moves the mid."""

    def __init__(self, lst: Listing, rng: random.Random) -> None:
        self.listing = lst
        self.mid = lst.price
        self.volume = 0.0
        self.last = lst.price
        self.last_size = 0.0
        self._rng = rng

    @property
    def spread(self) -> float:
        return self.listing.min_tick * max(self.listing.spread_ticks, 1)

    @property
    def bid(self) -> float:
        return round_tick(self.mid - self.spread / 2, self.listing.min_tick)

    @property
    def ask(self) -> float:
        return round_tick(self.bid + self.spread, self.listing.min_tick)

    def step(self, walk: bool) -> None:
        """Advance one streamed tick: maybe move the mid, print a trade."""
        if walk:
            self.mid = round_tick(
                self.mid + self._rng.choice((-1, 0, 1)) * self.listing.min_tick,
                self.listing.min_tick,
            )
        self.last = self.ask if self._rng.random() < 0.5 else self.bid
        self.last_size = max(1.0, round(self.listing.quote_size / 10))
        self.volume += self.last_size

    def set_mid(self, price: float) -> None:
        self.mid = round_tick(price, self.listing.min_tick)
        self.last = self.mid


def parse_end_time(text: str, now_secs: float) -> int:
    """An IB endDateTime ('' = now) as epoch seconds."""
    text = text.strip()
    if not text:
        return int(now_secs)
    body, tz = text, 'UTC'
    parts = text.replace('-', ' ').split()
    if len(parts) >= 3:
        body, tz = ' '.join(parts[:2]), parts[2]
    elif len(parts) == 2:
        body = ' '.join(parts)
    try:
        naive = datetime.strptime(body, '%Y%m%d %H:%M:%S')
    except ValueError:
        try:
            naive = datetime.strptime(body, '%Y%m%d')
        except ValueError as err:
            raise HistoryError(
                162, f"Historical Market Data Service error message: endDateTime {text!r} "
                "is not 'YYYYmmdd HH:MM:SS [zone]'",
            ) from err
    try:
        zone = UTC if tz.upper() == 'UTC' else ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise HistoryError(162, f'Historical Market Data Service error message: unknown time zone {tz!r}') from err
    return int(naive.replace(tzinfo=zone).timestamp())


def parse_duration_secs(text: str) -> int:
    parts = text.split()
    if len(parts) != 2 or parts[1] not in DURATION_UNIT_SECS or not parts[0].isdigit():
        raise HistoryError(
            162, f"Historical Market Data Service error message: duration "
            f"{text!r} is invalid: expected '<integer> <S|D|W|M|Y>'",
        )
    return int(parts[0]) * DURATION_UNIT_SECS[parts[1]]


def _noise(con_id: int, t: int) -> float:
    """A deterministic value in [-1, 1) for (contract, time)."""
    h = hashlib.blake2b(f'{con_id}:{t}'.encode(), digest_size=8).digest()
    return int.from_bytes(h, 'big') / 2**63 - 1.0


def price_at(lst: Listing, t: float) -> float:
    """A smooth, deterministic price path around the listing's reference price."""
    ph = (lst.con_id % 997) / 997 * 2 * math.pi
    wave = (
        0.010 * math.sin(2 * math.pi * t / 86400 + ph)
        + 0.004 * math.sin(2 * math.pi * t / 3600 + 2 * ph)
        + 0.0015 * math.sin(2 * math.pi * t / 300 + 3 * ph)
    )
    return lst.price * (1 + wave)


Bar = tuple[str, float, float, float, float, float, float, int]


def history_bars(lst: Listing, end_secs: int, duration: str, bar_size: str,
                 format_date: int) -> tuple[str, str, list[Bar]]:
    """Bars covering ``duration`` up to ``end_secs``; the same inputs always
    give the same bars. Returns (start text, end text, bars)."""
    if bar_size not in BAR_SIZES_SECS:
        raise HistoryError(
            162, f"Historical Market Data Service error message: bar size "
            f"setting {bar_size!r} is invalid; use one of {sorted(BAR_SIZES_SECS)}",
        )
    step = BAR_SIZES_SECS[bar_size]
    span = parse_duration_secs(duration)
    end = end_secs - end_secs % step
    count = max(span // step, 1)
    if count > MAX_BARS:
        raise HistoryError(
            162, 'Historical Market Data Service error message:Time length exceed max.',
        )
    tick = lst.min_tick
    bars: list[Bar] = []
    for k in range(count):
        t0 = end - (count - k) * step
        samples = [price_at(lst, t0 + step * j / 4) for j in range(5)]
        jitter = abs(_noise(lst.con_id, t0)) * lst.price * 0.001
        o = round_tick(samples[0], tick)
        c = round_tick(samples[-1], tick)
        h = round_tick(max(samples) + jitter, tick)
        lo = round_tick(min(samples) - jitter, tick)
        vol = float(int(1000 + 1000 * abs(_noise(lst.con_id, t0 + 1))))
        wap = round((h + lo + c) / 3, 6)
        if step >= 86400:
            date = _time.strftime('%Y%m%d', _time.gmtime(t0))
        elif format_date == 2:
            date = str(t0)
        else:
            date = _time.strftime('%Y%m%d %H:%M:%S UTC', _time.gmtime(t0))
        bars.append((date, o, h, lo, c, vol, wap, int(vol // 10) + 1))
    fmt = '%Y%m%d %H:%M:%S UTC'
    start_txt = _time.strftime(fmt, _time.gmtime(end - count * step))
    end_txt = _time.strftime(fmt, _time.gmtime(end))
    return start_txt, end_txt, bars


def search(listings: Sequence[Listing], pattern: str) -> list[Listing]:
    """reqMatchingSymbols: symbol prefix or name substring, case-insensitive."""
    p = pattern.strip().upper()
    if not p:
        return []
    hits = [
        lst for lst in listings
        if lst.symbol.upper().startswith(p) or p in lst.long_name.upper()
    ]
    return hits[:16]
