"""Feed a Stack millions of generated and mutated packets; it must never raise nor grow.

    python benchmarks/fuzz_stack.py --packets 1000000 --seed 1 [--max-seconds 3600]

A seeded generator (stdlib ``random``: the same seed gives the same packets)
plays up to 24 clients against one ``Stack`` with small limits, and a driver
plays the relay: it accepts or rejects connection requests, consumes received
bytes (or not), sends, closes and aborts. Each packet is one of:

* an in-window segment of a live flow (data, pure ACK, FIN), with random TCP
  options: MSS, window scale, SACK-permitted, timestamps (also going back),
  SACK blocks within, above and below the window, unknown and bad-length options;
* an out-of-window segment (far ahead, far behind, at the window's edges);
* a SYN (new flow, or a repeat) or an RST (in or out of window);
* a fragment storm: a large TCP or UDP packet cut into IPv4 or IPv6 fragments,
  shuffled, duplicated, with pieces missing or bytes flipped (overlaps);
* any of the above with 1-4 mutations (bit flips, truncation, inserted bytes);
* random bytes.

Time advances by a random step per packet and sometimes by minutes, so every
timer (retransmission, keepalive, TIME-WAIT, reassembly) fires. Every
``CHECK_EVERY`` packets, and at the end, the bounds are checked:
connections <= max_flows, per connection unconsumed <= rcv_buf, held out of
order <= ooo_limit, send buffer <= snd_buf; reassembly bytes and datagrams
within FragmentConfig; UDP/echo flows within DatagramConfig; the timer heap
within 2 x live entries + its compaction threshold; TIME-WAIT entries within
max_time_wait. An exception or a broken bound stops the run with the seed and
the packet index (rerun with the same seed to reproduce).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stack import ConnectionRequest, DataReceived, Stack, StackConfig, TcpConfig
from stack.config import DatagramConfig, FragmentConfig
from stack.events import FlowId
from stack.fragments import fragment
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, build_tcp_packet, encode_options
from stack.wire.udp import build_udp_packet

LIMITS = StackConfig(
    # Keepalive and an idle timeout: the clock's jumps end idle connections, so the
    # table churns instead of staying full.
    tcp=TcpConfig(
        rcv_buf=16384,
        ooo_limit=8192,
        snd_buf=16384,
        memory_budget=1 << 20,
        keepalive=True,
        keepalive_idle=30.0,
        keepalive_interval=5.0,
        keepalive_probes=2,
        idle_timeout=120.0,
    ),
    max_flows=32,
    max_pending=8,
    max_time_wait=64,
    datagram=DatagramConfig(max_flows=16),
    fragments=FragmentConfig(max_bytes=64 << 10, max_datagrams=16, max_fragments=32),
)
CHECK_EVERY = 1000
TIMER_HEAP_SLACK = 64  # stack._COMPACT_AT: the lazy heap compacts past this

CLIENTS = [
    (4, bytes([198, 18, 0, 2]), bytes([198, 19, 0, 80])),
    (6, bytes.fromhex("fd00" + "00" * 13 + "02"), bytes.fromhex("fd00" + "00" * 12 + "0180")),
]


class BoundBroken(AssertionError):
    pass


@dataclass
class Flow:
    """One client's view of a connection: enough to stay (mostly) in window."""

    version: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int = 0
    established: bool = False
    ts: int = field(default=1000)


