"""datad.ib: market info, history, quotes and search from IB.

The module-level functions are the datad protocol
(``piker.brokers._protocol.DatadBackend``). They share one actor-global
:class:`FeedClient`: an IB link with the ``datad`` client-id block, this
actor's contract cache, and one IB market-data subscription per contract
however many streams want it. datad should enter :func:`open_client` for its
own lifetime; if it does not, the first call starts the client as a trio
system task that lives as long as the actor.

After a reconnect, or when TWS reports its market data lost (1101), every
subscription is requested again: ib_async does not resubscribe by itself.
"""
from __future__ import annotations

import datetime as dt
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import trio

from ...config import IbCfg
from ...data import FeedError
from ...data._shm import ohlc_dtype
from ...data._types import Tick
from ...log import get_logger
from ._link import IbLink, LinkUp, open_ib_link
from .api import IbError, IbQuote, IbRequestError, LinkRestored, QuoteBatch
from .symbols import ContractCache, ContractInfo, ContractSpec, resolve_fqme_contract

log = get_logger(__name__)

# timeframe -> IB bar size setting
BAR_SIZES: dict[int, str] = {
    1: '1 secs', 5: '5 secs', 10: '10 secs', 15: '15 secs', 30: '30 secs',
    60: '1 min', 120: '2 mins', 180: '3 mins', 300: '5 mins', 600: '10 mins',
    900: '15 mins', 1200: '20 mins', 1800: '30 mins', 3600: '1 hour', 7200: '2 hours',
    14400: '4 hours', 28800: '8 hours', 86400: '1 day',
}
FIRST_QUOTE_WAIT_SECS = 5.0
# per-stream buffer of quote batches before the oldest is dropped
STREAM_BUFFER = 1024


def bar_size_for(timeframe_secs: int) -> str:
    try:
        return BAR_SIZES[timeframe_secs]
    except KeyError:
        raise ValueError(
            f'IB has no {timeframe_secs}s bars: use one of '
            f'{", ".join(str(s) for s in sorted(BAR_SIZES))} seconds'
        ) from None


def duration_for(secs: int) -> str:
    """IB's duration string covering ``secs`` (seconds up to a day, then days)."""
    if secs <= 86_400:
        return f'{max(secs, 1)} S'
    return f'{math.ceil(secs / 86_400)} D'


def bars_array(rows: Sequence[tuple[float, ...]], end_epoch: int, count: int) -> np.ndarray:
    """IB bars as ``ohlc_dtype`` rows opening before ``end_epoch``, the last ``count``."""
    kept = [r for r in rows if r[0] < end_epoch][-count:]
    out = np.zeros(len(kept), dtype=ohlc_dtype)
    if kept:
        arr = np.asarray(kept, dtype='f8')
        out['index'] = np.arange(len(kept))
        out['time'] = arr[:, 0].astype('i8')
        for i, name in enumerate(('open', 'high', 'low', 'close', 'volume'), start=1):
            out[name] = arr[:, i]
    return out


def _price(x: float) -> float | None:
    return x if x == x and x > 0 else None


def ticks_of(quote: IbQuote, fqme: str) -> list[Tick]:
    """One tick per trade in ``quote`` (each with the book), or one book tick."""
    bid, ask = _price(quote.bid), _price(quote.ask)
    bid_size, ask_size = quote.bid_size or None, quote.ask_size or None
    trades: list[tuple[float | None, float | None]] = list(quote.trades) or [(None, None)]
    return [Tick(fqme=fqme, ts_ns=quote.ts_ns, bid=bid, ask=ask, bid_size=bid_size,
                 ask_size=ask_size, last=price, last_size=size) for price, size in trades]


def tick_dict(t: Tick) -> dict[str, Any]:
    return {f: getattr(t, f) for f in Tick.__struct_fields__}


class FeedClient:
    """See module doc."""

    def __init__(self, link: IbLink) -> None:
        self.link = link
        self.cache = ContractCache()
        self._streams: dict[int, set[trio.MemorySendChannel[IbQuote]]] = {}
        self._infos: dict[int, ContractInfo] = {}

    async def _details(self, spec: ContractSpec) -> list[ContractInfo]:
        return await self.link.call('contract_details', spec)

    async def contract(self, fqme: str) -> ContractInfo:
        if self.cache.get(fqme) is None and not self.link.is_up:
            if not await self.link.wait_up(self.link.cfg.connect_timeout_secs):
                raise FeedError(f'cannot resolve {fqme!r}: {self.link.describe_down()}')
        return await resolve_fqme_contract(self.cache, fqme, self._details)

    @asynccontextmanager
    async def subscribe(self, info: ContractInfo) -> AsyncIterator[trio.MemoryReceiveChannel[IbQuote]]:
        tx, rx = trio.open_memory_channel[IbQuote](STREAM_BUFFER)
        subs = self._streams.setdefault(info.con_id, set())
        subs.add(tx)
        self._infos[info.con_id] = info
        try:
            if len(subs) == 1 and self.link.is_up:
                await self.link.call('subscribe_quotes', info)
            yield rx
        finally:
            subs.discard(tx)
            tx.close()
            if not subs:
                self._streams.pop(info.con_id, None)
                if self.link.is_up:
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await self.link.call('unsubscribe_quotes', info.con_id)

    async def resubscribe(self, why: str) -> None:
        for con_id in list(self._streams):
            await self.link.call('subscribe_quotes', self._infos[con_id], fresh=True)
        if self._streams:
            log.info('datad.ib.resubscribed', why=why, contracts=len(self._streams))

    def _fan_out(self, batch: QuoteBatch) -> None:
        for quote in batch.quotes:
            for tx in list(self._streams.get(quote.con_id, ())):
                try:
                    tx.send_nowait(quote)
                except trio.WouldBlock:
                    log.warning('datad.ib.stream_overrun', con_id=quote.con_id)
                except trio.BrokenResourceError:
                    pass

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for event in self.link.events:
            try:
                match event:
                    case QuoteBatch():
                        self._fan_out(event)
                    case LinkUp(reconnect=True):
                        await self.resubscribe('reconnected')
                    case LinkRestored(data_lost=True):
                        await self.resubscribe('IB 1101: market data lost')
                    case IbError(code=354):
                        log.warning('datad.ib.no_market_data', req_id=event.req_id,
                                    text=event.text)
            except trio.Cancelled:
                raise
            except Exception:
                log.exception('datad.ib.event_failed', msg_type=type(event).__name__)


