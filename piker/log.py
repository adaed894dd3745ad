"""One structured-logging pipeline per process, the same in every actor.

Why this exists: the bot runs as a tree of processes sharing one stdout (the
journal under systemd). Every record, ours or a third party's (trio, tractor,
ib_async, asyncio, apscheduler, ``warnings``), must come out exactly once, as one
JSON line written with a single ``write()`` so that lines from different actors
never interleave, small enough for journald, and never carrying local variables
(they hold secrets). On a TTY the same records are rendered for humans.

Nothing reaches the journal bare: uncaught exceptions (process and thread),
unraisable ones, records no handler takes and, in tractor children, print()
all become records (the hooks installed by :func:`setup_logging`), and
faulthandler's dumps are reported by the next process as one record. Repeated
identical warnings and errors are summarised (:class:`RateLimiter`;
``$PIKER_LOG_BURST`` per ``$PIKER_LOG_WINDOW_SECS``, default 10 per 10 s).

Usage::

    from piker.log import get_logger, setup_logging
    log = get_logger(__name__)
    setup_logging('info')              # once per actor; safe to call again
    log.info('order.ack', oid=oid, reqid=reqid)
"""
from __future__ import annotations

import asyncio
import atexit
import faulthandler
import io
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import msgspec
import structlog
from structlog.contextvars import bind_contextvars as bind_contextvars
from structlog.contextvars import bound_contextvars as bound_contextvars
from structlog.contextvars import clear_contextvars as clear_contextvars
from structlog.contextvars import unbind_contextvars as unbind_contextvars
from structlog.stdlib import ProcessorFormatter

# -- MultiError deprecation noise (tractor 0.1.0a5 imports trio.MultiError) ----
# Children are fresh interpreters: only the environment reaches them at import.
_WARNING_FILTERS = 'ignore:trio.MultiError:FutureWarning,ignore:MultiError.:FutureWarning'


def _ensure_warning_env() -> None:
    current = os.environ.get('PYTHONWARNINGS', '')
    if _WARNING_FILTERS not in current:
        # later entries win, so appending keeps an operator's own filters intact
        os.environ['PYTHONWARNINGS'] = f'{current},{_WARNING_FILTERS}' if current else _WARNING_FILTERS


_ensure_warning_env()
warnings.filterwarnings('ignore', message=r'(trio\.)?MultiError', category=FutureWarning)

LEVELS: dict[str, int] = {
    'debug': logging.DEBUG,
    'info': logging.INFO,
    'warning': logging.WARNING,
    'error': logging.ERROR,
    'critical': logging.CRITICAL,
}
MAX_RECORD_BYTES = 16 * 1024
MAX_FIELD_CHARS = 2048
MAX_TRACEBACK_FRAMES = 24
DEFAULT_ACTOR = 'piker'
_HEAD_KEYS = ('timestamp', 'level', 'actor', 'logger', 'event', 'pid')

_actor_name: str | None = None
_level_no: int = logging.INFO
_handler: logging.Handler | None = None


# -- processors ----------------------------------------------------------------

def _current_actor_name() -> str:
    if _actor_name:
        return _actor_name
    tractor = sys.modules.get('tractor')  # never import it just to log
    if tractor is not None:
        try:
            return tractor.current_actor().name
        except Exception:
            pass
    return DEFAULT_ACTOR


def _add_actor_pid(_logger: Any, _name: str, ed: dict[str, Any]) -> dict[str, Any]:
    """Actor identity is a process property: it overrides tractor's record extra."""
    ed['actor'] = _current_actor_name()
    ed['pid'] = os.getpid()
    return ed


def _foreign_stack(_logger: Any, _name: str, ed: dict[str, Any]) -> dict[str, Any]:
    # a stdlib record's stack_info is already text: keep it, don't re-capture
    stack = ed.pop('stack_info', None)
    if isinstance(stack, str):
        ed['stack'] = stack
    return ed


