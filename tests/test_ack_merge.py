"""Merging runs of pure ACKs read in one batch (``Stack.receive(batch=True)``).

Each test builds two stacks in the same state and feeds them the same packets:
one processes every packet on its own, the other gets them as a batch. The
merge must be invisible in what the stacks send and deliver; only the
``acks_merged`` counter (and the time spent) may differ.
"""

from __future__ import annotations

from typing import NamedTuple

from stack import ConnectionRequest, DataReceived, FlowId, Stack, StackConfig, TcpConfig
from stack.wire.tcp import ACK, PSH, SYN, encode_options

from packets import CLIENT_ISN, SERVER_ISN, ParsedTcp, sent_tcp, stack_events, tcp_packet

MSS = 1000
DATA = bytes(range(256)) * 160  # 41 segments: more than cwnd allows


def opened(*, sack: bool = False, ts: bool = False) -> tuple[Stack, FlowId, list[ParsedTcp]]:
    """A stack with one established flow that has sent DATA as far as cwnd allows."""
    stack = Stack(StackConfig(tcp=TcpConfig(tail_loss_probe=False)))
    syn_opts = encode_options(mss=MSS, sack_permitted=sack, timestamps=(100, 0) if ts else None)
    stack.receive(tcp_packet(CLIENT_ISN, 0, SYN, options=syn_opts), 0.0)
    (ev,) = stack_events(stack)
    assert isinstance(ev, ConnectionRequest)
    stack.accept(ev.flow, isn=SERVER_ISN)
    sent_tcp(stack)
    stack.receive(tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 1, options=stamp(101, ts)), 0.0)
    stack_events(stack)
    stack.send(ev.flow, DATA)
    sent = sent_tcp(stack, 0.01)
    assert len(sent) >= 8 and all(len(p.payload) > 0 for p in sent)
    return stack, ev.flow, sent


def stamp(tsval: int, ts: bool) -> bytes:
    return encode_options(timestamps=(tsval, 1)) if ts else b""


def acked(n: int) -> int:
    """The ACK number for the first ``n`` bytes of DATA."""
    return SERVER_ISN + 1 + n


class Twins(NamedTuple):
    one: Stack  # fed packet by packet
    batched: Stack  # fed one batch
    out_a: list[ParsedTcp]
    out_b: list[ParsedTcp]
    events: list[object]  # the same for both


def twins(packets: list[bytes], **opened_args: bool) -> Twins:
    """Feed ``packets`` to a stack one by one and to its twin as one batch."""
    one, flow_a, sent_a = opened(**opened_args)
    batched, flow_b, sent_b = opened(**opened_args)
    assert flow_a == flow_b and sent_a == sent_b
    now = 0.05
    for p in packets:
        one.receive(p, now)
    for p in packets:
        batched.receive(p, now, batch=True)
    batched.end_batch(now)
    out_a, out_b = sent_tcp(one, now), sent_tcp(batched, now)
    found = stack_events(one)
    assert stack_events(batched) == found
    return Twins(one, batched, out_a, out_b, found)


def test_a_run_of_cumulative_acks_counts_as_its_last() -> None:
    # A delayed-ACK client: one ACK per two segments. In slow start each covers
    # 2 SMSS, so the merged ACK must grow cwnd as much as the five did.
    packets = [tcp_packet(CLIENT_ISN + 1, acked(k * 2 * MSS)) for k in range(1, 6)]
    r = twins(packets)
    assert r.batched.stats.acks_merged == 4 and r.one.stats.acks_merged == 0
    assert r.out_b == r.out_a
    assert len(r.out_a) == 20  # 10 segments acknowledged, cwnd grown from 10 to 20 segments


def test_duplicate_acks_are_not_merged_and_still_trigger_fast_retransmit() -> None:
    first = acked(MSS)
    packets = [tcp_packet(CLIENT_ISN + 1, first)] + [tcp_packet(CLIENT_ISN + 1, first)] * 3
    r = twins(packets)
    assert r.batched.stats.acks_merged == 0
    assert r.out_b == r.out_a
    assert r.out_a and r.out_a[0].tcp.seq == first  # RFC 5681 3.2: the segment at the hole


