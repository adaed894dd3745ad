"""State files never fail open: every load validates, a corrupt ledger is one
clear error naming file and line (the file untouched), a corrupt derived file
is rebuilt from the ledger, and every state file has one mode whatever the
umask."""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from piker.accounting import Fill, Ledger, LedgerError
from piker.accounting._ledger import JOURNAL_NAME, LEDGER_NAME, POSITIONS_NAME
from piker.clearing._audit import AuditLog
from piker.clearing._ledger_view import read_fills
from piker.clearing._messages import BrokerdOrder
from piker.clearing._paper_engine import PaperEngine
from piker.config import STATE_DIR_MODE, STATE_FILE_MODE, PaperCfg, read_toml
from tests.conftest import REPO, run_piker

FQME = 'btcusd.sim'


def rec(fid: str, size: float = 1.0, price: float = 100.0, **kw: Any) -> dict[str, Any]:
    return {'fill_id': fid, 'fqme': FQME, 'size': size, 'price': price, 'fee': 0.0,
            'ts_ns': 1, **kw}


def ledger_path(state: Path, account: str = 'paper') -> Path:
    path = state / 'accounting' / 'sim' / account
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_ledger(state: Path, fills: list[dict[str, Any]]) -> Path:
    path = ledger_path(state)
    (path / LEDGER_NAME).write_text(tomli_w.dumps(
        {'broker': 'sim', 'account': 'paper', 'fills': fills}))
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(path.rglob('*')) if p.is_file()}


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [r.msg for r in caplog.records
            if isinstance(r.msg, dict) and r.msg.get('event') == name]


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith('piker: error:')]


def piker_ledger(state: Path) -> subprocess.CompletedProcess[str]:
    return run_piker('ledger', '--json', '--state-dir', str(state), timeout=30)


# -- duplicates --------------------------------------------------------------------

def test_repeated_fill_id_in_ledger_toml_is_counted_once_warned_and_written_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.WARNING)
    path = write_ledger(tmp_path, [rec('f1', 2), rec('f2', 1), rec('f1', 2)])
    assert [f.fill_id for f in read_fills(path)] == ['f1', 'f2']
    with Ledger.open(tmp_path, 'sim', 'paper') as led:
        assert [f.fill_id for f in led.fills()] == ['f1', 'f2']
        assert led.position(FQME).size == 3
    [warn, *_] = events(caplog, 'ledger.duplicate_fills')
    assert warn['path'] == str(path / LEDGER_NAME)
    assert warn['fill_ids'] == ['f1']
    written = [f['fill_id'] for f in read_toml(path / LEDGER_NAME)['fills']]
    assert written == ['f1', 'f2']
    assert read_toml(path / POSITIONS_NAME)['positions'][FQME]['size'] == 3


def test_piker_ledger_lists_a_repeated_fill_once_with_one_warning_line(tmp_path: Path):
    state = tmp_path / 'state'
    path = write_ledger(state, [rec('f1', 2), rec('f2', 1), rec('f1', 2)])
    res = piker_ledger(state)
    assert res.returncode == 0, res.stderr
    assert [r['fill_id'] for r in json.loads(res.stdout)] == ['f1', 'f2']
    assert res.stderr.splitlines() == [
        f"piker: warning: {path / LEDGER_NAME}: fill id 'f1' repeated with the same values, "
        'counted once (the owner writes it back once)']


def test_same_fill_id_with_different_values_is_an_error(tmp_path: Path):
    path = write_ledger(tmp_path, [rec('f1', 2), rec('f1', 5)])
    before = snapshot(tmp_path)
    with pytest.raises(LedgerError, match=r'ledger.toml:\d+: .*fill id .f1. .*different'):
        Ledger.open(tmp_path, 'sim', 'paper')
    assert snapshot(tmp_path) == before
    assert not (path / JOURNAL_NAME).exists()


# -- non-finite numbers, foreign accounts, invalid records -----------------------------

@pytest.mark.parametrize('field', ['price', 'size', 'fee'])
@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_non_finite_number_in_ledger_is_an_error_naming_file_and_line(
    tmp_path: Path, field: str, value: float,
):
    path = write_ledger(tmp_path, [rec('f1'), rec('f2', **{field: value})])
    before = snapshot(tmp_path)
    with pytest.raises(LedgerError, match=rf'ledger.toml:(\d+): .*`{field}` must be (a )?finite'):
        Ledger.open(tmp_path, 'sim', 'paper')
    assert snapshot(tmp_path) == before  # nothing written back, no journal created
    with pytest.raises(LedgerError, match=rf'ledger.toml:\d+: .*`{field}`'):
        read_fills(path)