def _merge_contextvars(logger: Any, name: str, ed: dict[str, Any]) -> Any:
    # a record the pipeline makes itself (a summary) is no task's: it must
    # not borrow the context of whichever task's record brought it out
    if ed.pop('_piker_own', False):
        return ed
    return structlog.contextvars.merge_contextvars(logger, name, ed)


_SHARED: list[Any] = [
    _merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt='iso', utc=True, key='timestamp'),
    _add_actor_pid,
]
_FOREIGN_PRE_CHAIN: list[Any] = [
    structlog.stdlib.ExtraAdder(),  # tractor's `task`, stdlib `extra={...}`
    _foreign_stack,
    *_SHARED,
]

_exception_dicts = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(
        show_locals=False, max_frames=MAX_TRACEBACK_FRAMES, use_rich=False,
    )
)


def _enc_hook(obj: Any) -> str:
    return repr(obj)


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def _encode(ed: Mapping[str, Any]) -> bytes:
    try:
        return _encoder.encode(ed)
    except (TypeError, ValueError, msgspec.EncodeError):
        # e.g. non-str keys msgspec refuses: fall back to stringified keys
        return _encoder.encode({str(k): v for k, v in ed.items()})


def _clip(value: Any, max_chars: int) -> Any:
    if isinstance(value, str):
        return value if len(value) <= max_chars else value[:max_chars] + '…'
    if isinstance(value, bool | int | float) or value is None:
        return value
    raw = _encode({'v': value})
    if len(raw) <= max_chars:
        return value
    return raw[5:5 + max_chars].decode('utf-8', 'replace') + '…'


def _trim_exception(exc: Any, depth: int = 0) -> Any:
    if not isinstance(exc, dict):
        return _clip(exc, MAX_FIELD_CHARS)
    out = dict(exc)
    out['exc_value'] = _clip(out.get('exc_value', ''), MAX_FIELD_CHARS)
    frames = out.get('frames')
    if isinstance(frames, list) and len(frames) > 10:
        omitted = len(frames) - 10
        out['frames'] = [*frames[:3], {'omitted_frames': omitted}, *frames[-7:]]
    subs = out.get('exceptions')
    if isinstance(subs, list) and subs:
        out['exceptions'] = [_trim_exception(s, depth + 1) for s in subs[:3]] if depth < 2 else []
    return out


def _shrink(ed: dict[str, Any], max_bytes: int) -> bytes:
    """Fit one record under ``max_bytes``: clip long fields and tracebacks first,
    then fall back to the head fields plus the names of what was dropped."""
    out: dict[str, Any] = {}
    for key, value in ed.items():
        if key == 'exception' and isinstance(value, list):
            out[key] = [_trim_exception(e) for e in value[:3]]
        else:
            out[key] = _clip(value, MAX_FIELD_CHARS)
    out['truncated'] = True
    raw = _encode(out)
    if len(raw) <= max_bytes:
        return raw
    minimal = {k: _clip(ed[k], 256) for k in _HEAD_KEYS if k in ed}
    minimal['event'] = _clip(ed.get('event', ''), 1024)
    exc = ed.get('exception')
    if isinstance(exc, list) and exc and isinstance(exc[0], dict):
        minimal['exception'] = [{
            'exc_type': _clip(exc[0].get('exc_type', ''), 256),
            'exc_value': _clip(exc[0].get('exc_value', ''), 512),
        }]
    minimal['truncated'] = True
    minimal['dropped'] = [_clip(k, 64) for k in ed if k not in minimal][:32]
    return _encode(minimal)


class _JsonLineRenderer:
    """Render to compact JSON with the head fields first, capped in size."""

    def __init__(self, max_bytes: int = MAX_RECORD_BYTES) -> None:
        self.max_bytes = max_bytes

    def __call__(self, _logger: Any, _name: str, ed: dict[str, Any]) -> str:
        ordered = {k: ed.pop(k) for k in _HEAD_KEYS if k in ed}
        ordered.update(ed)
        raw = _encode(ordered)
        if len(raw) > self.max_bytes:
            raw = _shrink(ordered, self.max_bytes)
        return raw.decode('utf-8', 'replace')


