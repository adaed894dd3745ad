"""A fake Interactive Brokers TWS / IB Gateway for tests.

It speaks the TWS socket protocol on loopback to the real ``ib_async`` 2.1
client (server version 178 and below, text framing), holds a scripted
:class:`Scenario` (accounts, listings, positions, orders, executions) and lets
a test inject faults. It never imports ib_async: the real client's decoder is
what checks our bytes.

    async with open_fake_gateway() as gw:      # demo scenario, free port
        ...  # ib.connectAsync('127.0.0.1', gw.port, clientId=1)

The gateway lives on the trio thread that opened it; its methods are sync.
From a worker thread running an asyncio client call them through
``trio.from_thread.run_sync(gw.drop_connections)`` and friends:

- inspect: ``gw.port``, ``gw.clients``, ``gw.requests`` (:class:`Received`),
  ``gw.protocol_errors`` (assert it stays empty), ``gw.order(order_ref=...)``,
  ``gw.executions``, ``gw.broker`` (all order/position state);
- inject: ``drop_connections()``, ``send_error(code, msg, req_id=-1)``,
  ``lose_connectivity()`` / ``restore_connectivity(data_lost=...)``,
  ``add_execution(...)``, ``refuse_client_id(id)``,
  ``set_fill_mode(mode, symbol=|order_ref=|order_id=)``,
  ``set_price(price, symbol='GLD.ARCA')``, ``fill_order(order_ref=...)``;
- wait: ``await gw.wait_until(predicate)``.

Run standalone with ``python -m tests.fake_tws [--port N] [--scenario demo]``.
"""
from ._broker import Broker as Broker
from ._broker import PositionState as PositionState
from ._model import ExecRecord as ExecRecord
from ._model import WorkingOrder as WorkingOrder
from ._requests import ContractQuery as ContractQuery
from ._scenario import FILL_MODES as FILL_MODES
from ._scenario import AccountValueSpec as AccountValueSpec
from ._scenario import ExecutionSpec as ExecutionSpec
from ._scenario import FillMode as FillMode
from ._scenario import Listing as Listing
from ._scenario import OrderSpec as OrderSpec
from ._scenario import PositionSpec as PositionSpec
from ._scenario import Scenario as Scenario
from ._scenario import demo_scenario as demo_scenario
from ._server import FakeGateway as FakeGateway
from ._server import Received as Received
from ._server import open_fake_gateway as open_fake_gateway
