"""Finding daemons by name and find-or-spawn through pikerd."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import tractor
import trio

from ..log import get_logger
from ._runtime import PIKERD, get_services
from ._services import START_TIMEOUT_SECS, ServiceInfo, SpawnError, remote_error_line
from ._spec import resolve_spec

log = get_logger(__name__)


class ServiceUnavailable(RuntimeError):
    """No pikerd to ask, or the daemon could not be started."""


@asynccontextmanager
async def find_service(name: str) -> AsyncIterator[tractor.Portal | None]:
    """A portal to the running actor ``name``, or ``None``.

    A registry entry left by a SIGKILLed actor (tractor keeps it) reads as
    ``None``, not as a hang or an OSError.
    """
    try:
        cm = tractor.find_actor(name)
        portal = await cm.__aenter__()
    except OSError:
        yield None
        return
    try:
        yield portal
    except BaseException as err:
        await cm.__aexit__(type(err), err, err.__traceback__)
        raise
    else:
        await cm.__aexit__(None, None, None)


async def request_spawn(init: str, kwargs: dict[str, Any]) -> ServiceInfo:
    """Have pikerd find-or-spawn the daemon; returns once it serves requests."""
    services = get_services()
    if services is not None:
        try:
            return await services.ensure(resolve_spec(init, kwargs))
        except SpawnError as err:
            raise ServiceUnavailable(str(err)) from None
    async with find_service(PIKERD) as pikerd:
        if pikerd is None:
            raise ServiceUnavailable('no pikerd is running on this registry; start `piker pikerd`')
        with trio.fail_after(START_TIMEOUT_SECS + 5):
            try:
                raw = await pikerd.run_from_ns(
                    'piker.service._rpc', 'spawn_service', init=init, kwargs=kwargs)
            except tractor.RemoteActorError as err:
                raise ServiceUnavailable(remote_error_line(err)) from None
    return ServiceInfo(name=raw['name'], kind=raw['kind'], pid=raw['pid'],
                       addr=tuple(raw['addr']), tier=raw['tier'], critical=raw['critical'],
                       started=raw.get('started'))


@asynccontextmanager
async def maybe_spawn_daemon(init: str, **kwargs: Any) -> AsyncIterator[tractor.Portal]:
    """Find-or-spawn the daemon that ``init(**kwargs)`` describes; yield a portal.

    The daemon's life belongs to pikerd: leaving this block only closes the
    caller's connection.
    """
    spec = resolve_spec(init, kwargs)
    async with find_service(spec.name) as portal:
        if portal is not None:
            yield portal
            return
    await request_spawn(init, kwargs)
    async with find_service(spec.name) as portal:
        if portal is None:
            raise ServiceUnavailable(f'{spec.name} was started but is not registered')
        yield portal