class _CappedConsoleRenderer:
    def __init__(self, colors: bool, max_bytes: int = MAX_RECORD_BYTES) -> None:
        self.max_bytes = max_bytes
        self.colors = colors
        self._inner = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback,
        )

    def __call__(self, logger: Any, name: str, ed: dict[str, Any]) -> str:
        text = self._inner(logger, name, ed)
        if len(text) <= self.max_bytes:
            return text
        return text[:self.max_bytes] + ('\x1b[0m' if self.colors else '') + ' …[truncated]'


# -- the one stdout handler ------------------------------------------------------

def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stdout_is_journal(fd: int = 1, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``fd`` is the journald stream systemd connected (``$JOURNAL_STREAM``)."""
    value = (os.environ if environ is None else environ).get('JOURNAL_STREAM', '')
    dev, sep, ino = value.partition(':')
    if not sep:
        return False
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


# -- repeated records: the first few pass, the rest become one summary --------

DEFAULT_BURST = 10
DEFAULT_WINDOW_SECS = 10.0
_MAX_KEYS = 4096
_MAX_KEY_CHARS = 200
SUPPRESSED_EVENT = 'log.suppressed'


def _record_event(record: logging.LogRecord) -> str:
    msg = record.msg
    if isinstance(msg, dict):  # a structlog record (wrap_for_formatter)
        msg = msg.get('event', '')
    return str(msg)[:_MAX_KEY_CHARS]


class _Window:
    __slots__ = ('start', 'passed', 'suppressed')

    def __init__(self, start: float) -> None:
        self.start = start
        self.passed = 0
        self.suppressed = 0


class RateLimiter:
    """Per (logger, event, level) key, records at WARNING and above: the first
    ``burst`` in a ``window_secs`` window pass, the rest are only counted.

    A logging filter gets no timer in a trio actor, so a window's summary
    (``log.suppressed``, at the level it summarises: errors stay errors)
    comes out with the first record of any key after the window closed, or
    at process exit (:meth:`drain`). Records below WARNING always pass (the
    info trail is the audit trail). ``clock`` is injectable for tests."""

    def __init__(self, burst: int = DEFAULT_BURST, window_secs: float = DEFAULT_WINDOW_SECS,
                 clock: Any = time.monotonic) -> None:
        self.burst = burst
        self.window_secs = window_secs
        self.clock = clock
        self._windows: dict[tuple[str, str, int], _Window] = {}
        self._next_due = float('inf')
        self._lock = threading.RLock()

    def admit(self, record: logging.LogRecord) -> tuple[bool, list[logging.LogRecord]]:
        """(whether ``record`` passes, summaries due before it)."""
        now = self.clock()
        with self._lock:
            due = self._due(now) if now >= self._next_due else []
            if record.levelno < logging.WARNING or getattr(record, '_piker_own', False):
                return True, due
            key = (record.name, _record_event(record), record.levelno)
            w = self._windows.get(key)
            if w is None or now - w.start >= self.window_secs:
                if len(self._windows) >= _MAX_KEYS:
                    due += self._evict(now)
                w = self._windows[key] = _Window(now)
            if w.passed < self.burst:
                w.passed += 1
                return True, due
            w.suppressed += 1
            self._next_due = min(self._next_due, w.start + self.window_secs)
            return False, due

    def drain(self) -> list[logging.LogRecord]:
        """Summaries of every window with something suppressed, closed or not."""
        with self._lock:
            out = [self._summary(k, w) for k, w in self._windows.items() if w.suppressed]
            self._windows.clear()
            self._next_due = float('inf')
            return out

    def _due(self, now: float) -> list[logging.LogRecord]:
        out, next_due = [], float('inf')
        for key, w in list(self._windows.items()):
            if now - w.start >= self.window_secs:
                del self._windows[key]
                if w.suppressed:
                    out.append(self._summary(key, w))
            elif w.suppressed:
                next_due = min(next_due, w.start + self.window_secs)
        self._next_due = next_due
        return out

    def _evict(self, now: float) -> list[logging.LogRecord]:
        out = self._due(now)
        while len(self._windows) >= _MAX_KEYS:  # all still open: the oldest go
            key = next(iter(self._windows))
            w = self._windows.pop(key)
            if w.suppressed:
                out.append(self._summary(key, w))
        return out

    def _summary(self, key: tuple[str, str, int], w: _Window) -> logging.LogRecord:
        name, event, levelno = key
        secs = self.window_secs
        return _own_record(name, levelno, SUPPRESSED_EVENT, {
            'of': event, 'count': w.suppressed, 'passed': w.passed,
            'window_secs': int(secs) if float(secs).is_integer() else secs,
        })


def _own_record(name: str, levelno: int, event: str, fields: dict[str, Any],
                exc_info: Any = None) -> logging.LogRecord:
    """A record the pipeline itself makes; ``fields`` become JSON keys."""
    record = logging.LogRecord(name, levelno, __file__, 0, event, (), exc_info)
    record.__dict__.update(fields)
    record._piker_own = True
    return record


def _env_number(name: str, default: float, kind: type = float) -> Any:
    raw = os.environ.get(name, '').strip()
    if not raw:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f'{name}: expected a positive number, found {raw!r}') from None
    if value <= 0:
        raise ValueError(f'{name}: expected a positive number, found {raw!r}')
    return value


_limiter = RateLimiter()


class _LineHandler(logging.Handler):
    """Writes each formatted record plus newline with one ``os.write()`` on the
    stdout fd (a TextIOWrapper may split a record across buffer flushes).
    Repeated records go through the process's :class:`RateLimiter` first."""

    def __init__(self, fd: int | None, journal: bool, limit: bool = True) -> None:
        super().__init__()
        self.fd = fd
        self.journal = journal
        self.limit = limit

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        if not self.filter(record):
            return False
        passes, due = _limiter.admit(record) if self.limit else (True, [])
        self.acquire()
        try:
            for summary in due:
                self.emit(summary)
            if passes:
                self.emit(record)
        finally:
            self.release()
        return passes

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            self._write(line, record.levelno)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _write(self, line: str, levelno: int) -> None:
        if self.journal:
            line = f'<{_syslog_priority(levelno)}>{line}'
        if self.fd is None:
            sys.stdout.write(line + '\n')
            sys.stdout.flush()
        else:
            _write_all(self.fd, (line + '\n').encode('utf-8', 'backslashreplace'))

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (stdlib name)
        """A record that cannot be formatted becomes a small JSON record
        naming why, instead of logging's ``--- Logging error ---`` text."""
        err = sys.exc_info()[1]
        try:
            try:
                event = _clip(str(record.getMessage()), 512)
            except Exception:
                event = _clip(repr(record.msg), 512)
            line = _encode({
                'timestamp': _utc_now(), 'level': 'error', 'actor': _current_actor_name(),
                'logger': 'piker.log', 'event': 'log.emit_failed', 'pid': os.getpid(),
                'of_logger': record.name, 'of': event,
                'error': _clip(f'{type(err).__name__}: {err}', 512),
            }).decode()
            self._write(line, logging.ERROR)
        except Exception:
            pass


def _utc_now() -> str:
    from datetime import UTC, datetime
    return datetime.now(UTC).isoformat().replace('+00:00', 'Z')


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select
            select.select([], [fd], [], 1.0)
            continue
        view = view[n:]


# tractor 0.1.0a5 logs these for ordinary cancellation and teardown (wart 12);
# the condition they describe reaches our code as an exception where it matters
_TRACTOR_BENIGN = (
    'Stream was already destroyed',
    'Cancelling existing result waiter task',
    'Ignoring msg from',
    'Discarding stream delivered',
    'No actor could be found @',
)
_CANCEL_MARKERS = ('ContextCancelled', 'trio.Cancelled', 'Cancelled\n', 'KeyboardInterrupt')


# A peer that connects and leaves before sending its uid: tractor 0.1.0a5
# logs it at WARNING from the listener. Nothing was registered or run for that
# connection (``_stream_handler`` returns right there), and a real actor that
# failed mid-handshake fails on its own side too. The one such peer we cannot
# change is tractor's own ``open_root_actor``, which connects and bails to see
# whether a registry exists (once per root that attaches, i.e. per CLI call):
# demoted to debug. Our own probes complete the handshake (service._runtime).
_HANDSHAKE_ABORTED = re.compile(r'^Channel <Channel [^\n]*> failed to handshake$')


class _TractorNoiseFilter(logging.Filter):
    """Drops tractor's benign cancellation/teardown chatter unless at debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith('tractor'):
            return True
        try:
            msg = record.getMessage()
        except Exception:
            return True
        if record.levelno == logging.WARNING and _HANDSHAKE_ABORTED.match(msg):
            record.levelno, record.levelname = logging.DEBUG, 'DEBUG'  # see above
            return _level_no <= logging.DEBUG
        if _level_no <= logging.DEBUG:
            return True
        if msg.startswith(_TRACTOR_BENIGN) or msg.endswith('consumer is already closed'):
            return False
        if msg.startswith(('Remote context error', 'Actor crashed', 'Cancelled?')) and any(
            m in msg for m in _CANCEL_MARKERS
        ):
            return False
        return True


class _TractorConsoleGuard(logging.Handler):
    """Sits on the ``tractor`` logger and emits nothing. tractor's
    ``get_console_log()`` (run by ``open_root_actor`` and at child boot) adds its
    colorlog stderr handler only if no handler's ``stream`` is ``sys.stderr``;
    this one claims that slot, so records just propagate to our root handler."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        pass


# -- every other way a process prints -------------------------------------------
# Python and the libraries under us print straight to stderr: an uncaught
# exception (sys.excepthook; what ends a tractor child whose trio.run raised),
# one on a thread, an "Exception ignored in" (unraisable), a record no handler
# takes (logging.lastResort), and print(). Each becomes a record here.

_crash_log = logging.getLogger('piker.crash')


def _exc_info(exc_type: type[BaseException] | None, exc: BaseException | None,
              tb: TracebackType | None) -> Any:
    if exc is None:
        return None
    return (exc_type or type(exc), exc, tb)


def _excepthook(exc_type: type[BaseException], exc: BaseException,
                tb: TracebackType | None) -> None:
    try:
        if issubclass(exc_type, KeyboardInterrupt):
            _crash_log.warning('process.interrupted', exc_info=(exc_type, exc, tb))
        else:
            _crash_log.critical('process.uncaught', exc_info=(exc_type, exc, tb))
    except Exception:
        sys.__excepthook__(exc_type, exc, tb)


def _thread_excepthook(args: Any) -> None:
    if args.exc_type is SystemExit:
        return  # what the default hook does too
    try:
        thread = getattr(args.thread, 'name', None)
        _crash_log.error('thread.uncaught', extra={'thread_name': thread},
                         exc_info=_exc_info(args.exc_type, args.exc_value, args.exc_traceback))
    except Exception:
        threading.__excepthook__(args)


def _unraisablehook(unraisable: Any) -> None:
    try:
        try:
            obj = _clip(repr(unraisable.object), 256) if unraisable.object is not None else None
        except Exception:
            obj = '<unrepresentable>'
        logging.getLogger('py.unraisable').warning(
            'unraisable', extra={'context': unraisable.err_msg or 'Exception ignored in',
                                 'object': obj},
            exc_info=_exc_info(unraisable.exc_type, unraisable.exc_value,
                               unraisable.exc_traceback),
        )
    except Exception:
        sys.__unraisablehook__(unraisable)


def _install_hooks() -> None:
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisablehook


class _LineToLog(io.TextIOBase):
    """A stand-in ``sys.stdout``/``sys.stderr`` for a tractor child (nothing
    there is for humans): each complete line written becomes one record (a
    strategy's ``print()``, a library's ``traceback.print_exc()``)."""

    def __init__(self, original: TextIO, name: str, level: int) -> None:
        super().__init__()
        self.original = original
        self._log = logging.getLogger(name)
        self._level = level
        self._buf = ''
        self._busy = threading.local()

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f'write() argument must be str, not {type(text).__name__}')
        self._buf += text
        if '\n' in self._buf:
            *lines, self._buf = self._buf.split('\n')
            for line in lines:
                self._emit(line)
        elif len(self._buf) > MAX_FIELD_CHARS:
            self._emit(self._buf)
            self._buf = ''
        return len(text)

    def _emit(self, line: str) -> None:
        line = line.rstrip('\r')
        if not line.strip():
            return
        if getattr(self._busy, 'on', False):  # logging itself wrote here: no loop
            return
        self._busy.on = True
        try:
            self._log.log(self._level, _clip(line, MAX_FIELD_CHARS))
        finally:
            self._busy.on = False

    def flush(self) -> None:
        pass

    def close_pending(self) -> None:
        if self._buf:
            line, self._buf = self._buf, ''
            self._emit(line)

    def fileno(self) -> int:
        return self.original.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.original, 'encoding', 'utf-8')

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.original, 'errors', 'strict')


