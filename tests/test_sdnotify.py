"""sd_notify(3) without libsystemd: the message format, path and abstract sockets, and
what ``from_environment`` takes out of the environment."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from relay.service.sdnotify import Notifier, encode, from_environment


def test_message_format() -> None:
    assert encode(READY=1, STATUS="relaying on tun0") == b"READY=1\nSTATUS=relaying on tun0"
    assert encode(WATCHDOG=1) == b"WATCHDOG=1"
    with pytest.raises(ValueError, match="STATUS"):
        encode(STATUS="two\nlines")


def test_sends_to_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        n = Notifier(path)
        assert n.notify(READY=1, STATUS="up")
        assert n.notify(STOPPING=1)
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
        assert sock.recv(100) == b"STOPPING=1"
        n.close()


def test_an_at_sign_names_an_abstract_socket() -> None:
    name = f"tunrelay-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        n = Notifier("@" + name)
        assert n.notify(WATCHDOG=1)
        assert sock.recv(100) == b"WATCHDOG=1"
        n.close()


def test_a_missing_socket_is_reported_not_raised(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    assert n.notify(READY=1) is False
    assert n.notify(READY=1) is False  # logged once
    n.close()


def test_from_environment_takes_the_variables_away(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "s"), "WATCHDOG_USEC": "4000000", "PATH": "/bin"}
    n = from_environment(env)
    assert n is not None and n.watchdog == 4.0
    assert env == {"PATH": "/bin"}  # the workers never see them
    n.close()
    other = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    n = from_environment(other)
    assert n is not None and n.watchdog is None  # the watchdog is another process's
    n.close()
    assert from_environment({}) is None
    assert from_environment({"NOTIFY_SOCKET": "relative"}) is None
