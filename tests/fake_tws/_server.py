"""The trio TCP server: handshake, per-client sessions, dispatch, market ticks,
and the fault-injection surface tests drive.

Everything here runs on the trio thread that opened the gateway. From a
worker thread (e.g. one running an asyncio ``ib_async`` client) call the
gateway's methods through ``trio.from_thread.run_sync(gw.method, ...)``.
"""
from __future__ import annotations

import math
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import msgspec
import trio

from piker.log import get_logger

from . import _encode as enc
from . import _requests as rq
from ._broker import Broker, Build
from ._market import (
    HistoryError,
    detail_exchange,
    history_bars,
    match_listings,
    parse_end_time,
    search,
)
from ._model import ExecRecord, WorkingOrder
from ._scenario import Listing, Scenario, demo_scenario
from ._wire import (
    MAX_SERVER_VERSION,
    MIN_CLIENT_VERSION,
    FrameReader,
    WireError,
    frame,
    parse_version_range,
)

log = get_logger(__name__)

CONNECT_WARNINGS = {
    2104: 'Market data farm connection is OK:usfarm',
    2106: 'HMDS data farm connection is OK:ushmds',
    2158: 'Sec-def data farm connection is OK:secdefnj',
}
MSG_1100 = 'Connectivity between IB and Trader Workstation has been lost.'
MSG_1101 = 'Connectivity between IB and Trader Workstation has been restored - data lost.'
MSG_1102 = 'Connectivity between IB and Trader Workstation has been restored - data maintained.'


class Received(msgspec.Struct, frozen=True, kw_only=True):
    """One request as the gateway got it: raw fields plus the parsed record."""

    client_id: int  # -1 until startApi named the client
    name: str  # the TWS API method, e.g. 'placeOrder'
    fields: tuple[str, ...]
    req: rq.Req | None


