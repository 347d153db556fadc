"""Stream capture: the synthetic pcap read back with scapy, the filter, a full disk."""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet
from scapy.utils import rdpcap

from relay.analysis.capture import (
    Capture,
    CaptureFilter,
    CaptureFilterError,
    DirectorySink,
    parse_capture_filter,
)
from relay.analysis.hooks import Direction, EndReason, FlowEnd, FlowInfo
from relay.analysis.pcapwriter import SEGMENT, TcpConversation, UdpConversation, file_header

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
V4 = ("198.18.0.2", 40000, "198.19.0.80", 443)
V6 = ("fd00:1::2", 40001, "fd00:2::80", 8080)


def read(tmp_path: Path, data: bytes) -> list[Packet]:
    path = tmp_path / "x.pcap"
    path.write_bytes(data)
    return list(rdpcap(str(path)))


def ip_layer(p: Packet) -> Packet:
    return p[IP] if IP in p else p[IPv6]


def checksums_valid(p: Packet) -> bool:
    """scapy recomputes every checksum when the fields are deleted and rebuilt."""
    layer = ip_layer(p)
    fresh = layer.__class__(bytes(layer))
    for cls in (IP, TCP, UDP):
        if cls in fresh:
            del fresh[cls].chksum
    rebuilt = layer.__class__(bytes(fresh))
    return bytes(rebuilt) == bytes(layer)


def flags(p: Packet) -> str:
    return str(p[TCP].flags)


def stream(packets: list[Packet], sport: int) -> bytes:
    """One direction's payload in file order (the sequence checks are separate)."""
    return b"".join(bytes(p[TCP].payload) for p in packets if p[TCP].sport == sport)


@pytest.mark.parametrize("addrs", [V4, V6], ids=["v4", "v6"])
def test_a_tcp_conversation_reads_back_as_a_clean_connection(
    tmp_path: Path, addrs: tuple[str, int, str, int]
) -> None:
    cip, cport, sip, sport = addrs
    # ISNs near 2**32: the sequence numbers wrap inside the conversation.
    conv = TcpConversation(cip, cport, sip, sport, client_isn=0xFFFFFFF0, server_isn=0xFFFF0000)
    big = bytes(range(256)) * 600  # 153,600 bytes: three segments
    conv.handshake(1000.0, 1000.25)
    conv.data(False, b"GET / HTTP/1.1\r\n\r\n", 1000.5)
    conv.data(True, big, 1001.0)
    conv.data(False, b"x", 1001.5)
    conv.fin(True, 1002.0)
    conv.fin(False, 1002.5)
    packets = read(tmp_path, file_header() + b"".join(conv.out))

    assert [flags(p) for p in packets] == [
        "S", "SA", "A", "PA", "A", "A", "PA", "PA", "FA", "FA", "A",
    ]  # fmt: skip
    assert all(checksums_valid(p) for p in packets)
    syn, synack, ack = packets[:3]
    assert (ip_layer(syn).src, ip_layer(syn).dst, syn[TCP].sport, syn[TCP].dport) == (
        cip, sip, cport, sport,
    )  # fmt: skip
    assert ("WScale", 14) in syn[TCP].options
    assert synack[TCP].ack == (0xFFFFFFF0 + 1) & 0xFFFFFFFF
    assert (ack[TCP].seq, ack[TCP].ack) == ((0xFFFFFFF0 + 1) % 2**32, 0xFFFF0000 + 1)
    # Every segment: seq follows its own side's bytes, ack the other side's.
    nxt = {cport: (0xFFFFFFF0 + 1) % 2**32, sport: 0xFFFF0000 + 1}
    for p in packets[3:]:
        t = p[TCP]
        other = sport if t.sport == cport else cport
        assert t.seq == nxt[t.sport], p.summary()
        assert t.ack == nxt[other], p.summary()
        nxt[t.sport] = (nxt[t.sport] + len(t.payload) + ("F" in str(t.flags))) % 2**32
    sizes = [len(p[TCP].payload) for p in packets if p[TCP].sport == sport and p[TCP].payload]
    assert sizes == [SEGMENT, SEGMENT, len(big) - 2 * SEGMENT]
    assert stream(packets, cport) == b"GET / HTTP/1.1\r\n\r\nx"
    assert stream(packets, sport) == big
    assert [float(p.time) for p in packets] == [
        1000.0, 1000.25, 1000.25, 1000.5, 1001.0, 1001.0, 1001.0, 1001.5, 1002.0, 1002.5, 1002.5,
    ]  # fmt: skip


