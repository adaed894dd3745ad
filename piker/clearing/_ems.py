"""emsd: the order-routing daemon (a singleton under pikerd).

The daemon-kind trio (``_setup_persistent_emsd``, ``emsd_init``,
``maybe_spawn_emsd``), the client endpoint :func:`ems_dialog` (one context
stream per client) and the operator RPCs (:func:`halt`, :func:`resume`,
:func:`status`, :func:`cancel_all`, :func:`flatten`). The routing itself is
:class:`~piker.clearing._router.Router`.
"""
from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import tractor
import trio

from ..config import BrokersCfg, ConfigError, PaperCfg, RiskCfg, state_dir
from ..log import get_logger
from ..service import DaemonSpec, daemon_lifetime, maybe_spawn_daemon
from ..service._spec import TIER_ORDERS
from ._dialog import STREAM_BUFFER
from ._messages import Status, now_ns
from ._router import ClientLink, Router
from ._router import _describe as describe_error

log = get_logger(__name__)

EMSD = 'emsd'
ROUTER_WAIT_SECS = 10.0

# this actor's router, while the lifetime fixture runs
_router: Router | None = None


def _convert(data: dict[str, Any] | None, kind: type, where: str) -> Any:
    try:
        return msgspec.convert(data or {}, kind)
    except msgspec.ValidationError as err:
        raise ConfigError(f'bot.toml [{where}]: {err}') from None


@tractor.context
async def _setup_persistent_emsd(
    ctx: tractor.Context,
    risk_cfg: dict[str, Any] | None = None,
    paper_cfg: dict[str, Any] | None = None,
    backend_cfgs: dict[str, Any] | None = None,
    mode: str = 'paper',
) -> None:
    global _router
    async with daemon_lifetime('emsd') as nursery:
        router = Router(
            mode=mode,
            risk_cfg=_convert(risk_cfg, RiskCfg, 'risk'),
            paper_cfg=_convert(paper_cfg, PaperCfg, 'paper'),
            backend_cfgs=backend_cfgs or {},
            state_dir=state_dir(),
            nursery=nursery,
        )
        _router = router
        try:
            log.info('emsd.ready', mode=mode, halted=router.gate.halted)
            await ctx.started({'pid': os.getpid(), 'mode': mode, 'halted': router.gate.halted})
            await trio.sleep_forever()
        finally:
            _router = None


class EmsdCfg(msgspec.Struct, frozen=True, kw_only=True):
    """emsd's config as pikerd keeps it (field names = the fixture's kwargs)."""
    risk_cfg: RiskCfg
    paper_cfg: PaperCfg
    backend_cfgs: BrokersCfg
    mode: str = 'paper'


def emsd_init(
    risk_cfg: dict[str, Any] | None = None,
    paper_cfg: dict[str, Any] | None = None,
    backend_cfgs: dict[str, Any] | None = None,
    mode: str = 'paper',
) -> DaemonSpec:
    """``*_cfg`` are the ``[risk]``, ``[paper]`` and ``[brokers]`` tables of
    bot.toml as builtins; validated here so a bad one fails the spawn request."""
    if mode not in ('paper', 'live'):
        raise ConfigError(f"bot.toml `mode`: expected 'paper' or 'live', found {mode!r}")
    return DaemonSpec(
        name=EMSD, kind='emsd',
        fixture='piker.clearing._ems:_setup_persistent_emsd',
        enable_modules=[__name__],
        config=EmsdCfg(
            risk_cfg=_convert(risk_cfg, RiskCfg, 'risk'),
            paper_cfg=_convert(paper_cfg, PaperCfg, 'paper'),
            backend_cfgs=_convert(backend_cfgs, BrokersCfg, 'brokers'), mode=mode,
        ),
        tier=TIER_ORDERS,
    )


@asynccontextmanager
async def maybe_spawn_emsd(**kwargs: Any) -> AsyncIterator[tractor.Portal]:
    async with maybe_spawn_daemon('piker.clearing._ems:emsd_init', **kwargs) as portal:
        yield portal


async def _require_router() -> Router:
    with trio.move_on_after(ROUTER_WAIT_SECS):
        while _router is None:
            await trio.sleep(0.05)
    if _router is None:
        raise RuntimeError('emsd is not running in this actor (its lifetime fixture is not up)')
    return _router


@tractor.context
async def ems_dialog(ctx: tractor.Context, source: str = 'cli',
                     backends: list[str] | None = None) -> None:
    """A client's dialog: ``started`` carries emsd's pid, positions, working
    orders and the halt flag (after opening the dialogs of ``backends``); then
    Order / Cancel / Warm / Resolve flow in and Status / BrokerdPosition /
    Warmed / Resolved flow out. The client owns its source's working orders
    (statuses of its earlier dialogs' orders reach it first-hand)."""
    router = await _require_router()
    link = router.attach_client(source)
    try:
        errors: dict[str, str] = {}
        for backend in backends or []:
            try:
                await router.dialog(backend)
            except trio.Cancelled:
                raise
            except Exception as err:
                # one line (a remote error's last traceback line), not a traceback
                errors[backend] = describe_error(err)
                log.error('ems.dialog_failed', backend=backend, error=errors[backend])
        router.claim_orders(link)
        start = router.client_start(list(backends or []))
        start['errors'] = errors
        # the client watches this pid: a SIGKILLed emsd never closes its streams
        start['pid'] = os.getpid()
        await ctx.started(start)
        async with ctx.open_stream(msg_buffer_size=STREAM_BUFFER) as stream:
            async with trio.open_nursery() as nursery:
                link.scope = nursery.cancel_scope
                nursery.start_soon(link.pump, stream)
                async for raw in stream:
                    for item in raw if isinstance(raw, list) else [raw]:
                        await _serve_client_msg(router, link, item)
                nursery.cancel_scope.cancel()
    finally:
        router.detach_client(link)


async def _serve_client_msg(router: Router, link: ClientLink, item: Any) -> None:
    """One client message; a failure is that message's error status, never
    the end of the client's dialog."""
    try:
        await router.on_client_msg(link, item)
    except Exception as err:
        oid = item.get('oid') if isinstance(item, dict) else None
        oid = oid if isinstance(oid, str) else ''
        log.exception('ems.client_msg_failed', client=link.source, oid=oid)
        link.push(Status(oid=oid, state='error', source=link.source, ts_ns=now_ns(),
                         reason=f'emsd failed this request: {type(err).__name__}: {err}'),
                  owned=True)


# -- operator RPCs (each is audited in <state_dir>/audit.jsonl) ------------------

async def halt(reason: str, by: str) -> dict[str, Any]:
    """Refuse new orders until :func:`resume`; persists across restarts."""
    return (await _require_router()).halt(reason, by)


async def resume(by: str) -> dict[str, Any]:
    return (await _require_router()).resume(by)


async def status() -> dict[str, Any]:
    """Positions, working orders, halt state, day P&L, risk counters."""
    return (await _require_router()).status()


@tractor.context
async def status_snapshot(ctx: tractor.Context) -> None:
    """:func:`status` for periodic callers (see ``service.call_ctx``)."""
    await ctx.started(await status())


async def cancel_all(account: str | None = None, by: str = 'operator') -> list[str]:
    return await (await _require_router()).cancel_all(account, by)


async def flatten(account: str | None = None, fqme: str | None = None,
                  by: str = 'operator') -> list[str]:
    return await (await _require_router()).flatten(account, fqme, by)
