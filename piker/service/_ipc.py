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
