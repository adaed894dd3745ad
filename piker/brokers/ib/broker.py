"""brokerd.ib: live order control through IB, behind the broker dialog.

The actor runs ib_async on asyncio (``infect_asyncio``) with the ``brokerd``
client-id block, and serves the one broker-dialog endpoint every broker actor
serves (``piker.clearing._dialog.open_trade_dialog``) through
:class:`IbBrokerSession`:

- **contracts**: warmed eagerly for every open position and order when the
  link syncs, resolved lazily for each order (both cache keys written);
- **identity**: the EMS ``oid`` is IB's ``orderRef``; on every (re)connect
  IB's orders and executions are matched back to oids;
- **ledger**: each execution is applied to ``<state_dir>/accounting/ib/<acct>``
  keyed by IB's ``execId``, so one seen again after a reconnect changes
  nothing and is not reported twice;
- **connection loss**: while the link is down or degraded, new orders are
  refused with a clear :class:`BrokerdError`; after a reconnect orders,
  executions and positions are re-synced.
"""
from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import tractor
import trio

from ...accounting import Ledger
from ...clearing._dialog import (
    DIALOG_MODULE,
    DialogHub,
    Resolution,
    Snapshot,
    serve_broker_session,
)
from ...clearing._messages import (
    BrokerdCancel,
    BrokerdError,
    BrokerdFill,
    BrokerdOrder,
    BrokerdOrderAck,
    BrokerdPosition,
    now_ns,
)
from ...clearing._paper_engine import from_ledger_fill, to_ledger_fill
from ...config import ConfigError, IbCfg, state_dir
from ...log import get_logger
from ...service import DaemonSpec, daemon_lifetime
from ...service._spec import TIER_BROKER
from ._link import IbLink, LinkUp, open_ib_link
from ._orders import AccountMap, OrderBook, external_oid
from .api import (
    ExecReport,
    IbError,
    LinkDown,
    LinkRestored,
    OrderReport,
    OrderRequest,
    PositionReport,
)
from .symbols import (
    ContractCache,
    ContractInfo,
    ContractSpec,
    resolve_con_id,
    resolve_fqme_contract,
)

log = get_logger(__name__)

BROKER = 'ib'
# how long a new dialog waits for the first sync with IB before it opens anyway
SYNC_WAIT_SECS = 5.0


