"""What the fake gateway knows at start: accounts, listings, positions, orders.

A :class:`Scenario` is plain frozen data; the gateway copies it into mutable
state when it starts, so one scenario can seed many gateways. Build your own
or start from :func:`demo_scenario` and ``msgspec.structs.replace`` it.
"""
from __future__ import annotations

from typing import Literal

import msgspec

FillMode = Literal['fill', 'partial', 'partial_rest', 'reject', 'rest']
"""How the fake clears an order:

- ``fill``: a market order, or a limit that is marketable against the current
  quote, fills completely at once; a non-marketable limit rests and fills when
  ``set_price`` makes it marketable.
- ``partial``: ``Scenario.partial_chunks`` executions that together fill the
  order, ``Scenario.partial_interval_secs`` apart.
- ``partial_rest``: one partial execution, then the rest stays working.
- ``reject``: error 201 "Order rejected - reason:..." and the order is done.
- ``rest``: stays Submitted until cancelled (or filled by ``gw.fill_order``).
"""
FILL_MODES: tuple[str, ...] = ('fill', 'partial', 'partial_rest', 'reject', 'rest')


class Listing(msgspec.Struct, frozen=True, kw_only=True):
    """One tradable listing with enough detail for a full ``contractDetails``."""

    con_id: int
    symbol: str
    sec_type: str = 'STK'
    exchange: str  # the listing venue, e.g. ARCA; also the primary exchange
    currency: str = 'USD'
    local_symbol: str = ''  # defaults to symbol
    trading_class: str = ''  # defaults to symbol
    multiplier: str = ''
    last_trade_date: str = ''  # YYYYmmdd for futures
    long_name: str = ''
    min_tick: float = 0.01
    price: float = 100.0  # reference mid price for quotes, fills and bars
    spread_ticks: int = 1
    quote_size: float = 100.0
    valid_exchanges: tuple[str, ...] = ()  # defaults to (SMART, exchange) for STK
    time_zone_id: str = 'US/Eastern'
    trading_hours: str = ''
    industry: str = ''
    category: str = ''
    stock_type: str = ''
    market_data: bool = True  # False: reqMktData answers error 354
    commission_per_unit: float = 0.005
    min_commission: float = 1.0

    @property
    def local(self) -> str:
        return self.local_symbol or self.symbol

    @property
    def tclass(self) -> str:
        return self.trading_class or self.symbol

    @property
    def venues(self) -> tuple[str, ...]:
        if self.valid_exchanges:
            return self.valid_exchanges
        if self.sec_type == 'STK':
            return ('SMART', self.exchange)
        return (self.exchange,)

    @property
    def mult(self) -> float:
        return float(self.multiplier) if self.multiplier else 1.0


class PositionSpec(msgspec.Struct, frozen=True, kw_only=True):
    account: str
    con_id: int
    qty: float
    avg_price: float  # per unit (IB's avgCost is this times the multiplier)


