"""OHLC buffers in POSIX shared memory, read zero-copy by other actors.

One writer (datad / samplerd) owns a segment; any number of readers attach
read-only and see the writer's rows through a numpy view of the same pages.

Segment layout: a 64-byte header (magic, ``first``, ``stop``, capacity) then
``capacity`` rows of the structured dtype. The valid rows are
``rows[first:stop]``; the writer moves ``stop`` on ``push`` and ``first`` on
``prepend``, always writing the rows *before* publishing the new bound, so a
reader never sees an unwritten row. The window starts in the middle of the
capacity so history can be prepended after live rows began to arrive.

Why not ``multiprocessing.shared_memory.SharedMemory``: on Python 3.11 it
registers every segment with the ``resource_tracker`` even for a reader that
only attaches; that tracker then unlinks the segment (and warns about a "leak")
when the reader exits, yanking it from under the owner. We call the same
``_posixshmem.shm_open``/``shm_unlink`` primitives it uses and ``mmap`` the fd
ourselves, so no tracker process exists and only the owner ever unlinks.
Leaks from a SIGKILLed owner are found by name instead: every segment is called
``piker_<owner pid>_<key>`` and :func:`sweep_stale_segments` unlinks those whose
owner is gone.
"""
from __future__ import annotations

import _posixshmem
import contextlib
import mmap
import os
import re
import weakref
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np

from piker.log import get_logger
from piker.types import Struct

log = get_logger(__name__)

ohlc_dtype = np.dtype([
    ('index', 'i8'),
    ('time', 'i8'),  # epoch secs of the bar's open
    ('open', 'f8'),
    ('high', 'f8'),
    ('low', 'f8'),
    ('close', 'f8'),
    ('volume', 'f8'),
])

SEGMENT_PREFIX = 'piker_'
_SHM_DIR = Path('/dev/shm')
_MAGIC = 0x7069_6B65_725F_7368  # b'piker_sh'
_header_dtype = np.dtype([
    ('magic', 'u8'),
    ('first', 'i8'),
    ('stop', 'i8'),
    ('capacity', 'i8'),
])
_HEADER_BYTES = 64
_KEY_BAD_CHARS = re.compile(r'[^A-Za-z0-9.\-_]')


class ShmError(RuntimeError):
    """Misuse of a shm buffer: overflow, write on a reader, bad token or rows."""


class ShmToken(Struct, frozen=True):
    """Everything a reader needs to attach; plain builtins on the wire."""

    shm_name: str
    dtype_descr: tuple[tuple[str, str], ...]
    size: int  # capacity in rows

    @property
    def dtype(self) -> np.dtype:
        return np.dtype([tuple(field) for field in self.dtype_descr])

    def to_dict(self) -> dict:
        return {
            'shm_name': self.shm_name,
            'dtype_descr': [list(field) for field in self.dtype_descr],
            'size': self.size,
        }

    @classmethod
    def from_dict(cls, data: dict | ShmToken) -> ShmToken:
        if isinstance(data, ShmToken):
            return data
        return msgspec.convert(data, cls)


def _names(dtype: np.dtype) -> tuple[str, ...]:
    if dtype.names is None:
        raise ShmError(f'expected a structured numpy dtype, found {dtype!r}')
    return dtype.names


def _descr(dtype: np.dtype) -> tuple[tuple[str, str], ...]:
    return tuple((name, dtype[name].str) for name in _names(dtype))


def _segment_name(key: str, pid: int) -> str:
    clean = _KEY_BAD_CHARS.sub('-', key)
    if not clean:
        raise ShmError(f'shm key {key!r} is empty: pass a name such as an fqme')
    return f'{SEGMENT_PREFIX}{pid}_{clean}'


def owner_pid(segment_name: str) -> int | None:
    """The owner pid encoded in a ``piker_<pid>_<key>`` name, else None."""
    match = re.fullmatch(rf'{SEGMENT_PREFIX}(\d+)_.+', segment_name)
    return int(match.group(1)) if match else None


def _unlink(name: str) -> bool:
    try:
        _posixshmem.shm_unlink('/' + name)
    except FileNotFoundError:
        return False
    return True