def test_a_reset_ends_the_conversation(tmp_path: Path) -> None:
    conv = TcpConversation(*V4, client_isn=7, server_isn=9)
    conv.handshake(1.0, 1.1)
    conv.data(False, b"abc", 1.2)
    conv.reset(False, 1.3)
    conv.data(True, b"late", 1.4)  # nothing after an RST
    conv.fin(True, 1.5)
    packets = read(tmp_path, file_header() + b"".join(conv.out))
    assert [flags(p) for p in packets] == ["S", "SA", "A", "PA", "RA"]
    rst = packets[-1][TCP]
    assert (rst.sport, rst.seq, rst.ack) == (V4[1], 7 + 1 + 3, 9 + 1)
    assert all(checksums_valid(p) for p in packets)


def test_a_refused_connection_is_a_syn_and_an_rst(tmp_path: Path) -> None:
    conv = TcpConversation(*V6, client_isn=100)
    conv.unanswered(5.0, 5.001)
    packets = read(tmp_path, file_header() + b"".join(conv.out))
    assert [flags(p) for p in packets] == ["S", "RA"]
    assert packets[1][TCP].ack == 101 and IPv6 in packets[1]
    assert all(checksums_valid(p) for p in packets)


@pytest.mark.parametrize("addrs", [V4, V6], ids=["v4", "v6"])
def test_udp_datagrams_are_packets_with_checksums(
    tmp_path: Path, addrs: tuple[str, int, str, int]
) -> None:
    conv = UdpConversation(*addrs)
    conv.datagram(False, b"query", 3.0)
    conv.datagram(True, b"answer!", 3.5)
    conv.datagram(False, b"", 4.0)
    packets = read(tmp_path, file_header() + b"".join(conv.out))
    cip, cport, sip, sport = addrs
    got = [
        (ip_layer(p).src, p[UDP].sport, ip_layer(p).dst, p[UDP].dport, bytes(p[UDP].payload))
        for p in packets
    ]
    assert got == [
        (cip, cport, sip, sport, b"query"),
        (sip, sport, cip, cport, b"answer!"),
        (cip, cport, sip, sport, b""),
    ]
    assert all(checksums_valid(p) for p in packets)
    assert all(p[UDP].chksum != 0 for p in packets)


# --- the filter --------------------------------------------------------------------------


def flow(cip: str, cport: int, sip: str, sport: int, proto: str = "tcp") -> FlowInfo:
    return FlowInfo("C" + "a" * 17, proto, cip, cport, sip, sport, 1000.0, 6 if ":" in cip else 4)


def test_filter_terms() -> None:
    f = parse_capture_filter(["port 443", "net 198.19.0.0/16, fd00:2::/64", "198.20.0.1"])
    assert f.ports == {443}
    assert [str(n) for n in f.nets] == ["198.19.0.0/16", "fd00:2::/64", "198.20.0.1/32"]
    assert f.matches(flow("198.18.0.2", 443, "198.30.0.1", 1))  # either end's port
    assert f.matches(flow("198.18.0.2", 1, "198.19.9.9", 2))
    assert f.matches(flow("fd00:2::9", 1, "fd00:9::1", 2))  # either end's address
    assert not f.matches(flow("198.18.0.2", 1, "198.20.0.2", 80))
    assert CaptureFilter().matches(flow("198.18.0.2", 1, "198.20.0.2", 80))
    assert parse_capture_filter(["PORT 53"]).ports == {53}


@pytest.mark.parametrize(
    "text", ["port", "port x", "port 0", "port 70000", "net", "net 1.2.3", "host 1.2.3.4", "", "a,"]
)
def test_bad_filter_terms_are_refused(text: str) -> None:
    with pytest.raises(CaptureFilterError):
        parse_capture_filter([text])


# --- the analyzer ------------------------------------------------------------------------


def run_flow(capture: Capture, info: FlowInfo, chunks: list[tuple[Direction, bytes]]) -> None:
    async def main() -> None:
        await capture.flow_start(info)
        for direction, data in chunks:
            assert await capture.data(info, direction, data) is None  # never a rewrite
        await capture.flow_end(info, FlowEnd(EndReason.FIN, 0, 0, 0.5, history="ShADdFf"))

    trio.run(main)