def test_nan_price_line_number_is_the_record(tmp_path: Path):
    path = write_ledger(tmp_path, [rec('f1'), rec('f2', price=float('nan'))])
    text = (path / LEDGER_NAME).read_text().splitlines()
    # tomli_w writes one inline table per line
    second = [i for i, ln in enumerate(text, 1) if ln.lstrip().startswith('{')][1]
    assert 'nan' in text[second - 1]
    with pytest.raises(LedgerError, match=rf'ledger.toml:{second}: '):
        Ledger.open(tmp_path, 'sim', 'paper')


def test_fill_of_another_account_in_the_file_is_an_error(tmp_path: Path):
    write_ledger(tmp_path, [rec('f1', account='live')])
    with pytest.raises(LedgerError, match=r"ledger.toml:\d+: .*account='live'"):
        Ledger.open(tmp_path, 'sim', 'paper')


def test_ledger_file_of_another_account_is_an_error(tmp_path: Path):
    path = ledger_path(tmp_path)
    (path / LEDGER_NAME).write_text(tomli_w.dumps(
        {'broker': 'sim', 'account': 'live', 'fills': [rec('f1')]}))
    with pytest.raises(LedgerError, match=r"ledger.toml:2: .*'live'.*sim/paper"):
        Ledger.open(tmp_path, 'sim', 'paper')


# -- the journal -----------------------------------------------------------------------

def _journal(path: Path, *lines: bytes) -> Path:
    jpath = path / JOURNAL_NAME
    jpath.write_bytes(b''.join(lines))
    return jpath


def _jline(fid: str, **kw: Any) -> bytes:
    return json.dumps(rec(fid, **kw)).encode() + b'\n'


def test_garbage_mid_journal_is_an_error_for_piker_ledger_not_a_vanished_fill(tmp_path: Path):
    state = tmp_path / 'state'
    jpath = _journal(ledger_path(state), _jline('f1'), b'\x00garbage}\n', _jline('f2'))
    before = snapshot(state)
    res = piker_ledger(state)
    assert res.returncode == 2, (res.stdout, res.stderr)
    [line] = error_lines(res.stderr)
    assert line.startswith(f'piker: error: {jpath}:2: ')
    assert 'Traceback' not in res.stderr
    assert snapshot(state) == before


@pytest.mark.parametrize('where', ['middle', 'last'])
def test_journal_line_that_is_json_but_not_a_fill_is_an_error(tmp_path: Path, where: str):
    path = ledger_path(tmp_path)
    bad = b'{"hello": "world"}\n'
    lines = [_jline('f1'), bad, _jline('f2')] if where == 'middle' else [_jline('f1'), bad]
    jpath = _journal(path, *lines)
    before = snapshot(tmp_path)
    with pytest.raises(LedgerError, match=rf'{jpath}:2: .*fill_id'):
        Ledger.open(tmp_path, 'sim', 'paper')
    with pytest.raises(LedgerError, match=rf'{jpath}:2: '):
        read_fills(path)
    assert snapshot(tmp_path) == before


def test_journal_fill_with_zero_size_or_foreign_account_is_an_error(tmp_path: Path):
    path = ledger_path(tmp_path)
    for bad in (_jline('f2', size=0.0), _jline('f2', account='live')):
        jpath = _journal(path, _jline('f1'), bad)
        with pytest.raises(LedgerError, match=rf'{jpath}:2: '):
            Ledger.open(tmp_path, 'sim', 'paper')


def test_journal_repeating_a_snapshot_fill_is_silent_but_a_repeat_inside_it_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.WARNING)
    path = write_ledger(tmp_path, [rec('f1')])
    # a crash between snapshot and journal truncation: f1 in both, normal
    _journal(path, _jline('f1'), _jline('f2'), _jline('f2'))
    with Ledger.open(tmp_path, 'sim', 'paper') as led:
        assert [f.fill_id for f in led.fills()] == ['f1', 'f2']
    [warn] = events(caplog, 'ledger.duplicate_fills')
    assert (warn['path'], warn['fill_ids']) == (str(path / JOURNAL_NAME), ['f2'])


# -- derived files are rebuilt -----------------------------------------------------------

@pytest.mark.parametrize('garbage', [b'\xff\xfe\x00binary', b'[positions.btcusd', b'x = 1\n'
                                     b'fills_applied = 1\n[positions."btcusd.sim"]\n'
                                     b'fqme = "btcusd.sim"\nsize = nan\n'])
