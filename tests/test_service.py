"""pikerd: boot/attach, find-or-spawn, ordered teardown, death detection."""
from __future__ import annotations

import json
import os
import signal

import tractor
import trio

from piker.service import get_services, open_runtime, registry_answers
from tests._daemons import maybe_spawn_echod
from tests.conftest import descendants, pid_alive, run_piker, spawn_piker


async def wait_registry(addr: tuple[str, int], limit_secs: float = 20) -> None:
    with trio.fail_after(limit_secs):
        while not registry_answers(addr):
            await trio.sleep(0.1)


def services_json(addr: tuple[str, int]) -> dict:
    res = run_piker('services', '--json', '--registry', f'{addr[0]}:{addr[1]}', timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


async def test_runtime_becomes_pikerd_when_registry_is_free(reg_addr, state_dir):
    with trio.fail_after(30):
        async with open_runtime('tester', reg_addr) as rt:
            assert rt.is_pikerd
            assert rt.name == 'pikerd'
            services = get_services()
            assert services is not None
            assert [s.name for s in services.list()] == ['healthd']
            healthd_pid = services.get('healthd').pid
            assert pid_alive(healthd_pid)
        assert not pid_alive(healthd_pid)
        assert get_services() is None


async def test_attach_find_or_spawn_concurrent_callers_share_one_daemon(
    reg_addr, tmp_path, piker_procs,
):
    pikerd = spawn_piker(piker_procs, tmp_path, 'pikerd', '--registry',
                         f'{reg_addr[0]}:{reg_addr[1]}')
    await wait_registry(reg_addr)
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr) as rt:
            assert not rt.is_pikerd
            pids: list[int] = []

            async def caller() -> None:
                async with maybe_spawn_echod(tag='shared', slow_start_secs=0.5) as portal:
                    info = await portal.run_from_ns('tests._daemons', 'whoami')
                    pids.append(info['pid'])

            async with trio.open_nursery() as n:
                n.start_soon(caller)
                n.start_soon(caller)
            assert len(pids) == 2 and pids[0] == pids[1]
            echod_pid = pids[0]
            # the daemon belongs to pikerd: it outlives the callers' portals
            assert echod_pid in descendants(pikerd.pid)

        # ...and this client's whole runtime
        await trio.sleep(0.5)
        assert pid_alive(echod_pid)
        table = await trio.to_thread.run_sync(services_json, reg_addr)
        names = {row['name']: row for row in table['actors']}
        assert {'pikerd', 'healthd', 'echod.shared'} <= set(names)
        assert names['echod.shared']['pid'] == echod_pid
        assert names['pikerd']['pid'] == pikerd.pid
    assert pikerd.stop(signal.SIGTERM) == 0


async def test_sigterm_tears_down_tree_with_exit_zero(reg_addr, tmp_path, piker_procs):
    pikerd = spawn_piker(piker_procs, tmp_path, 'pikerd', '--registry',
                         f'{reg_addr[0]}:{reg_addr[1]}')
    await wait_registry(reg_addr)
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr):
            async with maybe_spawn_echod(tag='one') as p:
                await p.run_from_ns('tests._daemons', 'whoami')
            async with maybe_spawn_echod(tag='two') as p:
                await p.run_from_ns('tests._daemons', 'whoami')
        kids = descendants(pikerd.pid)
        assert len(kids) == 3, kids  # healthd + 2 echods
        rc = await trio.to_thread.run_sync(pikerd.stop, signal.SIGTERM)
    assert rc == 0, pikerd.stderr
    assert not [k for k in kids if pid_alive(k)]
    out = pikerd.stdout
    # children stopped before healthd (tiered shutdown), then pikerd
    assert out.index('"service":"echod.one"') < out.rindex('"event":"pikerd.stopped"')


async def test_sigint_tears_down_tree_too(reg_addr, tmp_path, piker_procs):
    pikerd = spawn_piker(piker_procs, tmp_path, 'pikerd', '--registry',
                         f'{reg_addr[0]}:{reg_addr[1]}')
    await wait_registry(reg_addr)
    with trio.fail_after(40):
        while len(descendants(pikerd.pid)) < 1:
            await trio.sleep(0.1)
        kids = descendants(pikerd.pid)
        rc = await trio.to_thread.run_sync(pikerd.stop, signal.SIGINT)
    assert rc == 0
    assert not [k for k in kids if pid_alive(k)]


async def test_sigkilled_daemon_is_restarted_by_pikerd_itself(reg_addr, state_dir):
    """Nobody asks again: pikerd starts the dead daemon from the spec it owns."""
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr) as rt:
            services = rt.services
            async with maybe_spawn_echod(tag='victim') as portal:
                info = await portal.run_from_ns('tests._daemons', 'whoami')
            victim = info['pid']
            os.kill(victim, signal.SIGKILL)
            while True:
                now = services.get('echod.victim')
                if now is not None and now.pid != victim:
                    break
                await trio.sleep(0.05)
            assert now.restarts == 1 and pid_alive(now.pid)
            record = services.records['echod.victim']
            assert record.state == 'running'
            assert record.last_exit == 'killed by SIGKILL'
            assert services.deaths == []
            # the registry points at the new incarnation, not the corpse
            async with maybe_spawn_echod(tag='victim') as portal:
                info = await portal.run_from_ns('tests._daemons', 'whoami')
            assert info['pid'] == now.pid
            # healthd still answers
            async with tractor.find_actor('healthd') as hp:
                rows = await hp.run_from_ns('piker.service._health', 'health_report')
            assert any(r['name'] == 'pikerd' for r in rows)


