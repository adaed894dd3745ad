"""The raw IB client: ib_async's ``IB`` on the asyncio loop of an infected actor.

:class:`IbClient` is the target of the method proxy (``_proxy.py``): trio code
calls its public methods by name and receives plain frozen records, never live
ib_async objects (those mutate under the asyncio loop). Everything ib_async
reports on its own (order states, executions, positions, errors, connection
changes, quotes) is turned into such records and pushed through ``emit``.

Only ib_async's async API is used (``connectAsync`` and ``*Async``); its
blocking wrappers would try to run the loop that is already running.

Client ids: each actor role owns a block of :data:`CLIENT_IDS_PER_ROLE` ids
starting at ``base_client_id + ROLE_OFFSETS[role]``. TWS answers a duplicate
id with error 326 and a closed socket (and ib_async would only time out), so
:meth:`IbClient.connect` watches for 326 itself and moves on to the next id.
A reconnect tries the id it had first: only that id may manage its orders.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import re
import time
from typing import Any, Literal

from ib_async import IB, Contract, LimitOrder, MarketOrder, Order, RequestError, Trade

from ...config import IbCfg
from ...log import get_logger
from ...types import Struct
from .symbols import ContractInfo, ContractSpec, fqme_for, listing_venue, route_for

log = get_logger(__name__)

Role = Literal['brokerd', 'datad', 'adhoc']
ROLE_OFFSETS: dict[str, int] = {'brokerd': 0, 'datad': 16, 'adhoc': 32}
CLIENT_IDS_PER_ROLE = 16

# "all is well" notices (data farm OK / inactive / connecting): logged once
INFO_CODES = frozenset({2100, 2104, 2106, 2107, 2108, 2119, 2150, 2158})
# TWS <-> IB servers: lost, restored with data lost, restored with data kept
CONNECTIVITY_LOST = 1100
CONNECTIVITY_CODES = frozenset({1100, 1101, 1102, 1300})
CLIENT_ID_IN_USE = 326
# order / request problems that are the caller's business, not ours
REQUEST_CODES = frozenset({
    103, 104, 105, 110, 135, 161, 162, 165, 200, 201, 202, 203, 321, 354, 366, 399,
    404, 434, 10147, 10148, 10167, 10168,
})
# an order report with one of these codes ended the order normally
CANCEL_CODES = frozenset({202})
REQUEST_TIMEOUT_SECS = 10.0
HISTORY_TIMEOUT_SECS = 60.0

ErrorKind = Literal['info', 'connectivity', 'request', 'warning', 'error']


def client_ids(base: int, role: Role) -> range:
    """The client ids ``role`` may use, in the order they are tried."""
    try:
        start = base + ROLE_OFFSETS[role]
    except KeyError:
        raise ValueError(
            f'unknown IB actor role {role!r}: expected one of {sorted(ROLE_OFFSETS)}'
        ) from None
    return range(start, start + CLIENT_IDS_PER_ROLE)


def classify(code: int) -> ErrorKind:
    if code in INFO_CODES:
        return 'info'
    if code in CONNECTIVITY_CODES:
        return 'connectivity'
    if code in REQUEST_CODES:
        return 'request'
    if 2100 <= code < 2200:
        return 'warning'
    return 'error'


# -- records pushed to (or returned to) trio -------------------------------------------

class ConnInfo(Struct, frozen=True):
    host: str
    port: int
    client_id: int
    accounts: list[str]
    server_version: int


class IbError(Struct, frozen=True):
    """An error or warning from IB (``req_id`` is an order id for order errors)."""
    req_id: int
    code: int
    text: str
    kind: str


class LinkDown(Struct, frozen=True):
    """The link to IB is unusable: the socket closed, or TWS lost IB (1100)."""
    reason: str
    code: int | None = None
    socket_closed: bool = False


class LinkRestored(Struct, frozen=True):
    """TWS reached IB again (1101: subscriptions lost, 1102: kept)."""
    code: int
    data_lost: bool


class OrderReport(Struct, frozen=True):
    """An order as IB last described it."""
    order_id: int
    client_id: int
    perm_id: int
    order_ref: str
    account: str
    con_id: int
    action: str
    qty: float
    order_type: str
    lmt_price: float | None
    status: str
    filled: float
    remaining: float
    avg_fill_price: float
    # the IB error that ended or marked the order, if any
    error_code: int | None = None
    error_text: str = ''


class ExecReport(Struct, frozen=True):
    exec_id: str
    order_id: int
    client_id: int
    perm_id: int
    order_ref: str
    account: str
    con_id: int
    side: str  # BOT / SLD
    shares: float
    price: float
    time_ns: int
    commission: float | None


class PositionReport(Struct, frozen=True):
    account: str
    con_id: int
    symbol: str
    sec_type: str
    size: float
    # IB's avgCost: the per-unit price times the multiplier
    avg_cost: float
    multiplier: float


class SyncState(Struct, frozen=True):
    orders: list[OrderReport]
    executions: list[ExecReport]
    positions: list[PositionReport]


class IbQuote(Struct, frozen=True):
    con_id: int
    ts_ns: int
    bid: float
    ask: float
    bid_size: float
    ask_size: float
    last: float
    last_size: float
    volume: float
    # (price, size) of every trade tick since the previous quote
    trades: list[tuple[float, float]] = []


class QuoteBatch(Struct, frozen=True):
    quotes: list[IbQuote]


class OrderRequest(Struct, frozen=True):
    info: ContractInfo
    action: Literal['BUY', 'SELL']
    qty: float
    order_type: Literal['MKT', 'LMT']
    lmt_price: float | None = None
    account: str = ''
    order_ref: str = ''
    tif: str = 'DAY'
    # non-zero: modify this working order
    order_id: int = 0


class ClientIdInUse(ConnectionError):
    """TWS refused the client id (error 326)."""


class IbRequestError(ValueError):
    """IB answered a request with an error (``code`` and ``text`` are IB's)."""

    def __init__(self, what: str, code: int, text: str) -> None:
        super().__init__(f'IB refused {what}: error {code}: {text}')
        self.code = code
        self.text = text


# -- conversions (pure) ----------------------------------------------------------------

def _num(x: Any, default: float = 0.0) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return default
    return default if math.isnan(value) or value >= 1e300 else value


def to_ns(when: dt.datetime | dt.date | None) -> int:
    if when is None:
        return time.time_ns()
    if not isinstance(when, dt.datetime):
        when = dt.datetime(when.year, when.month, when.day, tzinfo=dt.UTC)
    elif when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1_000_000_000)