def _in_tractor_child() -> bool:
    spec = getattr(sys.modules.get('__main__'), '__spec__', None)
    return getattr(spec, 'name', None) == 'tractor._child'


def _debug_mode() -> bool:
    state = sys.modules.get('tractor._state')
    return bool(getattr(state, '_runtime_vars', {}).get('_debug_mode')) if state else False


def _capture_std_streams() -> None:
    if _debug_mode():
        return  # pdb talks to the terminal through them
    if not isinstance(sys.stdout, _LineToLog):
        sys.stdout = _LineToLog(sys.stdout, 'py.stdout', logging.INFO)
    if not isinstance(sys.stderr, _LineToLog):
        sys.stderr = _LineToLog(sys.stderr, 'py.stderr', logging.WARNING)


# faulthandler (PYTHONFAULTHANDLER=1 in the unit) writes a dying process's
# stacks straight to fd 2 from a signal handler: no record can hold them then.
# It writes to a per-process file instead, and the next process of the tree
# to set up logging (the restarted actor, or the restarted service) reports a
# dead process's dump as one record and removes it.
_FAULT_SUFFIX = '.faulthandler'
_fault_file: Any = None


def _fault_dir() -> Path | None:
    logs = os.environ.get('LOGS_DIRECTORY', '').split(':')[0]
    if logs:
        return Path(logs) / 'crash'
    state = os.environ.get('PIKER_STATE_DIR') or os.environ.get('STATE_DIRECTORY', '').split(':')[0]
    return Path(state) / 'crash' if state else None