def test_garbage_positions_toml_is_rebuilt_from_the_ledger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, garbage: bytes,
):
    caplog.set_level(logging.WARNING)
    with Ledger.open(tmp_path, 'sim', 'paper') as led:
        led.apply(Fill(fill_id='f1', fqme=FQME, size=2, price=100))
        want = led.positions()
    (led.path / POSITIONS_NAME).write_bytes(garbage)
    with Ledger.open(tmp_path, 'sim', 'paper') as again:
        assert again.positions() == want
        [warn] = events(caplog, 'ledger.positions_rebuilt')
        assert warn['path'] == str(led.path / POSITIONS_NAME)
        assert read_toml(led.path / POSITIONS_NAME)['positions'][FQME]['size'] == 2


def _orders_doc(*orders: dict[str, Any]) -> str:
    return tomli_w.dumps({'orders': list(orders)})


def _order(oid: str, price: float = 98.0, **kw: Any) -> dict[str, Any]:
    return {'type': 'brokerd_order', 'oid': oid, 'account': 'paper', 'fqme': FQME,
            'action': 'buy', 'size': 1.0, 'kind': 'limit', 'price': price,
            'reqid': f'paper-{oid}', 'ts_ns': 1, 'source': 'cli', **kw}


def _engine(state: Path) -> tuple[PaperEngine, dict[str, Ledger]]:
    ledgers: dict[str, Ledger] = {}

    def ledger_for(account: str) -> Ledger:
        if account not in ledgers:
            ledgers[account] = Ledger.open(state, 'sim', account)
        return ledgers[account]
    return PaperEngine('sim', PaperCfg(), state, ledger_for), ledgers


def test_corrupt_paper_orders_are_set_aside_and_lost_orders_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.WARNING)
    orders = tmp_path / 'paper' / 'sim' / 'orders.toml'
    orders.parent.mkdir(parents=True)
    good = _orders_doc(_order('keep1'), _order('keep2', price=97.0))
    # a nan-priced record, then a record torn by binary garbage
    raw = (good + _orders_doc(_order('nanpx', price=float('nan')))
           + '[[orders]]\ntype = "brokerd_order"\noid = "torn1"\nprice = \x00\x01')
    orders.write_bytes(raw.encode())
    eng, ledgers = _engine(tmp_path)
    try:
        assert [o.oid for o in eng.open_orders()] == ['keep1', 'keep2']
    finally:
        for led in ledgers.values():
            led.close()
    [aside] = list(orders.parent.glob('orders.toml.corrupt-*'))
    assert aside.read_bytes() == raw.encode()
    assert [o['oid'] for o in read_toml(orders)['orders']] == ['keep1', 'keep2']
    [err] = events(caplog, 'paper.orders_lost')
    assert err['path'] == str(orders)
    assert err['set_aside'] == str(aside)
    assert err['oids'] == ['nanpx', 'torn1']
    assert [r.levelname for r in caplog.records
            if isinstance(r.msg, dict) and r.msg.get('event') == 'paper.orders_lost'] == ['ERROR']


def test_unreadable_paper_orders_file_without_any_oid_is_reported_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.WARNING)
    orders = tmp_path / 'paper' / 'sim' / 'orders.toml'
    orders.parent.mkdir(parents=True)
    orders.write_bytes(bytes(range(256)))
    eng, ledgers = _engine(tmp_path)
    for led in ledgers.values():
        led.close()
    assert eng.open_orders() == []
    [err] = events(caplog, 'paper.orders_lost')
    assert err['oids'] == [] and err['unreadable_records'] == 1
    assert list(orders.parent.glob('orders.toml.corrupt-*'))


# -- piker ledger on a corrupt ledger: one line, exit 2, no traceback ----------------------

@pytest.mark.parametrize('case', ['binary', 'truncated', 'missing_field'])
def test_piker_ledger_on_a_corrupt_ledger_is_one_error_line(tmp_path: Path, case: str):
    state = tmp_path / 'state'
    path = write_ledger(state, [rec('f1'), rec('f2')])
    snap = path / LEDGER_NAME
    text = snap.read_bytes()
    if case == 'binary':
        snap.write_bytes(b'broker = "sim"\n' + bytes(range(256)))  # b'\n' at 10
        where = ':3: corrupt state file: not UTF-8 text'
    elif case == 'truncated':
        snap.write_bytes(text[:text.rindex(b'price') + 4])
        where = ': corrupt state file: '
    else:
        snap.write_bytes(text.replace(b', price = 100.0', b'', 1))
        where = ': corrupt ledger: bad fill record `fills[0]`: Object missing required field `price`'
    before = snapshot(state)
    res = piker_ledger(state)
    assert res.returncode == 2, (res.stdout, res.stderr)
    [line] = error_lines(res.stderr)
    assert line.startswith(f'piker: error: {snap}:'), line
    assert where in line
    assert 'Traceback' not in res.stderr
    assert snapshot(state) == before


