"""The journal of a real tree (``python -m piker bot run``): one JSON object per
line whatever crashes, a flood of identical warnings summarised, CLI probes
leaving nothing.

One tree serves the module (its stdout is "the journal": ``JOURNAL_STREAM``
names that file, so every line carries the ``<N>`` priority prefix); the
last test stops it and checks every line it ever printed.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests import _crashers
from tests.conftest import REPO, descendants, free_port, run_piker
from tests.test_ops import SD_VARS, service_pids, write_bot_toml

WINDOW_SECS = 3
FLOOD = 10_000
PRIORITY = {'debug': 7, 'info': 6, 'warning': 4, 'error': 3, 'critical': 2}
_PREFIX = re.compile(rb'^<([0-7])>')

# trades nothing; prints once (a strategy's print() must not reach the journal raw)
IDLE_SOURCE = '''
import sys
from piker.bot import Strategy


class Idle(Strategy):
    printed = False

    def on_bar(self, ctx, fqme, bars):
        if not self.printed:
            self.printed = True
            print('idle.print: to stdout')
            print('idle.print: to stderr', file=sys.stderr)
'''
IDLE = {'name': 'idle', 'strategy': 'idle', 'markets': ['btcusd.sim'], 'timeframe_secs': 1}


def parse_line(raw: bytes) -> dict[str, Any]:
    """One journal line: optional ``<N>`` then exactly one JSON object."""
    m = _PREFIX.match(raw)
    body = raw[m.end():] if m else raw
    rec = json.loads(body)
    assert isinstance(rec, dict), raw[:200]
    if m:
        assert int(m.group(1)) == PRIORITY[rec['level']], raw[:200]
    return rec


class Tree:
    """``piker bot run`` with stdout as the journal (a file ``JOURNAL_STREAM`` names)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.reg = ('127.0.0.1', free_port())
        sdir = tmp / 'strategies'
        sdir.mkdir()
        (sdir / 'idle.py').write_text(IDLE_SOURCE)
        self.cfg = write_bot_toml(tmp, [IDLE], sdir, risk={'max_order_size': 5})
        self.out_path, self.err_path = tmp / 'journal.out', tmp / 'journal.err'
        out, err = open(self.out_path, 'wb'), open(self.err_path, 'wb')
        st = os.fstat(out.fileno())
        env = {k: v for k, v in os.environ.items() if k not in SD_VARS}
        env.update(JOURNAL_STREAM=f'{st.st_dev}:{st.st_ino}', PYTHONFAULTHANDLER='1',
                   PIKER_LOG_WINDOW_SECS=str(WINDOW_SECS))
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'piker', 'bot', 'run', '-c', str(self.cfg),
             '--registry', self.registry, '--state-dir', str(tmp / 'state')],
            cwd=REPO, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        out.close()
        err.close()

    @property
    def registry(self) -> str:
        return f'{self.reg[0]}:{self.reg[1]}'

    def records(self, since: int = 0) -> list[dict[str, Any]]:
        """Whole records from byte offset ``since`` (a torn last line skipped)."""
        raw = self.out_path.read_bytes()[since:]
        out = []
        for line in raw.split(b'\n')[:-1]:
            try:
                out.append(parse_line(line))
            except (ValueError, AssertionError):
                continue
        return out

    def size(self) -> int:
        return self.out_path.stat().st_size

    def events(self, name: str, since: int = 0) -> list[dict[str, Any]]:
        return [r for r in self.records(since) if r.get('event') == name]

    def wait(self, check: Any, secs: float, what: str) -> Any:
        deadline = time.monotonic() + secs
        while True:
            got = check()
            if got:
                return got
            if self.proc.poll() is not None:
                raise AssertionError(f'bot exited ({self.proc.returncode}) waiting for {what}:\n'
                                     f'{self.err_path.read_text(errors="replace")[-3000:]}')
            if time.monotonic() > deadline:
                raise AssertionError(f'timed out after {secs}s waiting for {what}')
            time.sleep(0.1)

    def reap(self) -> None:
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(5)


@pytest.fixture(scope='module')
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    t = Tree(tmp_path_factory.mktemp('journal'))
    try:
        t.wait(lambda: t.events('bot.ready'), 60, 'bot.ready')
        yield t
    finally:
        t.reap()


def warnings_or_worse(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in recs if PRIORITY.get(r.get('level', ''), 0) in (2, 3, 4)]


def test_cli_probes_leave_no_warning_in_the_tree_log(tree: Tree) -> None:
    time.sleep(1.0)  # let startup chatter settle
    mark = tree.size()
    for args in (['services'], ['bot', 'status'], ['positions'], ['services', '--json']):
        res = run_piker(*args, '-c', str(tree.cfg), '--registry', tree.registry, timeout=60)
        assert res.returncode == 0, (args, res.stderr[-2000:])
    time.sleep(1.0)
    new = tree.records(mark)
    noisy = warnings_or_worse(new)
    assert noisy == [], '\n'.join(json.dumps(r)[:300] for r in noisy)


