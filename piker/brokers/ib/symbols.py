"""fqme ↔ IB contract resolution and the per-actor contract cache.

An ib fqme is ``<symbol>.<venue>.ib``: ``gld.arca.ib``, ``mnq.cme.ib`` (the
front-month future), ``eurusd.idealpro.ib`` (forex: base+quote). The venue is
the listing's primary exchange; orders and market data are routed through
``SMART`` wherever IB allows it.

A venue-less fqme (``gld.ib``) resolves when exactly one listing matches and
is an error naming the choices otherwise (``use 'gld.arca.ib' or
'gld.venture.ib'``).

Everything here is sync and pure except :func:`resolve_fqme_contract` and
:func:`resolve_con_id`, which take the contract-details lookup as a callable
(in the actors: a call through the method proxy).
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable

from ...types import Fqme, FqmeError, Struct, resolve_fqme

BACKEND = 'ib'
# venues whose listings are futures (orders go to the venue itself)
FUTURES_VENUES = frozenset({
    'CME', 'CBOT', 'NYMEX', 'COMEX', 'GLOBEX', 'ECBOT', 'NYBOT', 'ICEUS', 'ICEEU',
    'IPE', 'EUREX', 'CFE', 'CBOE', 'SGX', 'OSE.JPN', 'HKFE',
})
FX_VENUES = frozenset({'IDEALPRO'})
# tried in order for a venue-less fqme until one yields listings
VENUELESS_SEC_TYPES = ('STK', 'FUT')


class ContractSpec(Struct, frozen=True):
    """What to ask IB's contract details for (a partial contract)."""
    con_id: int = 0
    symbol: str = ''
    sec_type: str = ''
    exchange: str = ''
    primary_exchange: str = ''
    currency: str = ''


class ContractInfo(Struct, frozen=True):
    """One resolved listing: what orders and market data need, plus market info."""
    fqme: str
    con_id: int
    symbol: str
    sec_type: str
    # the listing venue (primary exchange), upper case
    venue: str
    # where orders and market data are routed
    route_exchange: str
    currency: str
    tick_size: float
    lot_size: float = 1.0
    multiplier: float = 1.0
    local_symbol: str = ''
    trading_class: str = ''
    last_trade_date: str = ''
    description: str = ''
    time_zone: str = ''

    @property
    def bs_fqme(self) -> str:
        """The backend-less key (``gld.arca``)."""
        return Fqme.parse(self.fqme).bs_key


def _fqme_symbol(text: str) -> str:
    return text.strip().lower().replace(' ', '-').replace('.', '-')


def fqme_for(symbol: str, sec_type: str, venue: str, currency: str) -> str:
    """The fqme of a listing (see module doc)."""
    sym = _fqme_symbol(symbol)
    if sec_type == 'CASH':
        sym = f'{sym}{currency.lower()}'
    return f'{sym}.{venue.lower()}.{BACKEND}'


def listing_venue(exchange: str, primary_exchange: str) -> str:
    return (primary_exchange or exchange).upper()


def route_for(sec_type: str, venue: str, valid_exchanges: str) -> str:
    venues = {v.strip().upper() for v in valid_exchanges.split(',') if v.strip()}
    if sec_type in ('STK', 'ETF') and (not venues or 'SMART' in venues):
        return 'SMART'
    return venue


def specs_for(fqme: str) -> list[ContractSpec]:
    """The contract-details queries that can find ``fqme``'s listings, in order."""
    f = Fqme.parse(fqme)
    if f.backend != BACKEND:
        raise FqmeError(
            f'fqme {fqme!r} is not an ib market: expected `<symbol>.<venue>.ib` '
            f"(e.g. 'gld.arca.ib', 'mnq.cme.ib')"
        )
    symbol = f.symbol.upper().replace('-', ' ')
    if f.venue is None:
        return [ContractSpec(symbol=symbol, sec_type=st) for st in VENUELESS_SEC_TYPES]
    venue = f.venue.upper()
    if venue in FX_VENUES:
        if len(symbol) != 6:
            raise FqmeError(
                f'bad forex fqme {fqme!r}: expected base and quote currency as one '
                f"symbol on {f.venue} (e.g. 'eurusd.idealpro.ib')"
            )
        return [ContractSpec(symbol=symbol[:3], currency=symbol[3:], sec_type='CASH',
                             exchange=venue)]
    if venue in FUTURES_VENUES:
        return [ContractSpec(symbol=symbol, sec_type='FUT', exchange=venue)]
    return [ContractSpec(symbol=symbol, sec_type='STK', exchange='SMART',
                         primary_exchange=venue)]