def test_capture_writes_three_files_per_tcp_flow(tmp_path: Path) -> None:
    sink = DirectorySink.open(str(tmp_path))
    capture = Capture(sink, flush_at=1000)  # several writes per flow
    info = flow(*V4)
    chunks = [(C2S, b"a" * 700), (S2C, b"b" * 3000), (C2S, b"c" * 10), (S2C, b"d")]
    try:
        run_flow(capture, info, chunks)
    finally:
        capture.close()
    assert (tmp_path / f"{info.uid}.c2s").read_bytes() == b"a" * 700 + b"c" * 10
    assert (tmp_path / f"{info.uid}.s2c").read_bytes() == b"b" * 3000 + b"d"
    assert os.stat(tmp_path / f"{info.uid}.c2s").st_mode & 0o777 == 0o600
    packets = rdpcap(str(tmp_path / f"{info.uid}.pcap"))
    assert [flags(p) for p in packets] == ["S", "SA", "A", "PA", "PA", "PA", "PA", "FA", "FA", "A"]
    assert stream(list(packets), V4[1]) == b"a" * 700 + b"c" * 10
    assert stream(list(packets), V4[3]) == b"b" * 3000 + b"d"
    assert capture.stats.flows == 1 and not capture.stopped


def test_udp_flows_get_a_pcap_only_and_unselected_flows_nothing(tmp_path: Path) -> None:
    sink = DirectorySink.open(str(tmp_path))
    capture = Capture(sink, parse_capture_filter(["port 53"]))
    dns = flow("198.18.0.2", 5353, "198.19.0.53", 53, "udp")
    other = FlowInfo("C" + "b" * 17, "tcp", "198.18.0.2", 1, "198.19.0.1", 80, 1.0, 4)
    try:
        run_flow(capture, dns, [(C2S, b"q"), (S2C, b"r")])
        run_flow(capture, other, [(C2S, b"GET")])
    finally:
        capture.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{dns.uid}.pcap"]
    assert [bytes(p[UDP].payload) for p in rdpcap(str(tmp_path / f"{dns.uid}.pcap"))] == [
        b"q", b"r",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("how", "history", "answer"),
    [
        (EndReason.REJECTED, "S", ["S", "RA"]),  # an analyzer's REJECT: RST to the SYN
        (EndReason.REFUSED, "Sr", ["S", "RA"]),
        (EndReason.CONNECT_TIMEOUT, "S", ["S"]),  # silence
        (EndReason.RST, "ShADR", ["S", "SA", "A", "PA", "RA"]),  # the client's reset
        (EndReason.LIMIT, "ShAD", ["S", "SA", "A", "PA", "RA"]),  # the relay's abort
        (EndReason.FIN, "ShADFf", ["S", "SA", "A", "PA", "FA", "FA", "A"]),
    ],
)
def test_the_close_follows_the_flow_end(
    tmp_path: Path, how: EndReason, history: str, answer: list[str]
) -> None:
    sink = DirectorySink.open(str(tmp_path))
    capture = Capture(sink)
    info = flow(*V4)

    async def main() -> None:
        await capture.flow_start(info)
        if "D" in history:
            await capture.data(info, C2S, b"hello")
        await capture.flow_end(info, FlowEnd(how, 0, 0, 0.5, history=history))

    try:
        trio.run(main)
    finally:
        capture.close()
    packets = list(rdpcap(str(tmp_path / f"{info.uid}.pcap")))
    assert [flags(p) for p in packets] == answer
    if "R" in history:
        assert packets[-1][TCP].sport == V4[1]  # from the client
    elif len(answer) > 1 and answer[-1] == "RA":
        assert packets[-1][TCP].sport == V4[3]  # from the server's address
    assert all(checksums_valid(p) for p in packets)


class FullDisk:
    """A sink whose file takes ``room`` bytes, then fails with ENOSPC."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.calls = 0
        self.files: dict[str, bytes] = {}

    def append(self, name: str, data: Sequence[bytes]) -> None:
        self.calls += 1
        joined = b"".join(data)
        if len(joined) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        self.room -= len(joined)
        self.files[name] = self.files.get(name, b"") + joined


def test_a_full_disk_stops_capture_for_every_flow_without_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = FullDisk(room=5000)
    capture = Capture(sink, flush_at=1000)
    a, b = flow(*V4), FlowInfo("C" + "z" * 17, "tcp", *V6, 1.0, 6)
    calls: list[int] = []

    async def main() -> None:
        await capture.flow_start(a)
        await capture.flow_start(b)
        for _ in range(20):  # 20 kB each: the disk fills on the way
            await capture.data(a, C2S, b"x" * 1000)
            await capture.data(b, S2C, b"y" * 1000)
        # a's end waits for its last batch: every batch before it was tried too.
        await capture.flow_end(a, FlowEnd(EndReason.FIN, 0, 0, 0.5))
        assert capture.stopped
        calls.append(sink.calls)
        await capture.data(b, S2C, b"y" * 5000)  # no more writes after the failure
        await capture.flow_end(b, FlowEnd(EndReason.FIN, 0, 0, 0.5))
        c = FlowInfo("C" + "n" * 17, "tcp", *V4, 2.0, 4)  # a new flow is not captured
        await capture.flow_start(c)
        await capture.data(c, C2S, b"z" * 5000)
        await capture.flow_end(c, FlowEnd(EndReason.FIN, 0, 0, 0.5))

    with caplog.at_level(logging.ERROR, logger="relay.analysis.capture"):
        trio.run(main)
        capture.close()
    assert sink.calls == calls[0]
    assert capture.stats.stopped.startswith("ENOSPC") and capture.stats.flows == 2
    assert capture.stats.bytes_written == sum(map(len, sink.files.values())) <= 5000
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # logged once
    assert "No space left on device" in errors[0].getMessage()


class SlowDisk:
    """A sink that takes ``seconds`` per write."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.data: dict[str, bytearray] = {}

    def append(self, name: str, data: Sequence[bytes]) -> None:
        time.sleep(self.seconds)
        self.data.setdefault(name, bytearray()).extend(b"".join(data))


