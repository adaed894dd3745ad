"""``piker quote`` / ``piker history`` as a user runs them (subprocesses)."""
from __future__ import annotations

import json
import signal

import trio

from tests.conftest import run_piker, spawn_piker
from tests.test_service import services_json, wait_registry


def reg_arg(addr: tuple[str, int]) -> list[str]:
    return ['--registry', f'{addr[0]}:{addr[1]}']


async def test_quote_and_history_become_pikerd_and_print_json_lines(state_dir):
    from tests.conftest import free_port
    quote_reg, hist_reg = ('127.0.0.1', free_port()), ('127.0.0.1', free_port())

    async def run(*args: str):
        return await trio.to_thread.run_sync(lambda: run_piker(*args, timeout=60))

    with trio.fail_after(90):
        async with trio.open_nursery() as n:
            results = {}

            async def one(key, *args):
                results[key] = await run(*args)

            n.start_soon(one, 'quote', 'quote', 'btcusd.sim', 'gld.arca.sim', '--count', '3',
                         *reg_arg(quote_reg))
            n.start_soon(one, 'history', 'history', 'spy.sim', '--timeframe', '1m',
                         '--count', '5', '--json', *reg_arg(hist_reg))
    quote = results['quote']
    assert quote.returncode == 0, quote.stderr[-2000:]
    records = [json.loads(line) for line in quote.stdout.splitlines()]
    # stdout carries the log pipeline's JSON records too (DESIGN §7): set them apart
    lines = [r for r in records if 'event' not in r]
    assert not [r for r in records if r.get('level') in ('error', 'critical')], quote.stdout
    # stdout is not a TTY: JSON lines, one per quote; the first quotes, then 2 batches
    assert {q['fqme'] for q in lines} == {'btcusd.sim', 'gld.arca.sim'}
    assert len(lines) >= 4
    assert all(q['bid'] < q['ask'] for q in lines)

    hist = results['history']
    assert hist.returncode == 0, hist.stderr[-2000:]
    bars = [r for r in map(json.loads, hist.stdout.splitlines()) if 'event' not in r]
    assert len(bars) == 5
    times = [b['time'] for b in bars]
    assert all(t % 60 == 0 for t in times) and times == sorted(times)
    assert all(b['low'] <= min(b['open'], b['close']) <= b['high'] for b in bars)


async def test_bad_fqmes_are_one_line_with_exit_2(reg_addr, state_dir):
    with trio.fail_after(90):
        ambiguous = await trio.to_thread.run_sync(
            lambda: run_piker('quote', 'gld.sim', '--count', '1', *reg_arg(reg_addr)))
        backend = await trio.to_thread.run_sync(
            lambda: run_piker('quote', 'x.nope', *reg_arg(reg_addr)))
        timeframe = await trio.to_thread.run_sync(
            lambda: run_piker('history', 'spy.sim', '--timeframe', '1w', *reg_arg(reg_addr)))
    assert ambiguous.returncode == 2
    assert ambiguous.stderr.strip() == (
        "piker: error: ambiguous fqme 'gld.sim': use 'gld.arca.sim' or 'gld.venture.sim'")
    assert backend.returncode == 2
    assert backend.stderr.strip().startswith("piker: error: unknown backend 'nope': choose one of")
    assert timeframe.returncode == 2 and 'bad timeframe' in timeframe.stderr
    for res in (ambiguous, backend, timeframe):
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


async def test_quote_attaches_to_a_running_pikerd_whose_datad_outlives_it(
    reg_addr, tmp_path, piker_procs,
):
    pikerd = spawn_piker(piker_procs, tmp_path, 'pikerd', *reg_arg(reg_addr))
    await wait_registry(reg_addr)
    with trio.fail_after(90):
        res = await trio.to_thread.run_sync(
            lambda: run_piker('quote', 'ethusd.sim', '--count', '2', *reg_arg(reg_addr)))
        assert res.returncode == 0, res.stderr[-2000:]
        assert len(res.stdout.splitlines()) == 2
        table = await trio.to_thread.run_sync(services_json, reg_addr)
        names = {row['name'] for row in table['actors']}
        assert {'datad.sim', 'samplerd'} <= names
        assert 'piker-quote' not in names
    assert await trio.to_thread.run_sync(pikerd.stop, signal.SIGTERM) == 0
