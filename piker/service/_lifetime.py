"""The shared body of every daemon's ``_setup_persistent_<kind>`` fixture."""
from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import tractor
import trio

from ..log import setup_logging
from ._orphan import exit_with_parent


def heartbeat_period_secs() -> float:
    return float(os.environ.get('PIKER_HEARTBEAT_SECS', '1.0'))


@asynccontextmanager
async def daemon_lifetime(kind: str, *, heartbeat: bool = True) -> AsyncIterator[trio.Nursery]:
    """Guard against outliving the parent, set up logging once for this actor
    and start its heartbeat; yields a nursery for the daemon's own long-lived
    tasks.

    Every daemon kind's fixture enters this first thing (infect_asyncio ones
    included), so it is where a child actor starts exiting with its parent
    (:mod:`._orphan`; a no-op in a root)."""
    parent_pid = os.getppid()  # before anything else: the orphan guard checks against it
    actor = tractor.current_actor()
    setup_logging(actor=actor.name)
    async with trio.open_nursery() as nursery:
        await nursery.start(exit_with_parent, parent_pid)
        if heartbeat:
            from ._health import run_heartbeat
            await nursery.start(run_heartbeat, actor.name, kind, heartbeat_period_secs())
        yield nursery
        nursery.cancel_scope.cancel()
