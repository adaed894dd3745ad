"""Reading paper's resting orders back from ``<state>/paper/<broker>/orders.toml``.

The file is derived state: every record is checked (a limit with a finite
positive size and price, a valid account, a market of this broker, the
``reqid`` paper gave it), and a file that does not parse is salvaged record
by record (one inline table per line as ``tomli_w`` writes them, or
``[[orders]]`` tables), so one torn record costs that order only. The engine
sets a corrupt file aside and reports what could not be recovered.
"""
from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from ..accounting import LedgerError, ledger_dir
from ..accounting._load import record_lines
from ..config import ConfigError, parse_state_toml
from ..types import Fqme, FqmeError, Struct
from ._messages import BrokerdOrder

_OID = re.compile(rb'''\boid\s*=\s*["']([^"'\n]{1,200})["']''')
_ACCOUNT = re.compile(rb'''\baccount\s*=\s*["']([^"'\n]{1,200})["']''')
_HEADER = re.compile(rb'\s*\[\[\s*orders\s*\]\]\s*(#.*)?')


class LostOrder(Struct, frozen=True):
    """A record of the file that is not a usable resting order."""
    line: int
    reason: str
    # what could be read of it, for the report and the ledger check
    oid: str | None = None
    account: str | None = None


class OrdersFile(Struct, frozen=True):
    orders: list[BrokerdOrder]
    lost: list[LostOrder]
    # one line each (``<path>:<line>: ...``): why the file is not clean
    problems: list[str]


def read_orders_file(path: Path, raw: bytes, broker: str, state_dir: Path) -> OrdersFile:
    """Every usable resting order of ``raw`` (the bytes of ``path``)."""
    problems: list[str] = []
    try:
        data = parse_state_toml(path, raw)
    except ConfigError as err:
        problems.append(str(err))
        records = _salvage(raw)
        if not records and raw.strip():
            return OrdersFile(orders=[], lost=[LostOrder(line=1, reason=str(err))],
                              problems=problems)
    else:
        found = data.get('orders', [])
        if not isinstance(found, list):
            problems.append(f'{path}: `orders` must be an array, found {type(found).__name__}')
            found = []
        text = raw.decode()
        records = list(zip(record_lines(text, 'orders', len(found)),
                           [r if isinstance(r, dict) else None for r in found], strict=True))
    orders: dict[str, BrokerdOrder] = {}
    lost: list[LostOrder] = []
    for line, record in records:
        if record is None:
            chunk = _chunk_at(raw, line)
            lost.append(LostOrder(line=line, reason='unreadable record',
                                  oid=_grab(_OID, chunk), account=_grab(_ACCOUNT, chunk)))
            continue
        order, reason = _check(record, broker, state_dir)
        if order is not None and orders.get(order.oid, order) != order:
            reason = f'oid {order.oid!r} rests twice with different values'
            order = None
        if order is None:
            oid, account = record.get('oid'), record.get('account')
            lost.append(LostOrder(line=line, reason=reason,
                                  oid=oid if isinstance(oid, str) and oid else None,
                                  account=account if isinstance(account, str) else None))
        elif order.oid in orders:
            problems.append(f'{path}:{line}: oid {order.oid!r} repeated; kept once')
        else:
            orders[order.oid] = order
    problems += [f'{path}:{x.line}: {x.reason}' for x in lost]
    return OrdersFile(orders=list(orders.values()), lost=lost, problems=problems)


def _check(record: dict[str, Any], broker: str,
           state_dir: Path) -> tuple[BrokerdOrder | None, str]:
    try:
        order = msgspec.convert(record, BrokerdOrder)
    except msgspec.ValidationError as err:
        return None, f'not a resting order: {err}'
    if not order.oid:
        return None, 'empty `oid`'
    try:
        ledger_dir(state_dir, broker, order.account)
    except LedgerError as err:
        return None, str(err)
    try:
        if Fqme.parse(order.fqme).backend != broker:
            return None, f'market {order.fqme!r} is not a {broker} market'
    except FqmeError as err:
        return None, str(err)
    if not (math.isfinite(order.size) and order.size > 0):
        return None, f'`size` must be a finite positive number, got {order.size!r}'
    if order.kind != 'limit':
        return None, f'only limit orders rest, got kind={order.kind!r}'
    if order.price is None or not (math.isfinite(order.price) and order.price > 0):
        return None, f'`price` must be a finite positive number, got {order.price!r}'
    if order.reqid != f'paper-{order.oid}':
        return None, f'`reqid` must be "paper-{order.oid}", got {order.reqid!r}'
    return order, ''


def _salvage(raw: bytes) -> list[tuple[int, dict[str, Any] | None]]:
    """(line, record or None when unreadable) of every record-looking part of
    a file that does not parse as a whole."""
    out: list[tuple[int, dict[str, Any] | None]] = []
    table: tuple[int, list[bytes]] | None = None

    def flush() -> None:
        if table is not None:
            out.append((table[0], _parse(b'\n'.join(table[1]))))

    for lineno, line in enumerate(raw.split(b'\n'), start=1):
        stripped = line.strip()
        if _HEADER.fullmatch(line):
            flush()
            table = (lineno, [])
        elif stripped.startswith(b'['):
            flush()
            table = None
        elif table is not None:
            table[1].append(line)
        elif stripped.startswith(b'{'):
            out.append((lineno, _parse(b'r = ' + stripped.rstrip(b',').rstrip(), 'r')))
    flush()
    return out


def _parse(chunk: bytes, key: str | None = None) -> dict[str, Any] | None:
    try:
        data = tomllib.loads(chunk.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    found = data.get(key) if key else data
    return found if isinstance(found, dict) else None


def _chunk_at(raw: bytes, line: int) -> bytes:
    """The bytes of the record starting at ``line`` (up to the next record)."""
    lines = raw.split(b'\n')[line - 1:]
    out = [lines[0]]
    for more in lines[1:]:
        if _HEADER.fullmatch(more) or more.strip().startswith((b'{', b'[')):
            break
        out.append(more)
    return b'\n'.join(out)


def _grab(pattern: re.Pattern[bytes], chunk: bytes) -> str | None:
    found = pattern.search(chunk)
    return found.group(1).decode(errors='replace') if found else None