def _redirect_faulthandler() -> None:
    global _fault_file
    if not faulthandler.is_enabled():
        return
    where = _fault_dir()
    if where is None:
        return
    path = where / f'{_current_actor_name()}.{os.getpid()}{_FAULT_SUFFIX}'
    if _fault_file is not None and _fault_file.name == str(path):
        return
    try:
        where.mkdir(parents=True, exist_ok=True)
        fh = open(path, 'w')  # noqa: SIM115 (held open for the process's life)
        faulthandler.enable(file=fh, all_threads=True)
    except OSError:
        return
    old, _fault_file = _fault_file, fh
    if old is not None:
        _discard_fault_file(old)
    _report_fault_dumps(where)


def _discard_fault_file(fh: Any) -> None:
    try:
        fh.close()
        if os.path.getsize(fh.name) == 0:
            os.unlink(fh.name)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _report_fault_dumps(where: Path) -> None:
    try:
        paths = sorted(where.glob(f'*{_FAULT_SUFFIX}'))
    except OSError:
        return
    for path in paths:
        actor, _, pid_text = path.name[:-len(_FAULT_SUFFIX)].rpartition('.')
        try:
            pid = int(pid_text)
        except ValueError:
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        claimed = path.with_name(f'{path.name}.{os.getpid()}')
        try:
            os.rename(path, claimed)  # one reporter, however many start at once
            text = claimed.read_text(errors='replace')
            os.unlink(claimed)
        except OSError:
            continue
        if text.strip():
            first = text.strip().splitlines()[0]
            _crash_log.critical('process.fault_dump', extra={
                'crashed_actor': actor, 'crashed_pid': pid, 'fault': _clip(first, 256),
                'dump': _clip(text, 8 * MAX_FIELD_CHARS)})