def info_from_details(details: Any) -> ContractInfo:
    c: Contract = details.contract
    venue = listing_venue(c.exchange, c.primaryExchange)
    return ContractInfo(
        fqme=fqme_for(c.symbol, c.secType, venue, c.currency),
        con_id=c.conId, symbol=c.symbol, sec_type=c.secType, venue=venue,
        route_exchange=route_for(c.secType, venue, details.validExchanges),
        currency=c.currency, tick_size=_num(details.minTick, 0.01) or 0.01,
        lot_size=_num(details.sizeIncrement) or _num(details.minSize) or 1.0,
        multiplier=_num(c.multiplier, 1.0) or 1.0, local_symbol=c.localSymbol,
        trading_class=c.tradingClass, last_trade_date=c.lastTradeDateOrContractMonth,
        description=details.longName, time_zone=details.timeZoneId,
    )


def to_contract(info: ContractInfo) -> Contract:
    return Contract(
        conId=info.con_id, symbol=info.symbol, secType=info.sec_type,
        exchange=info.route_exchange, currency=info.currency,
        primaryExchange=info.venue if info.sec_type == 'STK' else '',
        lastTradeDateOrContractMonth=info.last_trade_date,
        localSymbol=info.local_symbol, tradingClass=info.trading_class,
    )


