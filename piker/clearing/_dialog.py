"""The broker dialog: the one protocol emsd speaks to every broker actor.

A *broker actor* is ``paperboi.<backend>`` (paper clearing) or
``brokerd.<backend>`` (live orders). Whatever the backend, emsd opens the same
long-lived context on it, :func:`open_trade_dialog`, which lives in this module
so that the endpoint's name and signature exist in exactly one place:

1. emsd calls ``open_trade_dialog(accounts=[...])``; the broker replies with
   ``ctx.started(DialogStart)``: its pid, the positions of those accounts and
   its working orders (each a :class:`BrokerdOrder` with ``reqid`` set);
2. over the stream, emsd sends :class:`BrokerdOrder` (a re-send of a known
   ``oid`` modifies it), :class:`BrokerdCancel`, :class:`BrokerdWarm` and
   :class:`BrokerdResolve` (what became of these oids?);
3. the broker sends :class:`BrokerdOrderAck`, :class:`BrokerdStatus`,
   :class:`BrokerdFill`, :class:`BrokerdError`, :class:`BrokerdPosition`,
   :class:`BrokerdWarmed` and :class:`BrokerdResolved`, one message or a list
   of them (a batch).

Every message is validated with :func:`decode_msg` on arrival. A malformed
request is answered with a :class:`BrokerdError` naming the field; a broker
method that raises is answered the same way. Neither ends the dialog.

A broker actor implements :class:`BrokerSession` and enters
:func:`serve_broker_session` in its lifetime fixture; its ``enable_modules``
must include this module (``DIALOG_MODULE``) so emsd can call the endpoint.
"""
from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Protocol

import msgspec
import tractor
import trio

from ..log import get_logger
from ..types import Struct
from ._messages import (
    BadMessage,
    BrokerdCancel,
    BrokerdError,
    BrokerdFill,
    BrokerdOrder,
    BrokerdOrderAck,
    BrokerdPosition,
    BrokerdResolve,
    BrokerdResolved,
    BrokerdStatus,
    BrokerdWarm,
    BrokerdWarmed,
    decode_msg,
    now_ns,
    to_wire,
)

log = get_logger(__name__)

DIALOG_MODULE = __name__
# daemon-kind init paths emsd spawns broker actors through; a backend with a
# live order side provides `piker/brokers/<backend>/broker.py:brokerd_init(
# backend, backend_cfg)` (a path, so clearing never imports a backend)
PAPERBOI_INIT = 'piker.clearing._paper:paperboi_init'
BROKERD_INIT = 'piker.brokers.{backend}.broker:brokerd_init'
# most events one stream message carries
MAX_BATCH = 256
# receive buffer of each side's stream (tractor's default is 64)
STREAM_BUFFER = 1024
SESSION_WAIT_SECS = 10.0

DialogRequest = BrokerdOrder | BrokerdCancel | BrokerdWarm | BrokerdResolve
DialogEvent = (
    BrokerdOrderAck | BrokerdStatus | BrokerdFill | BrokerdError | BrokerdPosition
    | BrokerdWarmed | BrokerdResolved
)


class DialogStart(Struct, frozen=True):
    """What a broker says when a dialog opens."""
    broker: str
    pid: int
    accounts: list[str]
    positions: list[BrokerdPosition] = msgspec.field(default_factory=list)
    open_orders: list[BrokerdOrder] = msgspec.field(default_factory=list)


class Snapshot(Struct, frozen=True):
    """A session's state for :class:`DialogStart` (the endpoint adds the pid)."""
    accounts: list[str]
    positions: list[BrokerdPosition]
    open_orders: list[BrokerdOrder]


class Resolution(Struct, frozen=True):
    """What a broker knows of some oids (see :class:`BrokerdResolved`)."""
    working: list[BrokerdOrder] = msgspec.field(default_factory=list)
    fills: list[BrokerdFill] = msgspec.field(default_factory=list)
    unknown: list[str] = msgspec.field(default_factory=list)
    undecided: dict[str, str] = msgspec.field(default_factory=dict)
    # oid -> final state ('canceled', 'rejected', 'error') of orders it saw end unfilled
    done: dict[str, str] = msgspec.field(default_factory=dict)


