"""Segments per second through the sans-IO Stack, no I/O.

A client bulk-sends 1460-byte segments to the Stack in batches, as the relay's
packet loop would feed them from a TUN read: every packet is parsed and its
checksum verified, the payload is delivered and consumed, and ACKs are built.
The baseline, measured in the same run, is the cost of the checksum
verification alone (``int.from_bytes`` over each packet): the floor no pure
Python stack can go under.

With ``--options`` the client negotiates window scaling, SACK and timestamps
in its SYN, as Linux does, and every data segment carries the NOP,NOP,TS
option block (the stack then echoes timestamps on its ACKs).

With ``--download`` it measures the other direction: the Stack sends a bulk
stream with offloads on (GSO super-segments, as the relay writes them) and a
synthetic Linux-like client ACKs every second full segment with timestamps,
so the cost measured is mostly the ACK path. Only the Stack's calls are timed.

With ``--pingpong`` it measures what a request/response exchange costs the
Stack: a 64-byte request in (with timestamps, ACKing the last response), its
event, ``consumed``, a 64-byte response out, and the timer calls the relay's
packet loop makes around them.

With ``--ooo N`` it measures a hostile client's out-of-order flood: N
one-byte segments into one connection, each two bytes beyond the last (a
one-byte hole between each, so none coalesce; all within the window), fed in
batches of 64 with the duplicate ACKs built after each batch, with SACK
negotiated and without. It reports the CPU seconds the Stack spent.

Run: ``python benchmarks/bench_stack.py [--segments N] [--profile]``
and one of ``--options``, ``--download``, ``--pingpong``, ``--ooo N``, or none.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from stack import ConnectionRequest, DataReceived, FlowId, Stack, StackConfig, TcpConfig
from stack.wire.checksum import ones_sum
from stack.wire.ip import parse_ip
from stack.wire.tcp import ACK, PSH, SYN, build_tcp_packet, encode_options, parse_tcp

CLIENT = bytes([198, 18, 1, 2])
SERVER = bytes([198, 18, 2, 2])
MSS = 1460
BATCH = 40  # 58,400 bytes: within the 64 KiB window the stack advertises


def _handshake(stack: Stack, options: bool, sack: bool = True) -> tuple[FlowId, int, int, bytes]:
    isn = 1000
    if options:
        syn_opts = encode_options(mss=MSS, wscale=7, sack_permitted=sack, timestamps=(1, 0))
    else:
        syn_opts = encode_options(mss=MSS)
    syn = build_tcp_packet(CLIENT, SERVER, 40000, 80, isn, 0, SYN, 65535, syn_opts)
    stack.receive(syn, 0.0)
    ev = stack.next_event()
    assert isinstance(ev, ConnectionRequest)
    stack.accept(ev.flow, isn=5000)
    (synack,) = stack.packets_to_send(0.0)
    ip = parse_ip(synack)
    tcp = parse_tcp(synack, ip.offset, ip.end)
    server_isn = tcp.seq
    # Data segments carry NOP,NOP,TS (the fast path in wire.tcp), echoing the SYN-ACK.
    ts = b""
    if options and tcp.options.timestamps is not None:
        ts = encode_options(timestamps=(2, tcp.options.timestamps[0]))
    ack = build_tcp_packet(CLIENT, SERVER, 40000, 80, isn + 1, server_isn + 1, ACK, 65535, ts)
    stack.receive(ack, 0.0)
    stack.packets_to_send(0.0)
    while stack.next_event() is not None:
        pass
    return ev.flow, isn + 1, server_isn + 1, ts


def _packets(n: int, seq: int, ack: int, options: bytes = b"") -> list[bytes]:
    payload = bytes(range(256)) * 6
    payload = payload[:MSS]
    return [
        build_tcp_packet(
            CLIENT,
            SERVER,
            40000,
            80,
            (seq + i * MSS) & 0xFFFFFFFF,
            ack,
            ACK | PSH,
            65535,
            options,
            payload,
        )
        for i in range(n)
    ]


def run_stack(n: int, options: bool = False) -> tuple[float, int, int]:
    # The synthetic client sends one window's worth per batch; the relay consumes
    # each batch at once, so every batch's ACKs reopen the window for the next.
    stack = Stack(StackConfig(tcp=TcpConfig()))
    flow, seq, ack, ts = _handshake(stack, options)
    packets = _packets(n, seq, ack, ts)
    delivered = 0
    acks = 0
    now = 0.0
    t0 = time.perf_counter()
    for start in range(0, n, BATCH):
        now += 0.0001
        for p in packets[start : start + BATCH]:
            stack.receive(p, now)
        while (ev := stack.next_event()) is not None:
            if isinstance(ev, DataReceived):
                delivered += len(ev.data)
                stack.consumed(flow, len(ev.data))
        acks += len(stack.packets_to_send(now))
    elapsed = time.perf_counter() - t0
    assert delivered == n * MSS, (delivered, n * MSS)
    return elapsed, delivered, acks


def run_download(n: int, batch: bool = True) -> tuple[float, int, int]:
    """Send ``n`` full segments' worth to a client that ACKs every second segment.
    Returns (seconds inside the Stack, bytes acknowledged, ACKs fed). ``batch``:
    the ACKs of one round are fed as a batch, so runs of them merge (the relay's
    way); without it each is processed on its own."""
    stack = Stack(StackConfig(tcp=TcpConfig(tso_segments=44), offload=True))
    flow, cseq, _, _ = _handshake(stack, True)
    chunk = bytes(65536)
    total = n * MSS
    queued = 0
    acked = 0
    acks = 0
    now = 0.0
    inside = 0.0
    clock = time.perf_counter
    received: int | None = None  # the client's rcv_nxt
    tsval = 3
    while True:
        now += 0.0001
        t0 = clock()
        while queued < total and (space := stack.send_space(flow)) > 0:
            queued += stack.send(flow, chunk[: min(space, total - queued, len(chunk))])
        packets = stack.packets_to_send(now)
        inside += clock() - t0
        if not packets:
            break
        ack_packets = []
        for p in packets:
            ip = parse_ip(p)
            tcp = parse_tcp(p, ip.offset, ip.end)
            end = tcp.seq + ip.end - ip.offset - tcp.header_len
            seq = tcp.seq if received is None else received
            echo = tcp.options.timestamps[0] if tcp.options.timestamps else 0
            step = 2 * (MSS - 12)  # what Linux ACKs: every second full segment
            while seq < end:
                seq = min(seq + step, end)
                tsval += 1
                opts = encode_options(timestamps=(tsval, echo))
                ack_packets.append(
                    build_tcp_packet(CLIENT, SERVER, 40000, 80, cseq, seq, ACK, 65535, opts)
                )
            received = end
        t0 = clock()
        for a in ack_packets:
            stack.receive(a, now, batch=batch)
        stack.end_batch(now)
        while stack.next_event() is not None:
            pass
        inside += clock() - t0
        acks += len(ack_packets)
        if received is not None:
            acked = received
    del acked
    return inside, queued, acks


def run_pingpong(n: int) -> float:
    """``n`` request/response exchanges of 64 bytes each way, as the relay makes
    them: the request in as a batch of one, its event, ``consumed``, the response
    ``send``, the packets out, and the timer calls of one loop pass. Returns the
    seconds spent inside the Stack."""
    stack = Stack(StackConfig(tcp=TcpConfig(), offload=True))
    flow, cseq, _, _ = _handshake(stack, True)
    payload = bytes(64)
    now = 0.0
    tsval = 3
    echo = 0
    acked = 0  # the client's rcv_nxt, ACKed by its next request
    inside = 0.0
    clock = time.perf_counter
    for _ in range(n):
        now += 0.0002
        tsval += 1
        opts = encode_options(timestamps=(tsval, echo))
        request = build_tcp_packet(
            CLIENT, SERVER, 40000, 80, cseq, acked, ACK | PSH, 65535, opts, payload
        )
        cseq += len(payload)
        t0 = clock()
        stack.receive(request, now, batch=True)
        stack.end_batch(now)
        stack.handle_timer(now)
        while (ev := stack.next_event()) is not None:
            if isinstance(ev, DataReceived):
                stack.consumed(flow, len(ev.data))
        stack.packets_to_send(now)  # nothing: the ACK waits for the response
        stack.get_timer()
        stack.send(flow, payload)
        packets = stack.packets_to_send(now)
        stack.get_timer()
        inside += clock() - t0
        (response,) = packets
        ip = parse_ip(response)
        tcp = parse_tcp(response, ip.offset, ip.end)
        acked = (tcp.seq + ip.end - ip.offset - tcp.header_len) & 0xFFFFFFFF
        if tcp.options.timestamps is not None:
            echo = tcp.options.timestamps[0]
    return inside


def run_ooo(n: int, sack: bool) -> float:
    """``n`` one-byte out-of-order segments (see the module docstring); returns
    the CPU seconds inside the Stack."""
    cfg = TcpConfig(rcv_buf=4 << 20, rcv_buf_initial=4 << 20)
    stack = Stack(StackConfig(tcp=cfg))
    _, seq, ack, ts = _handshake(stack, True, sack)
    packets = [
        build_tcp_packet(
            CLIENT, SERVER, 40000, 80, (seq + 2 * i) & 0xFFFFFFFF, ack, ACK, 65535, ts, b"x"
        )
        for i in range(1, n + 1)
    ]
    acks = 0
    clock = time.process_time
    t0 = clock()
    for start in range(0, n, 64):
        for p in packets[start : start + 64]:
            stack.receive(p, 0.001)
        acks += len(stack.packets_to_send(0.001))
    cpu = clock() - t0
    assert acks >= n - 64, (acks, n)  # a duplicate ACK per segment
    return cpu


def report_ooo(n: int, repeat: int) -> None:
    print(f"out-of-order flood: {n:,} one-byte segments, a one-byte hole between each")
    for sack in (True, False):
        cpu = sorted(run_ooo(n, sack) for _ in range(repeat))[repeat // 2]
        name = "SACK" if sack else "no SACK"
        print(f"{name:8}: {cpu:8.3f} s CPU, {cpu / n * 1e6:7.1f} us per segment")


def run_checksum_floor(n: int) -> float:
    packets = _packets(n, 1, 1)
    t0 = time.perf_counter()
    for p in packets:
        ones_sum(p)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one run")
    parser.add_argument(
        "--options", action="store_true", help="negotiate WS/SACK/TS; TSopt on every segment"
    )
    parser.add_argument(
        "--download", action="store_true", help="the Stack sends; the client's ACKs come in"
    )
    parser.add_argument(
        "--pingpong", action="store_true", help="64-byte request/response exchanges"
    )
    parser.add_argument(
        "--ooo", type=int, metavar="N", help="N one-byte out-of-order segments, SACK on and off"
    )
    args = parser.parse_args()
    n = args.segments
    if args.ooo:
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(run_ooo, args.ooo, True)
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        else:
            report_ooo(args.ooo, args.repeat)
        return
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        if args.download:
            run_download(n)
        elif args.pingpong:
            run_pingpong(n)
        else:
            run_stack(n, args.options)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return
    if args.download:
        report_download(n, args.repeat)
        return
    if args.pingpong:
        report_pingpong(n, args.repeat)
        return
    rates = []
    ack_count = 0
    for _ in range(args.repeat):
        elapsed, _, ack_count = run_stack(n, args.options)
        rates.append(n / elapsed)
    floor = n / min(run_checksum_floor(n) for _ in range(args.repeat))
    best = sorted(rates)[len(rates) // 2]
    mode = "WS/SACK/TS negotiated, TSopt on every segment" if args.options else "no options"
    print(f"segments: {n} x {MSS} B in batches of {BATCH} ({mode}); ACKs per run: {ack_count}")
    print(f"stack:          {best:12,.0f} segments/s  ({best * MSS * 8 / 1e9:.2f} Gbit/s payload)")
    print(f"checksum only:  {floor:12,.0f} segments/s  (baseline)")
    print(f"ratio stack/checksum-only: {best / floor:.2f}")
    print(f"target >= 100,000 segments/s: {'met' if best >= 100_000 else 'NOT met'}")


def report_download(n: int, repeat: int) -> None:
    floor = n / min(run_checksum_floor(n) for _ in range(repeat))
    print(f"download: {n * MSS:,} bytes sent with offloads; one ACK in per 2 segments")
    print(f"checksum only:  {floor:12,.0f} packets/s  (baseline)")
    for batch in (False, True):
        runs = sorted((run_download(n, batch) for _ in range(repeat)), key=lambda r: r[0])
        inside, sent, acks = runs[len(runs) // 2]
        rate = acks / inside
        name = "batched" if batch else "one by one"
        print(
            f"ACKs {name:10}: {rate:10,.0f} ACKs/s, {inside / acks * 1e6:5.2f} us each "
            f"({sent * 8 / inside / 1e9:.2f} Gbit/s sent); "
            f"ratio to checksum-only {rate / floor:.2f}"
        )


def report_pingpong(n: int, repeat: int) -> None:
    floor = n / min(run_checksum_floor(n) for _ in range(repeat))
    inside = sorted(run_pingpong(n) for _ in range(repeat))[repeat // 2]
    rate = n / inside
    print(f"ping-pong: {n:,} exchanges of 64 bytes each way, one loop pass each")
    print(f"checksum only:  {floor:12,.0f} packets/s  (baseline)")
    print(
        f"exchanges:      {rate:12,.0f} /s, {inside / n * 1e6:5.2f} us each inside the Stack; "
        f"ratio to checksum-only {rate / floor:.2f}"
    )


if __name__ == "__main__":
    main()
