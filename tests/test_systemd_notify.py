"""rotator.systemd speaks sd_notify(3) to a real AF_UNIX datagram socket, the way systemd
listens, and the daemon sends READY=1, WATCHDOG=1 and STOPPING=1 over it."""

from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rotator import systemd
from rotator.errors import PermanentError
from tests.support import make_fleet, stop_daemon, wait_for


class NotifySocket:
    """The listening end systemd would hold; ``messages()`` returns what arrived so far."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value
        self.received: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.received
            self.received.append(dict(line.split("=", 1)
                                      for line in data.decode().split("\n") if line))

    def fields(self) -> list[str]:
        return [key for message in self.messages() for key in message]


def _listen(address: str, env_value: str) -> NotifySocket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return NotifySocket(sock, env_value)


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    listener = _listen(str(tmp_path / "notify.sock"), str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with listener.sock:
        yield listener


def test_ready_status_stopping_and_reloading_arrive_as_datagrams(notify_socket):
    assert systemd.ready("running: 3 credentials")
    assert systemd.status("rotating\nagent-1/openai")
    assert systemd.reloading()
    assert systemd.stopping()
    ready, status, reloading, stopping = notify_socket.messages()
    assert ready == {"READY": "1", "STATUS": "running: 3 credentials"}
    assert status == {"STATUS": "rotating agent-1/openai"}  # one line: a newline splits fields
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert stopping == {"STOPPING": "1"}


def test_abstract_namespace_socket(monkeypatch):
    name = f"rotator-test-{uuid.uuid4().hex}"
    listener = _listen("\0" + name, "@" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    with listener.sock:
        assert systemd.ready()
        assert listener.messages() == [{"READY": "1"}]


def test_everything_is_a_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert not systemd.ready()
    assert not systemd.watchdog()
    assert not systemd.stopping()
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # not AF_UNIX: ignored, never raises
    assert not systemd.ready()


def test_a_vanished_socket_is_reported_not_raised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    monkeypatch.setattr(systemd, "_warned", False)
    with caplog.at_level("DEBUG", logger="rotator.systemd"):
        assert not systemd.ready()
        assert not systemd.watchdog()  # not armed: nothing attempted
        assert not systemd.status("still fine")
    levels = [r.levelname for r in caplog.records if r.name == "rotator.systemd"]
    assert levels == ["WARNING", "DEBUG"]  # once loudly, then quietly


def test_watchdog_only_when_armed_for_this_process(notify_socket, monkeypatch):
    assert systemd.watchdog_interval() is None
    assert not systemd.watchdog()
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    assert systemd.watchdog_interval() == 30.0  # half of WatchdogSec=60s
    assert systemd.watchdog()
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    assert not systemd.watchdog()
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "nonsense")
    assert systemd.watchdog_interval() is None
    assert notify_socket.messages() == [{"WATCHDOG": "1"}]


def test_credentials_directory_expands_only_at_the_start(monkeypatch):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/rotator.service/")
    expand = systemd.expand_credentials_directory
    assert expand("${CREDENTIALS_DIRECTORY}/vault-token") == \
        "/run/credentials/rotator.service/vault-token"
    assert expand("$CREDENTIALS_DIRECTORY/vault-token") == \
        "/run/credentials/rotator.service/vault-token"
    for literal in ("/etc/rotator/vault-token", "/x/${CREDENTIALS_DIRECTORY}/t",
                    "$CREDENTIALS_DIRECTORYX/t", "${HOME}/t"):
        assert expand(literal) == literal
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(PermanentError, match="LoadCredential="):
        expand("${CREDENTIALS_DIRECTORY}/vault-token")


@pytest.mark.slow
def test_the_daemon_notifies_ready_watchdog_reload_and_stopping(tmp_path, openbao, fake_openai):
    """``rotator run`` under a fake service manager: READY=1 once it serves, WATCHDOG=1 at half
    of WATCHDOG_USEC, RELOADING=1 then READY=1 on SIGHUP, STOPPING=1 on SIGTERM."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    listener = _listen(str(tmp_path / "notify.sock"), str(tmp_path / "notify.sock"))
    with listener.sock:
        proc = fleet.start_daemon(NOTIFY_SOCKET=listener.env_value, WATCHDOG_USEC="1000000")
        wait_for(lambda: "READY" in listener.fields(), timeout=60, what="READY=1")
        wait_for(lambda: listener.fields().count("WATCHDOG") >= 2, timeout=10,
                 what="two WATCHDOG=1 at 0.5 s")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: listener.fields().count("READY") >= 2, timeout=20,
                 what="READY=1 after the reload")
        assert stop_daemon(proc) == 0
        states = [k for k in listener.fields() if k in ("READY", "RELOADING", "STOPPING")]
        assert states == ["READY", "RELOADING", "READY", "STOPPING"], states