class DialogHub:
    """Fans a session's events out to every open dialog, never blocking.

    Sessions call :meth:`emit` synchronously right where an event happens, so
    the order of events on a dialog is the order they happened in. Each
    dialog's outbox is unbounded; its sender task drains it continuously.
    """

    def __init__(self) -> None:
        self._outboxes: set[trio.MemorySendChannel[Any]] = set()

    def emit(self, event: DialogEvent) -> None:
        for outbox in list(self._outboxes):
            try:
                outbox.send_nowait(event)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._outboxes.discard(outbox)

    @property
    def dialogs(self) -> int:
        return len(self._outboxes)

    @contextmanager
    def attach(self) -> Iterator[tuple[trio.MemorySendChannel[Any], trio.MemoryReceiveChannel[Any]]]:
        tx, rx = trio.open_memory_channel[Any](math.inf)
        self._outboxes.add(tx)
        try:
            yield tx, rx
        finally:
            self._outboxes.discard(tx)
            tx.close()


class BrokerSession(Protocol):
    """What a broker actor implements; events go out through ``hub.emit``.

    ``submit``/``cancel`` may emit their events before returning or later
    (fills when the market moves); they must not block on the market.
    """
    broker: str
    hub: DialogHub

    async def snapshot(self, accounts: list[str]) -> Snapshot: ...

    async def submit(self, order: BrokerdOrder) -> None: ...

    async def cancel(self, msg: BrokerdCancel) -> None: ...

    async def warm(self, fqmes: list[str]) -> tuple[list[str], dict[str, str]]:
        """Resolve and cache market info / contracts: (warmed, {fqme: error})."""
        ...

    async def resolve(self, oids: list[str]) -> Resolution:
        """What became of ``oids``: working here, filled (from the ledger, by
        the fill's ``oid``), never seen, or undecidable right now. Claim
        ``unknown`` only when sure: a client marks those as never arrived."""
        ...


# the broker session of this actor (actor-global: one per broker process)
_session: BrokerSession | None = None
_session_changed: trio.Event | None = None


@asynccontextmanager
async def serve_broker_session(session: BrokerSession) -> AsyncIterator[BrokerSession]:
    """Make ``session`` the one :func:`open_trade_dialog` serves in this actor."""
    global _session, _session_changed
    if _session is not None:
        raise RuntimeError(
            f'this actor already serves the {_session.broker!r} broker session; '
            'one broker actor serves one backend'
        )
    _session = session
    if _session_changed is not None:
        _session_changed.set()
    try:
        yield session
    finally:
        _session = None


async def _require_session() -> BrokerSession:
    global _session_changed
    with trio.move_on_after(SESSION_WAIT_SECS):
        while _session is None:
            _session_changed = trio.Event()
            await _session_changed.wait()
    if _session is None:
        raise RuntimeError(
            'no broker session in this actor: a broker daemon must enter '
            '`serve_broker_session()` in its lifetime fixture before emsd opens a dialog'
        )
    return _session


@tractor.context
async def open_trade_dialog(ctx: tractor.Context, accounts: list[str]) -> None:
    """The broker side of a dialog (see the module doc for the protocol)."""
    session = await _require_session()
    with session.hub.attach() as (outbox, events):
        snap = await session.snapshot(list(accounts))
        start = DialogStart(
            broker=session.broker, pid=os.getpid(), accounts=snap.accounts,
            positions=snap.positions, open_orders=snap.open_orders,
        )
        await ctx.started(msgspec.to_builtins(start))
        log.info('dialog.open', broker=session.broker, accounts=snap.accounts,
                 positions=len(snap.positions), open_orders=len(snap.open_orders))
        async with ctx.open_stream(msg_buffer_size=STREAM_BUFFER) as stream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump_batches, events, stream)
                async for raw in stream:
                    for item in raw if isinstance(raw, list) else [raw]:
                        await _serve_request(session, item, outbox)
                nursery.cancel_scope.cancel()
    log.info('dialog.closed', broker=session.broker)