def test_acks_with_sack_blocks_are_not_merged() -> None:
    def sack(left: int, right: int) -> bytes:
        return encode_options(sack_blocks=[(acked(left), acked(right))])

    packets = [
        tcp_packet(CLIENT_ISN + 1, acked(MSS)),
        tcp_packet(CLIENT_ISN + 1, acked(MSS), options=sack(2 * MSS, 3 * MSS)),
        tcp_packet(CLIENT_ISN + 1, acked(MSS), options=sack(2 * MSS, 4 * MSS)),
        tcp_packet(CLIENT_ISN + 1, acked(MSS), options=sack(2 * MSS, 5 * MSS)),
    ]
    r = twins(packets, sack=True)
    assert r.batched.stats.acks_merged == 0
    assert r.out_b == r.out_a
    assert r.out_a[0].tcp.seq == acked(MSS)  # RFC 6675: the third SACK starts recovery


def test_data_between_acks_keeps_the_order() -> None:
    payload = b"upload"
    packets = [
        tcp_packet(CLIENT_ISN + 1, acked(2 * MSS)),
        tcp_packet(CLIENT_ISN + 1, acked(4 * MSS)),
        tcp_packet(CLIENT_ISN + 1, acked(4 * MSS), ACK | PSH, payload),
        tcp_packet(CLIENT_ISN + 1 + len(payload), acked(6 * MSS)),
        tcp_packet(CLIENT_ISN + 1 + len(payload), acked(8 * MSS)),
    ]
    r = twins(packets)
    assert r.batched.stats.acks_merged == 2  # 2 into 4 before the data, 6 into 8 after
    assert r.out_b == r.out_a
    assert any(p.tcp.ack == CLIENT_ISN + 1 + len(payload) for p in r.out_a)


def test_timestamps_that_go_backwards_end_the_run() -> None:
    packets = [
        tcp_packet(CLIENT_ISN + 1, acked(2 * MSS), options=stamp(200, True)),
        tcp_packet(CLIENT_ISN + 1, acked(4 * MSS), options=stamp(199, True)),  # reordered
        tcp_packet(CLIENT_ISN + 1, acked(6 * MSS), options=stamp(201, True)),
        tcp_packet(CLIENT_ISN + 1, acked(8 * MSS), options=stamp(202, True)),
    ]
    r = twins(packets, ts=True)
    assert r.batched.stats.acks_merged == 1  # only 6 into 8
    assert r.out_b == r.out_a


def test_held_acks_are_released_by_packets_to_send_without_end_batch() -> None:
    stack, _, _ = opened()
    for k in (2, 4):
        stack.receive(tcp_packet(CLIENT_ISN + 1, acked(k * MSS)), 0.05, batch=True)
    resent = sent_tcp(stack, 0.05)  # no end_batch(): packets_to_send does it
    assert stack.stats.acks_merged == 1
    assert len(resent) == 8 and resent[0].tcp.seq == acked(10 * MSS)


def test_an_ack_beyond_what_was_sent_is_not_merged_into_a_run() -> None:
    packets = [
        tcp_packet(CLIENT_ISN + 1, acked(2 * MSS)),
        tcp_packet(CLIENT_ISN + 1, acked(len(DATA) + 5)),  # never sent: dropped, answered by an ACK
        tcp_packet(CLIENT_ISN + 1, acked(4 * MSS)),
    ]
    r = twins(packets)
    assert r.batched.stats.acks_merged == 0
    assert r.out_b == r.out_a
    data = [p for p in r.out_a if p.payload]
    assert data and data[0].tcp.seq == acked(10 * MSS)


def test_merged_acks_deliver_nothing_twice() -> None:
    # The client's data, then its ACK-only run: the upload arrives once.
    packets = [tcp_packet(CLIENT_ISN + 1, acked(MSS), ACK | PSH, b"x" * 10)] + [
        tcp_packet(CLIENT_ISN + 11, acked(k * MSS)) for k in (2, 3, 4)
    ]
    result = twins(packets)
    assert result.batched.stats.acks_merged == 2
    data = [e.data for e in result.events if isinstance(e, DataReceived)]
    assert data == [b"x" * 10]
    assert result.out_b == result.out_a