@atexit.register
def _at_exit() -> None:
    """Summaries still pending, a partial last print() line, our fault file."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, _LineToLog):
            stream.close_pending()
    flush_suppressed()
    if _fault_file is not None:
        _discard_fault_file(_fault_file)


def flush_suppressed() -> None:
    """Emit the summary of every window with suppressed records now."""
    handler = _handler
    if handler is None:
        return
    due = _limiter.drain()
    if not due:
        return
    handler.acquire()
    try:
        for summary in due:
            handler.emit(summary)
    finally:
        handler.release()


# -- public API ------------------------------------------------------------------

def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger backed by stdlib logging (so it shares the pipeline)."""
    return structlog.stdlib.get_logger(name)


def _resolve_level(level: str | None) -> int:
    source = 'setup_logging(level=...)'
    if level is None:
        level, source = os.environ.get('PIKER_LOG_LEVEL') or 'info', '$PIKER_LOG_LEVEL'
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(
            f'log level: expected one of {", ".join(LEVELS)}, found {level!r} '
            f'(from {source}); fix that value or `log_level` in bot.toml'
        ) from None


def _want_json(fd: int | None, force_json: bool | None) -> bool:
    if force_json is not None:
        return force_json
    fmt = os.environ.get('PIKER_LOG_FORMAT', '').strip().lower()
    if fmt == 'json':
        return True
    if fmt == 'console':
        return False
    if fmt:
        raise ValueError(
            f"log format: expected 'json' or 'console', found {fmt!r} "
            '(from $PIKER_LOG_FORMAT); set it to one of those or unset it'
        )
    return not _isatty(fd)


