"""``relay.datapath.fairshare``: each flow's share of a loop pass, order kept per flow."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from relay.datapath.fairshare import flow_key, split
from stack.wire.tcp import ACK, build_tcp_packet

V4 = [ipaddress.ip_address(a).packed for a in ("198.18.1.2", "198.18.2.2")]
V6 = [ipaddress.ip_address(a).packed for a in ("fd00:1::2", "fd00:2::2")]


def tcp(port: int, size: int, addrs: list[bytes] = V4, seq: int = 0) -> bytes:
    return build_tcp_packet(addrs[0], addrs[1], port, 80, seq, 0, ACK, 65535, b"", bytes(size))


def test_keys_tell_flows_apart_by_addresses_and_ports() -> None:
    assert flow_key(tcp(1000, 10)) == flow_key(tcp(1000, 500, seq=7))
    assert flow_key(tcp(1000, 10)) != flow_key(tcp(1001, 10))
    assert flow_key(tcp(1000, 10, V6)) == flow_key(tcp(1000, 99, V6))
    assert flow_key(tcp(1000, 10, V6)) != flow_key(tcp(1001, 10, V6))
    assert flow_key(b"") == flow_key(b"\x45" * 10) == b""  # unreadable: one shared key
    later = bytearray(tcp(1000, 10))
    later[6:8] = (0x00B9).to_bytes(2, "big")  # a fragment at offset 185 * 8: no ports
    assert flow_key(bytes(later)) == bytes(later[12:20])


def test_a_view_of_a_packet_has_the_packets_key() -> None:
    # A TUN super-segment comes as a memoryview (relay.datapath.tun): same key, as bytes.
    for packet in (tcp(1000, 3000), tcp(1000, 3000, V6), tcp(1000, 10)[:30]):
        key = flow_key(memoryview(packet))
        assert type(key) is bytes and key == flow_key(packet)
    burst = [memoryview(tcp(1000, 60_000)), memoryview(tcp(1000, 60_000)), tcp(2000, 10)]
    now, _, later, _ = split(burst, [True, True, False], 50_000)
    assert now == [burst[0], burst[2]] and later == [burst[1]]


def test_a_small_batch_is_returned_as_it_is() -> None:
    packets = [tcp(1000, 100), tcp(1001, 100)]
    marks = [True, False]
    now, now_marks, later, later_marks = split(packets, marks, 10_000)
    assert (now, now_marks, later, later_marks) == (packets, marks, [], [])


def test_a_burst_gives_way_to_another_flow_and_keeps_its_order() -> None:
    burst = [tcp(1000, 1000, seq=i) for i in range(10)]
    request = tcp(2000, 10)
    packets = [*burst, request]
    marks = [i % 2 == 0 for i in range(len(packets))]
    now, now_marks, later, later_marks = split(packets, marks, 3000)
    assert now == [*burst[:3], request]  # 3 * 1,040 bytes reach the share, then the request
    assert later == burst[3:]
    assert now_marks == [*marks[:3], marks[-1]] and later_marks == marks[3:-1]


def test_one_packet_per_flow_always_goes() -> None:
    big = [tcp(1000 + i, 1400) for i in range(5)]
    now, _, later, _ = split(big, [False] * 5, 100)
    assert now == big and later == []


@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1500)), max_size=60),
    st.integers(0, 6000),
)
def test_nothing_is_lost_and_every_flow_keeps_its_order(
    spec: list[tuple[int, int]], budget: int
) -> None:
    packets = [tcp(1000 + flow, size, seq=i) for i, (flow, size) in enumerate(spec)]
    marks = [i % 3 == 0 for i in range(len(packets))]
    now, now_marks, later, later_marks = split(packets, marks, budget)
    assert sorted(now + later) == sorted(packets)
    mark_of = dict(zip(packets, marks, strict=True))
    assert [mark_of[p] for p in now] == now_marks and [mark_of[p] for p in later] == later_marks
    for flow in range(4):
        key = flow_key(tcp(1000 + flow, 0))
        mine = [p for p in packets if flow_key(p) == key]
        # Each flow: a prefix now, the rest later, in the original order.
        assert [p for p in now if flow_key(p) == key] + [
            p for p in later if flow_key(p) == key
        ] == mine
