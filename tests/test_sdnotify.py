"""SdNotifier against a real AF_UNIX datagram socket standing in for systemd."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from piker.service._sdnotify import SdNotifier

SD_VARS = ('NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID')


class FakeSystemd:
    """Receives notify datagrams with the sender's credentials, as PID 1 does."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(b'\0' + address[1:].encode() if address.startswith('@') else address)
        self.sock.settimeout(2.0)

    def recv(self) -> tuple[list[str], int]:
        """One datagram as its lines, plus the sender pid from SCM_CREDENTIALS."""
        size = socket.CMSG_SPACE(struct.calcsize('3i'))
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, size)
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack('3i', payload)
        return data.decode().split('\n'), pid

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in SD_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(params=['path', 'abstract'])
def fake_systemd(request: pytest.FixtureRequest, clean_env: None) -> Iterator[FakeSystemd]:
    if request.param == 'path':
        # short dir: AF_UNIX paths are limited to 108 bytes
        base = Path('/tmp') / f'sdn-{uuid.uuid4().hex[:8]}'
        base.mkdir()
        address = str(base / 'notify')
    else:
        base = None
        address = f'@piker-test-{uuid.uuid4().hex}'
    fake = FakeSystemd(address)
    yield fake
    fake.close()
    if base is not None:
        Path(address).unlink(missing_ok=True)
        base.rmdir()


def test_lifecycle_messages_reach_socket_from_main_pid(
    fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv('NOTIFY_SOCKET', fake_systemd.address)
    monkeypatch.setenv('WATCHDOG_USEC', '30000000')
    monkeypatch.setenv('WATCHDOG_PID', str(os.getpid()))
    sd = SdNotifier.from_env()
    try:
        for var in SD_VARS:
            assert var not in os.environ
        assert sd.enabled
        assert sd.watchdog_interval_secs == 15.0

        assert sd.ready(status='tree up: 3 actors')
        assert sd.status('trading btcusd.sim\nsecond line')
        assert sd.watchdog()
        assert sd.extend_timeout(2.5)
        assert sd.stopping()
        got = [fake_systemd.recv() for _ in range(5)]
    finally:
        sd.close()
    assert [lines for lines, _pid in got] == [
        ['READY=1', 'STATUS=tree up: 3 actors'],
        ['STATUS=trading btcusd.sim second line'],
        ['WATCHDOG=1'],
        ['EXTEND_TIMEOUT_USEC=2500000'],
        ['STOPPING=1'],
    ]
    assert {pid for _lines, pid in got} == {os.getpid()}


def test_children_do_not_inherit_notify_socket(
    fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv('NOTIFY_SOCKET', fake_systemd.address)
    monkeypatch.setenv('WATCHDOG_USEC', '1000000')
    SdNotifier.from_env().close()
    code = 'import os; print(sorted(k for k in os.environ if k.startswith(("NOTIFY", "WATCHDOG"))))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, timeout=30)
    assert out.stdout.decode().strip() == '[]'


def test_unset_env_is_noop(clean_env: None) -> None:
    sd = SdNotifier.from_env()
    assert not sd.enabled
    assert sd.watchdog_interval_secs is None
    assert sd.ready() is False
    assert sd.watchdog() is False
    assert sd.stopping() is False


def test_watchdog_for_other_pid_or_garbage_is_disabled(
    fake_systemd: FakeSystemd,
) -> None:
    cases = [
        {'WATCHDOG_USEC': '1000000', 'WATCHDOG_PID': str(os.getpid() + 1)},
        {'WATCHDOG_USEC': 'soon'},
        {'WATCHDOG_USEC': '0'},
    ]
    for extra in cases:
        env = {'NOTIFY_SOCKET': fake_systemd.address, **extra}
        sd = SdNotifier.from_env(env)
        try:
            assert env == {}
            assert sd.enabled and sd.watchdog_interval_secs is None
        finally:
            sd.close()


def test_missing_or_dead_listener_is_swallowed_and_logged_once(
    clean_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    gone = SdNotifier(str(tmp_path / 'nobody-here'))
    dead_path = Path('/tmp') / f'sdn-dead-{uuid.uuid4().hex[:8]}'
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(dead_path))
    listener.close()  # the path stays, nobody reads: ECONNREFUSED
    dead = SdNotifier(str(dead_path))
    try:
        for sd in (gone, dead):
            assert sd.enabled
            assert sd.ready() is False
            assert sd.watchdog() is False
            assert sd.watchdog() is False
    finally:
        gone.close()
        dead.close()
        dead_path.unlink()
    failures = [r.msg for r in caplog.records if r.name == 'piker.service._sdnotify']
    assert [(f['event'], f['errno']) for f in failures] == [
        ('sdnotify.send_failed', 'ENOENT'), ('sdnotify.send_failed', 'ECONNREFUSED'),
    ]


def test_full_socket_buffer_never_blocks(fake_systemd: FakeSystemd) -> None:
    sd = SdNotifier(fake_systemd.address)
    try:
        results = [sd.status('x' * 1000) for _ in range(2000)]  # nobody drains
    finally:
        sd.close()
    assert results[0] is True and results[-1] is False  # EAGAIN, swallowed


def test_bad_field_name_raises_clear_error(clean_env: None) -> None:
    sd = SdNotifier(None)
    with pytest.raises(ValueError, match="found 'ready'"):
        sd.notify(ready=1)
    with pytest.raises(ValueError, match='at least one field'):
        sd.notify()


def test_relative_socket_address_disables(clean_env: None) -> None:
    sd = SdNotifier('vsock:2:1234')
    assert not sd.enabled and sd.ready() is False
