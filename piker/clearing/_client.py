"""The order client: ``open_ems()`` for strategies, the CLI and tests.

::

    async with open_ems(mode='paper', backend_cfgs=..., risk_cfg=..., paper_cfg=...,
                        backends=['sim']) as ems:
        oid = await ems.send(ems.order('btcusd.sim', 'buy', 0.01))
        status = await ems.wait(oid)          # until terminal
        async for status in ems.statuses:     # every status emsd publishes
            ...

emsd is found or spawned through pikerd (its life belongs to pikerd). Leaving
the block closes this client's dialog only; its working orders keep working.
When emsd dies the block ends with :class:`EmsError` (its pid is watched: a
SIGKILLed actor never closes its streams) and ``statuses`` ends.
"""
from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, nullcontext
from typing import Any

import msgspec
import tractor
import trio

from ..log import get_logger
from ..service import call_ctx
from ..service._proc import cancel_when_gone
from ._dialog import STREAM_BUFFER
from ._ems import ems_dialog, maybe_spawn_emsd, status_snapshot
from ._messages import (
    TERMINAL_STATES,
    BadMessage,
    BrokerdPosition,
    Cancel,
    Order,
    Resolve,
    Resolved,
    Status,
    Warm,
    Warmed,
    decode_msg,
    now_ns,
    to_wire,
)

log = get_logger(__name__)

EmsEvent = Status | BrokerdPosition | Warmed | Resolved
EMS_MODULE = 'piker.clearing._ems'
# opening a dialog may spawn emsd and its broker dialogs (each bounded by pikerd)
OPEN_TIMEOUT_SECS = 60.0
RESOLVE_TIMEOUT_SECS = 60.0


class EmsError(RuntimeError):
    """The dialog with emsd is gone (emsd died) or could not be opened."""


def new_oid() -> str:
    """A client order id, unique forever (it travels to the broker)."""
    return uuid.uuid4().hex


