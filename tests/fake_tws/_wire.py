"""TWS socket framing and field formatting, written independently of ib_async.

The fake must never reuse the client's own encoder: the real client's
decoder is what validates the bytes we put on the wire.
"""
from __future__ import annotations

import math
import struct

API_PREFIX = b'API\0'
UNSET_DOUBLE = 1.7976931348623157e308  # sys.float_info.max, as TWS sends it
UNSET_INTEGER = 2**31 - 1
MIN_CLIENT_VERSION = 157
MAX_SERVER_VERSION = 178  # the highest text (non-protobuf) version ib_async 2.1 speaks


class WireError(ValueError):
    """Bytes or fields that do not follow the TWS protocol."""


def frame(*fields: object) -> bytes:
    """One length-prefixed message: each field as text ending in NUL."""
    payload = ''.join(f'{fmt(f)}\0' for f in fields).encode()
    return struct.pack('>I', len(payload)) + payload


def fmt(value: object) -> str:
    """Render one field the way TWS does (bools as 0/1, unset as empty)."""
    match value:
        case None:
            return ''
        case bool():
            return '1' if value else '0'
        case int():
            return '' if value == UNSET_INTEGER else str(value)
        case float():
            return fmt_float(value)
        case _:
            return str(value)


def fmt_float(value: float) -> str:
    """Floats without a needless `.0`: quantities read `10`, prices `101.25`."""
    if value == UNSET_DOUBLE:
        return ''
    if math.isinf(value):
        return 'Infinite'
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(round(value, 10))


class FrameReader:
    """Incremental splitter for a byte stream into field lists.

    The first bytes a client sends are ``API\\0`` (not length-prefixed);
    ``expect_prefix`` makes the reader consume and check them.
    """

    def __init__(self, expect_prefix: bool = True) -> None:
        self._buf = b''
        self._need_prefix = expect_prefix

    def feed(self, data: bytes) -> list[list[str]]:
        self._buf += data
        out: list[list[str]] = []
        if self._need_prefix:
            if len(self._buf) < len(API_PREFIX):
                return out
            if not self._buf.startswith(API_PREFIX):
                raise WireError(
                    f'handshake: expected the bytes {API_PREFIX!r} first, '
                    f'found {self._buf[:4]!r}; is this a TWS API client?'
                )
            self._buf = self._buf[len(API_PREFIX):]
            self._need_prefix = False
        while len(self._buf) >= 4:
            (size,) = struct.unpack('>I', self._buf[:4])
            if len(self._buf) < 4 + size:
                break
            payload = self._buf[4:4 + size]
            self._buf = self._buf[4 + size:]
            fields = payload.decode(errors='backslashreplace').split('\0')
            if fields and fields[-1] == '':
                fields.pop()
            out.append(fields)
        return out


def parse_version_range(fields: list[str]) -> tuple[int, int]:
    """The client's ``v<min>..<max>[ options]`` line as (min, max)."""
    text = fields[0] if fields else ''
    head = text.split(' ', 1)[0]
    if not head.startswith('v') or '..' not in head:
        raise WireError(
            f"handshake: expected a version range like 'v157..178', found {text!r}"
        )
    lo, _, hi = head[1:].partition('..')
    try:
        return int(lo), int(hi)
    except ValueError as err:
        raise WireError(
            f"handshake: version range {text!r} must hold two integers"
        ) from err


class Cursor:
    """Reads request fields in order; the parsers mirror the client's encoder
    field by field and check that nothing is left over."""

    def __init__(self, fields: list[str], what: str) -> None:
        self.fields = fields
        self.pos = 1  # fields[0] is the message id
        self.what = what

    def s(self) -> str:
        if self.pos >= len(self.fields):
            raise WireError(
                f'{self.what}: message ended after {len(self.fields)} fields, '
                f'expected more; fields={self.fields!r}'
            )
        v = self.fields[self.pos]
        self.pos += 1
        return v

    def i(self, default: int = 0) -> int:
        v = self.s()
        if v == '':
            return default
        try:
            return int(v)
        except ValueError as err:
            raise WireError(
                f'{self.what}: field #{self.pos - 1} should be an integer, found {v!r}'
            ) from err

    def f(self, default: float = UNSET_DOUBLE) -> float:
        v = self.s()
        if v == '':
            return default
        if v == 'Infinite':
            return math.inf
        try:
            return float(v)
        except ValueError as err:
            raise WireError(
                f'{self.what}: field #{self.pos - 1} should be a number, found {v!r}'
            ) from err

    def b(self) -> bool:
        v = self.s()
        if v in ('', '0', 'False', 'false'):
            return False
        if v in ('1', 'True', 'true'):
            return True
        raise WireError(f'{self.what}: field #{self.pos - 1} should be 0/1, found {v!r}')

    def skip(self, n: int) -> None:
        for _ in range(n):
            self.s()

    def done(self) -> None:
        if self.pos != len(self.fields):
            raise WireError(
                f'{self.what}: {len(self.fields) - self.pos} unexpected trailing '
                f'fields {self.fields[self.pos:]!r}; the client and the fake '
                'disagree on the layout (server version gates?)'
            )