class Fuzzer:
    """Generates the packets; ``random.Random(seed)`` makes a run reproducible."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.flows: list[Flow] = []
        self.ident = 0

    # --- options --------------------------------------------------------------------

    def options(self, flow: Flow) -> bytes:
        r = self.rng
        kind = r.random()
        if kind < 0.3:
            return b""
        if kind < 0.5:
            flow.ts += r.choice((1, 1, 1, 0, -5, 1 << 31))  # also back in time (PAWS)
            return encode_options(timestamps=(flow.ts & 0xFFFFFFFF, r.getrandbits(32)))
        if kind < 0.8:
            blocks = []
            for _ in range(r.randint(1, 4)):
                base = r.choice((flow.ack, flow.seq, r.getrandbits(32)))
                left = (base + r.randint(-70000, 70000)) & 0xFFFFFFFF
                right = (left + r.randint(-100, 30000)) & 0xFFFFFFFF  # also inverted
                blocks.append((left, right))
            try:
                return encode_options(sack_blocks=blocks[:3])
            except ValueError:
                return b""
        if kind < 0.9:  # raw: the builder refuses the out-of-range values
            mss = r.choice((0, 1, 536, 1460, 65535)).to_bytes(2, "big")
            wscale = bytes([r.choice((0, 7, 14, 15, 255))])
            sack_ok = b"\x04\x02" if r.random() < 0.5 else b"\x01\x01"
            return b"\x02\x04" + mss + b"\x01\x03\x03" + wscale + sack_ok + b"\x01\x01"
        # Unknown kinds, bad lengths, a zero length, EOL in the middle.
        raw = bytes(r.choice((1, 0, 2, 3, 4, 5, 8, 30, 254, r.randint(0, 255))) for _ in range(8))
        return raw[: r.choice((4, 8))]

    # --- packets --------------------------------------------------------------------

    def tcp(self, flow: Flow, seq: int, flags: int, payload: bytes = b"") -> bytes:
        opts = self.options(flow)
        return build_tcp_packet(
            flow.src, flow.dst, flow.sport, flow.dport, seq & 0xFFFFFFFF, flow.ack & 0xFFFFFFFF,
            flags, self.rng.choice((0, 1, 512, 65535, self.rng.randint(0, 65535))), opts, payload,
        )  # fmt: skip

    def new_flow(self) -> Flow:
        r = self.rng
        version, src, dst = r.choice(CLIENTS)
        sport, dport = r.randint(1024, 1100), r.choice((80, 443))
        flow = Flow(version, src, dst, sport, dport, r.getrandbits(32))
        if len(self.flows) >= 24:
            self.flows.pop(r.randrange(len(self.flows)))
        self.flows.append(flow)
        return flow

    def syn(self) -> bytes:
        r = self.rng
        flow = self.new_flow() if not self.flows or r.random() < 0.7 else r.choice(self.flows)
        opts = encode_options(
            mss=r.choice((None, 1460, 536, 1)),
            wscale=r.choice((None, 0, 7, 14)),
            sack_permitted=r.random() < 0.8,
            timestamps=(flow.ts & 0xFFFFFFFF, 0) if r.random() < 0.7 else None,
        )
        return build_tcp_packet(
            flow.src, flow.dst, flow.sport, flow.dport, flow.seq, 0, SYN, 65535, opts, b""
        )

    def segment(self, flow: Flow) -> bytes:
        r = self.rng
        size = r.choice((0, 0, 1, 100, 1460, 1460, r.randint(0, 3000)))
        where = r.random()
        if where < 0.6:
            seq = flow.seq + 1  # in order
            flow.seq = (flow.seq + size) & 0xFFFFFFFF
        elif where < 0.8:
            seq = flow.seq + 1 + r.randint(1, 20000)  # a hole before it
        elif where < 0.9:
            seq = flow.seq + 1 - r.randint(1, 20000)  # old, or overlapping
        else:
            seq = flow.seq + r.choice((1 << 31, 65535, 65536, 1 << 20, -(1 << 20)))
        flags = r.choice((ACK, ACK | PSH, ACK | PSH, ACK | FIN, ACK, RST, RST | ACK, 0, 0xFF))
        if flags & RST:
            size = 0
        return self.tcp(flow, seq, flags, r.randbytes(size))

    def storm(self) -> list[bytes]:
        r = self.rng
        version, src, dst = r.choice(CLIENTS)
        size = r.randint(1400, 6000)
        if r.random() < 0.5:
            big = build_udp_packet(src, dst, r.randint(1024, 1100), 53, r.randbytes(size))
        else:
            flow = r.choice(self.flows) if self.flows else self.new_flow()
            big = self.tcp(flow, flow.seq + 1, ACK, r.randbytes(size))
        self.ident = (self.ident + 1) & 0xFFFF
        mtu = 576 if version == 4 else 1280
        if len(big) <= mtu:
            return [big]
        pieces = fragment(big, mtu, self.ident)
        r.shuffle(pieces)
        out = []
        for p in pieces:
            roll = r.random()
            if roll < 0.1:
                continue  # missing: reassembly must time out
            out.append(p)
            if roll > 0.85:
                out.append(p)  # duplicate
            if roll > 0.95:
                q = bytearray(p)
                q[r.randrange(len(q))] ^= 0xFF  # an overlap, a bad header or length
                out.append(bytes(q))
        return out

    def mutate(self, packet: bytes) -> bytes:
        r = self.rng
        buf = bytearray(packet)
        for _ in range(r.randint(1, 4)):
            if not buf:
                break
            i = r.randrange(len(buf))
            kind = r.random()
            if kind < 0.5:
                buf[i] ^= 1 << r.randrange(8)
            elif kind < 0.7:
                del buf[i:]
            elif kind < 0.85:
                buf[i:i] = r.randbytes(r.randint(1, 8))
            else:
                buf[i] = r.randrange(256)
        return bytes(buf)

    def packets(self) -> list[bytes]:
        """The next one or more packets (a storm is many)."""
        r = self.rng
        roll = r.random()
        if roll < 0.08 or not self.flows:
            out = [self.syn()]
        elif roll < 0.75:
            out = [self.segment(r.choice(self.flows))]
        elif roll < 0.8:
            out = self.storm()
        elif roll < 0.97:
            inner = self.segment(r.choice(self.flows)) if r.random() < 0.8 else self.syn()
            out = [self.mutate(inner)]
        else:
            out = [r.randbytes(r.randint(0, 120))]
        return out

    def on_synack(self, version: int, sport: int, seq: int) -> None:
        """The client saw our SYN-ACK: its next ACK is in window."""
        for flow in self.flows:
            if flow.version == version and flow.sport == sport and not flow.established:
                flow.ack = (seq + 1) & 0xFFFFFFFF
                flow.established = True


def check_bounds(stack: Stack) -> None:
    cfg = LIMITS
    problems = []
    if len(stack) > cfg.max_flows:
        problems.append(f"{len(stack)} connections > max_flows {cfg.max_flows}")
    for conn in stack._by_key.values():  # white-box: the limits are the stack's internals
        if conn._unconsumed > cfg.tcp.rcv_buf:
            problems.append(f"unconsumed {conn._unconsumed} > rcv_buf")
        if conn._ooo.size > cfg.tcp.ooo_limit:
            problems.append(f"out of order {conn._ooo.size} > ooo_limit")
        if len(conn._sndbuf) > cfg.tcp.snd_buf:
            problems.append(f"send buffer {len(conn._sndbuf)} > snd_buf")
    frags = stack._fragments
    if frags.held_bytes > cfg.fragments.max_bytes or len(frags) > cfg.fragments.max_datagrams:
        problems.append(f"reassembly {frags.held_bytes} bytes, {len(frags)} datagrams")
    if stack.datagram_flows > cfg.datagram.max_flows:
        problems.append(f"{stack.datagram_flows} datagram flows")
    if len(stack._timers) > 2 * len(stack._filed) + TIMER_HEAP_SLACK + cfg.max_flows:
        problems.append(f"timer heap {len(stack._timers)} for {len(stack._filed)} live")
    if len(stack._time_wait) > cfg.max_time_wait:
        problems.append(f"{len(stack._time_wait)} TIME-WAIT entries")
    if problems:
        raise BoundBroken("; ".join(problems))


@dataclass
class Result:
    packets: int
    seconds: float
    seed: int
    connections_opened: int
    parse_errors: int
    max_connections: int


def run(packets: int, seed: int, max_seconds: float = float("inf")) -> Result:
    """Feed ``packets`` packets (or until ``max_seconds``); raise on a bug or a bound."""
    fz = Fuzzer(seed)
    r = random.Random(seed ^ 0x5EED)  # the driver's own choices
    stack = Stack(LIMITS)
    now = 0.0
    fed = 0
    peak = 0
    undecided: list[FlowId] = []  # requests the driver decides later (a slow connect)
    t0 = time.perf_counter()
    while fed < packets:
        batch = fz.packets()
        now += r.choice((0.0, 0.0001, 0.001, 0.01, 0.2)) if r.random() > 0.002 else 200.0
        for packet in batch:
            try:
                stack.receive(packet, now, batch=r.random() < 0.5)
            except Exception as exc:
                raise AssertionError(f"seed {seed}, packet {fed}: receive raised {exc!r}") from exc
            fed += 1
        try:
            stack.end_batch(now)
            stack.handle_timer(now)
            while (ev := stack.next_event()) is not None:
                _drive(stack, ev, r, undecided)
            if undecided and r.random() < 0.05:
                late = undecided.pop(0)
                if r.random() < 0.5:
                    stack.accept(late, isn=r.getrandbits(32))
                else:
                    stack.reject(late)
            for out in stack.packets_to_send(now):
                _observe(fz, out)
        except Exception as exc:
            raise AssertionError(f"seed {seed}, packet {fed}: the stack raised {exc!r}") from exc
        peak = max(peak, len(stack))
        if fed % CHECK_EVERY < len(batch):
            try:
                check_bounds(stack)
            except BoundBroken as exc:
                raise AssertionError(f"seed {seed}, packet {fed}: {exc}") from exc
            if time.perf_counter() - t0 > max_seconds:
                break
    check_bounds(stack)
    s = stack.stats
    return Result(fed, time.perf_counter() - t0, seed, s.connections_opened, s.parse_errors, peak)


def _drive(stack: Stack, ev: object, r: random.Random, undecided: list[FlowId]) -> None:
    """The relay's side: accept/reject, consume, send, close, abort."""
    flow: FlowId | None = getattr(ev, "flow", None)
    if flow is None or flow.proto != "tcp":
        return
    if isinstance(ev, ConnectionRequest):
        roll = r.random()
        if roll < 0.8:
            stack.accept(flow, isn=r.getrandbits(32))
        elif roll < 0.9:
            stack.reject(flow)
        else:
            undecided.append(flow)  # decided a few batches later (max_pending applies)
        return
    if isinstance(ev, DataReceived) and r.random() < 0.8:
        stack.consumed(flow, len(ev.data))
    roll = r.random()
    try:
        if roll < 0.3:
            stack.send(flow, r.randbytes(r.randint(1, 4000)))
        elif roll < 0.33:
            stack.close(flow)
        elif roll < 0.34:
            stack.abort(flow)
    except Exception as exc:
        if type(exc).__name__ != "LocalProtocolError":  # sending after close(): documented
            raise