def _isatty(fd: int | None) -> bool:
    try:
        return os.isatty(fd) if fd is not None else sys.stdout.isatty()
    except (OSError, ValueError):
        return False


def _stdout_fd() -> int | None:
    try:
        fd = sys.stdout.fileno()
        os.fstat(fd)
        return fd
    except (AttributeError, OSError, ValueError):
        return None  # e.g. a test harness replaced sys.stdout


def _tractor_level() -> int:
    return logging.DEBUG if _level_no <= logging.DEBUG else max(_level_no, logging.WARNING)


def strip_tractor_handlers() -> None:
    """Remove tractor's colorlog handler and reset its level; call it again after
    ``open_root_actor()`` (which re-sets the ``tractor`` level)."""
    tlog = logging.getLogger('tractor')
    guarded = False
    for handler in list(tlog.handlers):
        if isinstance(handler, _TractorConsoleGuard) and not guarded:
            guarded = True
        else:
            tlog.removeHandler(handler)
    if not guarded:
        tlog.addHandler(_TractorConsoleGuard())
    tlog.propagate = True  # reaches the root handler exactly once
    tlog.setLevel(_tractor_level())
    # tractor pins its sub-loggers to the level current at their import
    for name, child in list(logging.root.manager.loggerDict.items()):
        if name.startswith('tractor.') and isinstance(child, logging.Logger):
            child.setLevel(logging.NOTSET)


