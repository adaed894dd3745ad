"""pikerd's RPC surface is locked down: tractor has no authentication, so
whatever reaches pikerd's port may only ask for piker's own daemon kinds, and
strategy code comes only from where pikerd's own config says.

Over real IPC: pikerd runs in its own process, this test process is the
(any) local client calling ``spawn_service``.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import tomli_w
import tractor
import trio

from piker.bot._run import BOT_INIT
from piker.service import PIKERD, call_ctx, find_service, open_runtime, registry_answers
from piker.service._rpc import spawn_service_ctx
from piker.service._services import remote_error_line
from tests.conftest import REPO, spawn_piker

RPC = 'piker.service._rpc'


def marker_file(path: Path, marker: Path) -> None:
    """A Python file that, if anything ever imports it, leaves ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(f'''
        from pathlib import Path
        Path({str(marker)!r}).write_text('pikerd ran a file a client chose')
        from piker.bot import Strategy, StrategyParams

        class Evil(Strategy):
            class Params(StrategyParams):
                pass
    '''))


def bot_kwargs(strategy: str, strategies_dir: Path) -> dict[str, Any]:
    scfg = {'name': 'evil', 'strategy': strategy, 'markets': ['btcusd.sim']}
    return {'strategy_cfg': scfg, 'bot_cfg': {'name': 'evil', 'strategies': [scfg]},
            'strategies_dir': str(strategies_dir), 'index': 0, 'clock': 'wall'}


async def refused(portal: tractor.Portal, init: str, kwargs: dict[str, Any]) -> str:
    """The one-line error pikerd answers a spawn request with (it must refuse)."""
    try:
        info = await call_ctx(portal, spawn_service_ctx, init=init, kwargs=kwargs)
    except tractor.RemoteActorError as err:
        return remote_error_line(err)
    raise AssertionError(f'pikerd spawned {init} for a client: {info}')


async def test_spawn_service_refuses_what_pikerd_config_did_not_choose(
    reg_addr, tmp_path, piker_procs,
):
    own_dir = REPO / 'strategies'
    cfg = tmp_path / 'bot.toml'
    cfg.write_text(tomli_w.dumps({
        'name': 'rpc', 'strategies_dir': str(own_dir),
        'registry': {'host': reg_addr[0], 'port': reg_addr[1]},
        'strategies': [{'name': 'sma', 'strategy': 'sma_cross', 'markets': ['btcusd.sim']}],
    }))
    evil_dir, evil_path = tmp_path / 'evil_strategies', tmp_path / 'evil_path'
    markers = {k: tmp_path / f'marker-{k}' for k in ('dir', 'dotted', 'init', 'post')}
    marker_file(evil_dir / 'evil.py', markers['dir'])
    marker_file(evil_path / 'evilpkg' / 'evil.py', markers['dotted'])
    (evil_path / 'evilpkg' / '__init__.py').write_text('')
    # pikerd (and the actors it spawns) could import `evilpkg` if asked to
    pikerd = spawn_piker(piker_procs, tmp_path, 'pikerd', '-c', str(cfg),
                         '--state-dir', str(tmp_path / 'state'),
                         env={'PYTHONPATH': str(evil_path)})
    with trio.fail_after(60):
        while not registry_answers(reg_addr):
            assert pikerd.proc.poll() is None, pikerd.stderr[-3000:]
            await trio.sleep(0.1)
        async with open_runtime('intruder', reg_addr, loglevel='warning'):
            async with find_service(PIKERD) as portal:
                assert portal is not None

                # a strategies_dir of the caller's choosing: refused, nothing ran
                line = await refused(portal, BOT_INIT, bot_kwargs('evil', evil_dir))
                assert 'ConfigMismatch' in line and str(evil_dir) in line, line
                assert str(own_dir) in line and "pikerd's own config" in line

                # a dotted module pikerd's config never named: refused
                line = await refused(portal, BOT_INIT, bot_kwargs('evilpkg.evil', own_dir))
                assert "strategy 'evilpkg.evil'" in line and 'pikerd imports no module' in line

                # a path as the strategy name: refused by the schema itself
                line = await refused(portal, BOT_INIT, bot_kwargs(str(evil_dir / 'evil'), own_dir))
                assert 'bad strategy_cfg' in line and '$.strategy' in line, line

                # a piker function that is no daemon kind: never called
                line = await refused(portal, 'piker.config:write_toml_atomic',
                                     {'path': str(markers['init']), 'data': {'x': 1}})
                assert 'is not a daemon kind pikerd spawns' in line, line
                # ...through the plain function too
                try:
                    await portal.run_from_ns(RPC, 'spawn_service',
                                             init='piker.config:write_toml_atomic',
                                             kwargs={'path': str(markers['post']),
                                                     'data': {'x': 1}})
                except tractor.RemoteActorError as err:
                    assert 'SpecError' in remote_error_line(err)
                else:
                    raise AssertionError('spawn_service called write_toml_atomic')

                # the allow-list still lets the daemon kinds through (tests' echod)
                info = await call_ctx(portal, spawn_service_ctx, init='tests._daemons:echod_init',
                                      kwargs={'tag': 'allowed'})
                assert info['name'] == 'echod.allowed'
    assert not [m.name for m in markers.values() if m.exists()]
    assert pikerd.stop() == 0, pikerd.stderr[-3000:]
