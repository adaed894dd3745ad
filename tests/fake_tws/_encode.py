"""Gateway → client messages as field lists, laid out for ib_async 2.1's decoder.

Each builder takes the negotiated server version ``sv`` where the layout
depends on it (see the version table in the protocol fact sheet).
"""
from __future__ import annotations

import time as _time
from collections.abc import Sequence

from ._model import ExecRecord, WorkingOrder
from ._scenario import Listing
from ._wire import UNSET_DOUBLE

Fields = list[object]


def ib_time(epoch_secs: float) -> str:
    """``YYYYmmdd HH:MM:SS UTC``: the form ib_async parses with a zone."""
    return _time.strftime('%Y%m%d %H:%M:%S UTC', _time.gmtime(epoch_secs))


def _opt(v: float | None) -> object:
    return UNSET_DOUBLE if v is None else v


def error(sv: int, req_id: int, code: int, msg: str, advanced_json: str = '') -> Fields:
    out: Fields = [4, 2, req_id, code, msg]
    if sv >= 166:
        out.append(advanced_json)
    return out


def managed_accounts(accounts: Sequence[str]) -> Fields:
    return [15, 1, ','.join(accounts)]


def next_valid_id(order_id: int) -> Fields:
    return [9, 1, order_id]


def current_time(epoch_secs: int) -> Fields:
    return [49, 1, epoch_secs]


def contract_details(sv: int, req_id: int, lst: Listing, exchange: str) -> Fields:
    out: Fields = [10]
    if sv < 164:
        out.append(8)
    out += [
        req_id, lst.symbol, lst.sec_type, lst.last_trade_date, 0.0, '', exchange,
        lst.currency, lst.local, lst.tclass, lst.tclass, lst.con_id, lst.min_tick,
    ]
    if sv < 164:
        out.append('')  # mdSizeMultiplier
    out += [
        lst.multiplier,
        'ACTIVETIM,AD,ALERT,ALLOC,DAY,GTC,LMT,MKT,STP,STPLMT,TRAIL',
        ','.join(lst.venues),
        1,  # priceMagnifier
        0,  # underConId
        lst.long_name,
        lst.exchange,  # primaryExchange
        lst.last_trade_date[:6],  # contractMonth
        lst.industry, lst.category, '',
        lst.time_zone_id, lst.trading_hours, lst.trading_hours,
        '', '',  # evRule, evMultiplier
        0,  # numSecIds
        1,  # aggGroup
        '', '', '',  # underSymbol, underSecType, marketRuleIds
        lst.last_trade_date,  # realExpirationDate
        lst.stock_type,
    ]
    if sv == 163:
        out.append(1)
    if sv >= 164:
        out += [1, 1, 1]  # minSize, sizeIncrement, suggestedSizeIncrement
    return out


def contract_details_end(req_id: int) -> Fields:
    return [52, 1, req_id]


def _c11(lst: Listing, exchange: str) -> Fields:
    """The 11 contract fields used by openOrder/completedOrder (no primaryExchange)."""
    return [
        lst.con_id, lst.symbol, lst.sec_type, lst.last_trade_date, 0.0, '',
        lst.multiplier, exchange, lst.currency, lst.local, lst.tclass,
    ]


def open_order(sv: int, o: WorkingOrder, *, what_if: bool = False,
               init_margin: float | None = None) -> Fields:
    out: Fields = [5, o.order_id]
    out += _c11(o.listing, o.exchange)
    out += [
        o.action, o.qty, o.order_type, _opt(o.lmt_price), _opt(o.aux_price), o.tif,
        o.oca_group, o.account, 'O', 0, o.order_ref, o.client_id, o.perm_id,
        o.outside_rth, False, 0.0, '', '', '', '', '',
    ]
    if sv < 177:
        out.append('')  # faProfile
    out += [
        '', '', '', '', '', 0, '', -1,  # modelCode … exemptCode
        0, '', '', '', '', '',  # auctionStrategy … stockRangeUpper
        0, False, False, False, '', 3, False, False, '', o.parent_id, 0,
        '', 0, '', '',  # volatility, volatilityType, deltaNeutralOrderType, -AuxPrice
        False, 0, '', '', '', '', '',  # continuousUpdate … comboLegsDescrip
        0, 0, 0,  # comboLegs, orderComboLegs, smartComboRoutingParams
        '', '', '',  # scaleInitLevelSize, scaleSubsLevelSize, scalePriceIncrement
        '',  # hedgeType
        False, '', '', False, False,  # optOutSmartRouting … notHeld, dncPresent
        '',  # algoStrategy
        False, what_if, 'PreSubmitted' if what_if else o.status,
    ]
    if what_if:
        im = init_margin or 0.0
        out += [0.0, 0.0, 0.0, im, im * 0.8, 0.0, im, im * 0.8, 0.0]
        out += [o.listing.min_commission, UNSET_DOUBLE, UNSET_DOUBLE, o.listing.currency, '']
    else:
        out += ['', '', '', '', '', '', '', '', '']
        out += [UNSET_DOUBLE, UNSET_DOUBLE, UNSET_DOUBLE, '', '']
    out += [False, False]  # randomizeSize, randomizePrice
    out += [0]  # numConditions
    out += ['', '', '', '', '', '', '', 0, '', '', '', '', False, False, '', '']
    if sv >= 159:
        out.append('')  # duration
    if sv >= 160:
        out.append('')  # postToAts
    if sv >= 162:
        out.append(False)  # autoCancelParent
    if sv >= 170:
        out += ['', '', '', '', '']
    return out


def order_status(o: WorkingOrder, *, status: str | None = None) -> Fields:
    return [
        3, o.order_id, status or o.status, o.filled, o.remaining, o.avg_fill_price,
        o.perm_id, o.parent_id, o.last_fill_price, o.client_id, '', 0.0,
    ]


