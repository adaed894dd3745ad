"""Read-only views of the paper/live ledgers on disk, for the CLI and tests.

:class:`~piker.accounting.Ledger` takes an exclusive lock (one writer per
ledger); these readers take none, so ``piker ledger`` works while paperboi
runs. They read the TOML snapshot plus the journal and skip a torn last
journal line exactly as the ledger's own loader does.
"""
from __future__ import annotations

from pathlib import Path

import msgspec

from ..accounting import Fill, Position, positions_from_fills
from ..accounting._ledger import JOURNAL_NAME, LEDGER_NAME
from ..config import read_toml


def read_fills(ledger_path: Path | str) -> list[Fill]:
    """Every fill of one ``<state_dir>/accounting/<broker>/<account>`` dir."""
    path = Path(ledger_path)
    fills = msgspec.convert(read_toml(path / LEDGER_NAME).get('fills', []), list[Fill])
    seen = {f.fill_id for f in fills}
    try:
        raw = (path / JOURNAL_NAME).read_bytes()
    except FileNotFoundError:
        raw = b''
    for line in raw.split(b'\n')[:-1]:
        try:
            fill = msgspec.json.decode(line, type=Fill)
        except msgspec.DecodeError:
            continue  # a torn write was never acknowledged
        if fill.fill_id not in seen:
            seen.add(fill.fill_id)
            fills.append(fill)
    return fills


def ledger_dirs(state_dir: Path | str, broker: str | None = None,
                account: str | None = None) -> list[Path]:
    base = Path(state_dir) / 'accounting'
    if not base.is_dir():
        return []
    return sorted(
        d for d in base.glob('*/*')
        if d.is_dir() and (broker is None or d.parent.name == broker)
        and (account is None or d.name == account)
    )


def read_positions(ledger_path: Path | str) -> dict[str, Position]:
    return positions_from_fills(read_fills(ledger_path))