def setup_logging(
    level: str | None = None,
    actor: str | None = None,
    *,
    force_json: bool | None = None,
) -> None:
    """Install the process-wide pipeline; calling it again re-applies it.

    ``level`` None means ``$PIKER_LOG_LEVEL``, else 'info'. Output is JSON lines
    unless stdout is a TTY (``force_json`` or ``$PIKER_LOG_FORMAT=json|console``
    override). ``actor`` defaults to tractor's current actor name, else 'piker'.
    """
    global _actor_name, _level_no, _handler
    level_no = _resolve_level(level)  # validate everything before changing anything
    burst = _env_number('PIKER_LOG_BURST', DEFAULT_BURST, int)
    window_secs = _env_number('PIKER_LOG_WINDOW_SECS', DEFAULT_WINDOW_SECS)
    fd = _stdout_fd()
    as_json = _want_json(fd, force_json)
    _level_no = level_no
    _limiter.burst, _limiter.window_secs = burst, window_secs
    if actor is not None:
        _actor_name = actor
    if as_json:
        final: Any = _JsonLineRenderer()
        processors = [ProcessorFormatter.remove_processors_meta, _exception_dicts, final]
    else:
        final = _CappedConsoleRenderer(colors=_isatty(fd))
        processors = [ProcessorFormatter.remove_processors_meta, final]
    formatter = ProcessorFormatter(processors=processors, foreign_pre_chain=_FOREIGN_PRE_CHAIN)
    journal = fd is not None and stdout_is_journal(fd)
    handler = _LineHandler(fd, journal=journal)
    handler.addFilter(_TractorNoiseFilter())
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in list(root.handlers):
        # ours from an earlier call, or a basicConfig()-style console handler
        if isinstance(old, _LineHandler) or (
            type(old) is logging.StreamHandler and old.stream in (sys.stdout, sys.stderr)
        ):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_level_no)
    _handler = handler
    # a record that reaches no handler (a logger with propagate off and none
    # of its own) gets the same treatment instead of a bare stderr line
    last = _LineHandler(fd, journal=journal)
    last.setLevel(logging.WARNING)
    last.setFormatter(formatter)
    logging.lastResort = last
    logging.captureWarnings(True)
    strip_tractor_handlers()
    _install_hooks()
    if as_json and fd is not None and _in_tractor_child():
        _capture_std_streams()
    _redirect_faulthandler()


def quiet_asyncio_noise() -> None:
    """In an infected (asyncio) actor, drop the CancelledError tracebacks that
    every cancelled asyncio task prints at teardown; real errors still log."""
    for name in ('asyncio', 'tractor.to_asyncio'):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropCancelled) for f in lg.filters):
            lg.addFilter(_DropCancelled())
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # the logger filters above still catch the default handler's output
    loop.set_exception_handler(_quiet_exception_handler)


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if isinstance(context.get('exception'), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


class _DropCancelled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


structlog.configure(
    processors=[
        structlog.stdlib.filter_by_level,
        *_SHARED,
        structlog.processors.StackInfoRenderer(),
        structlog.stdlib.PositionalArgumentsFormatter(),
        ProcessorFormatter.wrap_for_formatter,
    ],
    logger_factory=structlog.stdlib.LoggerFactory(),
    wrapper_class=structlog.stdlib.BoundLogger,
    cache_logger_on_first_use=True,
)

if _in_tractor_child():
    # a child imports us with its enabled modules, long before any daemon
    # fixture runs: from here on nothing it prints escapes the pipeline
    try:
        setup_logging()
    except ValueError:
        setup_logging('info')

__all__ = [
    'LEVELS', 'MAX_RECORD_BYTES', 'RateLimiter', 'bind_contextvars', 'bound_contextvars',
    'clear_contextvars', 'flush_suppressed', 'get_logger', 'quiet_asyncio_noise', 'setup_logging',
    'stdout_is_journal', 'strip_tractor_handlers', 'unbind_contextvars',
]
