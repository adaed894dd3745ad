"""IPC helpers every daemon needs."""
from __future__ import annotations

from typing import Any

import trio


async def send_whole(stream: Any, msg: Any, timeout_secs: float) -> None:
    """Send ``msg`` on a tractor stream without ever cutting it in half.

    A cancelled ``send_all`` leaves a partial frame on the socket and every
    later message on that channel (all contexts with that actor) misframed:
    so outside cancellation waits for the message to go out, and only the
    deadline (a peer that stopped reading) interrupts it, raising
    ``trio.TooSlowError`` - the caller then drops that peer.
    """
    with trio.CancelScope(shield=True), trio.fail_after(timeout_secs):
        await stream.send(msg)


async def call_ctx(portal: Any, endpoint: Any, **kwargs: Any) -> Any:
    """A one-shot request over a ``@tractor.context`` endpoint that answers
    with ``ctx.started(value)`` and returns.

    Why not ``Portal.run``: tractor 0.1.0a5 never forgets a ``Portal.run``
    call; each leaves an entry in ``Actor._contexts`` on the caller and on the
    callee (about 7 KB together, verified with 5000 calls), which a service
    polling every few seconds for weeks turns into a steady leak. Context
    calls are removed on both sides when they end. Use this for anything
    called periodically.
    """
    async with portal.open_context(endpoint, **kwargs) as (_ctx, first):
        return first