class IbBrokerSession:
    """The :class:`~piker.clearing._dialog.BrokerSession` of brokerd.ib."""

    broker = BROKER

    def __init__(self, link: IbLink, cfg: IbCfg, ledger_dir: Path) -> None:
        self.link = link
        self.cfg = cfg
        self.hub = DialogHub()
        self.cache = ContractCache()
        self.book = OrderBook()
        self.accounts = AccountMap(cfg.accounts)
        self.synced = trio.Event()
        self.syncs = 0
        self._state_dir = ledger_dir
        self._ledgers: dict[str, Ledger] = {}
        self._positions: dict[tuple[str, str], BrokerdPosition] = {}

    # -- BrokerSession ------------------------------------------------------------

    async def snapshot(self, accounts: list[str]) -> Snapshot:
        with trio.move_on_after(min(SYNC_WAIT_SECS, self.cfg.connect_timeout_secs)):
            await self.synced.wait()
        if not self.synced.is_set():
            log.warning('brokerd.ib.unsynced_dialog', state=self.link.state,
                        reason=self.link.reason)
        served = self.accounts.aliases()
        return Snapshot(
            accounts=served,
            positions=[p for p in self._positions.values() if p.size],
            open_orders=[t.as_order() for t in self.book.working()],
        )

    async def submit(self, order: BrokerdOrder) -> None:
        refusal = self._refusal()
        if refusal is not None:
            self._error(order.oid, order.account, refusal[1], code=refusal[0])
            return
        try:
            code = self.accounts.code_for(order.account)
            info = await self.contract(order.fqme)
        except ValueError as err:  # FqmeError included
            self._error(order.oid, order.account, str(err))
            return
        tracked = self.book.get(order.oid)
        if tracked is not None and tracked.terminal:
            self._error(order.oid, order.account,
                        f'order {order.oid!r} is already {tracked.state}; use a new oid')
            return
        modify_id = tracked.order_id if tracked is not None else 0
        tracked = self.book.track(order)
        req = OrderRequest(
            info=info, action='BUY' if order.action == 'buy' else 'SELL', qty=order.size,
            order_type='LMT' if order.kind == 'limit' else 'MKT', lmt_price=order.price,
            account=code, order_ref=order.oid, order_id=modify_id,
        )
        try:
            order_id = await self.link.call('place_order', req)
        except (ConnectionError, ValueError) as err:
            if not modify_id:
                tracked.state = 'error'
            self._error(order.oid, order.account, f'IB did not take the order: {err}')
            return
        client_id = self.link.conn.client_id if self.link.conn else -1
        self.book.placed(order.oid, order_id, client_id)
        log.info('order.ack', oid=order.oid, reqid=order_id, fqme=info.fqme,
                 action=order.action, size=order.size, kind=order.kind, price=order.price)
        self.hub.emit(BrokerdOrderAck(oid=order.oid, reqid=str(order_id),
                                      account=order.account))

    async def cancel(self, msg: BrokerdCancel) -> None:
        tracked = self.book.get(msg.oid)
        if tracked is None:
            self._error(msg.oid, msg.account,
                        f'cancel for unknown order {msg.oid!r}: brokerd.ib never saw it')
            return
        if tracked.terminal:
            log.info('order.cancel_ignored', oid=msg.oid, state=tracked.state)
            return
        refusal = self._refusal()
        if refusal is not None:
            self._error(msg.oid, tracked.account, f'cancel not sent: {refusal[1]}',
                        code=refusal[0])
            return
        tracked.cancel_requested = True
        try:
            await self.link.call('cancel_order', tracked.order_id)
        except ConnectionError as err:
            tracked.cancel_requested = False
            self._error(msg.oid, tracked.account, f'cancel not sent: {err}')

    async def warm(self, fqmes: list[str]) -> tuple[list[str], dict[str, str]]:
        warmed: list[str] = []
        errors: dict[str, str] = {}
        for fqme in fqmes:
            try:
                info = await self.contract(fqme)
            except (ValueError, ConnectionError) as err:
                errors[fqme] = str(err)
            else:
                warmed.append(info.fqme)
        log.info('brokerd.ib.warmed', warmed=warmed, errors=errors, cached=len(self.cache))
        return warmed, errors

    async def resolve(self, oids: list[str]) -> Resolution:
        """Conservative: an oid is ``unknown`` only once IB's orders and
        executions were synced and neither the book nor a ledger has it;
        before that every oid without a trace here is ``undecided``."""
        with trio.move_on_after(min(SYNC_WAIT_SECS, self.cfg.connect_timeout_secs)):
            await self.synced.wait()
        wanted = set(oids)
        fills = [from_ledger_fill(f) for account in self.accounts.aliases()
                 for f in self.ledger(account).fills() if f.oid in wanted]
        filled = {f.oid for f in fills}
        res = Resolution(fills=fills)
        for oid in oids:
            tracked = self.book.get(oid)
            if tracked is not None and not tracked.terminal:
                res.working.append(tracked.as_order())
            elif oid in filled:
                continue
            elif tracked is not None:
                res.done[oid] = tracked.state
            elif self.synced.is_set():
                res.unknown.append(oid)
            else:
                res.undecided[oid] = ('brokerd.ib has not synced with IB yet '
                                      f'({self.link.describe_down()}); ask again later')
        log.info('brokerd.ib.resolved', asked=len(oids), working=len(res.working),
                 fills=len(fills), unknown=len(res.unknown), undecided=len(res.undecided))
        return res

    # -- contracts -------------------------------------------------------------------

    async def _details(self, spec: ContractSpec) -> list[ContractInfo]:
        return await self.link.call('contract_details', spec)

    async def contract(self, fqme: str) -> ContractInfo:
        if not self.link.is_up and self.cache.get(fqme) is None:
            raise ConnectionError(f'cannot resolve {fqme!r}: {self.link.describe_down()}')
        return await resolve_fqme_contract(self.cache, fqme, self._details)

    async def contract_by_id(self, con_id: int) -> ContractInfo:
        return await resolve_con_id(self.cache, con_id, self._details)

    # -- helpers -----------------------------------------------------------------------

    def _refusal(self) -> tuple[int | None, str] | None:
        if self.link.is_up and self.synced.is_set():
            return None
        if self.link.is_up:
            return None, ('order refused: brokerd.ib is re-syncing orders and executions '
                          'with IB after a reconnect; send again in a moment')
        code = 1100 if self.link.state == 'degraded' else None
        return code, (
            f'order refused: brokerd.ib is not connected to IB - {self.link.describe_down()}; '
            'it reconnects on its own (backoff up to '
            f'{self.cfg.reconnect_max_backoff_secs:g}s): send again once it is back'
        )

    def _error(self, oid: str, account: str, reason: str, code: int | None = None) -> None:
        log.warning('order.refused', oid=oid, account=account, code=code, reason=reason)
        self.hub.emit(BrokerdError(oid=oid, account=account, code=code, reason=reason,
                                   ts_ns=now_ns()))

    def ledger(self, account: str) -> Ledger:
        ledger = self._ledgers.get(account)
        if ledger is None:
            ledger = self._ledgers[account] = Ledger.open(self._state_dir, BROKER, account)
        return ledger

    def close(self) -> None:
        for ledger in self._ledgers.values():
            ledger.close()
        self._ledgers.clear()

    # -- IB events ------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Apply everything the link reports, in order, for the actor's life."""
        task_status.started()
        async for event in self.link.events:
            try:
                await self._on_event(event)
            except trio.Cancelled:
                raise
            except Exception:
                log.exception('brokerd.ib.event_failed', msg_type=type(event).__name__)

    async def _on_event(self, event: Any) -> None:
        match event:
            case LinkUp(reconnect=reconnect):
                await self.sync(reconnect)
            case LinkRestored(data_lost=data_lost):
                await self.sync(True)
                log.info('brokerd.ib.restored', data_lost=data_lost)
            case LinkDown(reason=reason, code=code):
                if self.synced.is_set():
                    self.synced = trio.Event()  # orders wait for the re-sync
                log.warning('brokerd.ib.degraded', reason=reason, code=code,
                            state=self.link.state)
            case OrderReport():
                for msg in self.book.on_report(event):
                    self._log_order_event(msg)
                    self.hub.emit(msg)
            case ExecReport():
                await self._on_exec(event)
            case PositionReport():
                if self.synced.is_set():
                    try:
                        await self._on_position(event, emit=True)
                    except (ValueError, ConnectionError) as err:
                        log.error('brokerd.ib.unresolved_position', con_id=event.con_id,
                                  error=str(err))
            case IbError():
                client_id = self.link.conn.client_id if self.link.conn else -1
                for msg in self.book.on_error(event, client_id):
                    self._log_order_event(msg)
                    self.hub.emit(msg)

    def _log_order_event(self, msg: Any) -> None:
        log.info('order.broker_event', oid=msg.oid, msg=type(msg).__name__,
                 code=getattr(msg, 'code', None), reason=getattr(msg, 'reason', ''))

    async def sync(self, reconnect: bool) -> None:
        """Match IB's orders, executions and positions to ours (see module doc)."""
        state = await self.link.call('sync_state', refresh=True)
        self.accounts.managed = (self.link.conn.accounts if self.link.conn else [])
        seen_refs: set[str] = set()
        adopted = 0
        for rep in state.orders:
            oid = self.book.oid_of(rep.order_ref, rep.perm_id, rep.order_id, rep.client_id)
            seen_refs.add(oid or rep.order_ref or external_oid(rep.perm_id))
            if oid is not None:
                for msg in self.book.on_report(rep):
                    self._log_order_event(msg)
                    self.hub.emit(msg)
                continue
            try:
                info = await self.contract_by_id(rep.con_id)
            except (ValueError, ConnectionError) as err:
                log.error('brokerd.ib.unresolved_order', perm_id=rep.perm_id, error=str(err))
                continue
            if self.book.adopt(rep, self.accounts.alias_for(rep.account), info.fqme):
                adopted += 1
        applied = 0
        for ex in sorted(state.executions, key=lambda e: e.time_ns):
            applied += await self._on_exec(ex)
        for tracked in self.book.working():
            if tracked.oid not in seen_refs and tracked.order_id:
                tracked.state = 'error'
                self._error(tracked.oid, tracked.account,
                            'IB does not know this order after the reconnect: it was lost '
                            'with the connection; check TWS and send it again if needed')
        live: set[tuple[str, str]] = set()
        for pos in state.positions:
            try:
                live.add(await self._on_position(pos, emit=True))
            except (ValueError, ConnectionError) as err:
                log.error('brokerd.ib.unresolved_position', con_id=pos.con_id,
                          account=pos.account, size=pos.size, error=str(err))
        for key, old in list(self._positions.items()):
            if key not in live and old.size:
                flat = msgspec.structs.replace(old, size=0.0, ts_ns=now_ns())
                self._positions[key] = flat
                self.hub.emit(flat)
        self.syncs += 1
        self.synced.set()
        log.info('brokerd.ib.synced', reconnect=reconnect, orders=len(state.orders),
                 adopted=adopted, executions=len(state.executions), new_fills=applied,
                 positions=len(state.positions), contracts=len(self.cache))

    async def _on_exec(self, ex: ExecReport) -> int:
        """Apply one execution to the ledger; report it if it was new. Returns 1 if so."""
        try:
            info = await self.contract_by_id(ex.con_id)
        except (ValueError, ConnectionError) as err:
            log.error('brokerd.ib.unresolved_fill', exec_id=ex.exec_id, error=str(err))
            return 0
        oid = (self.book.oid_of(ex.order_ref, ex.perm_id, ex.order_id, ex.client_id)
               or ex.order_ref or external_oid(ex.perm_id))
        account = self.accounts.alias_for(ex.account)
        fill = BrokerdFill(
            oid=oid, reqid=str(ex.order_id or ex.perm_id), fill_id=ex.exec_id,
            account=account, fqme=info.fqme, action='buy' if ex.side == 'BOT' else 'sell',
            size=ex.shares, price=ex.price, fee=ex.commission or 0.0, ts_ns=ex.time_ns,
        )
        if not self.ledger(account).apply(to_ledger_fill(fill, BROKER)):
            return 0
        self.book.on_fill(oid, ex.shares)
        log.info('order.fill', oid=oid, fill_id=ex.exec_id, fqme=info.fqme, size=ex.shares,
                 price=ex.price, fee=fill.fee, account=account)
        self.hub.emit(fill)
        return 1

    async def _on_position(self, pos: PositionReport, emit: bool) -> tuple[str, str]:
        info = await self.contract_by_id(pos.con_id)
        account = self.accounts.alias_for(pos.account)
        msg = BrokerdPosition(
            broker=BROKER, account=account, fqme=info.fqme, size=pos.size,
            avg_price=pos.avg_cost / (info.multiplier or 1.0), ts_ns=now_ns(),
        )
        self._positions[(account, info.fqme)] = msg
        if emit:
            self.hub.emit(msg)
        return account, info.fqme


