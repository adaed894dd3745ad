"""Reading a ledger's files back, trusting nothing in them.

One loader for the owning :class:`~piker.accounting.Ledger` and the
read-only views (``piker ledger``), so both see the same fills or the same
error. Every record must be a fill this ledger could have written: finite
numbers, a non-zero size, an id, and this ledger's broker and account. A
record that is not is a :class:`LedgerError` naming the file and line, raised
before anything is written: a ledger is never repaired by guessing, and a
fill never vanishes silently.

A fill id repeated with the same values inside one file is dropped (one
warning per file naming the ids); the same id with different values is an
error, since which one happened cannot be known. A journal fill that the
snapshot already holds is what a crash between snapshot and journal
truncation leaves: it is dropped without a word.
"""
from __future__ import annotations

import re
from pathlib import Path

import msgspec

from ..config import ConfigError, parse_state_toml
from ..log import get_logger
from ..types import Struct
from ._positions import Fill, validate_fill

log = get_logger(__name__)

JOURNAL_NAME = 'journal.jsonl'
LEDGER_NAME = 'ledger.toml'
# far above one fill record: a longer torn tail is not a torn write
MAX_RECORD_BYTES = 64 * 1024

_RESTORE = 'nothing was changed; fix or remove that record, or restore the file from a backup'
_decode_fill = msgspec.json.Decoder(Fill).decode
_decode_any = msgspec.json.Decoder().decode


class LedgerError(Exception):
    """A ledger that cannot be opened or a fill that cannot be recorded."""


class LoadedLedger(Struct, frozen=True):
    fills: list[Fill]
    # fills only the journal holds (not yet in a snapshot)
    journaled: int
    # journal bytes up to its last whole line; beyond is a torn, unacknowledged write
    journal_whole: int
    # file -> fill ids repeated in it with the same values (dropped)
    repeated: dict[str, list[str]] = msgspec.field(default_factory=dict)


def load_fills(path: Path, broker: str, account: str, journal: bytes,
               *, warn: bool = True) -> LoadedLedger:
    """The fills of ledger dir ``path``: its snapshot, then ``journal`` (the
    bytes of its journal), validated and de-duplicated (see the module doc)."""
    fills = _Fills()
    for line, fill in _snapshot_fills(path / LEDGER_NAME, broker, account):
        fills.add(fill, path / LEDGER_NAME, line)
    in_snapshot = len(fills.fills)
    records, whole = _journal_fills(path / JOURNAL_NAME, journal, broker, account)
    for line, fill in records:
        fills.add(fill, path / JOURNAL_NAME, line)
    if warn:
        for file, ids in fills.repeated.items():
            log.warning('ledger.duplicate_fills', path=str(file), fill_ids=ids,
                        kept='first', count=len(ids))
    return LoadedLedger(fills=fills.fills, journaled=len(fills.fills) - in_snapshot,
                        journal_whole=whole,
                        repeated={str(f): ids for f, ids in fills.repeated.items()})


class _Fills:
    def __init__(self) -> None:
        self.fills: list[Fill] = []
        self.repeated: dict[Path, list[str]] = {}
        self._where: dict[str, tuple[Fill, Path, int]] = {}

    def add(self, fill: Fill, file: Path, line: int) -> None:
        prior = self._where.get(fill.fill_id)
        if prior is None:
            self._where[fill.fill_id] = (fill, file, line)
            self.fills.append(fill)
            return
        first, first_file, first_line = prior
        if first != fill:
            raise LedgerError(
                f'{file}:{line}: corrupt ledger: fill id {fill.fill_id!r} is also at '
                f'{first_file.name}:{first_line} with different values, and which one '
                f'happened cannot be told; {_RESTORE}')
        if first_file == file:
            ids = self.repeated.setdefault(file, [])
            if fill.fill_id not in ids:
                ids.append(fill.fill_id)


def _check(fill: Fill, where: str, broker: str, account: str) -> None:
    try:
        validate_fill(fill)
    except ValueError as err:
        raise LedgerError(f'{where}: corrupt ledger: {err}; {_RESTORE}') from None
    for field, mine in (('broker', broker), ('account', account)):
        theirs = getattr(fill, field)
        if theirs and theirs != mine:
            raise LedgerError(
                f'{where}: corrupt ledger: fill {fill.fill_id!r} has {field}={theirs!r} but '
                f'this is the ledger of {broker}/{account}; {_RESTORE}')


