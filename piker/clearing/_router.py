"""emsd's core: routes client orders through the risk gate to broker dialogs.

One :class:`Router` lives in the emsd process. It

- validates every client message, gates every new order or modify with the
  :class:`RiskGate` (last quote from datad for the price band and notional;
  the position plus working orders on each side, an :class:`Exposure`, for
  the position and notional limits);
- keeps stops and alerts in a :class:`DarkBook`, evaluated on every quote;
- opens broker dialogs lazily, on first need: ``paperboi.<backend>`` in paper
  mode, ``brokerd.<backend>`` in live mode. :meth:`Router.dialog` is the only
  place in the tree that spawns a broker actor;
- tracks every order with an :class:`OrderTrack` and fans the resulting
  :class:`Status` out to every client without ever blocking on one;
- marks the day's P&L from fills and quotes and halts at the loss limit.
"""
from __future__ import annotations

import uuid
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import msgspec
import trio

from ..config import PaperCfg, RiskCfg
from ..log import get_logger
from ..service import maybe_spawn_daemon
from ..service._proc import cancel_when_gone
from ..service._spec import SpecError, resolve_spec
from ..types import Fqme, FqmeError
from ._audit import AUDIT_NAME, AuditLog
from ._dark import DarkBook
from ._dialog import (
    BROKERD_INIT,
    PAPERBOI_INIT,
    decode_events,
    open_broker_dialog,
)
from ._exposure import Exposure, fillable, working_exposure
from ._lifecycle import InvalidTransition, OrderTrack
from ._links import BrokerLink, ClientLink
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
from ._pnl import DayPnl
from ._quotes import FeedError, QuoteFeeds, QuoteTick
from ._risk import RiskGate

log = get_logger(__name__)

ClientRequest = Order | Cancel | Warm | Resolve
# terminal orders remembered (oids are unique forever; this bounds memory)
MAX_FINISHED = 50_000
WARM_TIMEOUT_SECS = 30.0
RESOLVE_TIMEOUT_SECS = 30.0
REDIAL_DELAY_SECS = 1.0
_SIZE_EPS = 1e-9


class RouteError(RuntimeError):
    """An order that cannot reach its broker; the text says why."""


