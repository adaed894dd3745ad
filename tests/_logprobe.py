"""Actor-side probes for tests/test_log.py, and the tree script they run.

Children import this module by name (``enable_modules``), so it must stay
importable without side effects. The tree runs as a subprocess so the test can
capture the whole tree's stdout/stderr::

    python -m tests._logprobe tree PORT [--quiet-aio]
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings

# piker.log first: importing it silences tractor's MultiError warnings
# isort: off
from piker.log import bound_contextvars, get_logger, quiet_asyncio_noise, setup_logging
import tractor
import trio
from tractor import to_asyncio
# isort: on

PROBE_EVENTS = (
    'probe.hello', 'probe.trio', 'probe.tractor', 'probe.ib_async', 'probe.failed',
)
SECRET = 'SECRET-API-KEY-123'
log = get_logger('piker.probe')


def _fail(api_key: str) -> None:
    token = api_key  # noqa: F841  (a local that must never reach the logs)
    raise ValueError('probe failure')


def emit_records() -> None:
    """One record per pipeline entry point, with bound context."""
    name = tractor.current_actor().name
    with bound_contextvars(strategy=f'strat-{name}', fqme='btcusd.sim'):
        log.info('probe.hello', oid=f'oid-{name}')
        logging.getLogger('trio.probe').warning('probe.trio')
        tractor.log.get_logger('tractor.probe').warning('probe.tractor')
        logging.getLogger('ib_async.probe').warning('probe.%s', 'ib_async')
        warnings.warn('probe.warning', UserWarning, stacklevel=1)
        try:
            _fail(SECRET)
        except ValueError:
            log.exception('probe.failed')


async def probe() -> int:
    """Child endpoint: set up logging as a daemon would, then emit."""
    setup_logging('info')
    emit_records()
    return os.getpid()


async def _aio_forever() -> None:
    await asyncio.sleep(3600)


async def aio_probe(quiet: bool) -> None:
    """Infected child: emit, then park in an asyncio task until cancelled
    (its teardown is what prints CancelledError noise)."""
    setup_logging('info')
    if quiet:
        quiet_asyncio_noise()
    emit_records()
    await to_asyncio.run_task(_aio_forever)


async def _tree(port: int, quiet_aio: bool) -> None:
    # run as ``-m`` this file is ``__main__``: address endpoints by the real name
    from tests import _logprobe as probes

    setup_logging('info')
    async with tractor.open_root_actor(
        name='root', arbiter_addr=('127.0.0.1', port), loglevel='error',
    ):
        async with tractor.open_nursery() as an:
            portals = [
                await an.start_actor(name, enable_modules=['tests._logprobe'])
                for name in ('child1', 'child2')
            ]
            aio = await an.start_actor(
                'aio', enable_modules=['tests._logprobe'], infect_asyncio=True,
            )
            for p in portals:
                await p.run(probes.probe)
            async with trio.open_nursery() as tn:
                tn.start_soon(lambda: aio.run(probes.aio_probe, quiet=quiet_aio))
                await trio.sleep(0.5)  # let it emit and park
                setup_logging('info')  # re-applying must not duplicate anything
                emit_records()
                await an.cancel()
                tn.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != 'tree':
        print('usage: python -m tests._logprobe tree PORT [--quiet-aio]', file=sys.stderr)
        return 2
    trio.run(_tree, int(argv[1]), '--quiet-aio' in argv)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
