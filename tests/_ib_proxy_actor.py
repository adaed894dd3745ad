"""Endpoints for tests/test_ib_proxy.py, run inside an ``infect_asyncio`` actor.

Each scenario opens a real :func:`open_method_proxy` over :class:`Target`
(plain asyncio code) and reports what the trio callers observed.
"""
from __future__ import annotations

import asyncio
from typing import Any

import trio

from piker.brokers.ib._proxy import Emit, ProxyClosed, open_method_proxy


class Target:
    """Stands where ib_async's client sits: asyncio methods, some misbehaving."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit

    async def echo(self, value: Any, delay_secs: float = 0.0) -> Any:
        await asyncio.sleep(delay_secs)
        return value

    async def stubborn(self, value: Any, delay_secs: float) -> Any:
        """Answers even after its caller gave up (a late reply)."""
        try:
            await asyncio.sleep(delay_secs)
        except asyncio.CancelledError:
            await asyncio.sleep(delay_secs)
        return value

    async def boom(self, text: str) -> None:
        await asyncio.sleep(0)
        raise ValueError(text)

    def sync_boom(self) -> None:
        raise KeyError('sync-side failure')

    def add(self, x: int, y: int) -> int:
        return x + y

    def emit_events(self, n: int) -> int:
        for i in range(n):
            self._emit({'seq': i})
        return n

    def _private(self) -> None:
        raise AssertionError('must never run')


async def cancelled_caller_then_next_call() -> dict[str, Any]:
    """A caller is cancelled mid-call; its late reply must not reach the next caller."""
    async with open_method_proxy(Target) as proxy:
        with trio.move_on_after(0.1) as scope:
            await proxy.call('stubborn', 'A', delay_secs=0.2)
        first_cancelled = scope.cancelled_caught
        # in flight while A's late reply (t ~ 0.3 s) arrives
        second = await proxy.call('echo', 'B', delay_secs=0.4)
        third = await proxy.call('echo', 'C')
        return {
            'first_cancelled': first_cancelled, 'second': second, 'third': third,
            'dropped': proxy.dropped_replies, 'pending': proxy.pending,
        }


async def concurrent_callers() -> list[tuple[int, Any]]:
    """Many overlapping calls finishing out of order each get their own result."""
    results: list[tuple[int, Any]] = []
    async with open_method_proxy(Target) as proxy:

        async def one(i: int) -> None:
            delay = ((i * 7) % 10) / 100
            results.append((i, await proxy.call('echo', i, delay_secs=delay)))

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(one, i)
    return results


async def failures_do_not_kill_relay() -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with open_method_proxy(Target) as proxy:
        for name, call in (
            ('boom', ('boom', 'bad input 42')),
            ('sync_boom', ('sync_boom',)),
            ('missing', ('no_such_method',)),
            ('private', ('_private',)),
        ):
            try:
                await proxy.call(*call)
            except Exception as err:
                out[name] = [type(err).__name__, str(err)]
            out[f'after_{name}'] = await proxy.call('add', 2, 3)
        try:
            await proxy.call('add', 1)  # wrong arity
        except TypeError as err:
            out['arity'] = str(err)
        out['after_arity'] = await proxy.call('echo', 'still alive')
    try:
        await proxy.call('echo', 'too late')
    except ProxyClosed as err:
        out['closed'] = str(err)
    return out


async def pushed_events_in_order() -> list[Any]:
    async with open_method_proxy(Target) as proxy:
        n = await proxy.call('emit_events', 1000)
        return [await proxy.events.receive() for _ in range(n)]
