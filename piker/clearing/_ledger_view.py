"""Read-only views of the paper/live ledgers on disk, for the CLI and tests.

:class:`~piker.accounting.Ledger` takes an exclusive lock (one writer per
ledger); these readers take none, so ``piker ledger`` works while paperboi
runs. They load through the ledger's own loader, so they see the same fills
or raise the same :class:`~piker.accounting.LedgerError` (file and line) on a
corrupt ledger, and skip a torn last journal line without repairing it.
"""
from __future__ import annotations

from pathlib import Path

from ..accounting import Fill, LedgerError, Position, positions_from_fills
from ..accounting._load import JOURNAL_NAME, LoadedLedger, load_fills


def read_fills(ledger_path: Path | str) -> list[Fill]:
    """Every fill of one ``<state_dir>/accounting/<broker>/<account>`` dir."""
    return load_ledger(ledger_path).fills


def load_ledger(ledger_path: Path | str, *, warn: bool = True) -> LoadedLedger:
    """:func:`read_fills` with what loading found (``warn=False``: the caller
    reports repeated fill ids itself instead of a log record)."""
    path = Path(ledger_path)
    jpath = path / JOURNAL_NAME
    # the journal first: a snapshot taken meanwhile holds every fill it did
    try:
        journal = jpath.read_bytes()
    except FileNotFoundError:
        journal = b''
    except OSError as err:
        raise LedgerError(f'{jpath}: cannot read: {err.strerror}') from None
    return load_fills(path, path.parent.name, path.name, journal, warn=warn)


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