async def _flood(reg: tuple[str, int], n: int) -> set[str]:
    from piker.clearing import open_ems
    from piker.service import open_runtime
    from tests.test_ems import BACKENDS

    async def all_rejected(ems: Any, oids: set[str]) -> None:
        while sum(1 for o in oids if getattr(ems.orders.get(o), 'state', None) == 'rejected') < len(oids):
            await trio.sleep(0.1)

    with trio.fail_after(60):
        async with open_runtime('flooder', reg):
            async with open_ems(backend_cfgs=BACKENDS, backends=['sim'], source='flood') as ems:
                oids: set[str] = set()
                for _ in range(n):  # each one over max_order_size
                    order = ems.order('btcusd.sim', 'buy', 10)
                    oids.add(order.oid)
                    await ems.send(order)
                await all_rejected(ems, oids)
                # the next one after the window closes brings its summary out
                await trio.sleep(WINDOW_SECS + 0.5)
                last = ems.order('btcusd.sim', 'buy', 10)
                await ems.send(last)
                await all_rejected(ems, {last.oid})
                oids.add(last.oid)
                await trio.sleep(0.5)
    return oids


def test_flood_of_identical_warnings_is_summarised(tree: Tree) -> None:
    mark = tree.size()
    oids = trio.run(_flood, tree.reg, FLOOD)
    recs = tree.records(mark)
    passed = [r for r in recs if r['event'] == 'order.rejected' and r.get('oid') in oids]
    assert {r['actor'] for r in passed} <= {'emsd'}
    summaries = [r for r in recs if r['event'] == 'log.suppressed' and r['of'] == 'order.rejected']
    assert len(passed) <= 100, f'{len(passed)} order.rejected records for {FLOOD + 1} rejections'
    assert summaries, 'no log.suppressed summary'
    for s in summaries:
        assert s['actor'] == 'emsd' and s['level'] == 'warning', s
        assert s['window_secs'] == WINDOW_SECS and s['count'] > 0, s
        assert s['logger'] == passed[0]['logger'], s
    assert len(passed) + sum(s['count'] for s in summaries) == FLOOD + 1
    # the whole tree stayed readable through the flood
    assert len(warnings_or_worse(recs)) <= 100


async def _crash_all(reg: tuple[str, int], marker_dir: Path) -> None:
    from piker.service import open_runtime, request_spawn

    async def one(how: str) -> None:
        try:
            await request_spawn('tests._crashers:crasher_init',
                                {'how': how, 'marker_dir': str(marker_dir)})
        except Exception:  # noqa: BLE001 (raise_early fails its start, as it should)
            pass

    with trio.fail_after(60):
        async with open_runtime('crash-tester', reg):
            async with trio.open_nursery() as n:
                for how in _crashers.HOW:
                    n.start_soon(one, how)


def test_crashes_and_kills_leave_only_json_lines(tree: Tree, tmp_path: Path) -> None:
    trio.run(_crash_all, tree.reg, tmp_path)

    def printed(needle: str) -> bool:
        return any(needle.encode() in p.read_bytes() for p in (tree.out_path, tree.err_path))

    for how in _crashers.HOW:
        if how != 'sigint':
            tree.wait(lambda how=how: printed(f'crasher.{how}: '), 20, f'crasher.{how} output')
    tree.wait(lambda: printed('idle.print: to stderr'), 20, 'the strategy print')

    # kill one: pikerd restarts it
    datad = service_pids(tree.reg)['datad.sim']
    mark = tree.size()
    os.kill(datad, signal.SIGKILL)
    tree.wait(lambda: [r for r in tree.events('service.restarted', mark)
                       if r['service'] == 'datad.sim'], 20, 'datad.sim restarted')
    tree.proc.send_signal(signal.SIGTERM)
    tree.proc.wait(40)

    bad = []
    for path in (tree.out_path, tree.err_path):
        for n, line in enumerate(path.read_bytes().split(b'\n')[:-1], 1):
            try:
                parse_line(line)
            except (ValueError, AssertionError, KeyError):
                bad.append(f'{path.name}:{n}: {line[:160]!r}')
    assert bad == [], f'{len(bad)} raw lines, first ones:\n' + '\n'.join(bad[:30])
    raw = tree.out_path.read_bytes()
    assert raw.endswith(b'\n') and _crashers.SECRET.encode() not in raw
    assert tree.err_path.read_bytes() == b''

    # each crash's traceback is inside a record, structured, without locals
    recs = tree.records()

    def said(needle: str, event: str | None = None) -> list[dict[str, Any]]:
        return [r for r in recs if needle in json.dumps(r) and event in (None, r['event'])]

    for how, event in (('raise', None), ('raise_early', None), ('thread', 'thread.uncaught'),
                       ('excepthook', 'process.uncaught'), ('aio', None)):
        found = said(f'crasher.{how}: boom', event)
        assert found, how
        frames = [f['name'] for r in found for e in r.get('exception', [])
                  for f in e.get('frames', [])]
        assert '_fail' in frames or any('in _fail' in r['event'] for r in found), (how, found)
    assert said('crasher.unraisable: boom in __del__', 'unraisable')
    assert said('crasher.warn: a user warning')[0]['logger'] == 'py.warnings'
    assert said('crasher.warn: to nobody')[0]['level'] == 'warning'
    for text in ('crasher.print: to stdout', 'idle.print: to stdout'):
        assert said(text)[0]['level'] == 'info', text
    for text in ('crasher.print: to stderr', 'idle.print: to stderr'):
        assert said(text)[0]['level'] == 'warning', text