# -- one file mode --------------------------------------------------------------------------

_WRITER = textwrap.dedent('''
    import os, sys
    os.umask(int(sys.argv[2], 8))
    from pathlib import Path
    from piker.accounting import Fill, Ledger
    from piker.clearing._audit import AuditLog
    from piker.clearing._messages import BrokerdOrder
    from piker.clearing._paper_engine import PaperEngine
    from piker.config import PaperCfg, write_toml_atomic
    state = Path(sys.argv[1])
    ledgers = {}
    def ledger_for(account):
        if account not in ledgers:
            ledgers[account] = Ledger.open(state, 'sim', account)
        return ledgers[account]
    eng = PaperEngine('sim', PaperCfg(), state, ledger_for)
    eng.on_quote('btcusd.sim', 99.0, 101.0, 100.0, 1)
    eng.submit(BrokerdOrder(oid='m1', account='paper', fqme='btcusd.sim', action='buy',
                            size=1.0))
    eng.submit(BrokerdOrder(oid='l1', account='paper', fqme='btcusd.sim', action='buy',
                            size=1.0, kind='limit', price=90.0))
    ledgers['paper'].compact()
    ledgers['paper'].apply(Fill(fill_id='x2', fqme='btcusd.sim', size=1.0, price=100.0))
    AuditLog(state / 'audit.jsonl').record('halt', by='test')
    write_toml_atomic(state / 'risk' / 'halt.toml', {'halted': True})
''')


@pytest.mark.parametrize('umask', ['000', '077', '022'])
def test_every_state_file_is_0640_and_every_dir_0750_whatever_the_umask(
    tmp_path: Path, umask: str,
):
    script = tmp_path / 'writer.py'
    script.write_text(_WRITER)
    state = tmp_path / 'state'
    state.mkdir()
    res = subprocess.run([sys.executable, str(script), str(state), umask], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    files = {p.relative_to(state).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in state.rglob('*') if p.is_file()}
    dirs = {p.relative_to(state).as_posix(): stat.S_IMODE(p.stat().st_mode)
            for p in state.rglob('*') if p.is_dir()}
    assert {'accounting/sim/paper/journal.jsonl', 'accounting/sim/paper/ledger.toml',
            'accounting/sim/paper/positions.toml', 'paper/sim/orders.toml', 'audit.jsonl',
            'risk/halt.toml'} <= set(files)
    assert files == {name: 0o640 for name in files}
    assert dirs == {name: 0o750 for name in dirs}
    assert STATE_FILE_MODE == 0o640 and STATE_DIR_MODE == 0o750


def test_existing_files_of_another_mode_are_fixed_when_opened_for_writing_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO)
    with Ledger.open(tmp_path, 'sim', 'paper') as led:
        led.apply(Fill(fill_id='f1', fqme=FQME, size=1, price=100))
    audit = AuditLog(tmp_path / 'audit.jsonl')
    audit.record('halt', by='test')
    paths = [led.path / JOURNAL_NAME, led.path / LEDGER_NAME, tmp_path / 'audit.jsonl']
    for p in paths:
        os.chmod(p, 0o644)
    caplog.clear()
    with Ledger.open(tmp_path, 'sim', 'paper') as led:
        led.apply(Fill(fill_id='f2', fqme=FQME, size=1, price=100))
    audit.record('resume', by='test')
    audit.record('halt', by='test')
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == STATE_FILE_MODE, p
    fixed = events(caplog, 'state.file_mode_fixed')
    assert sorted(e['path'] for e in fixed) == sorted(str(p) for p in paths)
    assert {e['mode'] for e in fixed} == {'0644'}


def test_paper_order_writer_keeps_the_mode(tmp_path: Path):
    eng, ledgers = _engine(tmp_path)
    eng.on_quote(FQME, 99.0, 101.0, 100.0, 1)
    eng.submit(BrokerdOrder(oid='l1', account='paper', fqme=FQME, action='buy', size=1.0,
                            kind='limit', price=90.0))
    for led in ledgers.values():
        led.close()
    assert stat.S_IMODE(eng.orders_path.stat().st_mode) == STATE_FILE_MODE
