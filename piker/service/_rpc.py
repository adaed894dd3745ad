"""pikerd's RPC surface (the only module pikerd enables)."""
from __future__ import annotations

import os
from typing import Any

import msgspec
import tractor
import trio

from ..log import get_logger
from ._health import health_snapshot
from ._ipc import call_ctx
from ._runtime import get_services
from ._spec import resolve_spec

log = get_logger(__name__)


def _services():
    services = get_services()
    if services is None:
        raise RuntimeError('this actor is not pikerd')
    return services


async def spawn_service(init: str, kwargs: dict[str, Any],
                        match_config: bool = False) -> dict[str, Any]:
    """Find-or-spawn a daemon for a client; the daemon outlives the client."""
    info = await _services().ensure(resolve_spec(init, kwargs), match_config=match_config)
    return msgspec.to_builtins(info)


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