def _front_month(infos: list[ContractInfo], today: str) -> ContractInfo:
    live = sorted((i for i in infos if i.last_trade_date[:8] >= today),
                  key=lambda i: i.last_trade_date)
    return live[0] if live else max(infos, key=lambda i: i.last_trade_date)


def select(fqme: str, infos: list[ContractInfo], today: dt.date | None = None) -> ContractInfo:
    """Pick ``fqme``'s listing among contract-details results.

    Futures of one fqme collapse to the front month. Raises :class:`FqmeError`
    (a ``ValueError``) when nothing matches or a venue-less fqme is ambiguous.
    """
    day = (today or dt.datetime.now(dt.UTC).date()).strftime('%Y%m%d')
    by_fqme: dict[str, list[ContractInfo]] = {}
    for info in infos:
        by_fqme.setdefault(info.fqme, []).append(info)
    if not by_fqme:
        raise FqmeError(
            f'unknown market {fqme!r}: IB has no listing for it; check the symbol and '
            f"venue (e.g. 'gld.arca.ib', 'mnq.cme.ib', 'eurusd.idealpro.ib')"
        )
    chosen = resolve_fqme(fqme, sorted(by_fqme))
    # IB answers once per exchange a listing trades on: one conId, many rows
    candidates = list({i.con_id: i for i in by_fqme[chosen]}.values())
    if len(candidates) == 1:
        return candidates[0]
    if all(i.sec_type == 'FUT' for i in candidates):
        return _front_month(candidates, day)
    listed = ', '.join(f'{i.local_symbol or i.symbol} (conId {i.con_id})' for i in candidates)
    raise FqmeError(
        f'{fqme!r} matches several IB contracts on one venue: {listed}; '
        'this backend cannot tell them apart yet'
    )


class ContractCache:
    """This actor's resolved contracts, by fqme (both keys) and by conId."""

    def __init__(self) -> None:
        self._by_key: dict[str, ContractInfo] = {}
        self._by_con_id: dict[int, ContractInfo] = {}

    def __len__(self) -> int:
        return len(self._by_con_id)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.strip().lower() in self._by_key

    def put(self, info: ContractInfo, *aliases: str) -> ContractInfo:
        """Cache ``info`` under its fqme, its backend-less key and ``aliases``."""
        for key in (info.fqme, info.bs_fqme, *aliases):
            self._by_key[key.strip().lower()] = info
        self._by_con_id[info.con_id] = info
        return info

    def get(self, key: str) -> ContractInfo | None:
        return self._by_key.get(key.strip().lower())

    def by_con_id(self, con_id: int) -> ContractInfo | None:
        return self._by_con_id.get(con_id)

    def keys(self) -> list[str]:
        return sorted(self._by_key)


Details = Callable[[ContractSpec], Awaitable[list[ContractInfo]]]


async def resolve_fqme_contract(cache: ContractCache, fqme: str, details: Details,
                                ) -> ContractInfo:
    """The cached listing of ``fqme``, asking IB (``details``) on a miss."""
    hit = cache.get(fqme)
    if hit is not None:
        return hit
    infos: list[ContractInfo] = []
    for spec in specs_for(fqme):
        infos = await details(spec)
        if infos:
            break
    info = select(fqme, infos)
    return cache.put(info, fqme)


async def resolve_con_id(cache: ContractCache, con_id: int, details: Details) -> ContractInfo:
    """The cached listing with ``con_id``, asking IB on a miss."""
    hit = cache.by_con_id(con_id)
    if hit is not None:
        return hit
    infos = await details(ContractSpec(con_id=con_id))
    if not infos:
        raise FqmeError(f'IB knows no contract with conId {con_id}')
    return cache.put(infos[0])