# ib_async's own framing of an error in a trade's log
_LOG_PREFIX = re.compile(r'^(Error|Warning) -?\d+, reqId -?\d+: ')


def order_report(trade: Trade) -> OrderReport:
    o, s = trade.order, trade.orderStatus
    code, text = None, ''
    # only the latest entry: an earlier warning (399, ...) says nothing about the end
    if trade.log and trade.log[-1].errorCode:
        code = trade.log[-1].errorCode
        text = _LOG_PREFIX.sub('', trade.log[-1].message)
    lmt = _num(o.lmtPrice, math.nan)
    return OrderReport(
        order_id=o.orderId, client_id=o.clientId, perm_id=o.permId or s.permId,
        order_ref=o.orderRef, account=o.account, con_id=trade.contract.conId,
        action=o.action, qty=_num(o.totalQuantity), order_type=o.orderType,
        lmt_price=None if math.isnan(lmt) else lmt, status=s.status,
        filled=_num(s.filled), remaining=_num(s.remaining),
        avg_fill_price=_num(s.avgFillPrice), error_code=code, error_text=text,
    )


def exec_report(fill: Any) -> ExecReport:
    ex, report = fill.execution, fill.commissionReport
    return ExecReport(
        exec_id=ex.execId, order_id=ex.orderId, client_id=ex.clientId,
        perm_id=ex.permId, order_ref=ex.orderRef, account=ex.acctNumber,
        con_id=fill.contract.conId, side=ex.side, shares=_num(ex.shares),
        price=_num(ex.price), time_ns=to_ns(ex.time),
        commission=_num(report.commission) if report.execId else None,
    )


def position_report(pos: Any) -> PositionReport:
    c = pos.contract
    return PositionReport(
        account=pos.account, con_id=c.conId, symbol=c.symbol, sec_type=c.secType,
        size=_num(pos.position), avg_cost=_num(pos.avgCost),
        multiplier=_num(c.multiplier, 1.0) or 1.0,
    )


def quote_of(ticker: Any, now_ns: int) -> IbQuote:
    trades = [(_num(t.price), _num(t.size)) for t in ticker.ticks
              if t.tickType in (4, 68) and _num(t.price) > 0]
    return IbQuote(
        con_id=ticker.contract.conId, ts_ns=now_ns,
        bid=_num(ticker.bid, math.nan), ask=_num(ticker.ask, math.nan),
        bid_size=_num(ticker.bidSize), ask_size=_num(ticker.askSize),
        last=_num(ticker.last, math.nan), last_size=_num(ticker.lastSize),
        volume=_num(ticker.volume), trades=trades,
    )


def bar_row(bar: Any) -> tuple[float, float, float, float, float, float]:
    return (to_ns(bar.date) / 1e9, _num(bar.open), _num(bar.high), _num(bar.low),
            _num(bar.close), _num(bar.volume))


# -- ib_async's own log lines -------------------------------------------------------------

# records we log ourselves, structured (errors with codes, connect failures)
_RELOGGED = (
    'Error ', 'Warning ', 'Canceled order', 'Peer closed connection', 'API connection failed',
    'Make sure API port', 'IBKR API validation warning',
)


class _RelayedRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        return not msg.startswith(_RELOGGED)


class _SocketErrors(logging.Filter):
    """The client logger's errors are all socket errors, which also reach
    ``client.apiError``: :class:`IbClient` logs them from there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def quiet_ib_async_logs() -> None:
    """Keep ib_async's warnings and errors, minus the ones :class:`IbClient`
    re-logs as structured events; its per-message INFO chatter only at debug."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger('ib_async').setLevel(logging.WARNING)
    for name, kind in (('ib_async.client', _SocketErrors), ('ib_async.client', _RelayedRecords),
                       ('ib_async.wrapper', _RelayedRecords), ('ib_async.ib', _RelayedRecords)):
        lg = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in lg.filters):
            lg.addFilter(kind())