class Router:
    def __init__(
        self,
        *,
        mode: str,
        risk_cfg: RiskCfg,
        paper_cfg: PaperCfg,
        backend_cfgs: dict[str, Any],
        state_dir: Path,
        nursery: trio.Nursery,
    ) -> None:
        if mode not in ('paper', 'live'):
            raise ValueError(f"emsd mode: expected 'paper' or 'live', found {mode!r} (`mode` in bot.toml)")
        self.mode = mode
        self.paper_cfg = paper_cfg
        self.backend_cfgs = dict(backend_cfgs)
        self.gate = RiskGate(risk_cfg, state_dir / 'risk' / 'halt.toml')
        self.audit = AuditLog(state_dir / AUDIT_NAME)
        self._nursery = nursery
        self.feeds = QuoteFeeds(nursery, self.backend_cfgs, self.on_quotes)
        self.tracks: dict[str, OrderTrack] = {}
        # the non-terminal subset of `tracks` (what exposure and status scan)
        self._working: dict[str, OrderTrack] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        # oid -> the largest size its broker may still work on, while a modify
        # is unacked; and how many BrokerdOrders each oid has unacked
        self._held: dict[str, float] = {}
        self._acks_due: Counter[str] = Counter()
        self.routes: dict[str, str] = {}
        self.owners: dict[str, int] = {}
        self._cancel_asked: set[str] = set()
        self.clients: dict[int, ClientLink] = {}
        self._next_cid = 0
        self.positions: dict[tuple[str, str, str], BrokerdPosition] = {}
        self.quotes: dict[str, QuoteTick] = {}
        self.marks: dict[str, float] = {}
        self.dark = DarkBook()
        self.pnl = DayPnl()
        self.dialogs: dict[str, BrokerLink] = {}
        self._dial_locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        # reqid -> (answered, [answer]) of requests a broker answers by reqid
        self._waiters: dict[str, tuple[trio.Event, list[Any]]] = {}
        self.accounts: set[str] = {'paper'} if mode == 'paper' else set()

    # -- clients ---------------------------------------------------------------

    def attach_client(self, source: str) -> ClientLink:
        self._next_cid += 1
        link = ClientLink(self._next_cid, source)
        self.clients[link.cid] = link
        log.info('ems.client_attached', client=source, cid=link.cid)
        return link

    def claim_orders(self, link: ClientLink) -> int:
        """A client (re)attaching under its name owns its working orders again
        (those of an earlier dialog, or restored from a broker): their
        statuses reach it even when it lags."""
        claimed = 0
        for track in self.working():
            if track.order.source == link.source and self.owners.get(track.oid) != link.cid:
                self.owners[track.oid] = link.cid
                claimed += 1
        if claimed:
            log.info('ems.orders_claimed', client=link.source, cid=link.cid, count=claimed)
        return claimed

    def detach_client(self, link: ClientLink) -> None:
        self.clients.pop(link.cid, None)
        link.close()
        log.info('ems.client_detached', client=link.source, cid=link.cid, dropped=link.dropped)

    def publish(self, status: Status | None) -> None:
        """Fan ``status`` out: to its owner always, to others unless they lag."""
        if status is None:
            return
        owner = self.owners.get(status.oid)
        for link in list(self.clients.values()):
            link.push(status, owned=link.cid == owner)
        if status.state in ('filled', 'canceled', 'rejected', 'error', 'triggered'):
            self._finish(status.oid)

    def _broadcast(self, msg: Any) -> None:
        for link in list(self.clients.values()):
            link.push(msg, owned=True)

    def _register(self, track: OrderTrack, backend: str | None, owner: int | None) -> None:
        oid = track.oid
        self.tracks[oid] = track
        if backend is not None:
            self.routes[oid] = backend
        if owner is not None:
            self.owners[oid] = owner
        if track.terminal:
            self._finish(oid)
        else:
            self._working[oid] = track

    def _finish(self, oid: str) -> None:
        self._working.pop(oid, None)
        self._held.pop(oid, None)
        self._acks_due.pop(oid, None)
        self._cancel_asked.discard(oid)
        self._finished[oid] = None
        while len(self._finished) > MAX_FINISHED:
            old, _ = self._finished.popitem(last=False)
            self.tracks.pop(old, None)
            self.routes.pop(old, None)
            self.owners.pop(old, None)

    def client_start(self, backends: list[str]) -> dict[str, Any]:
        """What a new client learns first: positions, working orders, halt."""
        wanted = set(backends)
        return {
            'mode': self.mode,
            'halted': self.gate.halted,
            'positions': [to_wire(p) for p in self.positions.values()
                          if not wanted or p.broker in wanted],
            'open_orders': [to_wire(t.status(now_ns())) for t in self.working()
                            if not wanted or self.routes.get(t.oid) in wanted],
        }

    def working(self) -> list[OrderTrack]:
        return list(self._working.values())

    # -- client messages -------------------------------------------------------

    async def on_client_msg(self, link: ClientLink, raw: Any) -> None:
        try:
            msg = decode_msg(raw, ClientRequest)
        except BadMessage as err:
            self._malformed(link, raw, str(err))
            return
        match msg:
            case Order():
                await self.submit(msg, owner=link.cid)
            case Cancel():
                await self.cancel(msg, link)
            case Warm():
                link.push(await self.warm(msg), owned=True)
            case Resolve():
                link.push(await self.resolve(msg, link), owned=True)

    def _malformed(self, link: ClientLink, raw: Any, error: str) -> None:
        oid = raw.get('oid') if isinstance(raw, dict) else None
        oid = oid if isinstance(oid, str) else ''
        reason = f'malformed message from {link.source}: {error}'
        log.warning('order.malformed', oid=oid, client=link.source, error=error)
        track = self.tracks.get(oid)
        if track is not None:
            # the order itself is unaffected; tell the sender why nothing happened
            status = msgspec.structs.replace(track.status(now_ns()), reason=f'ignored {reason}')
        else:
            status = Status(oid=oid, state='error', reason=reason, source=link.source,
                            ts_ns=now_ns())
        link.push(status, owned=True)

    def _reject(self, order: Order, rule: str, reason: str, owner: int | None) -> None:
        log.warning('order.rejected', rule=rule, reason=reason, oid=order.oid,
                    fqme=order.fqme, source=order.source)
        track = OrderTrack(order)
        status = track.on_reject(reason, now_ns())
        self._register(track, None, owner)
        self.publish(status)

    def _route_of(self, fqme: str) -> tuple[Order, str] | str:
        """:meth:`_resolve` for a market alone (warm-ups, resolves by oid)."""
        return self._resolve(Order(oid='', fqme=fqme, action='buy', size=1))

    def _resolve(self, order: Order) -> tuple[Order, str] | str:
        """The order with its canonical fqme, and its backend; or why not."""
        try:
            fq = Fqme.parse(order.fqme)
        except FqmeError as err:
            return str(err)
        if fq.backend not in self.backend_cfgs:
            known = ', '.join(sorted(self.backend_cfgs)) or 'none'
            return (f'unknown backend {fq.backend!r} in fqme {order.fqme!r}: '
                    f'configured backends are {known} ([brokers.<name>] in bot.toml)')
        return msgspec.structs.replace(order, fqme=fq.key, ts_ns=order.ts_ns or now_ns()), fq.backend

    async def submit(self, order: Order, owner: int | None) -> None:
        """A new order or a modify (same ``oid``), through the risk gate."""
        if not order.oid:
            client = self.clients.get(owner) if owner is not None else None
            if client is not None:
                client.push(Status(oid='', state='rejected', ts_ns=now_ns(), reason=(
                    'order without an `oid`: every order needs a client id, unique '
                    'forever (see piker.clearing.new_oid)')), owned=True)
            return
        track = self.tracks.get(order.oid)
        if track is not None:
            await self._modify(track, order, owner)
            return
        resolved = self._resolve(order)
        if isinstance(resolved, str):
            self._reject(order, 'invalid_order', resolved, owner)
            return
        order, backend = resolved
        if not self.gate.halted:
            try:
                canonical = await self.feeds.ensure(order.fqme)
            except FeedError as err:
                self._reject(order, 'no_quote', str(err), owner)
                return
            if canonical != order.fqme:
                order = msgspec.structs.replace(order, fqme=canonical)
        now = now_ns()
        rejection = self.gate.check(
            order, last_price=self.marks.get(order.fqme),
            exposure=self.exposure(backend, order.account, order.fqme), now_ns=now,
        )
        if rejection is not None:
            self._reject(order, rejection.rule, rejection.reason, owner)
            return
        self.gate.record_accept(now)
        self.accounts.add(order.account)
        dark = order.kind in ('stop', 'alert')
        track = OrderTrack(order, dark=dark)
        self._register(track, backend, owner)
        log.info('order.accepted', oid=order.oid, fqme=order.fqme, action=order.action,
                 size=order.size, kind=order.kind, price=order.price, source=order.source)
        self.publish(track.status(now))
        if dark:
            self.dark.add(order)
            return
        await self._route(track, backend)

    async def _modify(self, track: OrderTrack, order: Order, owner: int | None) -> None:
        old = track.order
        now = now_ns()
        problem = None
        if track.terminal:
            problem = (f'order {order.oid!r} is already {track.state}; order ids are unique '
                       'forever, send a new oid')
        else:
            resolved = self._resolve(order)
            if isinstance(resolved, str):
                problem = resolved
            else:
                order = resolved[0]
                order = msgspec.structs.replace(order, fqme=self.feeds.canonical(order.fqme))
                changed = [f for f in ('fqme', 'action', 'account')
                           if getattr(order, f) != getattr(old, f)]
                if changed:
                    problem = (f'a modify may change size, price and kind only, not '
                               f'{", ".join(changed)}; cancel {order.oid!r} and send a new order')
                elif (order.kind in ('stop', 'alert')) != (old.kind in ('stop', 'alert')):
                    problem = (f'cannot turn {old.kind} order {order.oid!r} into a {order.kind} '
                               'order; cancel it and send a new one')
        if problem is None:
            backend = self.routes[order.oid]
            # the new terms replace the old remainder once the broker acks
            # them: until then the larger of old and new may fill. A dark
            # order holds nothing yet and is checked like a new one.
            held = max(self._held.get(order.oid, 0.0), old.size)
            rejection = self.gate.check(
                order, last_price=self.marks.get(order.fqme),
                exposure=self.exposure(backend, order.account, order.fqme), now_ns=now,
                replaces=fillable(track, self._held.get(order.oid, 0.0)),
                adds=order.size if track.state == 'dark' else fillable(track, held, order.size),
            )
            if rejection is not None:
                log.warning('order.rejected', rule=rejection.rule, reason=rejection.reason,
                            oid=order.oid, modify=True)
                problem = f'modify rejected: {rejection.reason}'
        if problem is not None:
            status = msgspec.structs.replace(track.status(now), reason=problem)
            if owner is not None and owner in self.clients:
                self.clients[owner].push(status, owned=True)
            return
        self.gate.record_accept(now)
        try:
            self.publish(track.on_modify(order, now))
        except (ValueError, InvalidTransition) as err:
            log.warning('order.modify_failed', oid=order.oid, error=str(err))
            return
        if track.state == 'dark':
            self.dark.add(order)
            return
        self._held[order.oid] = held
        await self._route(track, self.routes[order.oid])

    async def _route(self, track: OrderTrack, backend: str, kind: str | None = None) -> None:
        o = track.order
        req = BrokerdOrder(
            oid=o.oid, account=o.account, fqme=o.fqme, action=o.action,
            size=o.size if kind is None else track.remaining,
            kind=kind or o.kind, price=None if kind == 'market' else o.price,  # type: ignore[arg-type]
            reqid=track.reqid, ts_ns=o.ts_ns, source=o.source,
        )
        self._acks_due[o.oid] += 1
        try:
            link = await self.dialog(backend)
            await link.send(req)
        except trio.Cancelled:
            raise
        except Exception as err:
            reason = f'cannot reach the {backend} broker: {_describe(err)}'
            log.error('order.route_failed', oid=o.oid, backend=backend, error=reason)
            if not track.terminal:
                self.publish(track.on_error(reason, ts_ns=now_ns()))

    async def cancel(self, msg: Cancel, link: ClientLink | None) -> None:
        track = self.tracks.get(msg.oid)
        now = now_ns()
        if track is None:
            if link is not None:
                link.push(Status(oid=msg.oid, state='error', ts_ns=now,
                                 reason=f'cancel of unknown order id {msg.oid!r}'), owned=True)
            return
        if track.terminal:
            if link is not None:
                link.push(msgspec.structs.replace(
                    track.status(now), reason=f'cancel ignored: order already {track.state}',
                ), owned=True)
            return
        if track.state == 'dark':
            self.dark.remove(msg.oid)
            self.publish(track.on_cancel_ack(msg.reason or 'canceled on request', now))
            return
        self._cancel_asked.add(msg.oid)
        o = track.order
        try:
            dialog = await self.dialog(self.routes[msg.oid])
            await dialog.send(BrokerdCancel(oid=o.oid, account=o.account, reqid=track.reqid,
                                            fqme=o.fqme))
        except trio.Cancelled:
            raise
        except Exception as err:
            self._cancel_asked.discard(msg.oid)
            if link is not None:
                link.push(msgspec.structs.replace(
                    track.status(now), reason=f'cancel failed: {_describe(err)}'), owned=True)

    async def warm(self, msg: Warm) -> Warmed:
        """Ask each market's broker to resolve it (paperboi: subscribe its quotes)."""
        by_backend: dict[str, list[str]] = defaultdict(list)
        errors: dict[str, str] = {}
        for fqme in msg.fqmes:
            resolved = self._route_of(fqme)
            if isinstance(resolved, str):
                errors[fqme] = resolved
            else:
                by_backend[resolved[1]].append(resolved[0].fqme)
        for fqmes in by_backend.values():
            # emsd's own quotes too: the first order's risk check needs them
            for fqme in fqmes:
                self._nursery.start_soon(self._ensure_quotes, fqme)
        warmed: list[str] = []
        for backend, fqmes in by_backend.items():
            reqid = uuid.uuid4().hex
            try:
                reply = await self._ask_broker(
                    backend, BrokerdWarm(reqid=reqid, fqmes=fqmes), WARM_TIMEOUT_SECS)
            except trio.Cancelled:
                raise
            except Exception as err:
                errors.update({f: _describe(err) for f in fqmes})
                continue
            warmed += reply.fqmes
            errors.update(reply.errors)
        log.info('ems.warmed', warmed=warmed, errors=errors)
        return Warmed(reqid=msg.reqid, fqmes=warmed, errors=errors)

    async def _ask_broker(self, backend: str, req: BrokerdWarm | BrokerdResolve,
                          timeout_secs: float) -> Any:
        """Send a request a broker answers by ``reqid``; its answer, or raise."""
        done = trio.Event()
        box: list[Any] = []
        self._waiters[req.reqid] = (done, box)
        try:
            dialog = await self.dialog(backend)
            await dialog.send(req)
            with trio.move_on_after(timeout_secs):
                await done.wait()
        finally:
            self._waiters.pop(req.reqid, None)
        if not box:
            raise RouteError(f'{backend} did not answer within {timeout_secs:g}s')
        return box[0]

    async def resolve(self, msg: Resolve, link: ClientLink | None = None) -> Resolved:
        """What became of a client's orders: emsd's own tracks first, then
        each order's broker (its working orders and its ledger, by oid).
        Nothing is sent again; the asking client owns what is still working."""
        now = now_ns()
        known: dict[str, Status] = {}
        fills: list[BrokerdFill] = []
        unknown: list[str] = []
        undecided: dict[str, str] = {}
        by_backend: dict[str, list[str]] = defaultdict(list)
        for oid, fqme in msg.orders.items():
            track = self.tracks.get(oid)
            if track is not None and not track.terminal:
                known[oid] = track.status(now)
                if link is not None:
                    self.owners[oid] = link.cid
                continue
            backend = self.routes.get(oid)
            if backend is None:
                resolved = self._route_of(fqme)
                if isinstance(resolved, str):
                    undecided[oid] = resolved
                    continue
                backend = resolved[1]
            by_backend[backend].append(oid)
        for backend, oids in by_backend.items():
            reply = await self._resolve_at(backend, oids)
            fills += reply.fills
            undecided.update(reply.undecided)
            for bo in reply.working:
                track = self.tracks.get(bo.oid) or self._restore(bo, backend)
                if link is not None:
                    self.owners[bo.oid] = link.cid
                known[bo.oid] = track.status(now)
            for oid in oids:
                track = self.tracks.get(oid)
                if oid not in known and track is not None:
                    known[oid] = track.status(now)  # final as emsd saw it
            for oid, state in reply.done.items():
                if oid not in known and state in ('canceled', 'rejected', 'error'):
                    known[oid] = Status(oid=oid, state=state, ts_ns=now,  # type: ignore[arg-type]
                                        reason=f'{state} at the {backend} broker')
            unknown += [oid for oid in reply.unknown if oid not in known]
        log.info('ems.resolved', asked=len(msg.orders), known=len(known), fills=len(fills),
                 unknown=unknown, undecided=undecided, client=link.source if link else None)
        return Resolved(reqid=msg.reqid, statuses=list(known.values()), fills=fills,
                        unknown=unknown, undecided=undecided)

    def exposure(self, backend: str, account: str, fqme: str) -> Exposure:
        """The position and the remainders of the orders working at the
        broker (not dark ones), per side: what the risk limits hold against."""
        pos = self.positions.get((backend, account, fqme))
        return working_exposure(pos.size if pos else 0.0, self._working.values(),
                                account=account, fqme=fqme, held=self._held)

    def _on_ack(self, oid: str) -> None:
        """The broker took the latest terms of ``oid`` once every BrokerdOrder
        sent for it is acked: the sizes a modify replaced stop counting."""
        self._acks_due[oid] -= 1
        if self._acks_due[oid] <= 0:
            self._acks_due.pop(oid, None)
            self._held.pop(oid, None)

    # -- broker dialogs ----------------------------------------------------------

    def broker_daemon(self, backend: str) -> tuple[str, dict[str, Any]]:
        """The daemon init that serves ``backend``'s orders in this mode."""
        backend_cfg = self.backend_cfgs.get(backend) or {}
        if self.mode == 'paper':
            return PAPERBOI_INIT, {
                'backend': backend, 'paper_cfg': msgspec.to_builtins(self.paper_cfg),
                'backend_cfg': backend_cfg,
            }
        return BROKERD_INIT.format(backend=backend), {
            'backend': backend, 'backend_cfg': backend_cfg}

    async def dialog(self, backend: str) -> BrokerLink:
        """The open dialog to ``backend``'s broker, spawning it on first need."""
        link = self.dialogs.get(backend)
        if link is not None and link.alive:
            return link
        async with self._dial_locks[backend]:
            link = self.dialogs.get(backend)
            if link is not None and link.alive:
                return link
            return await self._nursery.start(self._run_dialog, backend)

    async def _run_dialog(self, backend: str, *,
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        init, kwargs = self.broker_daemon(backend)
        name = f'{init.rsplit(":", 1)[1].removesuffix("_init")}.{backend}'
        link: BrokerLink | None = None
        reason = 'dialog closed'
        try:
            resolve_spec(init, kwargs)
        except SpecError:
            raise RouteError(
                f'backend {backend!r} has no live order side (no {init}); live mode needs '
                "a backend with a brokerd (e.g. ib), or set mode = 'paper' in bot.toml"
            ) from None
        try:
            with trio.CancelScope() as scope:
                async with maybe_spawn_daemon(init, **kwargs) as portal:
                    accounts = sorted(self.accounts)
                    async with open_broker_dialog(portal, accounts) as (start, stream):
                        link = BrokerLink(backend, name, start, stream)
                        self.dialogs[backend] = link
                        self._on_dialog_start(link)
                        task_status.started(link)
                        async with trio.open_nursery() as n:
                            n.start_soon(cancel_when_gone, start.pid, scope)
                            async for raw in stream:
                                self.on_broker_msg(link, raw)
                            n.cancel_scope.cancel()
            if scope.cancelled_caught:
                reason = f'{name} (pid {link.start.pid if link else "?"}) died'
        except trio.Cancelled:
            # emsd itself is stopping: nothing was lost
            if link is not None:
                link.alive = False
                self.dialogs.pop(backend, None)
                link = None
            raise
        except BaseException as err:
            if link is None:
                raise
            reason = f'{name} failed: {_describe(err)}'
        finally:
            if link is not None:
                link.alive = False
                self._on_dialog_lost(link, reason)

    def _on_dialog_start(self, link: BrokerLink) -> None:
        start = link.start
        log.info('ems.dialog_open', broker=link.name, pid=start.pid,
                 positions=len(start.positions), open_orders=len(start.open_orders))
        for pos in start.positions:
            self._on_position(pos)
        working = {o.oid for o in start.open_orders}
        for bo in start.open_orders:
            if bo.oid not in self.tracks:
                self._restore(bo, link.backend)
        # orders this emsd thought were working there but the broker no longer has
        for track in self.working():
            if (self.routes.get(track.oid) == link.backend and track.state != 'dark'
                    and track.state != 'pending' and track.oid not in working):
                self.publish(track.on_error(
                    f'{link.name} restarted without this order; check `piker ledger` '
                    'for its fills', ts_ns=now_ns()))

    def _restore(self, bo: BrokerdOrder, backend: str) -> OrderTrack:
        """Track an order a broker works that this emsd never routed (it
        restarted): owned by its client again once that client attaches."""
        order = Order(oid=bo.oid, fqme=bo.fqme, action=bo.action, size=bo.size,
                      kind=bo.kind, price=bo.price, account=bo.account,
                      source=bo.source or 'restored', ts_ns=bo.ts_ns)
        track = OrderTrack(order)
        owner = next((c.cid for c in self.clients.values() if c.source == order.source), None)
        self._register(track, backend, owner)
        self.accounts.add(bo.account)
        self.publish(track.on_ack(bo.reqid or '', now_ns()))
        self._nursery.start_soon(self._ensure_quotes, bo.fqme)
        return track

    async def _ensure_quotes(self, fqme: str) -> None:
        try:
            await self.feeds.ensure(fqme)
        except FeedError as err:
            log.warning('ems.quotes_unavailable', fqme=fqme, error=str(err))

    def _on_dialog_lost(self, link: BrokerLink, reason: str) -> None:
        if self.dialogs.get(link.backend) is link:
            del self.dialogs[link.backend]
        log.warning('ems.dialog_lost', broker=link.name, reason=reason)
        resting = False
        in_flight: list[str] = []
        for track in self.working():
            if self.routes.get(track.oid) != link.backend or track.state == 'dark':
                continue
            if track.state == 'pending':
                # sent but unanswered: the broker may or may not have it
                in_flight.append(track.oid)
            else:
                resting = True
        if in_flight:
            self._nursery.start_soon(self._resolve_in_flight, link.backend, link.name,
                                     reason, in_flight)
        elif resting:
            self._nursery.start_soon(self._redial, link.backend)

    async def _resolve_at(self, backend: str, oids: list[str]) -> BrokerdResolved:
        """Ask ``backend``'s broker about ``oids``; a broker that cannot answer
        leaves every one undecided (never assumed lost)."""
        try:
            return await self._ask_broker(
                backend, BrokerdResolve(reqid=uuid.uuid4().hex, oids=oids),
                RESOLVE_TIMEOUT_SECS)
        except trio.Cancelled:
            raise
        except Exception as err:
            log.error('ems.resolve_failed', backend=backend, error=_describe(err))
            return BrokerdResolved(reqid='', undecided={oid: _describe(err) for oid in oids})

    async def _resolve_in_flight(self, backend: str, name: str, reason: str,
                                 oids: list[str]) -> None:
        """Orders a broker died before answering: ask its successor by oid
        (its ledger has every fill the dead one made) instead of guessing;
        nothing is sent again. Redials the broker, so resting orders resume."""
        await trio.sleep(REDIAL_DELAY_SECS)
        reply = await self._resolve_at(backend, oids)
        now = now_ns()
        for fill in reply.fills:
            track = self.tracks.get(fill.oid)
            if track is not None:
                self._on_order_event(track, fill)
        for bo in reply.working:
            track = self.tracks.get(bo.oid)
            if track is not None and track.state == 'pending':
                self.publish(track.on_ack(bo.reqid or '', now))
        for oid in oids:
            track = self.tracks.get(oid)
            if track is None or track.state != 'pending':
                continue
            if oid in reply.undecided:
                why = (f'{reason} before answering; the order may have filled - check '
                       '`piker positions` / `piker ledger`')
            elif oid in reply.done:
                why = f'{name} ended it {reply.done[oid]} before it died'
            else:
                why = f'lost in flight when {name} died; not re-sent'
            self.publish(track.on_error(why, ts_ns=now))
        log.info('ems.in_flight_resolved', broker=name, asked=len(oids),
                 fills=len(reply.fills), working=len(reply.working),
                 unknown=len(reply.unknown), undecided=len(reply.undecided))

    async def _redial(self, backend: str) -> None:
        """Resting orders need their broker back (paperboi reloads them)."""
        await trio.sleep(REDIAL_DELAY_SECS)
        try:
            await self.dialog(backend)
        except Exception as err:
            log.error('ems.redial_failed', backend=backend, error=_describe(err))

    # -- broker events -------------------------------------------------------------

    def on_broker_msg(self, link: BrokerLink, raw: Any) -> None:
        for event in decode_events(raw):
            try:
                self._on_event(link, event)
            except Exception:
                log.exception('ems.broker_event_failed', broker=link.name)

    def _on_event(self, link: BrokerLink, event: Any) -> None:
        match event:
            case BadMessage():
                self._bad_broker_msg(link, event)
            case BrokerdPosition():
                self._on_position(event)
            case BrokerdWarmed() | BrokerdResolved():
                waiter = self._waiters.get(event.reqid)
                if waiter is not None:
                    waiter[1].append(event)
                    waiter[0].set()
            case _:
                track = self.tracks.get(event.oid)
                if track is None:
                    log.warning('ems.unknown_oid', broker=link.name, oid=event.oid,
                                msg_type=type(event).__name__)
                    if isinstance(event, BrokerdFill):
                        self._account_fill(event)
                    return
                self._on_order_event(track, event)

    def _on_order_event(self, track: OrderTrack, event: Any) -> None:
        match event:
            case BrokerdOrderAck():
                self._on_ack(track.oid)
                if track.state == 'pending' or (track.state in ('open', 'partial')):
                    self.publish(track.on_ack(event.reqid, now_ns()))
            case BrokerdStatus():
                if track.terminal:
                    log.debug('order.late_status', oid=track.oid, state=track.state,
                             broker_state=event.state)
                    return
                if event.state == 'canceled':
                    self._cancel_asked.discard(track.oid)
                self.publish(track.on_status(event))
            case BrokerdFill():
                status = track.on_fill(event)
                if status is not None:
                    self._account_fill(event)
                    log.info('order.fill', oid=track.oid, fill_id=event.fill_id,
                             fqme=event.fqme, size=event.size, price=event.price, fee=event.fee)
                self.publish(status)
            case BrokerdError():
                self._on_broker_error(track, event)

    def _on_broker_error(self, track: OrderTrack, event: BrokerdError) -> None:
        reason = event.reason or 'broker error'
        log.warning('order.broker_error', oid=track.oid, code=event.code, reason=reason)
        if track.terminal:
            return
        if track.oid in self._cancel_asked:
            # the cancel failed, the order itself may still be working
            self._cancel_asked.discard(track.oid)
            status = msgspec.structs.replace(track.status(now_ns()),
                                             reason=f'cancel failed: {reason}', code=event.code)
            owner = self.clients.get(self.owners.get(track.oid, -1))
            if owner is not None:
                owner.push(status, owned=True)
            return
        self.publish(track.on_error(reason, event.code, now_ns()))

    def _bad_broker_msg(self, link: BrokerLink, err: BadMessage) -> None:
        raw = getattr(err, 'raw', None)
        oid = raw.get('oid') if isinstance(raw, dict) else None
        log.error('ems.bad_broker_msg', broker=link.name, oid=oid, error=str(err))
        track = self.tracks.get(oid) if isinstance(oid, str) else None
        if track is not None and not track.terminal:
            self.publish(track.on_error(f'malformed message from {link.name}: {err}',
                                        ts_ns=now_ns()))

    def _on_position(self, pos: BrokerdPosition) -> None:
        key = (pos.broker, pos.account, pos.fqme)
        if key not in self.positions:
            self.pnl.start_position(pos.account, pos.fqme, pos.size)
        self.positions[key] = pos
        self._broadcast(pos)

    def _account_fill(self, fill: BrokerdFill) -> None:
        now = now_ns()
        signed = fill.size if fill.action == 'buy' else -fill.size
        self.pnl.on_fill(fill.account, fill.fqme, signed, fill.price, fill.fee, now)
        self._check_loss(now)

    # -- quotes ------------------------------------------------------------------

    def on_quotes(self, quotes: list[QuoteTick]) -> None:
        now = now_ns()
        for q in quotes:
            self.quotes[q.fqme] = q
            mark = q.mark
            if mark is None:
                continue
            self.marks[q.fqme] = mark
            self.pnl.on_mark(q.fqme, mark, now)
            for order in self.dark.triggered(q.fqme, mark):
                self._fire(order, mark)
        self._check_loss(now)

    def _fire(self, order: Order, last: float) -> None:
        track = self.tracks.get(order.oid)
        if track is None or track.state != 'dark':
            return
        log.info('order.triggered', oid=order.oid, kind=order.kind, fqme=order.fqme,
                 price=order.price, last=last)
        if order.kind == 'alert':
            self.publish(track.on_trigger(now_ns()))
            return
        self._nursery.start_soon(self._submit_stop, track)

    async def _submit_stop(self, track: OrderTrack) -> None:
        """A fired stop goes to its broker as a market order, gated again (a
        halt may have started since it was placed)."""
        o = track.order
        backend = self.routes[o.oid]
        market = msgspec.structs.replace(o, kind='market', price=None)
        now = now_ns()
        # still dark, so not in the exposure: it adds its whole remainder
        rejection = self.gate.check(
            market, last_price=self.marks.get(o.fqme),
            exposure=self.exposure(backend, o.account, o.fqme), now_ns=now,
            adds=track.remaining)
        if rejection is not None:
            log.warning('order.rejected', rule=rejection.rule, reason=rejection.reason,
                        oid=o.oid, trigger=True)
            self.publish(track.on_reject(f'stop triggered but {rejection.reason}', now))
            return
        self.gate.record_accept(now)
        self.publish(track.on_submit(now))
        await self._route(track, backend, kind='market')

    def _check_loss(self, now: int) -> None:
        day_pnl = self.pnl.total(now)
        if self.gate.update_pnl(day_pnl, now):
            halt = self.gate.halt_state
            self.audit.record('halt', by='risk.daily_loss_limit',
                              reason=halt.reason if halt else '', day_pnl=day_pnl)

    # -- operator actions ----------------------------------------------------------

    def halt(self, reason: str, by: str) -> dict[str, Any]:
        self.gate.halt(reason, by)
        self.audit.record('halt', by=by, reason=reason)
        return self.status()

    def resume(self, by: str) -> dict[str, Any]:
        previous = self.gate.halt_state
        self.gate.resume(by)
        self.audit.record('resume', by=by,
                          previous_reason=previous.reason if previous else '')
        return self.status()

    async def cancel_all(self, account: str | None, by: str) -> list[str]:
        oids = [t.oid for t in self.working() if account is None or t.order.account == account]
        self.audit.record('cancel_all', by=by, account=account, oids=oids)
        for oid in oids:
            await self.cancel(Cancel(oid=oid, reason=f'cancel_all by {by}'), None)
        return oids

    async def flatten(self, account: str | None, fqme: str | None, by: str) -> list[str]:
        """Cancel working orders, then market-out every matching position.

        Flatten orders skip the risk gate on purpose: they only reduce risk and
        must work while trading is halted. They are audited instead.
        """
        if fqme is not None:
            fqme = Fqme.parse(fqme).key
        for track in self.working():
            o = track.order
            if (account is None or o.account == account) and (fqme is None or o.fqme == fqme):
                await self.cancel(Cancel(oid=o.oid, reason=f'flatten by {by}'), None)
        sent: list[str] = []
        targets = [p for p in self.positions.values()
                   if abs(p.size) > _SIZE_EPS
                   and (account is None or p.account == account)
                   and (fqme is None or p.fqme == fqme)]
        for pos in targets:
            order = Order(oid=f'flatten-{uuid.uuid4().hex}', fqme=pos.fqme,
                          action='sell' if pos.size > 0 else 'buy', size=abs(pos.size),
                          account=pos.account, source=f'flatten:{by}', ts_ns=now_ns())
            track = OrderTrack(order)
            self._register(track, pos.broker, None)
            self.publish(track.status(now_ns()))
            sent.append(order.oid)
            await self._route(track, pos.broker)
        self.audit.record('flatten', by=by, account=account, fqme=fqme, oids=sent,
                          positions={p.fqme: p.size for p in targets})
        return sent

    def status(self) -> dict[str, Any]:
        now = now_ns()
        stats = self.gate.statistics(now)
        return {
            'mode': self.mode,
            'halted': self.gate.halted,
            'halt': msgspec.to_builtins(stats.halt) if stats.halt else None,
            'positions': [to_wire(p) for p in self.positions.values()],
            'open_orders': [to_wire(t.status(now)) for t in self.working()],
            'day_pnl': self.pnl.total(now),
            'marks': dict(self.marks),
            'risk': msgspec.to_builtins(stats),
            'dialogs': {b: {'name': d.name, 'pid': d.start.pid} for b, d in self.dialogs.items()},
            'clients': [{'cid': c.cid, 'source': c.source, 'backlog': c.backlog(),
                         'dropped': c.dropped} for c in self.clients.values()],
        }




def _describe(err: BaseException) -> str:
    msgdata = getattr(err, 'msgdata', None)
    if isinstance(msgdata, dict) and msgdata.get('tb_str'):
        lines = [ln for ln in msgdata['tb_str'].strip().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else str(msgdata.get('type_str'))
    if isinstance(err, BaseExceptionGroup):
        return '; '.join(_describe(e) for e in err.exceptions)
    return f'{type(err).__name__}: {err}'

