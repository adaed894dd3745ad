"""Shared fixtures: a private registry port and state dir per test, and a
helper to run ``python -m piker`` subprocesses that are always reaped."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from piker.service._proc import pid_alive as pid_alive  # noqa: F401  (tests import it from here)

os.environ.setdefault(
    'PYTHONWARNINGS',
    'ignore:trio.MultiError:FutureWarning,ignore:MultiError.:FutureWarning',
)
os.environ['PIKER_EXTRA_DAEMON_PREFIXES'] = 'tests'
# tests read records as JSON lines
os.environ.setdefault('PIKER_LOG_FORMAT', 'json')

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def reg_addr() -> tuple[str, int]:
    """A registry address nobody else uses: suites can run in parallel."""
    return ('127.0.0.1', free_port())


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / 'state'
    d.mkdir()
    monkeypatch.setenv('PIKER_STATE_DIR', str(d))
    return d


def descendants(pid: int) -> list[int]:
    """All live descendant pids of ``pid`` (via /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat', 'rb') as fh:
                stat = fh.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b')') + 2:].split()
        if rest[0] in (b'Z', b'X'):
            continue
        children.setdefault(int(rest[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class PikerProc:
    """A ``python -m piker ...`` subprocess whose output is captured to files."""

    def __init__(self, args: list[str], tmp: Path, env: dict[str, str] | None = None) -> None:
        self.out_path = tmp / f'out-{time.monotonic_ns()}.log'
        self.err_path = tmp / f'err-{time.monotonic_ns()}.log'
        full_env = dict(os.environ)
        full_env.update(env or {})
        self._out = open(self.out_path, 'wb')
        self._err = open(self.err_path, 'wb')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'piker', *args], cwd=REPO, env=full_env,
            stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL,
            # a shell's background job may inherit SIGINT=ignore; undo it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.pid = self.proc.pid

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors='replace')

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors='replace')

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.reap()

    def reap(self) -> None:
        """Kill this process and every descendant it left (by pid)."""
        for pid in [self.pid, *descendants(self.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()
        self._err.close()


@pytest.fixture
def piker_procs(tmp_path: Path) -> Iterator[list[PikerProc]]:
    """Start ``python -m piker`` processes with ``spawn(args)``; all reaped at the end."""
    procs: list[PikerProc] = []
    yield procs
    for p in procs:
        p.reap()


def spawn_piker(procs: list[PikerProc], tmp: Path, *args: str,
                env: dict[str, str] | None = None) -> PikerProc:
    p = PikerProc(list(args), tmp, env)
    procs.append(p)
    return p


def run_piker(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, '-m', 'piker', *args], cwd=REPO, env=full_env,
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
