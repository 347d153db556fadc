"""Offloads are on by default; a kernel that refuses them gets the plain path.

``open_queue`` asks for IFF_VNET_HDR and TUNSETOFFLOAD; here a fake TUN device
(no root, no kernel) and a fake ioctl stand in for a kernel that says EINVAL
(an unknown offload flag) or ENOTTY (no such ioctl). The relay must open the
device again without offloads, warn once naming the errno, say so in its
counters, and run the stack without GSO; other errors still stop it.
"""

from __future__ import annotations

import errno
import logging
import os
import types
from collections.abc import Iterator

import pytest

import relay.datapath.tun as tun_module
from relay.datapath.tun import IFF_VNET_HDR, TUNSETOFFLOAD
from relay.service.run import RunOptions, open_queue, validate, without_offload

NETS = ["198.18.1.0/24", "fd00:1::/64"]
REFUSE: dict[str, int] = {}  # "errno": what the fake kernel answers every ioctl


class FakeTunTapDevice:
    """pytun.TunTapDevice without a kernel: a pipe's fd stands for the queue."""

    opened: list[int] = []  # noqa: RUF012 (the flags of every open, in order)
    refuse_vnet_hdr = 0  # an errno for TUNSETIFF with IFF_VNET_HDR (0: accepted)

    def __init__(self, name: str, flags: int) -> None:
        FakeTunTapDevice.opened.append(flags)
        if flags & IFF_VNET_HDR and FakeTunTapDevice.refuse_vnet_hdr:
            code = FakeTunTapDevice.refuse_vnet_hdr
            raise tun_module.pytun.Error(code, os.strerror(code))
        self.name = name
        self._r, self._w = os.pipe()

    def fileno(self) -> int:
        return self._r

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Fake device and ioctl; yields the ioctls made. Set ``refuse`` to an errno."""
    FakeTunTapDevice.opened = []
    FakeTunTapDevice.refuse_vnet_hdr = 0
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(tun_module.pytun, "TunTapDevice", FakeTunTapDevice)
    monkeypatch.setattr(tun_module.TunDevice, "_configure_link", lambda *a, **k: None)
    REFUSE.clear()

    def ioctl(fd: int, request: int, arg: int) -> int:
        calls.append((request, arg))
        if "errno" in REFUSE:
            raise OSError(REFUSE["errno"], os.strerror(REFUSE["errno"]))
        return 0

    monkeypatch.setattr(tun_module, "fcntl", types.SimpleNamespace(ioctl=ioctl))
    yield calls


def refuse(code: int) -> None:
    REFUSE["errno"] = code


def options(**kw: object) -> RunOptions:
    return validate(tun="tr0", client_nets=NETS, **kw)  # type: ignore[arg-type]


def test_offloads_are_asked_for_by_default(fake_kernel: list[tuple[int, int]]) -> None:
    opts = options()
    with open_queue(opts, multi_queue=True, exclusive=True) as tun:
        assert tun.vnet_hdr and tun.stats.offload == "on"
    assert FakeTunTapDevice.opened[0] & IFF_VNET_HDR
    assert fake_kernel == [(TUNSETOFFLOAD, tun_module.OFFLOADS)]


def test_no_offload_asks_for_nothing(fake_kernel: list[tuple[int, int]]) -> None:
    with open_queue(options(offload=False)) as tun:
        assert not tun.vnet_hdr and tun.stats.offload == "off"
    assert not FakeTunTapDevice.opened[0] & IFF_VNET_HDR
    assert fake_kernel == []


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTTY])
def test_a_refused_tunsetoffload_falls_back_with_one_warning(
    fake_kernel: list[tuple[int, int]], caplog: pytest.LogCaptureFixture, code: int
) -> None:
    refuse(code)
    opts = options()
    with caplog.at_level(logging.WARNING, logger="tunrelay"):
        tun = open_queue(opts, multi_queue=True, exclusive=True)
    with tun:
        assert not tun.vnet_hdr and tun.stats.offload == "off(fallback)"
        assert "offload='off(fallback)'" in repr(tun.stats)
    # Opened twice: with the virtio-net header (refused at TUNSETOFFLOAD), then without.
    assert [bool(f & IFF_VNET_HDR) for f in FakeTunTapDevice.opened] == [True, False]
    assert fake_kernel == [(TUNSETOFFLOAD, tun_module.OFFLOADS)]
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errno.errorcode[code] in warning.getMessage()
    # What the supervisor hands its workers: no GSO from the stack, plain queues.
    plain = without_offload(opts)
    assert (plain.offload, plain.offload_fallback, plain.stack.offload) == (False, True, False)
    FakeTunTapDevice.opened = []
    caplog.clear()
    with open_queue(plain, attach=True) as worker_queue:
        assert worker_queue.stats.offload == "off(fallback)"
    assert [bool(f & IFF_VNET_HDR) for f in FakeTunTapDevice.opened] == [False]
    assert not caplog.records  # the warning is the supervisor's, once


def test_an_attached_queue_never_falls_back_alone(fake_kernel: list[tuple[int, int]]) -> None:
    # IFF_VNET_HDR is the device's setting: one worker without it would corrupt the others'.
    refuse(errno.EINVAL)
    with pytest.raises(OSError) as info:
        open_queue(options(), attach=True)
    assert info.value.errno == errno.EINVAL


def test_other_errors_are_not_taken_for_a_refusal(fake_kernel: list[tuple[int, int]]) -> None:
    refuse(errno.EPERM)
    with pytest.raises(OSError) as info:
        open_queue(options(), multi_queue=True, exclusive=True)
    assert info.value.errno == errno.EPERM
    assert len(FakeTunTapDevice.opened) == 1  # no second try


def test_a_refused_vnet_header_falls_back_too(
    fake_kernel: list[tuple[int, int]], caplog: pytest.LogCaptureFixture
) -> None:
    # The kernel may refuse IFF_VNET_HDR at TUNSETIFF already (before any TUNSETOFFLOAD).
    FakeTunTapDevice.refuse_vnet_hdr = errno.EINVAL
    with caplog.at_level(logging.WARNING, logger="tunrelay"), open_queue(options()) as tun:
        assert not tun.vnet_hdr and tun.stats.offload == "off(fallback)"
    assert [bool(f & IFF_VNET_HDR) for f in FakeTunTapDevice.opened] == [True, False]
    assert fake_kernel == []  # no TUNSETOFFLOAD on the plain device
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "EINVAL" in warning.getMessage()
