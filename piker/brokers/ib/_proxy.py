"""A trio → asyncio method proxy for ``infect_asyncio`` actors.

ib_async lives on the asyncio loop; the actor's logic lives in trio. Rather
than crossing the loop boundary ad hoc for every call, each actor opens one
relay: trio tasks call ``await proxy.call('method', *args)`` and an asyncio
task runs ``target.method(*args)`` and ships the outcome back.

Why request ids: several trio tasks call concurrently and a caller may be
cancelled while its call is in flight. Every request carries a ``mid`` and
every reply is matched to its waiter by that ``mid``, so a late reply for an
abandoned call is dropped rather than handed to the next caller.

Why ship exceptions: the relay catches every non-cancel exception a method
raises and sends it back as the reply; the caller re-raises the very same
exception object. One bad request never kills the relay (or the dialog
behind it).

Unsolicited pushes from the asyncio side (fills, errors, ticks) travel over
the same reply channel as :class:`Push` and come out of ``proxy.events``.

Both directions use unbounded queues: tractor's ``open_channel_from`` buffers
(256 items) would silently drop events raised inside ib_async callbacks.
"""
from __future__ import annotations

import asyncio
import inspect
import itertools
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio
from tractor import to_asyncio

from ...log import get_logger
from ...types import Struct

log = get_logger(__name__)

# how long a closing proxy waits for the relay to finish on its own
CLOSE_GRACE_SECS = 1.0


class ProxyClosed(RuntimeError):
    """The relay is gone: no call can be answered any more."""


class Call(Struct, frozen=True):
    mid: int
    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}


class Abandon(Struct, frozen=True):
    """The caller of ``mid`` was cancelled: stop working on it."""
    mid: int


class Reply(Struct, frozen=True):
    mid: int
    value: Any = None
    error: Exception | None = None


class Push(Struct, frozen=True):
    """An event the asyncio side emits on its own."""
    event: Any


Emit = Callable[[Any], None]


# -- the asyncio side ------------------------------------------------------------

async def serve_call(target: Any, call: Call, replies: trio.MemorySendChannel[Any]) -> None:
    """Run one call on ``target`` and ship its outcome; cancellation ships nothing."""
    try:
        if call.method.startswith('_'):
            raise AttributeError(
                f'{type(target).__name__}.{call.method} is private; '
                'only public methods can be called through the proxy'
            )
        fn = getattr(target, call.method)
        result = fn(*call.args, **call.kwargs)
        if inspect.isawaitable(result):
            result = await result
    except asyncio.CancelledError:
        raise
    except Exception as err:
        _ship(replies, Reply(mid=call.mid, error=err))
        return
    _ship(replies, Reply(mid=call.mid, value=result))


def _forget(tasks: dict[int, Any], mid: int, _task: Any) -> None:
    tasks.pop(mid, None)


def _ship(replies: trio.MemorySendChannel[Any], msg: Any) -> None:
    try:
        replies.send_nowait(msg)
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass  # the trio side is gone; nobody waits for this


async def relay(
    to_trio: trio.MemorySendChannel[Any],
    make_target: Callable[[Emit], Any],
    requests: asyncio.Queue[Any],
    replies: trio.MemorySendChannel[Any],
) -> None:
    """The asyncio task behind a proxy: builds the target, then serves calls
    concurrently until it gets ``None`` (or is cancelled)."""
    target = make_target(lambda event: _ship(replies, Push(event=event)))
    to_trio.send_nowait(type(target).__name__)
    tasks: dict[int, asyncio.Task[None]] = {}
    try:
        while True:
            msg = await requests.get()
            match msg:
                case Call(mid=mid):
                    task = asyncio.create_task(serve_call(target, msg, replies))
                    tasks[mid] = task
                    task.add_done_callback(partial(_forget, tasks, mid))
                case Abandon(mid=mid):
                    abandoned = tasks.pop(mid, None)
                    if abandoned is not None:
                        abandoned.cancel()
                case None:
                    return
                case _:
                    log.error('proxy.bad_request', request=repr(msg))
    finally:
        for task in list(tasks.values()):
            task.cancel()
        close = getattr(target, 'close', None)
        if callable(close):
            try:
                close()
            except Exception:
                log.exception('proxy.target_close_failed', target=type(target).__name__)


# -- the trio side -----------------------------------------------------------------

class _Waiter:
    __slots__ = ('done', 'reply')

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Reply | None = None


class MethodProxy:
    """Calls methods of an object living on the asyncio loop (see module doc)."""

    def __init__(self, requests: asyncio.Queue[Any],
                 events: trio.MemoryReceiveChannel[Any]) -> None:
        self._requests = requests
        self._pending: dict[int, _Waiter] = {}
        self._mids = itertools.count(1)
        self._closed_reason: str | None = None
        self.events = events
        # replies that arrived for callers who had already given up
        self.dropped_replies = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """``await target.method(*args, **kwargs)`` on the asyncio side.

        Raises what the method raised, or :class:`ProxyClosed`.
        """
        if self._closed_reason is not None:
            raise ProxyClosed(f'cannot call {method!r}: {self._closed_reason}')
        mid = next(self._mids)
        waiter = _Waiter()
        self._pending[mid] = waiter
        self._requests.put_nowait(Call(mid=mid, method=method, args=args, kwargs=kwargs))
        try:
            await waiter.done.wait()
        except BaseException:
            if self._pending.pop(mid, None) is not None and self._closed_reason is None:
                self._requests.put_nowait(Abandon(mid=mid))
            raise
        reply = waiter.reply
        if reply is None:
            raise ProxyClosed(f'{method!r} got no answer: {self._closed_reason}')
        if reply.error is not None:
            raise reply.error
        return reply.value

    async def _dispatch(self, replies: trio.MemoryReceiveChannel[Any],
                        events: trio.MemorySendChannel[Any]) -> None:
        try:
            async for msg in replies:
                match msg:
                    case Reply(mid=mid):
                        waiter = self._pending.pop(mid, None)
                        if waiter is None:
                            self.dropped_replies += 1
                            log.debug('proxy.reply_dropped', mid=mid)
                            continue
                        waiter.reply = msg
                        waiter.done.set()
                    case Push(event=event):
                        try:
                            events.send_nowait(event)
                        except (trio.ClosedResourceError, trio.BrokenResourceError):
                            pass  # nobody reads events any more
        finally:
            self._close('the asyncio relay stopped')
            events.close()

    def _close(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        for waiter in self._pending.values():
            waiter.done.set()
        self._pending.clear()


@asynccontextmanager
async def open_method_proxy(make_target: Callable[[Emit], Any]) -> AsyncIterator[MethodProxy]:
    """Start a relay for ``make_target(emit)`` (built on the asyncio loop) and
    yield its :class:`MethodProxy`. Must run in an ``infect_asyncio`` actor."""
    requests: asyncio.Queue[Any] = asyncio.Queue()
    replies_tx, replies_rx = trio.open_memory_channel[Any](math.inf)
    events_tx, events_rx = trio.open_memory_channel[Any](math.inf)
    async with to_asyncio.open_channel_from(
        relay, make_target=make_target, requests=requests, replies=replies_tx,
    ) as (_name, chan):
        proxy = MethodProxy(requests, events_rx)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy._dispatch, replies_rx, events_tx)
            try:
                yield proxy
            finally:
                proxy._close('the proxy was closed')
                requests.put_nowait(None)
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE_SECS):
                    await chan.wait_asyncio_complete()
                replies_tx.close()
                nursery.cancel_scope.cancel()
