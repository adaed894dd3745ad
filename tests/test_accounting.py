"""Ledger and position accounting: arithmetic, idempotence, reload, crash safety."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from piker.accounting import (
    Fill,
    Ledger,
    LedgerError,
    Position,
    apply_fill,
    positions_from_fills,
    read_positions_file,
)
from piker.accounting._ledger import JOURNAL_NAME, LEDGER_NAME

FQME = 'btcusd.sim'


def fill(fid: str, size: float, price: float, fee: float = 0.0, fqme: str = FQME) -> Fill:
    return Fill(fill_id=fid, fqme=fqme, size=size, price=price, fee=fee, ts_ns=1)


def fold(*fills: Fill) -> Position:
    return positions_from_fills(fills)[fills[0].fqme]


# -- position arithmetic -------------------------------------------------------

def test_adding_moves_avg_price_size_weighted():
    pos = fold(fill('a', 2, 100), fill('b', 1, 130))
    assert pos.size == 3
    assert pos.avg_price == 110
    assert pos.realized_pnl == 0


def test_reducing_long_realizes_pnl_and_keeps_avg():
    pos = fold(fill('a', 4, 100), fill('b', -1, 110))
    assert pos == Position(fqme=FQME, size=3, avg_price=100, realized_pnl=10)


def test_reducing_short_realizes_pnl_with_sign():
    pos = fold(fill('a', -4, 100), fill('b', 2, 90))
    assert pos == Position(fqme=FQME, size=-2, avg_price=100, realized_pnl=20)
    loss = fold(fill('a', -1, 100), fill('b', 1, 105))
    assert loss == Position(fqme=FQME, size=0, avg_price=0, realized_pnl=-5)


def test_flip_realizes_closed_part_and_opens_remainder_at_fill_price():
    pos = fold(fill('a', 2, 100), fill('b', -5, 120))
    assert pos == Position(fqme=FQME, size=-3, avg_price=120, realized_pnl=40)
    back = apply_fill(pos, fill('c', 4, 110))
    assert back == Position(fqme=FQME, size=1, avg_price=110, realized_pnl=70)


def test_fees_reduce_realized_pnl():
    pos = fold(fill('a', 1, 100, fee=1.5), fill('b', -1, 101, fee=0.5))
    assert pos.size == 0
    assert pos.realized_pnl == pytest.approx(-1.0)


def test_fractional_sizes_cancel_exactly_to_flat():
    pos = fold(fill('a', 0.1, 10), fill('b', 0.2, 10), fill('c', -0.3, 10))
    assert pos.size == 0 and pos.is_flat and pos.avg_price == 0


def test_unrealized_marks_open_size():
    pos = fold(fill('a', -2, 100))
    assert pos.unrealized(95) == 10
    assert Position(fqme=FQME).unrealized(95) == 0


def test_bad_fill_is_rejected_with_the_field():
    with pytest.raises(ValueError, match='`size`'):
        from piker.accounting import validate_fill
        validate_fill(fill('a', 0, 100))
    with pytest.raises(ValueError, match='is for'):
        apply_fill(Position(fqme='eth.sim'), fill('a', 1, 1))


# -- ledger ----------------------------------------------------------------------

def test_reapplying_known_fill_changes_nothing(tmp_path: Path):
    with Ledger.open(tmp_path, 'sim', 'paper') as led:
        assert led.apply(fill('f1', 1, 100)) is True
        before = (led.fills(), led.positions(), (led.path / JOURNAL_NAME).read_bytes())
        assert led.apply(fill('f1', 5, 999)) is False
        assert (led.fills(), led.positions(), (led.path / JOURNAL_NAME).read_bytes()) == before


def test_reload_equals_recompute_from_journal_and_snapshot(tmp_path: Path):
    rng = random.Random(3)
    fills = [
        fill(f'f{i}', rng.choice([-1, 1]) * rng.randint(1, 9) * 0.25,
             round(rng.uniform(90, 110), 2), fee=0.01, fqme=rng.choice([FQME, 'eth.sim']))
        for i in range(300)
    ]
    led = Ledger.open(tmp_path, 'sim', 'paper', compact_every=64)
    for f in fills:
        led.apply(f)
    live = led.positions()
    assert live == positions_from_fills(fills)
    # not closed: simulates a crash with fills spread over snapshot + journal
    led._release()
    assert (led.path / LEDGER_NAME).exists() and (led.path / JOURNAL_NAME).stat().st_size > 0

    with Ledger.open(tmp_path, 'sim', 'paper') as again:
        assert again.fills() == fills
        assert again.positions() == live
    # after close the snapshot alone holds everything, positions.toml matches
    assert (led.path / JOURNAL_NAME).stat().st_size == 0
    assert read_positions_file(led.path) == live
    with Ledger.open(tmp_path, 'sim', 'paper') as third:
        assert third.positions() == live


def test_torn_last_journal_line_is_dropped_and_repaired(tmp_path: Path):
    led = Ledger.open(tmp_path, 'sim', 'paper')
    led.apply(fill('f1', 1, 100))
    led._release()
    journal = led.path / JOURNAL_NAME
    with open(journal, 'ab') as fh:
        fh.write(b'{"fill_id":"f2","fqme":"btc')
    with Ledger.open(tmp_path, 'sim', 'paper') as again:
        assert [f.fill_id for f in again.fills()] == ['f1']
        assert again.apply(fill('f2', 1, 101)) is True
        assert journal.read_bytes().count(b'\n') == 2
    with Ledger.open(tmp_path, 'sim', 'paper') as third:
        assert [f.fill_id for f in third.fills()] == ['f1', 'f2']


def test_corrupt_middle_journal_line_is_an_error_naming_the_line(tmp_path: Path):
    led = Ledger.open(tmp_path, 'sim', 'paper')
    led.apply(fill('f1', 1, 100))
    led._release()
    journal = led.path / JOURNAL_NAME
    journal.write_bytes(b'garbage\n' + journal.read_bytes())
    with pytest.raises(LedgerError, match=r'journal.jsonl:1: corrupt'):
        Ledger.open(tmp_path, 'sim', 'paper')


def test_second_owner_is_refused_while_open(tmp_path: Path):
    with Ledger.open(tmp_path, 'sim', 'paper'):
        with pytest.raises(LedgerError, match='locked'):
            Ledger.open(tmp_path, 'sim', 'paper')


def test_fill_for_another_account_is_refused(tmp_path: Path):
    with Ledger.open(tmp_path, 'sim', 'paper') as led:
        other = Fill(fill_id='x', fqme=FQME, size=1, price=1, account='live')
        with pytest.raises(LedgerError, match="account='live'"):
            led.apply(other)
        assert len(led) == 0


def test_bad_account_name_is_refused(tmp_path: Path):
    with pytest.raises(LedgerError, match='without `/`'):
        Ledger.open(tmp_path, 'sim', '../etc')


# -- crash safety ------------------------------------------------------------------

_WRITER = textwrap.dedent('''
    import sys
    from piker.accounting import Fill, Ledger
    state_dir, start, sync = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    led = Ledger.open(state_dir, 'sim', 'paper', compact_every=13, sync=sync)
    i = start
    while True:
        fid = f'f{i}'
        led.apply(Fill(fill_id=fid, fqme='btcusd.sim', size=1 if i % 3 else -2,
                       price=100 + i % 7, fee=0.01, ts_ns=i))
        sys.stdout.write(fid + '\\n')
        sys.stdout.flush()
        i += 1
''')


@pytest.mark.parametrize('sync', ['always', 'deferred'])
def test_sigkill_at_random_points_never_loses_an_acknowledged_fill(tmp_path: Path, sync: str):
    script = tmp_path / 'writer.py'
    script.write_text(_WRITER)
    rng = random.Random(11)
    acked: list[str] = []
    kills = 12
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), str(len(acked) + 10_000 * _), sync],
            stdout=subprocess.PIPE, text=True,
        )
        assert proc.stdout is not None
        want = rng.randint(1, 60)
        got = 0
        while got < want:
            line = proc.stdout.readline()
            assert line, 'writer died before it was killed'
            acked.append(line.strip())
            got += 1
        os.kill(proc.pid, signal.SIGKILL)
        # fills acknowledged while we were deciding to kill also count
        rest, _err = proc.communicate(timeout=10)
        acked.extend(rest.split())
        assert proc.returncode == -signal.SIGKILL

        with Ledger.open(tmp_path, 'sim', 'paper') as led:
            ids = {f.fill_id for f in led.fills()}
            missing = [fid for fid in acked if fid not in ids]
            assert not missing, f'acknowledged fills lost: {missing[:5]}'
            assert led.positions() == positions_from_fills(led.fills())
    assert len(acked) >= kills


def test_deferred_sync_marks_dirty_until_synced(tmp_path: Path):
    with pytest.raises(LedgerError, match="`sync` must be 'always' or 'deferred'"):
        Ledger.open(tmp_path, 'sim', 'paper', sync='sometimes')
    with Ledger.open(tmp_path, 'sim', 'paper', sync='deferred') as led:
        assert not led.dirty and led.sync_fd() is None
        assert led.apply(fill('d1', 1, 100.0))
        assert led.dirty
        led.sync()
        assert not led.dirty
    with Ledger.open(tmp_path, 'sim', 'paper') as led:
        assert [f.fill_id for f in led.fills()] == ['d1']
