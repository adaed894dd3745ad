"""The operator audit trail: ``<state_dir>/audit.jsonl``, append-only.

Every operator action on emsd (halt, resume, cancel_all, flatten) and every
automatic halt is one JSON line, written with a single ``os.write`` and
fsynced, so the trail survives a crash the instant after the action. The
file is ``STATE_FILE_MODE`` (0640) whatever the umask, like every state file.
"""
from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from ..config import ensure_state_dir, fix_state_file_mode, open_state_file
from ..log import get_logger

log = get_logger(__name__)

AUDIT_NAME = 'audit.jsonl'
_encode = msgspec.json.Encoder().encode


class AuditLog:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        ensure_state_dir(self.path.parent)

    def record(self, action: str, by: str, **fields: Any) -> dict[str, Any]:
        """Append one record and log it as ``audit.<action>``; returns it."""
        now = datetime.now(UTC)
        entry = {
            'ts': now.isoformat(timespec='microseconds'),
            'action': action,
            'by': by,
            **fields,
        }
        line = _encode(entry) + b'\n'
        fd, created = open_state_file(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            if not created:
                fix_state_file_mode(fd, self.path)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info(f'audit.{action}', by=by, **fields)
        return entry


def read_audit(path: Path | str) -> list[dict[str, Any]]:
    """Every whole record (a torn last line from a crash is skipped)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in raw.splitlines():
        try:
            out.append(msgspec.json.decode(line))
        except msgspec.DecodeError:
            continue
    return out
