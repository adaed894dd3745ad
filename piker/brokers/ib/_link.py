"""The trio side of one IB connection: proxy, supervision, reconnects, events.

:func:`open_ib_link` starts an :class:`~.api.IbClient` behind the method proxy
and keeps it connected: the first connect and every reconnect after the socket
closed are retried with exponential backoff (capped by
``reconnect_max_backoff_secs``). The link's state is what order and data code
checks before talking to IB:

- ``down``: no socket (not yet connected, or lost and reconnecting);
- ``degraded``: the socket is up but TWS lost IB's servers (error 1100);
- ``up``: usable.

Consumers read ``link.events``: everything the client emits plus
:class:`LinkUp` after each successful (re)connect, in the order it happened.
"""
from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import trio

from ...config import IbCfg
from ...log import get_logger, quiet_asyncio_noise
from ...types import Struct
from ._proxy import MethodProxy, open_method_proxy
from .api import ConnInfo, IbClient, LinkDown, LinkRestored, Role

log = get_logger(__name__)

LinkState = Literal['down', 'degraded', 'up']
FIRST_BACKOFF_SECS = 0.25


class LinkUp(Struct, frozen=True):
    conn: ConnInfo
    reconnect: bool


def backoff_secs(attempt: int, max_secs: float, first_secs: float = FIRST_BACKOFF_SECS) -> float:
    """Delay before retry number ``attempt`` (0-based): doubling, capped."""
    return min(max_secs, first_secs * 2 ** min(attempt, 30))


class IbLink:
    """See module doc. ``call`` forwards to the client through the proxy."""

    def __init__(self, proxy: MethodProxy, cfg: IbCfg, role: Role) -> None:
        self.proxy = proxy
        self.cfg = cfg
        self.role = role
        self.state: LinkState = 'down'
        self.reason = 'not connected yet'
        self.conn: ConnInfo | None = None
        self.connects = 0
        self._need_connect = trio.Event()
        self._need_connect.set()
        self._up = trio.Event()
        self.first_attempt = trio.Event()
        self._events_tx, self.events = trio.open_memory_channel[Any](math.inf)

    @property
    def is_up(self) -> bool:
        return self.state == 'up'

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        return await self.proxy.call(method, *args, **kwargs)

    async def wait_up(self, timeout_secs: float) -> bool:
        with trio.move_on_after(timeout_secs):
            while not self.is_up:
                await self._up.wait()
        return self.is_up

    def describe_down(self) -> str:
        since = {'down': 'no connection to TWS/IB Gateway',
                 'degraded': 'TWS lost its connection to IB',
                 'up': 'connected'}[self.state]
        return f'{since} ({self.reason})'

    def _set(self, state: LinkState, reason: str) -> None:
        if state != self.state:
            log.info('ib.link.state', role=self.role, state=state, was=self.state,
                     reason=reason)
        self.state, self.reason = state, reason
        if state == 'up':
            self._up.set()
        elif self._up.is_set():
            self._up = trio.Event()

    def _forward(self, event: Any) -> None:
        try:
            self._events_tx.send_nowait(event)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def _pump(self) -> None:
        """Client events -> state changes + consumers, in arrival order."""
        async for event in self.proxy.events:
            match event:
                case LinkDown(socket_closed=True):
                    self._set('down', event.reason)
                    self._need_connect.set()
                case LinkDown():
                    self._set('degraded', f'IB {event.code}: {event.reason}')
                case LinkRestored():
                    if self.state == 'degraded':
                        self._set('up', f'IB {event.code}')
            self._forward(event)

    async def _connector(self) -> None:
        attempt = 0
        while True:
            await self._need_connect.wait()
            self._need_connect = trio.Event()
            try:
                conn = await self.proxy.call('connect')
            except (ConnectionError, OSError) as err:
                delay = backoff_secs(attempt, self.cfg.reconnect_max_backoff_secs)
                attempt += 1
                self._set('down', str(err))
                log.warning('ib.link.connect_failed', role=self.role, attempt=attempt,
                            retry_in_secs=delay, error=str(err))
                self.first_attempt.set()
                await trio.sleep(delay)
                self._need_connect.set()
                continue
            attempt = 0
            reconnect = self.connects > 0
            self.connects += 1
            self.conn = conn
            self._set('up', f'client id {conn.client_id} on port {conn.port}')
            self._forward(LinkUp(conn=conn, reconnect=reconnect))
            self.first_attempt.set()


@asynccontextmanager
async def open_ib_link(cfg: IbCfg, role: Role) -> AsyncIterator[IbLink]:
    """An IB connection for this actor, kept up until the block exits.

    Returns after the first connect attempt, connected or not (see
    :meth:`IbLink.wait_up`); must run in an ``infect_asyncio`` actor.
    """
    quiet_asyncio_noise()
    async with open_method_proxy(lambda emit: IbClient(emit, cfg, role)) as proxy:
        link = IbLink(proxy, cfg, role)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link._pump)
            nursery.start_soon(link._connector)
            await link.first_attempt.wait()
            try:
                yield link
            finally:
                nursery.cancel_scope.cancel()
