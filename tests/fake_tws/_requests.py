"""Client → gateway requests, parsed into typed records.

Every parser mirrors ib_async 2.1's encoder field by field (with the same
server-version gates) and fails if fields are left over, so any drift between
the client and the fake shows up as a loud error instead of silent garbage.
"""
from __future__ import annotations

import math

import msgspec

from ._wire import UNSET_DOUBLE, Cursor, WireError


class Req(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every parsed request."""


class ContractQuery(msgspec.Struct, frozen=True, kw_only=True):
    """The 12 contract fields the client sends (C12 in the fact sheet)."""

    con_id: int = 0
    symbol: str = ''
    sec_type: str = ''
    last_trade: str = ''
    strike: float = 0.0
    right: str = ''
    multiplier: str = ''
    exchange: str = ''
    primary_exchange: str = ''
    currency: str = ''
    local_symbol: str = ''
    trading_class: str = ''

    def describe(self) -> str:
        parts = [f'{k}={v!r}' for k, v in msgspec.structs.asdict(self).items() if v]
        return 'Contract(' + ', '.join(parts) + ')'


class StartApi(Req):
    client_id: int
    optional_capabilities: str = ''


class ReqContractDetails(Req):
    req_id: int
    contract: ContractQuery
    include_expired: bool = False
    sec_id_type: str = ''
    sec_id: str = ''


class ReqMatchingSymbols(Req):
    req_id: int
    pattern: str


class ReqMktData(Req):
    req_id: int
    contract: ContractQuery
    generic_ticks: str = ''
    snapshot: bool = False
    regulatory_snapshot: bool = False


class CancelMktData(Req):
    req_id: int


class ReqHistoricalData(Req):
    req_id: int
    contract: ContractQuery
    end: str
    bar_size: str
    duration: str
    use_rth: bool
    what_to_show: str
    format_date: int
    keep_up_to_date: bool


class CancelHistoricalData(Req):
    req_id: int


class PlaceOrder(Req):
    order_id: int
    contract: ContractQuery
    action: str
    qty: float
    order_type: str
    lmt_price: float | None
    aux_price: float | None
    tif: str
    oca_group: str
    account: str
    order_ref: str
    transmit: bool
    parent_id: int
    outside_rth: bool
    what_if: bool
    algo_strategy: str = ''
    n_conditions: int = 0


class CancelOrder(Req):
    order_id: int
    manual_cancel_time: str = ''


class ReqOpenOrders(Req):
    pass


class ReqAllOpenOrders(Req):
    pass


class ReqAutoOpenOrders(Req):
    auto_bind: bool


class ReqCompletedOrders(Req):
    api_only: bool


class ReqExecutions(Req):
    req_id: int
    client_id: int
    account: str
    time: str
    symbol: str
    sec_type: str
    exchange: str
    side: str


class ReqPositions(Req):
    pass


class CancelPositions(Req):
    pass


class ReqAccountUpdates(Req):
    subscribe: bool
    account: str


class ReqAccountUpdatesMulti(Req):
    req_id: int
    account: str
    model_code: str
    ledger_and_nlv: bool


class CancelAccountUpdatesMulti(Req):
    req_id: int


class ReqAccountSummary(Req):
    req_id: int
    group: str
    tags: str


class CancelAccountSummary(Req):
    req_id: int


class ReqCurrentTime(Req):
    pass


class ReqIds(Req):
    num_ids: int


class ReqMarketDataType(Req):
    data_type: int


class ReqGlobalCancel(Req):
    pass


class Unsupported(Req):
    msg_id: int


def _contract(c: Cursor) -> ContractQuery:
    return ContractQuery(
        con_id=c.i(),
        symbol=c.s(),
        sec_type=c.s(),
        last_trade=c.s(),
        strike=c.f(0.0),
        right=c.s(),
        multiplier=c.s(),
        exchange=c.s(),
        primary_exchange=c.s(),
        currency=c.s(),
        local_symbol=c.s(),
        trading_class=c.s(),
    )


def _price(v: float) -> float | None:
    return None if v == UNSET_DOUBLE else v


def _place_order(c: Cursor, sv: int) -> PlaceOrder:
    order_id = c.i()
    contract = _contract(c)
    c.skip(2)  # secIdType, secId
    action = c.s()
    qty = c.f(0.0)
    order_type = c.s()
    lmt = _price(c.f())
    aux = _price(c.f())
    tif = c.s()
    oca_group = c.s()
    account = c.s()
    c.skip(2)  # openClose, origin
    order_ref = c.s()
    transmit = c.b()
    parent_id = c.i()
    c.skip(4)  # blockOrder, sweepToFill, displaySize, triggerMethod
    outside_rth = c.b()
    c.skip(1)  # hidden
    if contract.sec_type == 'BAG':
        c.skip(8 * c.i())
        c.skip(c.i())
        c.skip(2 * c.i())
    c.skip(7)  # "", discretionaryAmt, goodAfterTime, goodTillDate, faGroup/Method/Percentage
    if sv < 177:
        c.skip(1)  # faProfile
    # modelCode … deltaNeutralOrderType, deltaNeutralAuxPrice
    c.skip(22)
    dn_order_type = c.s()
    c.skip(1)
    if dn_order_type:
        c.skip(8)
    c.skip(6)  # continuousUpdate … scaleSubsLevelSize
    increment = c.f()
    if 0 < increment < UNSET_DOUBLE:
        c.skip(7)
    c.skip(3)  # scaleTable, activeStartTime, activeStopTime
    if c.s():  # hedgeType
        c.skip(1)
    c.skip(4)  # optOutSmartRouting, clearingAccount, clearingIntent, notHeld
    if c.b():  # deltaNeutralContract present
        c.skip(3)
    algo = c.s()
    if algo:
        c.skip(2 * c.i())
    c.skip(1)  # algoId
    what_if = c.b()
    c.skip(4)  # orderMiscOptions, solicited, randomizeSize, randomizePrice
    if order_type in ('PEG BENCH', 'PEGBENCH'):
        c.skip(5)
    n_cond = c.i()
    if n_cond:
        cond_len = {1: 6, 3: 3, 4: 3, 5: 4, 6: 5, 7: 5}
        for _ in range(n_cond):
            ctype = c.i()
            if ctype not in cond_len:
                raise WireError(f'placeOrder: unknown order condition type {ctype}')
            c.skip(cond_len[ctype])
        c.skip(2)  # conditionsIgnoreRth, conditionsCancelOrder
    c.skip(19)  # adjustedOrderType … usePriceMgmtAlgo
    if sv >= 158:
        c.skip(1)  # duration
    if sv >= 160:
        c.skip(1)  # postToAts
    if sv >= 162:
        c.skip(1)  # autoCancelParent
    if sv >= 166:
        c.skip(1)  # advancedErrorOverride
    if sv >= 169:
        c.skip(1)  # manualOrderTime
    if sv >= 170:
        if contract.exchange == 'IBKRATS':
            c.skip(1)
        if order_type in ('PEG BEST', 'PEGBEST'):
            c.skip(1)
            if c.f() == math.inf:
                c.skip(2)
        elif order_type in ('PEG MID', 'PEGMID'):
            c.skip(2)
    return PlaceOrder(
        order_id=order_id, contract=contract, action=action, qty=qty,
        order_type=order_type, lmt_price=lmt, aux_price=aux, tif=tif,
        oca_group=oca_group, account=account, order_ref=order_ref, transmit=transmit,
        parent_id=parent_id, outside_rth=outside_rth, what_if=what_if,
        algo_strategy=algo, n_conditions=n_cond,
    )


def _mkt_data(c: Cursor) -> ReqMktData:
    c.skip(1)  # version 11
    req_id = c.i()
    contract = _contract(c)
    if contract.sec_type == 'BAG':
        c.skip(4 * c.i())
    if c.b():
        c.skip(3)
    generic = c.s()
    snapshot = c.b()
    regulatory = c.b()
    c.skip(1)  # mktDataOptions
    return ReqMktData(
        req_id=req_id, contract=contract, generic_ticks=generic,
        snapshot=snapshot, regulatory_snapshot=regulatory,
    )


def _historical(c: Cursor) -> ReqHistoricalData:
    req_id = c.i()
    contract = _contract(c)
    c.skip(1)  # includeExpired
    end = c.s()
    bar_size = c.s()
    duration = c.s()
    use_rth = c.b()
    what = c.s()
    fmt_date = c.i(1)
    if contract.sec_type == 'BAG':
        c.skip(4 * c.i())
    keep = c.b()
    c.skip(1)  # chartOptions
    return ReqHistoricalData(
        req_id=req_id, contract=contract, end=end, bar_size=bar_size, duration=duration,
        use_rth=use_rth, what_to_show=what, format_date=fmt_date, keep_up_to_date=keep,
    )


def _contract_details(c: Cursor, sv: int) -> ReqContractDetails:
    c.skip(1)  # version 8
    req_id = c.i()
    contract = _contract(c)
    include_expired = c.b()
    sec_id_type = c.s()
    sec_id = c.s()
    if sv >= 176:
        c.skip(1)  # issuerId
    return ReqContractDetails(
        req_id=req_id, contract=contract, include_expired=include_expired,
        sec_id_type=sec_id_type, sec_id=sec_id,
    )


def _executions(c: Cursor) -> ReqExecutions:
    c.skip(1)  # version 3
    return ReqExecutions(
        req_id=c.i(), client_id=c.i(), account=c.s(), time=c.s(),
        symbol=c.s(), sec_type=c.s(), exchange=c.s(), side=c.s(),
    )


def _cancel_order(c: Cursor, sv: int) -> CancelOrder:
    c.skip(1)
    oid = c.i()
    manual = c.s() if sv >= 169 else ''
    return CancelOrder(order_id=oid, manual_cancel_time=manual)


def _bare(cls: type[Req]):
    """Parser for a request that carries only a version field."""

    def parse(c: Cursor, sv: int) -> Req:
        c.skip(1)
        return cls()

    return parse


def _v(c: Cursor) -> Cursor:
    """Skip the version field that follows the message id."""
    c.skip(1)
    return c


# msg id -> (TWS API method name, parser(cursor, server_version))
_PARSERS = {
    71: ('startApi', lambda c, sv: StartApi(client_id=_v(c).i(), optional_capabilities=c.s())),
    9: ('reqContractDetails', _contract_details),
    81: ('reqMatchingSymbols', lambda c, sv: ReqMatchingSymbols(req_id=c.i(), pattern=c.s())),
    1: ('reqMktData', lambda c, sv: _mkt_data(c)),
    2: ('cancelMktData', lambda c, sv: CancelMktData(req_id=_v(c).i())),
    20: ('reqHistoricalData', lambda c, sv: _historical(c)),
    25: ('cancelHistoricalData', lambda c, sv: CancelHistoricalData(req_id=_v(c).i())),
    3: ('placeOrder', _place_order),
    4: ('cancelOrder', _cancel_order),
    5: ('reqOpenOrders', _bare(ReqOpenOrders)),
    16: ('reqAllOpenOrders', _bare(ReqAllOpenOrders)),
    15: ('reqAutoOpenOrders', lambda c, sv: ReqAutoOpenOrders(auto_bind=_v(c).b())),
    99: ('reqCompletedOrders', lambda c, sv: ReqCompletedOrders(api_only=c.b())),
    7: ('reqExecutions', lambda c, sv: _executions(c)),
    61: ('reqPositions', _bare(ReqPositions)),
    64: ('cancelPositions', _bare(CancelPositions)),
    6: ('reqAccountUpdates', lambda c, sv: ReqAccountUpdates(
        subscribe=_v(c).b(), account=c.s())),
    76: ('reqAccountUpdatesMulti', lambda c, sv: ReqAccountUpdatesMulti(
        req_id=_v(c).i(), account=c.s(), model_code=c.s(), ledger_and_nlv=c.b())),
    77: ('cancelAccountUpdatesMulti', lambda c, sv: CancelAccountUpdatesMulti(req_id=_v(c).i())),
    62: ('reqAccountSummary', lambda c, sv: ReqAccountSummary(
        req_id=_v(c).i(), group=c.s(), tags=c.s())),
    63: ('cancelAccountSummary', lambda c, sv: CancelAccountSummary(req_id=_v(c).i())),
    49: ('reqCurrentTime', _bare(ReqCurrentTime)),
    8: ('reqIds', lambda c, sv: ReqIds(num_ids=_v(c).i())),
    59: ('reqMarketDataType', lambda c, sv: ReqMarketDataType(data_type=_v(c).i())),
    58: ('reqGlobalCancel', _bare(ReqGlobalCancel)),
}


def parse_request(fields: list[str], server_version: int) -> tuple[str, Req]:
    """Decode one client message into ``(api_method_name, request)``.

    Unknown message ids become :class:`Unsupported` (recorded, not answered).
    """
    if not fields:
        raise WireError('empty message from client: expected at least a message id')
    try:
        msg_id = int(fields[0])
    except ValueError as err:
        raise WireError(f'message id should be an integer, found {fields[0]!r}') from err
    entry = _PARSERS.get(msg_id)
    if entry is None:
        return f'msg{msg_id}', Unsupported(msg_id=msg_id)
    name, parser = entry
    cursor = Cursor(fields, name)
    req = parser(cursor, server_version)
    cursor.done()
    return name, req