def completed_order(sv: int, o: WorkingOrder) -> Fields:
    out: Fields = [101]
    out += _c11(o.listing, o.exchange)
    out += [
        o.action, o.qty, o.order_type, _opt(o.lmt_price), _opt(o.aux_price), o.tif,
        o.oca_group, o.account, 'O', 0, o.order_ref, o.perm_id, o.outside_rth, False,
        0.0, '', '', '', '',
    ]
    if sv < 177:
        out.append('')
    out += [
        '', '', '', '', '', 0, '', -1,  # modelCode … exemptCode
        '', '', '', '', '',  # startingPrice … stockRangeUpper
        0, False, False, '', 3, 0, '', 0, '', '',  # displaySize … deltaNeutralAuxPrice
        False, 0, '', '', '',  # continuousUpdate … comboLegsDescrip
        0, 0, 0,  # legs, order legs, params
        '', '', '',  # scale
        '',  # hedgeType
        '', '', False, False,  # clearingAccount, clearingIntent, notHeld, dncPresent
        '',  # algoStrategy
        False, o.status, False, False,  # solicited, status, randomizeSize/Price
        0,  # numConditions
        '', '', '', False, False, '', o.filled, 0, False, '', False, False, 0,
        o.completed_time, o.completed_status,
    ]
    if sv >= 170:
        out += ['', '', '', '', '']
    return out


def completed_orders_end() -> Fields:
    return [102]


def open_order_end() -> Fields:
    return [53, 1]


def exec_details(sv: int, req_id: int, ex: ExecRecord) -> Fields:
    lst = ex.listing
    out: Fields = [
        11, req_id, ex.order_id, lst.con_id, lst.symbol, lst.sec_type, lst.last_trade_date,
        0.0, '', lst.multiplier, lst.exchange, lst.currency, lst.local, lst.tclass,
        ex.exec_id, ib_time(ex.time_epoch_secs), ex.account, lst.exchange, ex.side,
        ex.shares, ex.price, ex.perm_id, ex.client_id, 0, ex.cum_qty, ex.avg_price,
        ex.order_ref, '', '', '', 1,
    ]
    if sv >= 178:
        out.append(False)  # pendingPriceRevision
    return out


def exec_details_end(req_id: int) -> Fields:
    return [55, 1, req_id]


def commission_report(ex: ExecRecord) -> Fields:
    pnl = UNSET_DOUBLE if ex.realized_pnl is None else ex.realized_pnl
    return [59, 1, ex.exec_id, ex.commission, ex.listing.currency, pnl, UNSET_DOUBLE, '']


def position(account: str, lst: Listing, qty: float, avg_cost: float) -> Fields:
    return [
        61, 3, account, lst.con_id, lst.symbol, lst.sec_type, lst.last_trade_date, 0.0, '',
        lst.multiplier, lst.exchange, lst.currency, lst.local, lst.tclass, qty, avg_cost,
    ]


def position_end() -> Fields:
    return [62, 1]


def portfolio(lst: Listing, qty: float, mkt_price: float, avg_cost: float,
              unrealized: float, realized: float, account: str) -> Fields:
    return [
        7, 8, lst.con_id, lst.symbol, lst.sec_type, lst.last_trade_date, 0.0, '',
        lst.multiplier, lst.exchange, lst.currency, lst.local, lst.tclass, qty, mkt_price,
        qty * mkt_price * lst.mult, avg_cost, unrealized, realized, account,
    ]


def account_value(tag: str, value: str, currency: str, account: str) -> Fields:
    return [6, 2, tag, value, currency, account]


def account_time(epoch_secs: float) -> Fields:
    return [8, 1, _time.strftime('%H:%M', _time.gmtime(epoch_secs))]


def account_download_end(account: str) -> Fields:
    return [54, 1, account]


def account_update_multi(req_id: int, account: str, tag: str, value: str,
                         currency: str) -> Fields:
    return [73, 1, req_id, account, '', tag, value, currency]


def account_update_multi_end(req_id: int) -> Fields:
    return [74, 1, req_id]


def account_summary(req_id: int, account: str, tag: str, value: str, currency: str) -> Fields:
    return [63, 1, req_id, account, tag, value, currency]


def account_summary_end(req_id: int) -> Fields:
    return [64, 1, req_id]


def symbol_samples(sv: int, req_id: int, listings: Sequence[Listing]) -> Fields:
    out: Fields = [79, req_id, len(listings)]
    for lst in listings:
        derivs = ['FUT', 'OPT'] if lst.sec_type == 'STK' else []
        out += [lst.con_id, lst.symbol, lst.sec_type, lst.exchange, lst.currency, len(derivs)]
        out += derivs
        if sv >= 176:
            out += [lst.long_name, '']
    return out


def market_data_type(req_id: int, data_type: int) -> Fields:
    return [58, 1, req_id, data_type]


def tick_req_params(req_id: int, min_tick: float, bbo_exchange: str) -> Fields:
    return [81, req_id, min_tick, bbo_exchange, 3]


def tick_price(req_id: int, tick_type: int, price: float, size: float) -> Fields:
    return [1, 6, req_id, tick_type, price, size, 0]


def tick_size(req_id: int, tick_type: int, size: float) -> Fields:
    return [2, 6, req_id, tick_type, size]


def tick_snapshot_end(req_id: int) -> Fields:
    return [57, 1, req_id]


def historical_data(req_id: int, start: str, end: str,
                    bars: Sequence[tuple[str, float, float, float, float, float, float, int]]
                    ) -> Fields:
    out: Fields = [17, req_id, start, end, len(bars)]
    for bar in bars:
        out += list(bar)
    return out