async def _serve_request(
    session: BrokerSession, raw: Any, outbox: trio.MemorySendChannel[Any],
) -> None:
    try:
        req = decode_msg(raw, DialogRequest)
    except BadMessage as err:
        oid = _field(raw, 'oid')
        log.warning('dialog.bad_request', broker=session.broker, oid=oid, error=str(err))
        outbox.send_nowait(BrokerdError(
            oid=oid, reqid=_field(raw, 'reqid') or None, account=_field(raw, 'account'),
            reason=f'malformed request from emsd: {err}', ts_ns=now_ns(),
        ))
        return
    try:
        match req:
            case BrokerdOrder():
                await session.submit(req)
            case BrokerdCancel():
                await session.cancel(req)
            case BrokerdWarm():
                warmed, errors = await session.warm(list(req.fqmes))
                outbox.send_nowait(BrokerdWarmed(reqid=req.reqid, fqmes=warmed, errors=errors))
            case BrokerdResolve():
                try:
                    res = await session.resolve(list(req.oids))
                except Exception as err:
                    log.exception('dialog.resolve_failed', broker=session.broker)
                    why = f'{session.broker} failed to resolve: {type(err).__name__}: {err}'
                    res = Resolution(undecided={oid: why for oid in req.oids})
                outbox.send_nowait(BrokerdResolved(
                    reqid=req.reqid, working=res.working, fills=res.fills,
                    unknown=res.unknown, undecided=res.undecided, done=res.done))
    except Exception as err:
        oid = getattr(req, 'oid', '')
        log.exception('dialog.request_failed', broker=session.broker, oid=oid)
        outbox.send_nowait(BrokerdError(
            oid=oid, account=getattr(req, 'account', ''), ts_ns=now_ns(),
            reason=f'{session.broker} failed the request: {type(err).__name__}: {err}',
        ))


def _field(raw: Any, name: str) -> str:
    value = raw.get(name) if isinstance(raw, dict) else None
    return value if isinstance(value, str) else ''


async def pump_batches(rx: trio.MemoryReceiveChannel[Any], stream: tractor.MsgStream) -> None:
    """Send everything ``rx`` yields, as lists of up to ``MAX_BATCH`` messages:
    one IPC message per burst instead of one per event."""
    async for first in rx:
        batch = [to_wire(first)]
        while len(batch) < MAX_BATCH:
            try:
                batch.append(to_wire(rx.receive_nowait()))
            except trio.WouldBlock:
                break
        await stream.send(batch)


# -- the emsd side -------------------------------------------------------------

def decode_events(raw: Any) -> list[DialogEvent | BadMessage]:
    """One stream message (an event or a batch) as events; a malformed one
    becomes its :class:`BadMessage` in place, so the rest still count."""
    out: list[DialogEvent | BadMessage] = []
    for item in raw if isinstance(raw, list) else [raw]:
        try:
            out.append(decode_msg(item, DialogEvent))
        except BadMessage as err:
            err.raw = item  # type: ignore[attr-defined]
            out.append(err)
    return out


@asynccontextmanager
async def open_broker_dialog(
    portal: tractor.Portal, accounts: list[str],
) -> AsyncIterator[tuple[DialogStart, tractor.MsgStream]]:
    """Open a dialog on a broker actor: yields its :class:`DialogStart` and the
    stream (send requests with ``to_wire``; read with :func:`decode_events`)."""
    async with portal.open_context(open_trade_dialog, accounts=list(accounts)) as (ctx, first):
        try:
            start = msgspec.convert(first, DialogStart)
        except msgspec.ValidationError as err:
            raise BadMessage(f'broker dialog start: {err}') from None
        async with ctx.open_stream(msg_buffer_size=STREAM_BUFFER) as stream:
            yield start, stream
