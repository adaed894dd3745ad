"""One structured-logging pipeline per process, the same in every actor.

Why this exists: the bot runs as a tree of processes sharing one stdout (the
journal under systemd). Every record, ours or a third party's (trio, tractor,
ib_async, asyncio, apscheduler, ``warnings``), must come out exactly once, as one
JSON line written with a single ``write()`` so that lines from different actors
never interleave, small enough for journald, and never carrying local variables
(they hold secrets). On a TTY the same records are rendered for humans.

Usage::

    from piker.log import get_logger, setup_logging
    log = get_logger(__name__)
    setup_logging('info')              # once per actor; safe to call again
    log.info('order.ack', oid=oid, reqid=reqid)
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

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


_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
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


class _LineHandler(logging.Handler):
    """Writes each formatted record plus newline with one ``os.write()`` on the
    stdout fd (a TextIOWrapper may split a record across buffer flushes)."""

    def __init__(self, fd: int | None, journal: bool) -> None:
        super().__init__()
        self.fd = fd
        self.journal = journal

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self.journal:
                line = f'<{_syslog_priority(record.levelno)}>{line}'
            if self.fd is None:
                sys.stdout.write(line + '\n')
                sys.stdout.flush()
            else:
                _write_all(self.fd, (line + '\n').encode('utf-8', 'backslashreplace'))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


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


class _TractorNoiseFilter(logging.Filter):
    """Drops tractor's benign cancellation/teardown chatter unless at debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith('tractor') or _level_no <= logging.DEBUG:
            return True
        try:
            msg = record.getMessage()
        except Exception:
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
    global _actor_name, _level_no
    level_no = _resolve_level(level)  # validate everything before changing anything
    fd = _stdout_fd()
    as_json = _want_json(fd, force_json)
    _level_no = level_no
    if actor is not None:
        _actor_name = actor
    if as_json:
        final: Any = _JsonLineRenderer()
        processors = [ProcessorFormatter.remove_processors_meta, _exception_dicts, final]
    else:
        final = _CappedConsoleRenderer(colors=_isatty(fd))
        processors = [ProcessorFormatter.remove_processors_meta, final]
    handler = _LineHandler(fd, journal=fd is not None and stdout_is_journal(fd))
    handler.addFilter(_TractorNoiseFilter())
    handler.setFormatter(ProcessorFormatter(
        processors=processors, foreign_pre_chain=_FOREIGN_PRE_CHAIN,
    ))

    root = logging.getLogger()
    for old in list(root.handlers):
        # ours from an earlier call, or a basicConfig()-style console handler
        if isinstance(old, _LineHandler) or (
            type(old) is logging.StreamHandler and old.stream in (sys.stdout, sys.stderr)
        ):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_level_no)
    logging.captureWarnings(True)
    strip_tractor_handlers()


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

__all__ = [
    'LEVELS', 'MAX_RECORD_BYTES', 'bind_contextvars', 'bound_contextvars',
    'clear_contextvars', 'get_logger', 'quiet_asyncio_noise', 'setup_logging',
    'stdout_is_journal', 'strip_tractor_handlers', 'unbind_contextvars',
]