class _Session:
    """One client connection: an outgoing queue drained by a writer task."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.client_id = -1
        self.sv = 0
        self.ready = False
        self.closing = False
        self.abort = False
        self.cancel_scope = trio.CancelScope()
        self._tx, self._rx = trio.open_memory_channel[bytes](math.inf)
        self.mkt_subs: dict[int, int] = {}  # reqId -> conId
        self.positions_sub = False
        self.account_sub: str | None = None
        self.market_data_type = 1

    def send(self, fields: list) -> None:
        try:
            self._tx.send_nowait(frame(*fields))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def close_outbox(self) -> None:
        self._tx.close()

    async def writer(self) -> None:
        try:
            async with self._rx:
                async for data in self._rx:
                    batch = [data]
                    while True:
                        try:
                            batch.append(self._rx.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await self.stream.send_all(b''.join(batch))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.cancel_scope.cancel()  # the peer is gone: stop reading too


class FakeGateway:
    """A fake TWS / IB Gateway. Use :func:`open_fake_gateway` to run one.

    Inspect: ``port``, ``clients``, ``requests``, ``protocol_errors``,
    ``broker`` (orders, executions, positions). Inject: ``drop_connections``,
    ``send_error``, ``lose_connectivity``/``restore_connectivity``,
    ``add_execution``, ``refuse_client_id``, ``set_fill_mode``, ``set_price``,
    ``fill_order``.
    """

    def __init__(self, scenario: Scenario) -> None:
        if not scenario.accounts:
            raise ValueError(
                'Scenario.accounts is empty: ib_async only becomes ready after a '
                "non-empty managedAccounts message; give at least one, e.g. ('DU1234567',)"
            )
        self.scenario = scenario
        self.host = '127.0.0.1'
        self.port = 0
        self.requests: list[Received] = []
        self.protocol_errors: list[str] = []
        self.broker = Broker(scenario, self)
        self._sessions: set[_Session] = set()
        self._refused: set[int] = set()
        self._nursery: trio.Nursery | None = None
        self._upstream_ok = True

    # -- inspection ------------------------------------------------------------

    @property
    def clients(self) -> list[int]:
        """Client ids of connected, started API sessions."""
        return sorted(s.client_id for s in self._sessions if s.ready)

    def requests_named(self, name: str, client_id: int | None = None) -> list[Received]:
        return [r for r in self.requests
                if r.name == name and (client_id is None or r.client_id == client_id)]

    @property
    def executions(self) -> list[ExecRecord]:
        return list(self.broker.executions)

    def order(self, *, order_ref: str | None = None, order_id: int | None = None,
              client_id: int | None = None) -> WorkingOrder | None:
        """The most recent order (working or done) with this ref or id."""
        for o in reversed(list(self.broker.orders.values())):
            if client_id is not None and o.client_id != client_id:
                continue
            if (order_ref is not None and o.order_ref == order_ref) or (
                    order_id is not None and o.order_id == order_id):
                return o
        return None

    async def wait_until(self, predicate: Callable[[], bool], timeout_secs: float = 5.0,
                         poll_secs: float = 0.01) -> None:
        """Poll ``predicate`` on the trio loop until it holds (or raise TooSlowError)."""
        with trio.fail_after(timeout_secs):
            while not predicate():
                await trio.sleep(poll_secs)

    # -- fault injection -----------------------------------------------------------

    def drop_connections(self, client_id: int | None = None) -> int:
        """Reset client sockets abruptly (RST, no goodbye); returns how many."""
        n = 0
        for s in list(self._sessions):
            if client_id is None or s.client_id == client_id:
                s.abort = True
                s.cancel_scope.cancel()
                n += 1
        log.info('fake_tws.drop', client_id=client_id, dropped=n)
        return n

    def send_error(self, code: int, msg: str, req_id: int = -1,
                   client_id: int | None = None) -> None:
        """Send an error/warning message to every client (or one)."""
        for s in self._ready(client_id):
            s.send(enc.error(s.sv, req_id, code, msg))

    def lose_connectivity(self) -> None:
        """Error 1100 to all and pause market data, like TWS losing IB's servers."""
        self._upstream_ok = False
        self.send_error(1100, MSG_1100)

    def restore_connectivity(self, data_lost: bool = False) -> None:
        """1102 (subscriptions kept) or 1101 (market data subscriptions dropped)."""
        self._upstream_ok = True
        if data_lost:
            for s in self._sessions:
                s.mkt_subs.clear()
            self.send_error(1101, MSG_1101)
        else:
            self.send_error(1102, MSG_1102)

    def refuse_client_id(self, client_id: int) -> None:
        """Answer this client id's startApi with error 326 and close."""
        self._refused.add(client_id)

    def accept_client_id(self, client_id: int) -> None:
        self._refused.discard(client_id)

    def set_fill_mode(self, mode: str, *, symbol: str | None = None,
                      order_ref: str | None = None, order_id: int | None = None,
                      reason: str | None = None) -> None:
        """How future orders clear, per symbol, orderRef or order id (see FillMode)."""
        self.broker.set_fill_mode(mode, symbol=symbol, order_ref=order_ref,
                                  order_id=order_id, reason=reason)

    def add_execution(self, *, shares: float, price: float | None = None,
                      order_ref: str | None = None, order_id: int | None = None,
                      client_id: int | None = None, symbol: str | None = None,
                      con_id: int | None = None, side: str = 'BOT',
                      account: str | None = None) -> ExecRecord:
        """See :meth:`Broker.add_execution`."""
        return self.broker.add_execution(
            shares=shares, price=price, order_ref=order_ref, order_id=order_id,
            client_id=client_id, symbol=symbol, con_id=con_id, side=side, account=account,
        )

    def fill_order(self, *, order_ref: str | None = None, order_id: int | None = None,
                   client_id: int | None = None, qty: float | None = None,
                   price: float | None = None) -> ExecRecord:
        """Fill (part of) a working order now, whatever its fill mode."""
        o = self.broker.find_order(order_ref=order_ref, order_id=order_id, client_id=client_id)
        if o is None:
            raise ValueError(
                f'fill_order: no working order with order_ref={order_ref!r} '
                f'order_id={order_id!r}; working: {self.broker.working_refs()}'
            )
        px = price if price is not None else self.broker._fill_price(o)
        return self.broker.execute(o, qty if qty is not None else o.remaining, px)

    def set_price(self, price: float, *, symbol: str | None = None,
                  con_id: int | None = None) -> None:
        """Move a listing's mid; subscribers get ticks, marketable limits fill."""
        lst = self.broker.resolve(symbol, con_id, 'set_price')
        self.broker.quotes[lst.con_id].set_mid(price)
        self._send_quotes(lst.con_id)
        self.broker.on_price(lst.con_id)

    # -- Outbox (used by the broker) -------------------------------------------------

    def _ready(self, client_id: int | None = None) -> list[_Session]:
        return [s for s in self._sessions
                if s.ready and (client_id is None or s.client_id == client_id)]

    def to_client(self, client_id: int, build: Build) -> None:
        for s in self._ready(client_id):
            s.send(build(s.sv))

    def to_position_subscribers(self, build: Build) -> None:
        for s in self._ready():
            if s.positions_sub:
                s.send(build(s.sv))

    def to_account_subscribers(self, account: str, build: Build) -> None:
        for s in self._ready():
            if s.account_sub == account:
                s.send(build(s.sv))

    def later(self, delay_secs: float, fn: Callable[[], None]) -> None:
        assert self._nursery is not None, 'the gateway is not running'

        async def run() -> None:
            await trio.sleep(delay_secs)
            fn()

        self._nursery.start_soon(run)

    def now(self) -> float:
        return time.time()

    # -- serving ----------------------------------------------------------------------

    async def _serve(self, host: str, port: int,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.host = host
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._ticker)
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            log.info('fake_tws.listening', host=host, port=self.port)
            task_status.started()

    async def _connection(self, stream: trio.SocketStream) -> None:
        sess = _Session(stream)
        self._sessions.add(sess)
        try:
            with sess.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sess.writer)
                    try:
                        await self._read_loop(sess)
                    finally:
                        sess.close_outbox()
        except Exception as err:  # a fake bug: record it, keep serving others
            self._protocol_error(sess, f'connection handler failed: {err!r}')
        finally:
            self._sessions.discard(sess)
            if sess.ready:
                log.info('fake_tws.client.gone', client_id=sess.client_id, reset=sess.abort)
            if sess.abort:
                try:
                    stream.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
                except OSError:
                    pass
            await trio.aclose_forcefully(stream)

    async def _read_loop(self, sess: _Session) -> None:
        reader = FrameReader(expect_prefix=True)
        while not sess.closing:
            try:
                data = await sess.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                messages = reader.feed(data)
            except WireError as err:
                self._protocol_error(sess, str(err))
                return
            for fields in messages:
                if sess.sv == 0:
                    self._handshake(sess, fields)
                elif not sess.ready:
                    self._start_api(sess, fields)
                else:
                    self._dispatch(sess, fields)
                if sess.closing:
                    return

    def _protocol_error(self, sess: _Session, text: str) -> None:
        self.protocol_errors.append(f'client {sess.client_id}: {text}')
        log.error('fake_tws.protocol_error', client_id=sess.client_id, error=text)

    def _handshake(self, sess: _Session, fields: list[str]) -> None:
        try:
            lo, hi = parse_version_range(fields)
        except WireError as err:
            self._protocol_error(sess, str(err))
            sess.closing = True
            return
        sv = min(hi, self.scenario.server_version, MAX_SERVER_VERSION)
        if sv < max(lo, MIN_CLIENT_VERSION):
            self._protocol_error(
                sess, f'handshake: client speaks v{lo}..{hi}, the fake speaks '
                f'v{MIN_CLIENT_VERSION}..{MAX_SERVER_VERSION}; no common version')
            sess.closing = True
            return
        sess.sv = sv
        sess.send([sv, time.strftime('%Y%m%d %H:%M:%S UTC', time.gmtime())])

    def _start_api(self, sess: _Session, fields: list[str]) -> None:
        try:
            name, req = rq.parse_request(fields, sess.sv)
        except WireError as err:
            self._protocol_error(sess, str(err))
            sess.closing = True
            return
        self.requests.append(Received(client_id=-1, name=name, fields=tuple(fields), req=req))
        if not isinstance(req, rq.StartApi):
            self._protocol_error(sess, f'expected startApi (71) after the handshake, got {name}')
            sess.closing = True
            return
        cid = req.client_id
        in_use = any(s.ready and s.client_id == cid for s in self._sessions)
        if cid in self._refused or in_use:
            log.info('fake_tws.client.refused', client_id=cid, in_use=in_use)
            sess.send(enc.error(
                sess.sv, -1, 326, 'Unable to connect as the client id is already in use. '
                'Retry with a unique client id.'))
            sess.closing = True
            return
        sess.client_id = cid
        sess.ready = True
        log.info('fake_tws.client.ready', client_id=cid, server_version=sess.sv)
        sess.send(enc.managed_accounts(self.scenario.accounts))
        sess.send(enc.next_valid_id(self.broker.next_order_id))
        for code in self.scenario.connect_warnings:
            sess.send(enc.error(sess.sv, -1, code, CONNECT_WARNINGS.get(code, 'OK')))

    def _dispatch(self, sess: _Session, fields: list[str]) -> None:
        try:
            name, req = rq.parse_request(fields, sess.sv)
        except WireError as err:
            self.requests.append(Received(
                client_id=sess.client_id, name=f'msg{fields[0] if fields else "?"}',
                fields=tuple(fields), req=None))
            self._protocol_error(sess, str(err))
            return
        self.requests.append(Received(
            client_id=sess.client_id, name=name, fields=tuple(fields), req=req))
        try:
            self._handle(sess, req)
        except Exception as err:  # a fake bug must not kill the connection silently
            self._protocol_error(sess, f'{name} handler failed: {err!r}')
            log.exception('fake_tws.handler_failed', request=name)

    # -- request handlers ----------------------------------------------------------------

    def _handle(self, sess: _Session, req: rq.Req) -> None:
        b = self.broker
        sv = sess.sv
        match req:
            case rq.PlaceOrder():
                b.place(sess.client_id, req)
            case rq.CancelOrder(order_id=oid):
                b.cancel(sess.client_id, oid)
            case rq.ReqGlobalCancel():
                b.global_cancel()
            case rq.ReqOpenOrders() | rq.ReqAllOpenOrders():
                who = None if isinstance(req, rq.ReqAllOpenOrders) else sess.client_id
                for o in b.open_orders(who):
                    sess.send(enc.open_order(sv, o))
                    sess.send(enc.order_status(o))
                sess.send(enc.open_order_end())
            case rq.ReqAutoOpenOrders():
                pass
            case rq.ReqCompletedOrders():
                for o in b.completed:
                    sess.send(enc.completed_order(sv, o))
                sess.send(enc.completed_orders_end())
            case rq.ReqExecutions(req_id=rid):
                for ex in b.executions_matching(req):
                    sess.send(enc.exec_details(sv, rid, ex))
                    sess.send(enc.commission_report(ex))
                sess.send(enc.exec_details_end(rid))
            case rq.ReqPositions():
                sess.positions_sub = True
                for acct, lst, p in b.position_rows():
                    if p.qty:
                        sess.send(enc.position(acct, lst, p.qty, p.avg_price * lst.mult))
                sess.send(enc.position_end())
            case rq.CancelPositions():
                sess.positions_sub = False
            case rq.ReqAccountUpdates(subscribe=sub, account=acct):
                self._account_updates(sess, sub, acct)
            case rq.ReqAccountUpdatesMulti(req_id=rid, account=acct):
                for a in self._accounts_for(acct):
                    for tag, value, cur in self._values(a):
                        sess.send(enc.account_update_multi(rid, a, tag, value, cur))
                sess.send(enc.account_update_multi_end(rid))
            case rq.CancelAccountUpdatesMulti() | rq.CancelAccountSummary() | rq.CancelHistoricalData():
                pass
            case rq.ReqAccountSummary(req_id=rid, tags=tags):
                wanted = {t.strip() for t in tags.split(',') if t.strip()}
                for a in self.scenario.accounts:
                    for tag, value, cur in self._values(a):
                        if tag in wanted or 'All' in wanted:
                            sess.send(enc.account_summary(rid, a, tag, value, cur))
                sess.send(enc.account_summary_end(rid))
            case rq.ReqContractDetails(req_id=rid, contract=q):
                matches = [] if req.sec_id_type else match_listings(b.listings, q)
                if not matches:
                    self._no_security(sess, rid, q)
                    return
                for lst in matches:
                    sess.send(enc.contract_details(sv, rid, lst, detail_exchange(q, lst)))
                sess.send(enc.contract_details_end(rid))
            case rq.ReqMatchingSymbols(req_id=rid, pattern=pattern):
                sess.send(enc.symbol_samples(sv, rid, search(b.listings, pattern)))
            case rq.ReqMktData():
                self._mkt_data(sess, req)
            case rq.CancelMktData(req_id=rid):
                sess.mkt_subs.pop(rid, None)
            case rq.ReqHistoricalData():
                self._history(sess, req)
            case rq.ReqCurrentTime():
                sess.send(enc.current_time(int(self.now())))
            case rq.ReqIds():
                sess.send(enc.next_valid_id(b.next_order_id))
            case rq.ReqMarketDataType(data_type=t):
                sess.market_data_type = t
            case rq.StartApi():
                self._protocol_error(sess, 'startApi sent twice on one connection')
            case rq.Unsupported(msg_id=mid):
                log.warning('fake_tws.unsupported', client_id=sess.client_id, msg_id=mid)
            case _:
                log.warning('fake_tws.unhandled', request=type(req).__name__)

    def _accounts_for(self, acct: str) -> list[str]:
        if acct in ('', 'All'):
            return list(self.scenario.accounts)
        return [a for a in self.scenario.accounts if a == acct]

    def _values(self, account: str) -> list[tuple[str, str, str]]:
        return [(v.tag, v.value, v.currency) for v in self.scenario.account_values
                if v.account in ('', account)]

    def _account_updates(self, sess: _Session, subscribe: bool, acct: str) -> None:
        acct = acct or self.broker.default_account
        if not subscribe:
            sess.account_sub = None
            return
        sess.account_sub = acct
        for tag, value, cur in self._values(acct):
            sess.send(enc.account_value(tag, value, cur, acct))
        for a, lst, p in self.broker.position_rows():
            if a == acct and p.qty:
                sess.send(self.broker.portfolio_fields(a, lst, p))
        sess.send(enc.account_time(self.now()))
        sess.send(enc.account_download_end(acct))

    def _resolve_one(self, sess: _Session, req_id: int, q: rq.ContractQuery) -> Listing | None:
        matches = match_listings(self.broker.listings, q)
        if len(matches) == 1:
            return matches[0]
        if not matches:
            self._no_security(sess, req_id, q)
        else:
            venues = ', '.join(f'{m.symbol}@{m.exchange}' for m in matches)
            sess.send(enc.error(
                sess.sv, req_id, 200,
                f'The contract description specified for {q.symbol} is ambiguous ({venues}).'))
        return None

    def _no_security(self, sess: _Session, req_id: int, q: rq.ContractQuery) -> None:
        log.info('fake_tws.no_security', req_id=req_id, contract=q.describe())
        sess.send(enc.error(
            sess.sv, req_id, 200, 'No security definition has been found for the request'))

    def _history(self, sess: _Session, req: rq.ReqHistoricalData) -> None:
        lst = self._resolve_one(sess, req.req_id, req.contract)
        if lst is None:
            return
        now = self.scenario.history_end_epoch_secs or self.now()
        try:
            end = parse_end_time(req.end, now)
            start, stop, bars = history_bars(lst, end, req.duration, req.bar_size,
                                             req.format_date)
        except HistoryError as err:
            sess.send(enc.error(sess.sv, req.req_id, err.code, str(err)))
            return
        sess.send(enc.historical_data(req.req_id, start, stop, bars))

    def _mkt_data(self, sess: _Session, req: rq.ReqMktData) -> None:
        lst = self._resolve_one(sess, req.req_id, req.contract)
        if lst is None:
            return
        if not lst.market_data:
            sess.send(enc.error(
                sess.sv, req.req_id, 354, 'Requested market data is not subscribed. '
                f'Check API status by selecting the Account menu then under Management '
                f'choose Market Data Subscription Manager ({lst.symbol}).'))
            return
        rid = req.req_id
        sess.send(enc.market_data_type(rid, sess.market_data_type))
        sess.send(enc.tick_req_params(rid, lst.min_tick, lst.exchange))
        self._send_quote(sess, rid, lst.con_id)
        sess.send(enc.tick_price(rid, 9, lst.price, 0))  # prior close
        if req.snapshot or req.regulatory_snapshot:
            sess.send(enc.tick_snapshot_end(rid))
            return
        sess.mkt_subs[rid] = lst.con_id

    def _send_quote(self, sess: _Session, req_id: int, con_id: int) -> None:
        q = self.broker.quotes[con_id]
        size = q.listing.quote_size
        sess.send(enc.tick_price(req_id, 1, q.bid, size))
        sess.send(enc.tick_price(req_id, 2, q.ask, size))
        sess.send(enc.tick_price(req_id, 4, q.last, q.last_size))
        sess.send(enc.tick_size(req_id, 8, q.volume))

    def _send_quotes(self, con_id: int) -> None:
        for s in self._ready():
            for rid, cid in list(s.mkt_subs.items()):
                if cid == con_id:
                    self._send_quote(s, rid, cid)

    async def _ticker(self) -> None:
        interval = self.scenario.tick_interval_secs
        if interval <= 0:
            return
        while True:
            await trio.sleep(interval)
            if not self._upstream_ok:
                continue
            con_ids = {cid for s in self._ready() for cid in s.mkt_subs.values()}
            for cid in sorted(con_ids):
                self.broker.quotes[cid].step(self.scenario.random_walk)
                self._send_quotes(cid)
                self.broker.on_price(cid)


@asynccontextmanager
async def open_fake_gateway(scenario: Scenario | None = None, host: str = '127.0.0.1',
                            port: int = 0) -> AsyncIterator[FakeGateway]:
    """Serve a fake TWS on ``host:port`` (0: a free port, see ``gw.port``)
    for the duration of the block; the demo scenario by default."""
    gw = FakeGateway(scenario if scenario is not None else demo_scenario())
    async with trio.open_nursery() as nursery:
        await nursery.start(gw._serve, host, port)
        try:
            yield gw
        finally:
            nursery.cancel_scope.cancel()