def _snapshot_fills(snap: Path, broker: str, account: str) -> list[tuple[int, Fill]]:
    try:
        raw = snap.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise LedgerError(f'{snap}: cannot read: {err.strerror}') from None
    try:
        data = parse_state_toml(snap, raw)
    except ConfigError as err:
        raise LedgerError(str(err)) from None
    text = raw.decode()
    for key, mine in (('broker', broker), ('account', account)):
        theirs = data.get(key, mine)
        if theirs != mine:
            raise LedgerError(
                f'{snap}:{key_line(text, key)}: corrupt ledger: {key} = {theirs!r} but this '
                f'is the ledger of {broker}/{account} (copied from another ledger?); {_RESTORE}')
    records = data.get('fills', [])
    if not isinstance(records, list):
        raise LedgerError(
            f'{snap}:{key_line(text, "fills")}: corrupt ledger: `fills` must be an array '
            f'of fill records, found {type(records).__name__}; {_RESTORE}')
    out = []
    for i, (record, line) in enumerate(zip(records, record_lines(text, 'fills', len(records)),
                                           strict=True)):
        where = f'{snap}:{line}'
        try:
            fill = msgspec.convert(record, Fill)
        except msgspec.ValidationError as err:
            raise LedgerError(
                f'{where}: corrupt ledger: bad fill record `fills[{i}]`: {err}; {_RESTORE}'
            ) from None
        _check(fill, where, broker, account)
        out.append((line, fill))
    return out


def _journal_fills(jpath: Path, raw: bytes, broker: str, account: str,
                   ) -> tuple[list[tuple[int, Fill]], int]:
    """(line, fill) of every whole journal line, and the bytes those lines span."""
    out: list[tuple[int, Fill]] = []
    whole = 0
    lines = raw.split(b'\n')
    # the element after the last newline is b'' or a torn, unacknowledged write
    if len(lines[-1]) > MAX_RECORD_BYTES:
        raise LedgerError(
            f'{jpath}:{len(lines)}: corrupt journal: {len(lines[-1])} bytes without a newline '
            f'at the end is not a torn write; {_RESTORE}')
    last = len(lines) - 1
    for lineno, line in enumerate(lines[:-1], start=1):
        where = f'{jpath}:{lineno}'
        try:
            fill = _decode_fill(line)
        except msgspec.DecodeError as err:
            if _is_json(line):
                raise LedgerError(
                    f'{where}: corrupt journal line: not a fill record: {err}; {_RESTORE}'
                ) from None
            if lineno == last and len(line) <= MAX_RECORD_BYTES:
                break  # a torn last line whose newline happened to land
            raise LedgerError(
                f'{where}: corrupt journal line ({err}); only the last line can be torn by '
                f'a crash; {_RESTORE}') from None
        _check(fill, where, broker, account)
        out.append((lineno, fill))
        whole += len(line) + 1
    return out, whole


def _is_json(line: bytes) -> bool:
    try:
        _decode_any(line)
    except msgspec.ValidationError:  # well-formed, e.g. a number out of range
        return True
    except msgspec.DecodeError:
        return False
    return True


def key_line(text: str, key: str) -> int:
    pattern = re.compile(rf'\s*{re.escape(key)}\s*=')
    for i, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return i
    return 1


def record_lines(text: str, key: str, count: int) -> list[int]:
    """The line of each of ``count`` records of array ``key``: ``[[key]]``
    headers, or one inline table per line as ``tomli_w`` writes them; else
    the line of the key."""
    lines = text.splitlines()
    header = re.compile(rf'\s*\[\[\s*{re.escape(key)}\s*\]\]\s*(#.*)?')
    headers = [i for i, ln in enumerate(lines, start=1) if header.fullmatch(ln)]
    if len(headers) == count:
        return headers
    start = key_line(text, key)
    inline = [i for i, ln in enumerate(lines, start=1)
              if i > start and ln.lstrip().startswith('{')]
    if len(inline) >= count:
        return inline[:count]
    return [start] * count
