"""A minimal daemon kind for service-manager tests: ``echod.<tag>``.

It follows the same per-kind convention as the real daemons (lifetime
fixture, ``*_init``, ``maybe_spawn_*``).
"""
from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import tractor
import trio

from piker.service import DaemonSpec, daemon_lifetime, maybe_spawn_daemon

_spawn_count = 0


@tractor.context
async def _setup_persistent_echod(ctx: tractor.Context, slow_start_secs: float = 0.0) -> None:
    async with daemon_lifetime('echod'):
        # widen the window in which a second caller could race the first
        await trio.sleep(slow_start_secs)
        await ctx.started({'pid': os.getpid()})
        await trio.sleep_forever()


class EchodCfg(msgspec.Struct, frozen=True, kw_only=True):
    slow_start_secs: float = 0.0


def echod_init(tag: str = 'a', slow_start_secs: float = 0.0) -> DaemonSpec:
    return DaemonSpec(
        name=f'echod.{tag}', kind='echod',
        fixture='tests._daemons:_setup_persistent_echod',
        enable_modules=['tests._daemons'],
        config=EchodCfg(slow_start_secs=slow_start_secs),
    )


@asynccontextmanager
async def maybe_spawn_echod(**kwargs: Any) -> AsyncIterator[tractor.Portal]:
    async with maybe_spawn_daemon('tests._daemons:echod_init', **kwargs) as portal:
        yield portal


async def whoami() -> dict[str, Any]:
    return {'pid': os.getpid(), 'name': tractor.current_actor().name}


@tractor.context
async def _setup_persistent_broken(ctx: tractor.Context) -> None:
    async with daemon_lifetime('broken'):
        raise ValueError('no such widget: set `widget` in bot.toml')


def broken_init() -> DaemonSpec:
    return DaemonSpec(
        name='broken', kind='broken',
        fixture='tests._daemons:_setup_persistent_broken',
        enable_modules=['tests._daemons'],
    )


@tractor.context
async def snapshot(ctx: tractor.Context) -> None:
    await ctx.started({'pid': os.getpid()})


async def tracked_contexts() -> int:
    # tractor-private, read only to prove that periodic calls don't accumulate
    return len(tractor.current_actor()._contexts)


@tractor.context
async def _setup_persistent_crashy(ctx: tractor.Context, live_secs: float = 0.3) -> None:
    """Comes up, then dies like a segfault would: every incarnation."""
    async with daemon_lifetime('crashy'):
        await ctx.started({'pid': os.getpid()})
        await trio.sleep(live_secs)
        os._exit(1)


class CrashyCfg(msgspec.Struct, frozen=True, kw_only=True):
    live_secs: float = 0.3


def crashy_init(live_secs: float = 0.3) -> DaemonSpec:
    return DaemonSpec(
        name='crashy', kind='crashy',
        fixture='tests._daemons:_setup_persistent_crashy',
        enable_modules=['tests._daemons'],
        config=CrashyCfg(live_secs=live_secs),
    )