_session: IbBrokerSession | None = None


@asynccontextmanager
async def open_broker_session(cfg: IbCfg, ledger_dir: Path | None = None,
                              ) -> AsyncIterator[IbBrokerSession]:
    """Connect (role ``brokerd``), start following IB, yield the session."""
    global _session
    async with open_ib_link(cfg, 'brokerd') as link:
        session = IbBrokerSession(link, cfg, ledger_dir or state_dir())
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(session.run)
                _session = session
                yield session
                nursery.cancel_scope.cancel()
        finally:
            _session = None
            session.close()


# -- the brokerd.ib daemon ------------------------------------------------------------------

def parse_cfg(backend_cfg: dict[str, Any] | None) -> IbCfg:
    try:
        return msgspec.convert(backend_cfg or {}, IbCfg)
    except msgspec.ValidationError as err:
        raise ConfigError(f'bot.toml [brokers.ib]: {err}') from None


@tractor.context
async def _setup_persistent_brokerd(ctx: tractor.Context, backend: str = BROKER,
                                    backend_cfg: dict[str, Any] | None = None) -> None:
    async with daemon_lifetime('brokerd'):
        cfg = parse_cfg(backend_cfg)
        async with open_broker_session(cfg) as session, serve_broker_session(session):
            link = session.link
            await ctx.started({'pid': os.getpid(), 'broker': BROKER, 'state': link.state,
                               'client_id': link.conn.client_id if link.conn else None})
            await trio.sleep_forever()


