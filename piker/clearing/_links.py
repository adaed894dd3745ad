"""emsd's two kinds of connection: clients and broker dialogs.

A :class:`ClientLink` never blocks emsd: statuses go into an unbounded outbox
drained by the link's own sender task. A client that falls behind first stops
getting other clients' statuses (its own are always kept), and one that stops
reading altogether is disconnected.
"""
from __future__ import annotations

import math
from typing import Any

import msgspec
import tractor
import trio

from ..log import get_logger
from ._dialog import MAX_BATCH, DialogStart
from ._messages import to_wire

log = get_logger(__name__)

# a client this far behind stops getting other clients' statuses
SLOW_CLIENT_BACKLOG = 1_000
# ... and this far behind on its own is disconnected
MAX_CLIENT_BACKLOG = 100_000


class ClientLink:
    """One connected client: an unbounded outbox drained by its sender task."""

    def __init__(self, cid: int, source: str) -> None:
        self.cid = cid
        self.source = source
        self._tx, self._rx = trio.open_memory_channel[Any](math.inf)
        self.dropped = 0
        self.scope: trio.CancelScope | None = None

    def backlog(self) -> int:
        return self._tx.statistics().current_buffer_used

    def push(self, msg: Any, owned: bool) -> None:
        backlog = self.backlog()
        if not owned and backlog >= SLOW_CLIENT_BACKLOG:
            if self.dropped == 0:
                log.warning('ems.client_slow', client=self.source, backlog=backlog)
            self.dropped += 1
            return
        if backlog >= MAX_CLIENT_BACKLOG:
            log.error('ems.client_dropped', client=self.source, backlog=backlog,
                      reason='it stopped reading its status stream')
            if self.scope is not None:
                self.scope.cancel()
            return
        try:
            self._tx.send_nowait(msg)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def pump(self, stream: tractor.MsgStream) -> None:
        async for first in self._rx:
            batch = [to_wire(first)]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(to_wire(self._rx.receive_nowait()))
                except trio.WouldBlock:
                    break
            await stream.send(batch)

    def close(self) -> None:
        self._tx.close()


class BrokerLink:
    """An open broker dialog."""

    def __init__(self, backend: str, name: str, start: DialogStart,
                 stream: tractor.MsgStream) -> None:
        self.backend = backend
        self.name = name
        self.start = start
        self.stream = stream
        self.alive = True

    async def send(self, msg: msgspec.Struct) -> None:
        await self.stream.send(to_wire(msg))
