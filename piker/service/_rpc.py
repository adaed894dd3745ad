"""pikerd's RPC surface (the only module pikerd enables)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import tractor
import trio

from ..config import StrategyCfg
from ..log import get_logger
from ._health import health_snapshot
from ._ipc import call_ctx
from ._runtime import get_services, get_strategy_code
from ._services import ConfigMismatch
from ._spec import BOT_INIT, DaemonSpec, SpecError, check_spawnable, resolve_spec, under_prefixes

log = get_logger(__name__)


def _services():
    services = get_services()
    if services is None:
        raise RuntimeError('this actor is not pikerd')
    return services


async def spawn_service(init: str, kwargs: dict[str, Any],
                        match_config: bool = False) -> dict[str, Any]:
    """Find-or-spawn a daemon for a client; the daemon outlives the client."""
    spec = resolve_client_spec(init, kwargs)
    info = await _services().ensure(spec, match_config=match_config)
    return msgspec.to_builtins(info)


def resolve_client_spec(init: str, kwargs: dict[str, Any]) -> DaemonSpec:
    """The spec of a daemon a client asked for, if it may have one: the init
    is on the allow-list, and a strategy's code is where pikerd's own config
    says (RPC has no authentication: no argument chooses code to run)."""
    check_spawnable(init)
    if init == BOT_INIT:
        _check_strategy_code(kwargs)
    return resolve_spec(init, kwargs)


def _check_strategy_code(kwargs: dict[str, Any]) -> None:
    sdir, raw = kwargs.get('strategies_dir'), kwargs.get('strategy_cfg')
    if not isinstance(sdir, str) or not isinstance(raw, dict):
        raise SpecError('a bot spec needs `strategies_dir` and `strategy_cfg`')
    try:
        scfg = msgspec.convert(raw, StrategyCfg)
    except msgspec.ValidationError as err:
        raise SpecError(f'bad strategy_cfg of a bot spec: {err}') from None
    own = get_strategy_code()
    if own is None or own.strategies_dir is None:
        raise SpecError('this pikerd has no strategies_dir of its own, so it starts no '
                        'strategy for a client (run `piker pikerd -c bot.toml`)')
    if Path(sdir).resolve() != Path(own.strategies_dir).resolve():
        raise ConfigMismatch(
            f'bot.{scfg.name}: strategies_dir {sdir} is not the tree\'s '
            f'{own.strategies_dir}: strategy code loads only from the strategies_dir of '
            "pikerd's own config (stop the running tree, or use the config it was started "
            'with)')
    module = scfg.strategy.partition(':')[0]
    if '.' in module and scfg.strategy not in own.modules and not under_prefixes(module):
        raise SpecError(
            f'bot.{scfg.name}: strategy {scfg.strategy!r} is neither in the running tree\'s '
            "config nor under piker's module prefixes; pikerd imports no module a client "
            'names (put it in pikerd\'s bot.toml)')


@tractor.context
async def spawn_service_ctx(ctx: tractor.Context, init: str, kwargs: dict[str, Any],
                            match_config: bool = False) -> None:
    """:func:`spawn_service` over a context (see ``_ipc.call_ctx``): every
    client's find-or-spawn comes through here."""
    await ctx.started(await spawn_service(init, kwargs, match_config))


async def stop_service(name: str) -> bool:
    with trio.CancelScope(shield=True):
        return await _services().stop(name)


async def service_table() -> dict[str, Any]:
    """Every registered actor joined with its service record and heartbeat."""
    services = _services()
    actor = tractor.current_actor()
    registry = await actor.get_registry()  # type: ignore[attr-defined]
    health: dict[str, dict[str, Any]] = {}
    info = services.get('healthd')
    if info is not None:
        from ._discovery import find_service
        with trio.move_on_after(2):
            async with find_service('healthd') as portal:
                if portal is not None:
                    rows = await call_ctx(portal, health_snapshot)
                    health = {r['name']: r for r in rows}
    known = {s.name: s for s in services.list()}
    records = services.records
    rows = []
    for key, addr in registry.items():
        name = key.rsplit('.', 1)[0] if '.' in key else key
        svc = known.get(name)
        beat = health.get(name, {})
        pid = svc.pid if svc else (os.getpid() if name == actor.name else beat.get('pid'))
        rows.append({
            'name': name,
            'kind': svc.kind if svc else ('pikerd' if name == actor.name else 'client'),
            'pid': pid,
            'addr': f'{addr[0]}:{addr[1]}',
            'heartbeat_age_secs': beat.get('age_secs'),
            'state': beat.get('state', 'n/a'),
            'restarts': records[name].restarts if name in records else 0,
            'last_exit': records[name].last_exit if name in records else None,
        })
    # daemons that died and are not back (yet): restarting, or given up on
    listed = {r['name'] for r in rows}
    for name, rec in records.items():
        if name not in listed and rec.state in ('restarting', 'failed'):
            rows.append({'name': name, 'kind': rec.kind, 'pid': None, 'addr': None,
                         'heartbeat_age_secs': None, 'state': rec.state,
                         'restarts': rec.restarts, 'last_exit': rec.last_exit})
    rows.sort(key=lambda r: (r['kind'] != 'pikerd', r['name']))
    return {'pikerd_pid': os.getpid(), 'actors': rows, 'deaths': list(services.deaths),
            'escalation': services.escalation}


@tractor.context
async def service_table_snapshot(ctx: tractor.Context) -> None:
    """:func:`service_table` over a context: monitoring scripts may run
    `piker services` every few seconds (see ``_ipc.call_ctx``)."""
    await ctx.started(await service_table())