class OrderClient:
    """One client's dialog with emsd."""

    def __init__(self, portal: tractor.Portal, stream: tractor.MsgStream,
                 start: dict[str, Any], account: str, source: str) -> None:
        self.portal = portal
        self._stream = stream
        self.account = account
        self.source = source
        self.mode: str = start.get('mode', '')
        self.pid: int | None = start.get('pid')
        self.halted_at_start: bool = bool(start.get('halted'))
        # backends whose dialog failed to open, with why
        self.errors: dict[str, str] = dict(start.get('errors') or {})
        self._positions: dict[tuple[str, str, str], BrokerdPosition] = {}
        # as the dialog opened (later updates change `positions`, never this)
        self.start_positions: list[BrokerdPosition] = [
            msgspec.convert(raw, BrokerdPosition) for raw in start.get('positions') or []]
        for pos in self.start_positions:
            self._on_position(pos)
        self.open_orders: list[Status] = [
            msgspec.convert(raw, Status) for raw in start.get('open_orders') or []
        ]
        # the latest status of every order this client has heard of
        self.orders: dict[str, Status] = {s.oid: s for s in self.open_orders}
        self._status_tx, self._status_rx = trio.open_memory_channel[Status](math.inf)
        self._changed = trio.Event()
        self._warmed: dict[str, Warmed] = {}
        self._resolved: dict[str, Resolved] = {}
        self.warm_errors: dict[str, str] = {}

    # -- state ---------------------------------------------------------------------

    @property
    def positions(self) -> list[BrokerdPosition]:
        """Current non-flat positions (as brokers reported them)."""
        return [p for p in self._positions.values() if p.size != 0]

    def position(self, fqme: str, account: str | None = None) -> float:
        acct = account or self.account
        return sum(p.size for (_, a, f), p in self._positions.items()
                   if f == fqme and a == acct)

    @property
    def statuses(self) -> trio.MemoryReceiveChannel[Status]:
        """Every Status emsd publishes, in order (iterate it from one task)."""
        return self._status_rx

    def start_position(self, fqme: str, account: str | None = None) -> float:
        """``fqme``'s size in ``account`` as the dialog opened (0 when flat)."""
        acct = account or self.account
        return sum(p.size for p in self.start_positions if p.fqme == fqme and p.account == acct)

    def _on_position(self, pos: BrokerdPosition) -> None:
        self._positions[(pos.broker, pos.account, pos.fqme)] = pos

    async def _receive(self) -> None:
        try:
            await self._receive_all()
        finally:
            # iterating `statuses` ends with the dialog
            self._status_tx.close()

    async def _receive_all(self) -> None:
        async for raw in self._stream:
            for item in raw if isinstance(raw, list) else [raw]:
                try:
                    event = decode_msg(item, EmsEvent)
                except BadMessage as err:
                    log.error('ems_client.bad_msg', error=str(err))
                    continue
                match event:
                    case Status():
                        self.orders[event.oid] = event
                        self._status_tx.send_nowait(event)
                    case BrokerdPosition():
                        self._on_position(event)
                    case Warmed():
                        self._warmed[event.reqid] = event
                    case Resolved():
                        self._resolved[event.reqid] = event
                self._changed.set()
                self._changed = trio.Event()

    # -- requests --------------------------------------------------------------------

    def order(self, fqme: str, action: str, size: float, *, kind: str = 'market',
              price: float | None = None, oid: str | None = None,
              account: str | None = None) -> Order:
        """Build an Order with this client's account and source filled in."""
        return Order(oid=oid or new_oid(), fqme=fqme, action=action, size=size,  # type: ignore[arg-type]
                     kind=kind, price=price, account=account or self.account,  # type: ignore[arg-type]
                     source=self.source, ts_ns=now_ns())

    async def send(self, order: Order) -> str:
        """Place ``order``; re-sending a working order's ``oid`` modifies it."""
        await self._stream.send(to_wire(order))
        return order.oid

    async def send_raw(self, msg: dict[str, Any]) -> None:
        """Send an unvalidated message (tests of emsd's validation use it)."""
        await self._stream.send(msg)

    async def cancel(self, oid: str, reason: str = '') -> None:
        await self._stream.send(to_wire(Cancel(oid=oid, reason=reason)))

    async def warm(self, fqmes: Iterable[str], timeout_secs: float = 60.0) -> list[str]:
        """Have the brokers of ``fqmes`` resolve them (contracts, market info)
        before trading starts; returns the warmed ones. Why the others failed
        is in ``warm_errors`` (and logged)."""
        reqid = new_oid()
        await self._stream.send(to_wire(Warm(reqid=reqid, fqmes=list(fqmes))))
        with trio.fail_after(timeout_secs):
            while reqid not in self._warmed:
                await self._changed.wait()
        reply = self._warmed.pop(reqid)
        self.warm_errors.update(reply.errors)
        for fqme, error in reply.errors.items():
            log.warning('ems_client.warm_failed', fqme=fqme, error=error)
        return list(reply.fqmes)

    async def resolve(self, orders: dict[str, str],
                      timeout_secs: float = RESOLVE_TIMEOUT_SECS) -> Resolved:
        """What became of ``orders`` (oid -> fqme), e.g. orders in flight when
        an earlier dialog was lost: working, filled (with their fills),
        unknown (never arrived) or undecided. Nothing is re-sent."""
        reqid = new_oid()
        await self._stream.send(to_wire(Resolve(reqid=reqid, orders=dict(orders))))
        with trio.fail_after(timeout_secs):
            while reqid not in self._resolved:
                await self._changed.wait()
        return self._resolved.pop(reqid)

    async def wait(self, oid: str, states: Iterable[str] = TERMINAL_STATES,
                   timeout_secs: float | None = None) -> Status:
        """The first status of ``oid`` in ``states`` (already seen counts)."""
        wanted = set(states)
        with trio.fail_after(timeout_secs) if timeout_secs else nullcontext():
            while True:
                status = self.orders.get(oid)
                if status is not None and status.state in wanted:
                    return status
                await self._changed.wait()

    # -- operator RPCs -------------------------------------------------------------

    async def halt(self, reason: str, by: str | None = None) -> dict[str, Any]:
        return await self.portal.run_from_ns(EMS_MODULE, 'halt', reason=reason,
                                             by=by or self.source)

    async def resume(self, by: str | None = None) -> dict[str, Any]:
        return await self.portal.run_from_ns(EMS_MODULE, 'resume', by=by or self.source)

    async def ems_status(self) -> dict[str, Any]:
        return await call_ctx(self.portal, status_snapshot)

    async def cancel_all(self, account: str | None = None, by: str | None = None) -> list[str]:
        return await self.portal.run_from_ns(EMS_MODULE, 'cancel_all', account=account,
                                             by=by or self.source)

    async def flatten(self, account: str | None = None, fqme: str | None = None,
                      by: str | None = None) -> list[str]:
        return await self.portal.run_from_ns(EMS_MODULE, 'flatten', account=account,
                                             fqme=fqme, by=by or self.source)


@asynccontextmanager
async def open_ems(
    *,
    mode: str = 'paper',
    backend_cfgs: dict[str, Any] | None = None,
    risk_cfg: dict[str, Any] | None = None,
    paper_cfg: dict[str, Any] | None = None,
    account: str = 'paper',
    source: str = 'cli',
    backends: Iterable[str] = (),
) -> AsyncIterator[OrderClient]:
    """Open an order dialog with emsd (found, or spawned with these configs).

    ``backends``: open these brokers' dialogs now, so ``positions`` and
    ``open_orders`` are filled at start; others open on their first order.
    The configs only matter when this call spawns emsd. Raises
    :class:`EmsError` when emsd dies while the dialog is open, or does not
    open it within ``OPEN_TIMEOUT_SECS``.
    """
    died: list[int] = []
    async with maybe_spawn_emsd(
        risk_cfg=risk_cfg or {}, paper_cfg=paper_cfg or {},
        backend_cfgs=backend_cfgs or {}, mode=mode,
    ) as portal:
        with trio.CancelScope(deadline=trio.current_time() + OPEN_TIMEOUT_SECS) as session:
            async with portal.open_context(
                ems_dialog, source=source, backends=list(backends),
            ) as (ctx, start):
                session.deadline = math.inf
                async with ctx.open_stream(msg_buffer_size=STREAM_BUFFER) as stream:
                    client = OrderClient(portal, stream, start, account, source)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(cancel_when_gone, client.pid, session, died)
                        nursery.start_soon(client._receive)
                        try:
                            yield client
                        finally:
                            nursery.cancel_scope.cancel()
        if died:
            raise EmsError(f'emsd (pid {died[0]}) died while this dialog was open; '
                           'pikerd starts a new one on the next open_ems')
        if session.cancelled_caught:
            raise EmsError(f'emsd did not open the dialog within {OPEN_TIMEOUT_SECS:g} s')