_client: FeedClient | None = None
_client_ready: trio.Event | None = None


@asynccontextmanager
async def open_client(cfg: IbCfg) -> AsyncIterator[FeedClient]:
    """This actor's feed client for the duration of the block (role ``datad``)."""
    global _client, _client_ready
    async with open_ib_link(cfg, 'datad') as link:
        client = FeedClient(link)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            _client = client
            if _client_ready is not None:
                _client_ready.set()
            try:
                yield client
            finally:
                _client = None
                nursery.cancel_scope.cancel()


async def get_client(cfg: IbCfg) -> FeedClient:
    """The actor-global client, started on first use if datad did not."""
    global _client_ready
    if _client is not None:
        return _client
    if _client_ready is None:
        _client_ready = trio.Event()
        trio.lowlevel.spawn_system_task(_keep_client, cfg, name='datad.ib.client')
    await _client_ready.wait()
    if _client is None:
        raise ConnectionError('the IB feed client stopped')
    return _client


async def _keep_client(cfg: IbCfg) -> None:
    global _client_ready
    try:
        async with open_client(cfg):
            await trio.sleep_forever()
    except Exception:  # a system task must not raise
        log.exception('datad.ib.client_failed')
    finally:
        ready, _client_ready = _client_ready, None
        if ready is not None:
            ready.set()


def _as_cfg(cfg: Any) -> IbCfg:
    if isinstance(cfg, IbCfg):
        return cfg
    import msgspec
    return msgspec.convert(cfg or {}, IbCfg)


# -- the datad protocol ---------------------------------------------------------------------

async def market_info(fqme: str, cfg: Any) -> dict[str, Any]:
    client = await get_client(_as_cfg(cfg))
    info = await client.contract(fqme)
    return {
        'fqme': info.fqme, 'symbol': info.symbol.lower(), 'venue': info.venue.lower(),
        'backend': 'ib', 'currency': info.currency.lower(), 'tick_size': info.tick_size,
        'lot_size': info.lot_size, 'description': info.description,
        'multiplier': info.multiplier, 'sec_type': info.sec_type, 'con_id': info.con_id,
    }


async def history(fqme: str, cfg: Any, *, timeframe_secs: int, end_epoch: int,
                  count: int) -> np.ndarray:
    client = await get_client(_as_cfg(cfg))
    info = await client.contract(fqme)
    bar_size = bar_size_for(timeframe_secs)
    # one bar more: IB's last bar may be the one still open at `end_epoch`
    span_secs = (count + 1) * timeframe_secs
    try:
        rows = await client.link.call(
            'history', info, dt.datetime.fromtimestamp(end_epoch + timeframe_secs, dt.UTC),
            duration_for(span_secs), bar_size,
            what_to_show='MIDPOINT' if info.sec_type == 'CASH' else 'TRADES',
        )
    except (IbRequestError, ConnectionError) as err:
        raise FeedError(f'no {bar_size} history for {info.fqme}: {err}') from None
    return bars_array(rows, end_epoch, count)


async def search(pattern: str, cfg: Any) -> list[str]:
    client = await get_client(_as_cfg(cfg))
    found = await client.link.call('search', pattern)
    return sorted({row['fqme'] for row in found})


async def stream_quotes(
    fqme: str,
    cfg: Any,
    *,
    clock: Any,
    publish: Callable[[Sequence[Any]], None],
    start_ns: int,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """IB's quotes for ``fqme`` as they come (IB time is the wall clock, so
    ``clock`` only matters to backends that replay)."""
    client = await get_client(_as_cfg(cfg))
    info = await client.contract(fqme)
    async with client.subscribe(info) as quotes:
        first: IbQuote | None = None
        with trio.move_on_after(FIRST_QUOTE_WAIT_SECS):
            first = await quotes.receive()
        if first is None:
            log.warning('datad.ib.no_first_quote', fqme=info.fqme,
                        waited_secs=FIRST_QUOTE_WAIT_SECS)
            task_status.started(None)
        else:
            ticks = ticks_of(first, info.fqme)
            task_status.started(tick_dict(ticks[-1]))
            publish(ticks)
        async for quote in quotes:
            batch = ticks_of(quote, info.fqme)
            while True:
                try:
                    batch += ticks_of(quotes.receive_nowait(), info.fqme)
                except trio.WouldBlock:
                    break
            publish(batch)