class BrokerdCfg(msgspec.Struct, frozen=True, kw_only=True):
    backend: str
    backend_cfg: IbCfg


def brokerd_init(backend: str = BROKER, backend_cfg: dict[str, Any] | None = None,
                 ) -> DaemonSpec:
    if backend != BROKER:
        raise ValueError(f'piker.brokers.ib serves backend {BROKER!r}, not {backend!r}')
    return DaemonSpec(
        name=f'brokerd.{BROKER}', kind='brokerd',
        fixture=f'{__name__}:_setup_persistent_brokerd',
        enable_modules=[__name__, DIALOG_MODULE],
        config=BrokerdCfg(backend=BROKER, backend_cfg=parse_cfg(backend_cfg)),
        infect_asyncio=True, tier=TIER_BROKER,
    )


async def link_status() -> dict[str, Any]:
    """RPC: this brokerd's link to IB (for operators and tests)."""
    if _session is None:
        return {'state': 'starting'}
    link = _session.link
    return {
        'state': link.state, 'reason': link.reason, 'connects': link.connects,
        'client_id': link.conn.client_id if link.conn else None,
        'port': link.conn.port if link.conn else None,
        'synced': _session.synced.is_set(), 'syncs': _session.syncs,
        'contracts': _session.cache.keys(),
    }