async def test_heartbeats_reach_healthd_and_go_stale_when_actor_hangs(reg_addr, state_dir):
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr, heartbeat_secs=0.2,
                                stale_after_secs=1.0):
            async with maybe_spawn_echod(tag='hb') as portal:
                pid = (await portal.run_from_ns('tests._daemons', 'whoami'))['pid']
                async with tractor.find_actor('healthd') as hp:
                    await trio.sleep(0.6)
                    rows = {r['name']: r for r in await hp.run_from_ns(
                        'piker.service._health', 'health_report')}
                    assert rows['echod.hb']['state'] == 'ok'
                    assert rows['echod.hb']['pid'] == pid
                    # freeze the daemon: its loop cannot beat any more
                    os.kill(pid, signal.SIGSTOP)
                    try:
                        await trio.sleep(1.5)
                        rows = {r['name']: r for r in await hp.run_from_ns(
                            'piker.service._health', 'health_report')}
                        assert rows['echod.hb']['state'] == 'stale'
                        assert rows['echod.hb']['age_secs'] > 1.0
                    finally:
                        os.kill(pid, signal.SIGCONT)


def test_services_without_pikerd_says_so(reg_addr):
    res = run_piker('services', '--registry', f'{reg_addr[0]}:{reg_addr[1]}')
    assert res.returncode == 1
    assert 'no pikerd is running on' in res.stderr
    assert 'Traceback' not in res.stderr


async def test_second_pikerd_on_same_registry_is_refused(reg_addr, tmp_path, piker_procs):
    spawn_piker(piker_procs, tmp_path, 'pikerd', '--registry', f'{reg_addr[0]}:{reg_addr[1]}')
    await wait_registry(reg_addr)
    res = await trio.to_thread.run_sync(
        lambda: run_piker('pikerd', '--registry', f'{reg_addr[0]}:{reg_addr[1]}'))
    assert res.returncode == 2
    assert 'already answers' in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


async def test_daemon_failing_at_startup_is_reported_and_ended(reg_addr, state_dir):
    from piker.service import ServiceUnavailable, maybe_spawn_daemon
    with trio.fail_after(40):
        async with open_runtime('tester', reg_addr) as rt:
            before = set(descendants(os.getpid()))
            try:
                async with maybe_spawn_daemon('tests._daemons:broken_init'):
                    raise AssertionError('should not start')
            except ServiceUnavailable as err:
                assert 'broken failed to start' in str(err)
                assert 'ValueError: no such widget' in str(err)
            else:
                raise AssertionError('no error')
            assert rt.services.get('broken') is None
            # the failed actor's process is gone
            while set(descendants(os.getpid())) - before:
                await trio.sleep(0.1)


async def test_registry_port_held_by_a_foreign_program_is_a_clear_error(reg_addr):
    import socket as _socket

    from piker.service import RuntimeStartupError
    squatter = _socket.socket()
    squatter.bind(reg_addr)
    squatter.listen()
    try:
        with trio.fail_after(20):
            try:
                async with open_runtime('tester', reg_addr):
                    raise AssertionError('should not start')
            except RuntimeStartupError as err:
                assert 'not a piker tree' in str(err)
                assert '--registry' in str(err)
    finally:
        squatter.close()


async def test_registry_probe_recognises_a_running_tree(reg_addr, state_dir):
    from piker.service._runtime import registry_is_tractor
    with trio.fail_after(30):
        async with open_runtime('tester', reg_addr):
            assert await trio.to_thread.run_sync(registry_is_tractor, reg_addr)


async def test_periodic_context_calls_leave_no_runtime_state_behind(reg_addr, state_dir):
    """`call_ctx` is what periodic pollers (watchdog, STATUS) use: unlike
    tractor 0.1.0a5's Portal.run, it leaves nothing in either actor."""
    from piker.service import call_ctx
    from tests._daemons import snapshot
    with trio.fail_after(60):
        async with open_runtime('tester', reg_addr):
            async with maybe_spawn_echod(tag='poll') as portal:
                me = tractor.current_actor()
                callee_before = await portal.run_from_ns('tests._daemons', 'tracked_contexts')
                caller_before = len(me._contexts)
                for _ in range(200):
                    assert (await call_ctx(portal, snapshot))['pid'] > 0
                callee_after = await portal.run_from_ns('tests._daemons', 'tracked_contexts')
                # only the two counting calls themselves (Portal.run) are left over
                assert callee_after - callee_before <= 2
                assert len(me._contexts) - caller_before <= 2