def _observe(fz: Fuzzer, packet: bytes) -> None:
    """Learn the server's ISN from a SYN-ACK so later segments can be in window."""
    version = packet[0] >> 4
    off = 20 if version == 4 else 40
    if len(packet) < off + 20:
        return
    flags = packet[off + 13]
    if flags & (SYN | ACK) == SYN | ACK:
        dport = int.from_bytes(packet[off + 2 : off + 4], "big")
        seq = int.from_bytes(packet[off + 4 : off + 8], "big")
        fz.on_synack(version, dport, seq)


# --- the protocol dissectors ----------------------------------------------------------


def dissector_corpus() -> tuple[list[list[tuple[bool, bytes]]], list[tuple[bool, bytes]]]:
    """Real conversations to mutate: (client?, bytes) pieces per stream, and datagrams."""
    import dns.message
    from aioquic.quic.packet import QuicProtocolVersion

    from tests.dissect_helpers import C2S, quic_handshake, tls_conversation

    tls = tls_conversation(alpn=["h2", "http/1.1"])
    streams = [
        [(direction is C2S, data) for direction, data in tls.flights],
        [
            (True, b"GET /a HTTP/1.1\r\nHost: h.test\r\nUser-Agent: f\r\n\r\n"),
            (False, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
            (True, b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"),
            (True, b"5\r\nabcde\r\n0\r\n\r\n"),
            (False, b"HTTP/1.1 204 No Content\r\n\r\n"),
        ],
    ]
    query = dns.message.make_query("a.example.test.", "AAAA").to_wire()
    answer = dns.message.make_response(dns.message.from_wire(query)).to_wire()
    streams.append([(True, len(query).to_bytes(2, "big") + query), (False, answer)])
    c2s, s2c = quic_handshake(["h3"], QuicProtocolVersion.VERSION_1)
    datagrams = [(True, query), (False, answer)]
    datagrams += [(True, d) for d in c2s[:2]] + [(False, d) for d in s2c[:2]]
    return streams, datagrams


def fuzz_dissectors(cases: int, seed: int) -> tuple[float, dict[str, int]]:
    """Mutated conversations through detection and every dissector.

    Returns:
        Seconds, and how many cases reached each dissector (by class name).

    The package's contract (``relay.analysis.dissect``): a dissector never raises;
    it sets ``failed`` and ignores the rest. Any exception is a bug.
    """
    from relay.analysis.dissect import (
        StreamDetector,
        datagram_dissector,
        detect_datagram,
        stream_dissector,
    )
    from relay.analysis.hooks import Direction

    streams, datagrams = dissector_corpus()
    fz = Fuzzer(seed)
    r = fz.rng
    reached: dict[str, int] = {}
    t0 = time.perf_counter()
    for case in range(cases):
        try:
            if r.random() < 0.7:
                det = StreamDetector()
                d = None
                now = 1.0
                for client, data in r.choice(streams):
                    if r.random() < 0.5:
                        data = fz.mutate(data)
                    direction = Direction.CLIENT_TO_SERVER if client else Direction.SERVER_TO_CLIENT
                    cuts = sorted(r.sample(range(len(data) + 1), min(3, len(data) + 1)))
                    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
                        piece = data[a:b]
                        now += 0.001
                        if d is None and client and det.feed(piece) is not None:
                            assert det.result is not None
                            d = stream_dissector(det.result)
                            if d is not None:
                                name = type(d).__name__
                                reached[name] = reached.get(name, 0) + 1
                                d.feed(direction, det.take_backlog(), now)
                        elif d is not None and d.active:
                            d.feed(direction, piece, now)
                if d is not None:
                    d.end(Direction.CLIENT_TO_SERVER, now)
                    d.close(now)
            else:
                client, data = r.choice(datagrams)
                dd = datagram_dissector(detect_datagram(fz.mutate(data)))
                if dd is not None:
                    reached[type(dd).__name__] = reached.get(type(dd).__name__, 0) + 1
                    for _ in range(r.randint(1, 3)):
                        c, more = r.choice(datagrams)
                        direction = Direction.CLIENT_TO_SERVER if c else Direction.SERVER_TO_CLIENT
                        dd.datagram(direction, fz.mutate(more), 1.0)
                    dd.close(2.0)
        except Exception as exc:
            raise AssertionError(f"seed {seed}, case {case}: a dissector raised {exc!r}") from exc
    return time.perf_counter() - t0, reached


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop early after this")
    parser.add_argument(
        "--dissector-cases", type=int, default=0, help="also this many dissector conversations"
    )
    opts = parser.parse_args()
    result = run(opts.packets, opts.seed, opts.max_seconds)
    print(
        f"fuzz_stack: {result.packets:,} packets, seed {result.seed}, {result.seconds:.1f} s "
        f"({result.packets / result.seconds:,.0f} packets/s); connections opened "
        f"{result.connections_opened:,}, at most {result.max_connections} at once; "
        f"parse errors {result.parse_errors:,}; no exception, every bound held",
        flush=True,
    )
    if opts.dissector_cases:
        seconds, reached = fuzz_dissectors(opts.dissector_cases, opts.seed)
        print(
            f"fuzz_stack: {opts.dissector_cases:,} mutated conversations through the "
            f"dissectors, seed {opts.seed}, {seconds:.1f} s; none raised; reached: {reached}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