class ShmArray:
    """A window of valid rows in a shared segment; see the module docstring.

    Build with :meth:`create` (owner, writer) or :meth:`attach` (reader).
    If the dtype has an ``index`` field the buffer stamps it with the row's
    absolute position in the segment, so indices stay stable across prepends.
    """

    def __init__(
        self,
        name: str,
        buf: mmap.mmap,
        dtype: np.dtype,
        capacity: int,
        *,
        owner: bool,
        readonly: bool,
    ) -> None:
        self._name = name
        self._mmap = buf
        self._dtype = dtype
        self._capacity = capacity
        self._owner = owner
        self._readonly = readonly
        self._closed = False
        self._header = np.frombuffer(buf, dtype=_header_dtype, count=1, offset=0)
        self._rows = np.frombuffer(buf, dtype=dtype, count=capacity, offset=_HEADER_BYTES)
        self._has_index = 'index' in (dtype.names or ())
        # Safety net: an owner dropped without close() still unlinks at GC/exit.
        self._finalizer = weakref.finalize(self, _unlink, name) if owner else None

    # -- construction -------------------------------------------------------

    @classmethod
    def create(
        cls,
        key: str,
        capacity: int,
        dtype: np.dtype = ohlc_dtype,
        *,
        start: int | None = None,
    ) -> ShmArray:
        """Create and own a new segment named after ``key`` and this pid.

        ``start`` is where the (empty) valid window begins; by default the
        middle, leaving ``capacity // 2`` rows for prepended history.
        """
        dtype = np.dtype(dtype)
        _descr(dtype)
        if capacity < 1:
            raise ShmError(f'shm capacity must be >= 1 row, found {capacity}')
        start = capacity // 2 if start is None else start
        if not 0 <= start <= capacity:
            raise ShmError(f'shm start row must be within 0..{capacity}, found {start}')
        name = _segment_name(key, os.getpid())
        nbytes = _HEADER_BYTES + capacity * dtype.itemsize
        try:
            fd = _posixshmem.shm_open('/' + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        except FileExistsError:
            raise ShmError(
                f'shm segment {name!r} already exists: this process already owns a buffer '
                f'for key {key!r}; close/destroy it first or pick another key'
            ) from None
        try:
            os.ftruncate(fd, nbytes)
            buf = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            _unlink(name)
            raise
        finally:
            os.close(fd)
        shm = cls(name, buf, dtype, capacity, owner=True, readonly=False)
        shm._header[0] = (_MAGIC, start, start, capacity)
        log.debug('shm.created', shm_name=name, capacity=capacity, nbytes=nbytes)
        return shm

    @classmethod
    def attach(cls, token: ShmToken | dict, readonly: bool = True) -> ShmArray:
        """Map an existing segment; readers get ``writeable=False`` views."""
        token = ShmToken.from_dict(token)
        dtype = token.dtype
        nbytes = _HEADER_BYTES + token.size * dtype.itemsize
        flags = os.O_RDONLY if readonly else os.O_RDWR
        try:
            fd = _posixshmem.shm_open('/' + token.shm_name, flags, mode=0o600)
        except FileNotFoundError:
            raise ShmError(
                f'shm segment {token.shm_name!r} does not exist: its owner closed it or died; '
                'ask the feed for a fresh token'
            ) from None
        try:
            found = os.fstat(fd).st_size
            if found < nbytes:
                raise ShmError(
                    f'shm segment {token.shm_name!r} is {found} bytes, expected >= {nbytes} '
                    f'for {token.size} rows of {dtype.itemsize} bytes: the token does not match'
                )
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            buf = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        shm = cls(token.shm_name, buf, dtype, token.size, owner=False, readonly=readonly)
        header = shm._header[0]
        if header['magic'] != _MAGIC or header['capacity'] != token.size:
            shm.close()
            raise ShmError(
                f'shm segment {token.shm_name!r} is not a piker buffer of {token.size} rows '
                f'(magic {int(header["magic"]):#x}, capacity {int(header["capacity"])})'
            )
        return shm

    # -- reading --------------------------------------------------------------

    @property
    def token(self) -> ShmToken:
        return ShmToken(shm_name=self._name, dtype_descr=_descr(self._dtype), size=self._capacity)

    @property
    def name(self) -> str:
        return self._name

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def span(self) -> tuple[int, int]:
        """``(first, stop)`` absolute row positions of the valid window."""
        if self._closed:
            raise ShmError(f'shm buffer {self._name!r} is closed: attach again to read it')
        header = self._header[0]
        return int(header['first']), int(header['stop'])

    def __len__(self) -> int:
        first, stop = self.span
        return stop - first

    @property
    def array(self) -> np.ndarray:
        """Zero-copy view of the valid rows (read-only for readers)."""
        first, stop = self.span
        return self._rows[first:stop]

    def last(self, n: int = 1) -> np.ndarray:
        """Zero-copy view of the last ``n`` valid rows (fewer if not that many)."""
        if n < 1:
            raise ShmError(f'last(n) needs n >= 1, found {n}')
        first, stop = self.span
        return self._rows[max(first, stop - n):stop]

    # -- writing --------------------------------------------------------------

    def _check_writer(self, op: str) -> None:
        if self._readonly:
            raise ShmError(
                f'{op}() on read-only shm buffer {self._name!r}: only the owner writes; '
                'readers attach with readonly=True'
            )

    def _as_rows(self, rows: np.ndarray | np.void, op: str) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(rows))
        if rows.dtype != self._dtype:
            raise ShmError(
                f'{op}() rows have dtype {rows.dtype}, expected the buffer dtype {self._dtype}'
            )
        return rows

    def push(self, rows: np.ndarray | np.void) -> int:
        """Append rows after the last valid row; returns the new ``stop``."""
        self._check_writer('push')
        rows = self._as_rows(rows, 'push')
        first, stop = self.span
        new_stop = stop + len(rows)
        if new_stop > self._capacity:
            raise ShmError(
                f'shm buffer {self._name!r} is full: push of {len(rows)} rows needs '
                f'{new_stop - self._capacity} more rows after position {stop}; '
                f'capacity is {self._capacity} (raise it when creating the buffer)'
            )
        self._rows[stop:new_stop] = rows
        if self._has_index:
            self._rows['index'][stop:new_stop] = np.arange(stop, new_stop)
        self._header['stop'] = new_stop  # publish after the rows are written
        return new_stop

    def prepend(self, rows: np.ndarray) -> int:
        """Insert (history) rows before the first valid row; returns the new ``first``."""
        self._check_writer('prepend')
        rows = self._as_rows(rows, 'prepend')
        first, _ = self.span
        new_first = first - len(rows)
        if new_first < 0:
            raise ShmError(
                f'shm buffer {self._name!r} has room for {first} rows before its first row, '
                f'prepend got {len(rows)}; create it with a larger capacity or start position'
            )
        self._rows[new_first:first] = rows
        if self._has_index:
            self._rows['index'][new_first:first] = np.arange(new_first, first)
        self._header['first'] = new_first
        return new_first

    def update_last(self, **fields: float | int) -> None:
        """Overwrite fields of the last valid row in place (the live bar)."""
        self._check_writer('update_last')
        first, stop = self.span
        if stop == first:
            raise ShmError(f'update_last() on empty shm buffer {self._name!r}: push a row first')
        names = _names(self._dtype)
        unknown = set(fields) - set(names)
        if unknown:
            raise ShmError(
                f'update_last() got unknown fields {sorted(unknown)}, '
                f'expected some of {list(names)}'
            )
        row = self._rows[stop - 1:stop]
        for field, value in fields.items():
            row[field] = value

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Unmap; the owner also unlinks (readers never do)."""
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
            if _unlink(self._name):
                log.debug('shm.unlinked', shm_name=self._name)
        del self._header, self._rows  # drop our own exports of the mapping
        try:
            self._mmap.close()
        except BufferError:
            # Views handed out (``array``) still reference the pages; the mapping
            # goes away with the last of them. The name is already gone.
            pass

    def destroy(self) -> None:
        """Unlink the segment and unmap; only the owner may."""
        if not self._owner:
            raise ShmError(
                f'destroy() on shm buffer {self._name!r} by a reader: only its owner '
                f'(pid {owner_pid(self._name)}) unlinks it; readers call close()'
            )
        self.close()

    def __enter__(self) -> ShmArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = 'owner' if self._owner else ('reader' if self._readonly else 'writer')
        if self._closed:
            return f'<ShmArray {self._name} {role} closed>'
        first, stop = self.span
        return f'<ShmArray {self._name} {role} rows {first}:{stop} of {self._capacity}>'


@contextlib.contextmanager
def open_shm_array(
    key: str,
    capacity: int,
    dtype: np.dtype = ohlc_dtype,
    *,
    start: int | None = None,
) -> Iterator[ShmArray]:
    """Own a buffer for the block; it is unlinked on any exit, incl. cancellation.

    SIGTERM reaches this ``finally`` only when the process turns the signal
    into cancellation (pikerd's root does; a bare default handler kills the
    process outright, which :func:`sweep_stale_segments` then cleans up).
    """
    shm = ShmArray.create(key, capacity, dtype, start=start)
    try:
        yield shm
    finally:
        shm.destroy()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def sweep_stale_segments(shm_dir: Path = _SHM_DIR) -> list[str]:
    """Unlink ``piker_<pid>_*`` segments whose owner pid is dead; returns their names.

    Run at datad startup. A recycled pid keeps its segment alive until the
    next sweep after that process exits.
    """
    swept: list[str] = []
    try:
        entries = sorted(p.name for p in shm_dir.iterdir())
    except FileNotFoundError:
        return swept
    for name in entries:
        pid = owner_pid(name)
        if pid is None or _pid_alive(pid):
            continue
        if _unlink(name):
            swept.append(name)
            log.info('shm.swept', shm_name=name, owner_pid=pid)
    return swept
