"""paperboi.<backend>: paper clearing behind the broker dialog protocol.

The actor shell around :class:`PaperEngine`: it subscribes to datad for every
market it holds or receives orders in, feeds each quote batch to the engine,
and ships the engine's events over the broker dialog (``_dialog``), exactly
as a live ``brokerd`` would.

Restarts: resting paper orders survive. The engine persists them to
``<state_dir>/paper/<backend>/orders.toml`` on every change and reloads them;
at startup paperboi re-subscribes to their markets, so they keep filling, and
a new dialog lists them in ``open_orders``. Every fill is fsynced to the
account's ledger (``<state_dir>/accounting/<backend>/<account>/``) before the
fill is sent, so a SIGKILL never loses an acknowledged fill.
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

from ..accounting import Ledger
from ..config import ConfigError, PaperCfg, state_dir
from ..log import get_logger
from ..service import DaemonSpec, daemon_lifetime, maybe_spawn_daemon
from ..service._spec import TIER_BROKER
from ..types import Fqme, FqmeError
from ._dialog import DIALOG_MODULE, DialogHub, Resolution, Snapshot, serve_broker_session
from ._messages import BrokerdCancel, BrokerdError, BrokerdOrder, now_ns
from ._paper_engine import PaperEngine
from ._quotes import FeedError, QuoteFeeds, QuoteTick

log = get_logger(__name__)

# the longest a written paper fill waits for fdatasync
LEDGER_SYNC_SECS = 0.02


class PaperSession:
    """The :class:`~piker.clearing._dialog.BrokerSession` of paperboi."""

    def __init__(self, broker: str, paper_cfg: PaperCfg, state: os.PathLike[str] | str,
                 nursery: trio.Nursery, backend_cfg: dict[str, Any]) -> None:
        self.broker = broker
        self.hub = DialogHub()
        state = Path(state)
        self._state_dir = state
        self._ledgers: dict[str, Ledger] = {}
        self.engine = PaperEngine(broker, paper_cfg, state, self.ledger_for)
        self.feeds = QuoteFeeds(nursery, {broker: backend_cfg}, self._on_quotes)

    def ledger_for(self, account: str) -> Ledger:
        ledger = self._ledgers.get(account)
        if ledger is None:
            ledger = self._ledgers[account] = Ledger.open(
                self._state_dir, self.broker, account, sync='deferred')
        return ledger

    async def sync_ledgers(self, period_secs: float = LEDGER_SYNC_SECS) -> None:
        """fdatasync written paper fills within ``period_secs``, off the event
        loop: a fill is written before it is acknowledged (SIGKILL-safe), and
        on the platter a few milliseconds later (power-loss-safe)."""
        while True:
            for ledger in list(self._ledgers.values()):
                fd = ledger.sync_fd()
                if fd is not None:
                    try:
                        await trio.to_thread.run_sync(os.fdatasync, fd)
                    except OSError as err:  # closed under us at shutdown
                        log.warning('ledger.sync_failed', account=ledger.account,
                                    error=str(err))
            await trio.sleep(period_secs)

    def known_accounts(self) -> list[str]:
        base = os.path.join(self._state_dir, 'accounting', self.broker)
        try:
            return sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
        except FileNotFoundError:
            return []

    def close(self) -> None:
        for ledger in self._ledgers.values():
            ledger.close()
        self._ledgers.clear()

    # -- quotes ----------------------------------------------------------------

    def _on_quotes(self, quotes: list[QuoteTick]) -> None:
        for q in quotes:
            for event in self.engine.on_quote(q.fqme, q.bid, q.ask, q.last, q.ts_ns):
                self.hub.emit(event)

    async def restore(self) -> None:
        """Re-subscribe to the markets of resting orders reloaded from disk."""
        for fqme in sorted({o.fqme for o in self.engine.open_orders()}):
            try:
                await self.feeds.ensure(fqme)
            except FeedError as err:
                log.error('paper.restore_feed_failed', fqme=fqme, error=str(err))

    # -- BrokerSession -----------------------------------------------------------

    async def snapshot(self, accounts: list[str]) -> Snapshot:
        names = sorted(set(accounts) | set(self.known_accounts()))
        positions = [p for account in names for p in self.engine.positions(account)]
        return Snapshot(accounts=names, positions=positions,
                        open_orders=self.engine.open_orders())

    async def submit(self, order: BrokerdOrder) -> None:
        if (reason := await self._market_problem(order.fqme)) is not None:
            self.hub.emit(BrokerdError(
                oid=order.oid, reqid=order.reqid, account=order.account,
                reason=reason, ts_ns=now_ns(),
            ))
            return
        if order.kind == 'market' and order.ts_ns:
            await self.feeds.catch_up(self.feeds.canonical(order.fqme), order.ts_ns)
        for event in self.engine.submit(order):
            self.hub.emit(event)

    async def cancel(self, msg: BrokerdCancel) -> None:
        for event in self.engine.cancel(msg):
            self.hub.emit(event)

    async def warm(self, fqmes: list[str]) -> tuple[list[str], dict[str, str]]:
        warmed: list[str] = []
        errors: dict[str, str] = {}
        for fqme in fqmes:
            if (reason := await self._market_problem(fqme)) is None:
                warmed.append(fqme)
            else:
                errors[fqme] = reason
        return warmed, errors

    async def resolve(self, oids: list[str]) -> Resolution:
        working, fills, unknown = self.engine.resolve(oids, self.known_accounts())
        return Resolution(working=working, fills=fills, unknown=unknown)

    async def _market_problem(self, fqme: str) -> str | None:
        """``None`` once ``fqme`` has a live quote here, else why not."""
        try:
            backend = Fqme.parse(fqme).backend
        except FqmeError as err:
            return str(err)
        if backend != self.broker:
            return (f'{fqme} belongs to backend {backend!r} but this is paperboi.{self.broker}; '
                    'emsd routes each order by its fqme backend')
        try:
            await self.feeds.ensure(fqme)
        except FeedError as err:
            return str(err)
        return None


@tractor.context
async def _setup_persistent_paperboi(
    ctx: tractor.Context,
    backend: str,
    paper_cfg: dict[str, Any] | None = None,
    backend_cfg: dict[str, Any] | None = None,
) -> None:
    """paperboi's lifetime: the engine and ledgers live as long as the actor;
    ledgers are snapshotted and released in ``finally``."""
    async with daemon_lifetime('paperboi') as nursery:
        cfg = msgspec.convert(paper_cfg or {}, PaperCfg)
        session = PaperSession(backend, cfg, state_dir(), nursery, backend_cfg or {})
        try:
            async with serve_broker_session(session):
                resting = len(session.engine.open_orders())
                if resting:
                    nursery.start_soon(session.restore)
                nursery.start_soon(session.sync_ledgers)
                log.info('paperboi.ready', broker=backend, resting=resting)
                await ctx.started({'pid': os.getpid(), 'broker': backend, 'resting': resting})
                await trio.sleep_forever()
        finally:
            session.close()


class PaperboiCfg(msgspec.Struct, frozen=True, kw_only=True):
    backend: str
    paper_cfg: PaperCfg
    # the backend's [brokers.<backend>] table, handed on to datad (which
    # validates it: clearing names no backend's config type)
    backend_cfg: dict[str, Any]


def paperboi_init(
    backend: str,
    paper_cfg: dict[str, Any] | None = None,
    backend_cfg: dict[str, Any] | None = None,
) -> DaemonSpec:
    try:
        paper = msgspec.convert(paper_cfg or {}, PaperCfg)
    except msgspec.ValidationError as err:
        raise ConfigError(f'bot.toml [paper]: {err}') from None
    return DaemonSpec(
        name=f'paperboi.{backend}', kind='paperboi',
        fixture='piker.clearing._paper:_setup_persistent_paperboi',
        # no feed or brokerd modules: quotes come from datad over IPC
        enable_modules=[__name__, DIALOG_MODULE],
        config=PaperboiCfg(backend=backend, paper_cfg=paper,
                           backend_cfg=dict(backend_cfg or {})),
        tier=TIER_BROKER,
    )


@asynccontextmanager
async def maybe_spawn_paperboi(**kwargs: Any) -> AsyncIterator[tractor.Portal]:
    async with maybe_spawn_daemon('piker.clearing._paper:paperboi_init', **kwargs) as portal:
        yield portal