class AccountValueSpec(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    value: str
    currency: str = 'USD'
    account: str = ''  # '' means every managed account


class OrderSpec(msgspec.Struct, frozen=True, kw_only=True):
    """An order that exists before any client connects (open or completed)."""

    order_id: int
    client_id: int = 1
    con_id: int
    action: str = 'BUY'
    qty: float
    order_type: str = 'LMT'
    lmt_price: float | None = None
    aux_price: float | None = None
    tif: str = 'DAY'
    account: str = ''  # '' is the first managed account
    order_ref: str = ''
    status: str = 'Submitted'  # completed orders: Filled / Cancelled / Inactive
    filled: float = 0.0
    avg_fill_price: float = 0.0
    perm_id: int = 0  # 0: assigned by the gateway


class ExecutionSpec(msgspec.Struct, frozen=True, kw_only=True):
    """An execution known before any client connects."""

    con_id: int
    side: Literal['BOT', 'SLD']
    shares: float
    price: float
    order_id: int = 0
    client_id: int = 0
    perm_id: int = 0
    order_ref: str = ''
    account: str = ''
    time_epoch_secs: float | None = None
    exec_id: str = ''
    commission: float | None = None  # None: computed from the listing


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    accounts: tuple[str, ...] = ('DU1234567',)
    next_valid_id: int = 1
    server_version: int = 178
    listings: tuple[Listing, ...] = ()
    positions: tuple[PositionSpec, ...] = ()
    account_values: tuple[AccountValueSpec, ...] = ()
    open_orders: tuple[OrderSpec, ...] = ()
    completed_orders: tuple[OrderSpec, ...] = ()
    executions: tuple[ExecutionSpec, ...] = ()
    default_fill_mode: FillMode = 'fill'
    fill_modes: dict[str, FillMode] = msgspec.field(default_factory=dict)  # by symbol
    reject_reason: str = 'fake-tws: rejected by scenario'
    partial_chunks: int = 2
    partial_interval_secs: float = 0.05
    tick_interval_secs: float = 0.25  # 0: ticks only on set_price
    random_walk: bool = True  # each streamed tick moves the mid by -1/0/+1 tick
    seed: int = 7
    history_end_epoch_secs: int | None = None  # None: "now" for an empty endDateTime
    connect_warnings: tuple[int, ...] = (2104, 2106, 2158)


def demo_scenario(**overrides: object) -> Scenario:
    """A paper account with US stocks, a two-venue GLD, an MNQ future and EURUSD."""
    acct = 'DU1234567'
    listings = (
        Listing(
            con_id=51529211, symbol='GLD', exchange='ARCA', long_name='SPDR GOLD SHARES',
            price=240.0, industry='Funds', category='Commodity Fund', stock_type='ETF',
        ),
        Listing(
            con_id=1400025, symbol='GLD', exchange='VENTURE', currency='CAD',
            long_name='GOLDLANDS CORP', price=0.35, min_tick=0.005,
            valid_exchanges=('SMART', 'VENTURE'), time_zone_id='America/Toronto',
            stock_type='COMMON',
        ),
        Listing(
            con_id=265598, symbol='AAPL', exchange='NASDAQ', long_name='APPLE INC',
            price=190.0, industry='Technology', category='Computers', stock_type='COMMON',
        ),
        Listing(
            con_id=756733, symbol='SPY', exchange='ARCA', long_name='SPDR S&P 500 ETF TRUST',
            price=560.0, stock_type='ETF',
        ),
        Listing(
            con_id=711280073, symbol='MNQ', sec_type='FUT', exchange='CME',
            local_symbol='MNQZ6', trading_class='MNQ', multiplier='2',
            last_trade_date='20261218', long_name='Micro E-Mini Nasdaq-100 Index',
            min_tick=0.25, price=21000.0, time_zone_id='US/Central',
            commission_per_unit=0.62, min_commission=0.0, quote_size=5.0,
        ),
        Listing(
            con_id=12087792, symbol='EUR', sec_type='CASH', exchange='IDEALPRO',
            local_symbol='EUR.USD', trading_class='EUR.USD', long_name='European Monetary Union Euro',
            min_tick=0.00005, price=1.08, quote_size=1_000_000.0,
            commission_per_unit=0.00002, min_commission=2.0,
        ),
    )
    values = tuple(
        AccountValueSpec(tag=t, value=v, currency=c)
        for t, v, c in (
            ('AccountType', 'INDIVIDUAL', ''),
            ('NetLiquidation', '100000.00', 'USD'),
            ('TotalCashValue', '72400.00', 'USD'),
            ('SettledCash', '72400.00', 'USD'),
            ('BuyingPower', '400000.00', 'USD'),
            ('EquityWithLoanValue', '100000.00', 'USD'),
            ('GrossPositionValue', '27600.00', 'USD'),
            ('InitMarginReq', '9000.00', 'USD'),
            ('MaintMarginReq', '7000.00', 'USD'),
            ('AvailableFunds', '91000.00', 'USD'),
            ('ExcessLiquidity', '93000.00', 'USD'),
            ('Cushion', '0.93', ''),
        )
    )
    scenario = Scenario(
        accounts=(acct,),
        next_valid_id=100,
        listings=listings,
        positions=(
            PositionSpec(account=acct, con_id=756733, qty=10, avg_price=550.0),
            PositionSpec(account=acct, con_id=711280073, qty=1, avg_price=20900.0),
        ),
        account_values=values,
        open_orders=(
            OrderSpec(
                order_id=7, client_id=1, con_id=265598, action='BUY', qty=5,
                order_type='LMT', lmt_price=150.0, order_ref='demo-open-1', tif='GTC',
            ),
        ),
        completed_orders=(
            OrderSpec(
                order_id=6, client_id=1, con_id=756733, action='BUY', qty=10,
                order_type='MKT', order_ref='demo-done-1', status='Filled', filled=10,
                avg_fill_price=550.0, perm_id=900000006,
            ),
        ),
        executions=(
            ExecutionSpec(
                con_id=756733, side='BOT', shares=10, price=550.0, order_id=6, client_id=1,
                perm_id=900000006, order_ref='demo-done-1', exec_id='0000e1a0.6756f001.01.01',
            ),
        ),
    )
    return msgspec.structs.replace(scenario, **overrides) if overrides else scenario
