"""Finding daemons by name and find-or-spawn through pikerd."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import tractor
import trio

from ..log import get_logger
from ._ipc import call_ctx
from ._runtime import PIKERD, get_services
from ._services import (
    START_TIMEOUT_SECS,
    ConfigMismatch,
    ServiceInfo,
    SpawnError,
    remote_error_line,
)
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


async def request_spawn(init: str, kwargs: dict[str, Any], *,
                        match_config: bool = False) -> ServiceInfo:
    """Have pikerd find-or-spawn the daemon; returns once it serves requests.

    ``match_config``: a daemon already running with another config is a
    :class:`ConfigMismatch` naming the differing keys (``bot run`` attaching
    to a tree started from another bot.toml), not a silent attach.
    """
    services = get_services()
    if services is not None:
        try:
            return await services.ensure(resolve_spec(init, kwargs), match_config=match_config)
        except SpawnError as err:
            raise ServiceUnavailable(str(err)) from None
    from ._rpc import spawn_service_ctx
    async with find_service(PIKERD) as pikerd:
        if pikerd is None:
            raise ServiceUnavailable('no pikerd is running on this registry; start `piker pikerd`')
        with trio.fail_after(START_TIMEOUT_SECS + 5):
            try:
                raw = await call_ctx(pikerd, spawn_service_ctx, init=init, kwargs=kwargs,
                                     match_config=match_config)
            except tractor.RemoteActorError as err:
                line = remote_error_line(err)
                _, marker, text = line.partition('ConfigMismatch: ')
                if marker:
                    raise ConfigMismatch(text) from None
                raise ServiceUnavailable(line) from None
    return msgspec.convert(raw, ServiceInfo)


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
