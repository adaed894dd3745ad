"""A small sd_notify(3) client for the root actor, no library needed.

Why our own: the protocol is one AF_UNIX datagram of ``KEY=VALUE`` lines, and we
need what the libraries don't do together: pop ``NOTIFY_SOCKET``/``WATCHDOG_*``
from the environment so tractor children (which inherit it) can never speak
for the service (``NotifyAccess=main``), a non-blocking socket that can never
stall trio, and silence (after one log line) when systemd isn't listening.
"""
from __future__ import annotations

import errno
import os
import re
import socket
from collections.abc import MutableMapping

from ..log import get_logger

log = get_logger(__name__)

_KEY_RE = re.compile(r'[A-Z][A-Z0-9_]*')


class SdNotifier:
    """Talks to the service manager when ``$NOTIFY_SOCKET`` was set, else no-ops."""

    def __init__(
        self,
        address: str | None,
        watchdog_usec: int | None = None,
    ) -> None:
        self._addr: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._failed_errnos: set[int] = set()
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        if not address:
            return
        if address.startswith('@'):
            # Linux abstract namespace: a leading NUL instead of '@'
            self._addr = b'\0' + address[1:].encode()
        elif address.startswith('/'):
            self._addr = address
        else:
            log.warning(
                'sdnotify.unsupported_socket', found=address,
                expected='an absolute path or @abstract name in $NOTIFY_SOCKET',
            )
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None) -> SdNotifier:
        """Build from systemd's variables and remove them from the environment,
        so no child process inherits them."""
        env = os.environ if environ is None else environ
        address = env.pop('NOTIFY_SOCKET', None)
        usec_raw = env.pop('WATCHDOG_USEC', None)
        pid_raw = env.pop('WATCHDOG_PID', None)
        return cls(address, _watchdog_usec(usec_raw, pid_raw))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval_secs(self) -> float | None:
        """How often to call :meth:`watchdog` (half the timeout, as sd_watchdog_enabled(3)
        advises), or None when systemd expects no pings."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True if it was handed to the kernel."""
        if not fields:
            raise ValueError('sd_notify: expected at least one field such as READY=1, found none')
        lines = []
        for key, value in fields.items():
            if not _KEY_RE.fullmatch(key):
                raise ValueError(
                    f'sd_notify: expected an upper-case field name like READY or STATUS, '
                    f'found {key!r}'
                )
            text = str(value).replace('\n', ' ')  # a newline would start a new field
            lines.append(f'{key}={text}')
        if self._sock is None or self._addr is None:
            return False
        try:
            self._sock.sendto('\n'.join(lines).encode(), self._addr)
        except OSError as err:
            self._log_failure(err)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """The tree is up: ends ``systemctl start`` for ``Type=notify``."""
        return self.notify(READY=1, **({'STATUS': status} if status else {}))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING=1, **({'STATUS': status} if status else {}))

    def status(self, text: str) -> bool:
        """One line for ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Call only while the tree is healthy; missing pings get us restarted."""
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, secs: float) -> bool:
        """Ask for more start/stop time (e.g. a slow broker login)."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(secs * 1_000_000))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _log_failure(self, err: OSError) -> None:
        code = err.errno or 0
        if code in self._failed_errnos:
            return
        self._failed_errnos.add(code)
        expected = code in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN)
        (log.warning if expected else log.error)(
            'sdnotify.send_failed', errno=errno.errorcode.get(code, str(code)),
            error=str(err), note='further failures of this kind are not logged',
        )


def _watchdog_usec(usec_raw: str | None, pid_raw: str | None) -> int | None:
    if not usec_raw:
        return None
    if pid_raw:
        try:
            if int(pid_raw) != os.getpid():
                return None  # the watchdog belongs to another process
        except ValueError:
            log.error('sdnotify.bad_env', var='WATCHDOG_PID', found=pid_raw, expected='a pid')
            return None
    try:
        usec = int(usec_raw)
    except ValueError:
        log.error(
            'sdnotify.bad_env', var='WATCHDOG_USEC', found=usec_raw,
            expected='microseconds as an integer (set by WatchdogSec=)',
        )
        return None
    return usec if usec > 0 else None
