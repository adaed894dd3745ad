"""The durable, per-(broker, account) fill ledger.

Layout under ``<state_dir>/accounting/<broker>/<account>/``:

- ``journal.jsonl``: append-only, one JSON fill per line, each written with a
  single ``os.write`` before :meth:`Ledger.apply` returns, so a fill that was
  acknowledged survives the process being SIGKILLed the next instant (the
  kernel holds the write). ``sync='always'`` (the default) also fdatasyncs
  before returning, so it survives a power loss too; ``sync='deferred'`` leaves
  that to :meth:`Ledger.sync`, which the owner calls off its event loop within
  milliseconds (paperboi: a simulated fill need not wait ~0.5 ms for the disk).
  Only the last line can be torn; loading drops it (it was never acknowledged)
  and truncates the file back to the last whole line.
- ``ledger.toml``: every fill, the human-readable record DESIGN asks for.
- ``positions.toml``: positions derived from those fills, for humans.

Both TOML files are snapshots written atomically (``write_toml_atomic``) once
the journal holds ``max(compact_every, total_fills // 4)`` fills, and on
:meth:`Ledger.close`; after a snapshot the journal is emptied. A crash between
the two steps only leaves fills in both places, which loading de-duplicates by
``fill_id``.

Loading trusts nothing (``_load.py``): a record that is not a valid fill of
this ledger is a :class:`LedgerError` naming file and line, raised before
anything is written. Positions are always recomputed from the fills, never
trusted from ``positions.toml``; an unreadable or disagreeing one is rewritten
from them with a warning. Files are created ``STATE_FILE_MODE`` (0640) and
directories ``STATE_DIR_MODE`` (0750) whatever the umask; an existing journal
of another mode is fixed once the ledger has loaded.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import msgspec

from ..config import (
    ConfigError,
    ensure_state_dir,
    fix_state_file_mode,
    open_state_file,
    read_toml,
    remove_stale_temps,
    write_toml_atomic,
)
from ..log import get_logger
from ._load import JOURNAL_NAME as JOURNAL_NAME
from ._load import LEDGER_NAME as LEDGER_NAME
from ._load import LedgerError as LedgerError
from ._load import load_fills
from ._locks import locked_by_message
from ._positions import Fill, Position, apply_fill, validate_fill

log = get_logger(__name__)

POSITIONS_NAME = 'positions.toml'
DEFAULT_COMPACT_EVERY = 500

_encode = msgspec.json.Encoder().encode


def _safe_component(value: str, what: str) -> str:
    if not value or value in ('.', '..') or '/' in value or '\0' in value:
        raise LedgerError(
            f'bad ledger {what} {value!r}: expected a non-empty name without `/` '
            f'(it becomes a directory under <state_dir>/accounting/)'
        )
    return value


def ledger_dir(state_dir: Path, broker: str, account: str) -> Path:
    return (
        Path(state_dir) / 'accounting'
        / _safe_component(broker, 'broker') / _safe_component(account, 'account')
    )


class Ledger:
    """Fills for one (broker, account), durable before :meth:`apply` returns.

    Open with :meth:`Ledger.open`; one process at a time (an exclusive
    ``flock`` on the journal enforces it).
    """

    def __init__(
        self,
        path: Path,
        broker: str,
        account: str,
        journal_fd: int,
        compact_every: int,
        sync: str = 'always',
    ) -> None:
        self.path = path
        self.broker = broker
        self.account = account
        self._fd: int | None = journal_fd
        self._compact_every = compact_every
        self._fills: list[Fill] = []
        self._ids: set[str] = set()
        self._positions: dict[str, Position] = {}
        self._journaled = 0
        self._sync_always = sync == 'always'
        # bytes written but not yet fdatasync'ed (sync='deferred')
        self.dirty = False

    # -- opening -----------------------------------------------------------

    @classmethod
    def open(
        cls,
        state_dir: Path | str,
        broker: str,
        account: str,
        *,
        compact_every: int = DEFAULT_COMPACT_EVERY,
        sync: str = 'always',
    ) -> Ledger:
        """Load (or create) the ledger and replay its journal.

        ``sync``: 'always' fdatasyncs each fill before :meth:`apply` returns;
        'deferred' leaves it to :meth:`sync` (see the module doc)."""
        if compact_every < 1:
            raise LedgerError(f'`compact_every` must be >= 1, got {compact_every}')
        if sync not in ('always', 'deferred'):
            raise LedgerError(f"`sync` must be 'always' or 'deferred', got {sync!r}")
        path = ledger_dir(Path(state_dir), broker, account)
        ensure_state_dir(path)
        jpath = path / JOURNAL_NAME
        if not jpath.exists():
            # a corrupt snapshot is refused before anything is created next to it
            load_fills(path, broker, account, b'', warn=False)
        fd = _open_journal(jpath)
        ledger = cls(path, broker, account, fd, compact_every, sync)
        try:
            ledger._load()
        except BaseException:
            ledger._release()
            raise
        fix_state_file_mode(fd, jpath)
        remove_stale_temps(path)
        log.info(
            'ledger.open', broker=broker, account=account,
            fills=len(ledger._fills), journaled=ledger._journaled, path=str(path),
        )
        return ledger

    def _load(self) -> None:
        assert self._fd is not None
        raw = _read_all(self._fd)
        loaded = load_fills(self.path, self.broker, self.account, raw)
        for fill in loaded.fills:
            self._record(fill)
        self._journaled = loaded.journaled
        if loaded.journal_whole != len(raw):
            # the torn last line was never acknowledged: drop it
            log.warning('ledger.journal_repaired', path=str(self.path / JOURNAL_NAME),
                        dropped_bytes=len(raw) - loaded.journal_whole)
            os.ftruncate(self._fd, loaded.journal_whole)
            os.fsync(self._fd)
        self._check_positions_snapshot()

    def _check_positions_snapshot(self) -> None:
        """positions.toml is derived: when unreadable or not the fold of the
        fills it claims to cover, rewrite it from the fills (with a warning)."""
        snap = self.path / POSITIONS_NAME
        try:
            data = read_toml(snap)
            if not data or data.get('fills_applied') != len(self._fills):
                return  # absent, or older: the next snapshot rewrites it
            if _convert_positions(data, snap) == self._positions:
                return
            reason = f'differs from the {len(self._fills)} fills of the ledger'
        except ConfigError as err:
            reason = str(err)
        log.warning('ledger.positions_rebuilt', path=str(snap), reason=reason)
        write_toml_atomic(snap, positions_doc(self))

    # -- queries -----------------------------------------------------------

    def __contains__(self, fill_id: object) -> bool:
        return fill_id in self._ids

    def __len__(self) -> int:
        return len(self._fills)

    def fills(self) -> list[Fill]:
        return list(self._fills)

    def positions(self) -> dict[str, Position]:
        return dict(self._positions)

    def position(self, fqme: str) -> Position:
        return self._positions.get(fqme) or Position(fqme=fqme)

    # -- writing -----------------------------------------------------------

    def apply(self, fill: Fill) -> bool:
        """Record ``fill`` durably and update positions.

        Returns ``False`` (and changes nothing) when ``fill_id`` is already
        recorded, so replaying a broker's fills is safe.
        """
        if self._fd is None:
            raise LedgerError(f'ledger {self.path} is closed')
        if fill.fill_id in self._ids:
            return False
        validate_fill(fill)
        self._check_owner(fill)
        self._append(_encode(fill) + b'\n')
        self._record(fill)
        self._journaled += 1
        log.info(
            'ledger.fill', fill_id=fill.fill_id, fqme=fill.fqme, size=fill.size,
            price=fill.price, fee=fill.fee, oid=fill.oid, account=self.account,
        )
        # geometric cadence: a snapshot costs O(all fills), so spacing them by a
        # fraction of the total keeps apply() amortized O(1)
        if self._journaled >= max(self._compact_every, len(self._fills) // 4):
            self.compact()
        return True

    def _append(self, line: bytes) -> None:
        assert self._fd is not None
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            _write_all(self._fd, line)
            if self._sync_always:
                os.fdatasync(self._fd)
            else:
                self.dirty = True
        except OSError:
            # never leave a partial line for the next append to glue onto
            os.ftruncate(self._fd, start)
            raise

    def sync_fd(self) -> int | None:
        """The journal's fd for a deferred :meth:`sync` run off the event loop
        (``None`` when closed or nothing is pending); clears ``dirty``."""
        if self._fd is None or not self.dirty:
            return None
        self.dirty = False
        return self._fd

    def sync(self) -> None:
        """fdatasync what deferred appends wrote."""
        fd = self.sync_fd()
        if fd is not None:
            os.fdatasync(fd)

    def _check_owner(self, fill: Fill) -> None:
        for field, mine in (('broker', self.broker), ('account', self.account)):
            theirs = getattr(fill, field)
            if theirs and theirs != mine:
                raise LedgerError(
                    f'fill {fill.fill_id!r} has {field}={theirs!r} but this ledger is '
                    f'{self.broker}/{self.account}; open the ledger for {theirs!r}'
                )

    def _record(self, fill: Fill) -> None:
        self._fills.append(fill)
        self._ids.add(fill.fill_id)
        pos = self._positions.get(fill.fqme) or Position(fqme=fill.fqme)
        self._positions[fill.fqme] = apply_fill(pos, fill)

    def compact(self) -> None:
        """Snapshot fills and positions to TOML, then empty the journal."""
        if self._fd is None:
            raise LedgerError(f'ledger {self.path} is closed')
        write_toml_atomic(self.path / LEDGER_NAME, {
            'broker': self.broker,
            'account': self.account,
            'fills': [msgspec.to_builtins(f) for f in self._fills],
        })
        write_toml_atomic(self.path / POSITIONS_NAME, positions_doc(self))
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self.dirty = False
        log.debug('ledger.compact', path=str(self.path), fills=len(self._fills))
        self._journaled = 0

    def close(self) -> None:
        """Snapshot and release the journal; idempotent."""
        if self._fd is None:
            return
        try:
            self.compact()
        finally:
            self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also drops the flock
            self._fd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def positions_doc(ledger: Ledger) -> dict[str, Any]:
    return {
        'broker': ledger.broker,
        'account': ledger.account,
        'fills_applied': len(ledger),
        'positions': {
            fqme: msgspec.to_builtins(pos) for fqme, pos in sorted(ledger.positions().items())
        },
    }


def read_positions_file(path: Path | str) -> dict[str, Position]:
    """Positions as last snapshotted to ``<ledger dir>/positions.toml`` (for tooling)."""
    snap = Path(path) / POSITIONS_NAME
    return _convert_positions(read_toml(snap), snap)


def _convert_positions(data: dict[str, Any], snap: Path) -> dict[str, Position]:
    try:
        return msgspec.convert(data.get('positions', {}), dict[str, Position])
    except msgspec.ValidationError as err:
        raise ConfigError(f'{snap}: bad position record: {err}') from None


def _open_journal(jpath: Path) -> int:
    fd, created = open_state_file(jpath, os.O_RDWR | os.O_APPEND)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LedgerError(
            locked_by_message(jpath)
            or f'{jpath} is locked by another process; only one actor may own a ledger '
            '(is another paperboi/emsd running on this state dir?)'
        ) from None
    if created:
        dir_fd = os.open(jpath.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return fd


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b''.join(chunks)


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]