def test_a_slow_disk_holds_a_flow_only_past_the_backlog_limit() -> None:
    sink = SlowDisk(0.05)
    capture = Capture(sink, flush_at=1000, backlog_limit=50_000)
    info = flow(*V4)
    took: list[float] = []

    async def main() -> None:
        await capture.flow_start(info)
        t = time.perf_counter()
        for _ in range(10):  # 10 batches of ~2 kB: well under the backlog limit
            await capture.data(info, C2S, b"x" * 1000)
        took.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(40):  # ~80 kB more: over the limit, so the flow waits
            await capture.data(info, S2C, b"y" * 1000)
        took.append(time.perf_counter() - t)
        await capture.flow_end(info, FlowEnd(EndReason.FIN, 0, 0, 0.5, history="ShADdFf"))

    trio.run(main)
    capture.close()
    assert took[0] < 0.05, took  # no write was waited for (each takes 0.05 s)
    assert took[1] >= 0.05, took
    assert bytes(sink.data[f"{info.uid}.c2s"]) == b"x" * 10_000
    assert bytes(sink.data[f"{info.uid}.s2c"]) == b"y" * 40_000


# --- the options -------------------------------------------------------------------------


def test_capture_options_are_checked_naming_the_option(tmp_path: Path) -> None:
    from relay.service.run import ConfigError, validate

    base = {"tun": "tr0", "client_nets": ["198.18.0.0/24"]}
    (tmp_path / "file").write_text("")
    bad = [
        ({"capture_filter": ["port 1"]}, "--capture-filter: needs --capture-dir"),
        ({"capture_dir": str(tmp_path), "capture_filter": ["port x"]}, "--capture-filter: "),
        ({"capture_dir": str(tmp_path / "file")}, "--capture-dir: "),
        ({"capture_dir": str(tmp_path / "no" / "such")}, "--capture-dir: the parent"),
    ]
    for kw, message in bad:
        with pytest.raises(ConfigError, match=f"^{message}"):
            validate(**base, **kw)
    opts = validate(
        **base, capture_dir=str(tmp_path / "new"), capture_filter=["port 443, fd00::/8"]
    )
    assert (opts.capture_dir, opts.capture_filter) == (
        str(tmp_path / "new"),
        ("port 443, fd00::/8",),
    )


def test_the_capture_directory_is_made_private_and_capture_comes_first(tmp_path: Path) -> None:
    import dataclasses

    from relay.service.privileges import Identity
    from relay.service.run import (
        ConfigError,
        load_analyzers,
        open_capture_dir,
        prepare_capture_dir,
        validate,
    )

    me = Identity("me", os.getuid(), os.getgid())
    path = tmp_path / "cap"
    opts = validate(
        tun="tr0", client_nets=["198.18.0.0/24"], capture_dir=str(path), block_domains=["x.example"]
    )
    old = os.umask(0)
    try:
        prepare_capture_dir(opts, me)
    finally:
        os.umask(old)
    st = os.stat(path)
    assert (st.st_mode & 0o777, st.st_uid) == (0o700, me.uid)
    prepare_capture_dir(opts, me)  # a previous run's directory: used as it is
    os.chmod(path, 0o770)
    with pytest.raises(ConfigError, match=r"^--capture-dir: .* writable by others"):
        prepare_capture_dir(opts, me)
    os.chmod(path, 0o700)
    stranger = dataclasses.replace(me, name="other", uid=me.uid + 1)
    with pytest.raises(ConfigError, match=r"^--capture-dir: .* belongs to uid"):
        prepare_capture_dir(opts, stranger)
    capture = open_capture_dir(opts)
    assert capture is not None
    try:
        analyzers = load_analyzers(opts, capture=capture)
        assert analyzers[0] is capture and len(analyzers) == 2  # then the domain blocker
    finally:
        capture.close()