# -- the client -------------------------------------------------------------------------

class IbClient:
    """One ib_async connection for one actor role (see module doc)."""

    def __init__(self, emit: Any, cfg: IbCfg, role: Role) -> None:
        self._emit = emit
        self._cfg = cfg
        self._role = role
        self._ids = client_ids(cfg.base_client_id, role)
        self._ib = IB()
        self._ib.RaiseRequestErrors = True
        self._up = False
        self._closing = False
        self._info_logged: set[int] = set()
        self._tickers: dict[int, Any] = {}
        self._socket_error = ''
        self.conn: ConnInfo | None = None
        quiet_ib_async_logs()
        ib = self._ib
        ib.errorEvent += self._on_error
        ib.disconnectedEvent += self._on_disconnected
        ib.orderStatusEvent += self._on_order
        ib.openOrderEvent += self._on_order
        ib.commissionReportEvent += self._on_commission
        ib.positionEvent += self._on_position
        ib.pendingTickersEvent += self._on_tickers
        ib.client.apiError += self._on_api_error

    # -- connection ------------------------------------------------------------

    def is_connected(self) -> bool:
        return self._up and self._ib.isConnected()

    async def connect(self) -> ConnInfo:
        """Connect on the first port that answers, with the first free client id
        of this role; raises ``ConnectionError`` naming everything tried."""
        cfg = self._cfg
        tried: list[str] = []
        # the id we had first: IB only lets the placing client id manage its orders
        ids = list(self._ids)
        if self.conn is not None:
            ids.remove(self.conn.client_id)
            ids.insert(0, self.conn.client_id)
        for port in cfg.ports:
            for cid in ids:
                try:
                    await self._connect_once(port, cid)
                except ClientIdInUse:
                    log.warning('ib.connect.client_id_in_use', host=cfg.host, port=port,
                                client_id=cid, role=self._role)
                    continue
                except OSError as err:  # refused, timed out, closed
                    tried.append(f'{cfg.host}:{port} ({type(err).__name__}: {err or "no answer"})')
                    break
                self._up = True
                self.conn = ConnInfo(
                    host=cfg.host, port=port, client_id=cid,
                    accounts=list(self._ib.managedAccounts()),
                    server_version=self._ib.client.serverVersion(),
                )
                log.info('ib.connected', host=cfg.host, port=port, client_id=cid,
                         role=self._role, accounts=self.conn.accounts)
                return self.conn
            else:
                tried.append(f'{cfg.host}:{port} (client ids {self._ids.start}..'
                             f'{self._ids.stop - 1} all in use: IB error 326)')
        raise ConnectionError(
            f'cannot connect to IB as {self._role}: tried {"; ".join(tried)}. Start TWS or '
            'IB Gateway with the API enabled, or fix `brokers.ib.host` / `brokers.ib.ports` '
            '(and `base_client_id` if the ids are taken) in bot.toml'
        )

    async def _connect_once(self, port: int, client_id: int) -> None:
        loop = asyncio.get_running_loop()
        refused: asyncio.Future[str] = loop.create_future()

        def watch(_req_id: int, code: int, text: str, _contract: Any = None) -> None:
            if code == CLIENT_ID_IN_USE and not refused.done():
                refused.set_result(text)

        self._ib.errorEvent += watch
        connecting = asyncio.ensure_future(self._ib.connectAsync(
            self._cfg.host, port, clientId=client_id,
            timeout=self._cfg.connect_timeout_secs,
        ))
        try:
            await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
            if refused.done():
                raise ClientIdInUse(refused.result())
            connecting.result()
        finally:
            self._ib.errorEvent -= watch
            if not connecting.done():
                connecting.cancel()
                try:
                    await connecting
                except BaseException:  # noqa: B036 - we are discarding this attempt
                    pass
                self._ib.disconnect()
            refused.cancel()

    def disconnect(self) -> None:
        self._up = False
        self._tickers.clear()
        self._ib.disconnect()

    def close(self) -> None:
        """Called by the relay on its way out."""
        self._closing = True
        self.disconnect()

    # -- requests ----------------------------------------------------------------

    async def contract_details(self, spec: ContractSpec) -> list[ContractInfo]:
        contract = Contract(
            conId=spec.con_id, symbol=spec.symbol, secType=spec.sec_type,
            exchange=spec.exchange, primaryExchange=spec.primary_exchange,
            currency=spec.currency,
        )
        try:
            details = await asyncio.wait_for(
                self._ib.reqContractDetailsAsync(contract), REQUEST_TIMEOUT_SECS)
        except RequestError as err:
            if err.code == 200:  # no security definition
                return []
            raise IbRequestError('the contract details request', err.code, err.message) from None
        return [info_from_details(d) for d in details]

    async def search(self, pattern: str) -> list[dict[str, str]]:
        found = await self._ib.reqMatchingSymbolsAsync(pattern) or []
        out = []
        for desc in found:
            c = desc.contract
            if c is None:
                continue
            venue = listing_venue(c.exchange, c.primaryExchange)
            out.append({
                'fqme': fqme_for(c.symbol, c.secType, venue, c.currency),
                'symbol': c.symbol, 'sec_type': c.secType, 'currency': c.currency,
                'description': getattr(c, 'description', '') or '',
            })
        return out

    async def history(self, info: ContractInfo, end: dt.datetime | None, duration: str,
                      bar_size: str, what_to_show: str = 'TRADES', use_rth: bool = False,
                      ) -> list[tuple[float, float, float, float, float, float]]:
        try:
            bars = await self._ib.reqHistoricalDataAsync(
                to_contract(info), endDateTime=end or '', durationStr=duration,
                barSizeSetting=bar_size, whatToShow=what_to_show, useRTH=use_rth,
                formatDate=2, timeout=HISTORY_TIMEOUT_SECS,
            )
        except RequestError as err:
            raise IbRequestError(f'the history of {info.fqme}', err.code, err.message) from None
        return [bar_row(b) for b in bars]

    def subscribe_quotes(self, info: ContractInfo, fresh: bool = False) -> None:
        """Stream ``info``'s quotes; ``fresh`` requests them again even if
        subscribed (after 1101 TWS dropped them while ib_async kept its ticker)."""
        ticker = self._tickers.get(info.con_id)
        if ticker is not None:
            if not fresh:
                return
            self._ib.cancelMktData(ticker.contract)
        self._tickers[info.con_id] = self._ib.reqMktData(to_contract(info), '', False, False)

    def unsubscribe_quotes(self, con_id: int) -> None:
        ticker = self._tickers.pop(con_id, None)
        if ticker is not None and self._ib.isConnected():
            self._ib.cancelMktData(ticker.contract)

    def place_order(self, req: OrderRequest) -> int:
        """Place (or, with ``order_id``, modify) an order; returns its order id."""
        if not self.is_connected():
            raise ConnectionError('not connected to IB')
        order: Order
        if req.order_type == 'LMT':
            if req.lmt_price is None:
                raise ValueError('a limit order needs `lmt_price`')
            order = LimitOrder(req.action, req.qty, req.lmt_price)
        else:
            order = MarketOrder(req.action, req.qty)
        order.orderId = req.order_id
        order.account = req.account
        order.orderRef = req.order_ref
        order.tif = req.tif
        trade = self._ib.placeOrder(to_contract(req.info), order)
        return trade.order.orderId

    def cancel_order(self, order_id: int) -> None:
        if not self.is_connected():
            raise ConnectionError('not connected to IB')
        for trade in self._ib.trades():
            if trade.order.orderId == order_id and trade.order.clientId == self.conn_client_id:
                self._ib.cancelOrder(trade.order)
                return
        self._ib.cancelOrder(Order(orderId=order_id, clientId=self.conn_client_id))

    @property
    def conn_client_id(self) -> int:
        return self.conn.client_id if self.conn else -1

    async def sync_state(self, refresh: bool = True) -> SyncState:
        """Orders (working and completed), executions and positions as IB has
        them; ``refresh`` asks IB again instead of reading the connect-time sync."""
        if not self.is_connected():
            raise ConnectionError('not connected to IB')
        if refresh:
            ib = self._ib
            await asyncio.wait_for(ib.reqAllOpenOrdersAsync(), REQUEST_TIMEOUT_SECS)
            await asyncio.wait_for(ib.reqExecutionsAsync(), REQUEST_TIMEOUT_SECS)
            await asyncio.wait_for(ib.reqPositionsAsync(), REQUEST_TIMEOUT_SECS)
        return SyncState(
            orders=[order_report(t) for t in self._ib.trades()],
            executions=[exec_report(f) for f in self._ib.fills()],
            positions=[position_report(p) for p in self._ib.positions()],
        )

    def managed_accounts(self) -> list[str]:
        return list(self._ib.managedAccounts())

    # -- ib_async callbacks ----------------------------------------------------------

    def _on_error(self, req_id: int, code: int, text: str, _contract: Any = None) -> None:
        kind = classify(code)
        match kind:
            case 'info':
                if code not in self._info_logged:
                    self._info_logged.add(code)
                    log.info('ib.info', code=code, text=text)
                return
            case 'connectivity':
                level = logging.INFO if code == 1102 else logging.WARNING
                log.log(level, 'ib.connectivity', code=code, text=text)
                if code == CONNECTIVITY_LOST:
                    self._emit(LinkDown(reason=text, code=code))
                elif code in (1101, 1102):
                    self._emit(LinkRestored(code=code, data_lost=code == 1101))
                return
            case 'request' | 'warning':
                if code == CLIENT_ID_IN_USE:
                    return  # connect() reports it
                level = logging.INFO if code in CANCEL_CODES else logging.WARNING
                log.log(level, 'ib.error', req_id=req_id, code=code, text=text, kind=kind)
            case _:
                if code == CLIENT_ID_IN_USE:
                    return
                log.error('ib.error', req_id=req_id, code=code, text=text, kind=kind)
        self._emit(IbError(req_id=req_id, code=code, text=text, kind=kind))

    def _on_api_error(self, text: str) -> None:
        # connect() reports failed attempts itself; this names a live socket's end
        self._socket_error = text

    def _on_disconnected(self) -> None:
        was_up, self._up = self._up, False
        self._tickers.clear()
        why, self._socket_error = self._socket_error or 'closed by the peer', ''
        if was_up and not self._closing:
            log.warning('ib.disconnected', role=self._role, error=why)
            self._emit(LinkDown(reason=f'the socket to TWS/IB Gateway closed ({why})',
                                socket_closed=True))

    # eventkit swallows what a handler raises: each one logs its own failure

    def _on_order(self, trade: Trade) -> None:
        try:
            self._emit(order_report(trade))
        except Exception:
            log.exception('ib.callback_failed', callback='order', trade=repr(trade))

    def _on_commission(self, _trade: Trade, fill: Any, _report: Any) -> None:
        try:
            self._emit(exec_report(fill))
        except Exception:
            log.exception('ib.callback_failed', callback='commission', fill=repr(fill))

    def _on_position(self, pos: Any) -> None:
        try:
            self._emit(position_report(pos))
        except Exception:
            log.exception('ib.callback_failed', callback='position', position=repr(pos))

    def _on_tickers(self, tickers: Any) -> None:
        now = time.time_ns()
        try:
            quotes = [quote_of(t, now) for t in tickers if t.contract is not None]
        except Exception:
            log.exception('ib.callback_failed', callback='tickers')
            return
        if quotes:
            self._emit(QuoteBatch(quotes=quotes))
