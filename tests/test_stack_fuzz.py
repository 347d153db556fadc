"""Malformed and hostile input never raises out of the Stack nor grows it past its limits."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stack import Stack, StackConfig, TcpConfig
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, encode_options

from packets import C4, C6, CLIENT_ISN, S4, S6, SERVER_ISN, open_tcp_flow, tcp_packet

LIMITS = StackConfig(
    tcp=TcpConfig(rcv_buf=4096, ooo_limit=2048, snd_buf=4096), max_flows=8, max_pending=4
)

_valid = st.builds(
    tcp_packet,
    seq=st.sampled_from([CLIENT_ISN, CLIENT_ISN + 1, CLIENT_ISN + 3000, 0, 0xFFFFFFFF])
    | st.integers(0, 2**32 - 1),
    ack=st.sampled_from([SERVER_ISN + 1, 0]) | st.integers(0, 2**32 - 1),
    flags=st.sampled_from([SYN, ACK, ACK | PSH, ACK | FIN, RST, RST | ACK, SYN | ACK, 0, 0xFF]),
    payload=st.binary(max_size=3000),
    window=st.integers(0, 65535),
    src=st.sampled_from([C4]),
    dst=st.sampled_from([S4]),
    sport=st.sampled_from([40000, 40001, 40002]) | st.integers(0, 65535),
    dport=st.sampled_from([80, 443]),
    options=st.sampled_from([b"", encode_options(mss=1), encode_options(mss=1460, wscale=14)]),
)
_valid6 = st.builds(
    tcp_packet,
    seq=st.integers(0, 2**32 - 1),
    flags=st.sampled_from([SYN, ACK, ACK | FIN, RST]),
    payload=st.binary(max_size=100),
    src=st.just(C6),
    dst=st.just(S6),
)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    packet = bytearray(draw(_valid | _valid6))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "set"]))
        if not packet:
            break
        i = draw(st.integers(0, len(packet) - 1))
        if kind == "flip":
            packet[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del packet[i:]
        elif kind == "insert":
            packet[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            packet[i] = draw(st.integers(0, 255))
    return bytes(packet)


_packets = st.lists(_mutated() | _valid | st.binary(max_size=80), min_size=1, max_size=40)


def _check_bounds(stack: Stack) -> None:
    assert len(stack) <= LIMITS.max_flows
    for conn in stack._by_key.values():  # white-box: the test owns the limits it checks
        assert conn._unconsumed <= LIMITS.tcp.rcv_buf
        assert conn._ooo.size <= LIMITS.tcp.ooo_limit
        assert len(conn._sndbuf) <= LIMITS.tcp.snd_buf


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packets=_packets, accept=st.booleans())
def test_hostile_packets_never_raise_and_stay_bounded(packets: list[bytes], accept: bool) -> None:
    stack = Stack(LIMITS)
    open_tcp_flow(stack)
    now = 0.0
    for p in packets:
        now += 0.05
        stack.receive(p, now)
        while (ev := stack.next_event()) is not None:
            if accept and type(ev).__name__ == "ConnectionRequest":
                stack.accept(ev.flow, isn=7)  # type: ignore[union-attr]
        stack.handle_timer(now)
        stack.packets_to_send(now)
        _check_bounds(stack)
    counted = (
        stack.stats.parse_errors
        + stack.stats.checksum_errors
        + stack.stats.fragments
        + stack.stats.not_tcp
    )
    assert counted <= stack.stats.packets_in


# --- at scale: benchmarks/fuzz_stack.py's generator, CI-sized --------------------------
# (The full run, a million packets, and its result are in benchmarks/README.md.)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1))
def test_fifty_thousand_generated_packets_never_raise_and_stay_bounded(seed: int) -> None:
    from benchmarks.fuzz_stack import run

    result = run(10_000, seed)  # x 5 examples; raises with the seed and packet index
    assert result.packets >= 10_000
    assert result.connections_opened > 0  # the generator reaches the connection code
    assert 0 < result.parse_errors < result.packets  # and the parsers' error paths


@settings(max_examples=3, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1))
def test_mutated_conversations_never_raise_out_of_the_dissectors(seed: int) -> None:
    from benchmarks.fuzz_stack import fuzz_dissectors

    _, reached = fuzz_dissectors(1_000, seed)
    # Every dissector was reached, so each one met mutated input.
    assert set(reached) >= {"TlsDissector", "HttpDissector", "DnsTcpDissector", "QuicDissector"}
