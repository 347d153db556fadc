"""A bound on the work one client flow gets per pass of the packet loop.

Theory of operation: the packet loop (``relay.datapath.engine``) drains up to
``max_batch`` packets, gives them all to the stack, and only then dispatches
the events (a request's bytes go upstream there) and writes the stack's
output. With TUN offloads a bulk upload's packets are GRO super-segments of up
to 64 KiB, so one batch can carry megabytes of one flow, and a request that
arrived in the same batch waited for all of them to be received first.

``split`` lets each flow (its addresses and ports, read from the raw header)
have at most ``budget`` bytes of the batch -- always at least one packet --
and returns the rest, which the loop gives the stack first on its next pass,
before what it reads then: the order within a flow is kept, and only packets
of different flows change places, which TCP and UDP allow. The loop goes on
reading while less than ``CARRY_BYTES`` is carried, so a request that arrives
behind an upload's burst in the kernel's queue is read in the next pass. A batch of
``budget`` bytes or less is returned as it is, without looking at a header.

A packet whose header cannot be read gets the empty key (one shared flow);
a fragment without ports (not the first) gets its addresses only. A wrong key
only moves a packet behind others of its own key, never ahead of them.
"""

from __future__ import annotations

from relay.datapath.packet_source import RawPacket

PROTO_TCP, PROTO_UDP = 6, 17
# The loop reads no more while this much is carried (a flow's default window is
# 4 MiB; packets beyond their flows' windows are the stack's to drop, but they
# too wait here first): the rest stays in the kernel's TUN queue meanwhile.
CARRY_BYTES = 4 << 20


def flow_key(packet: RawPacket) -> bytes:
    """The addresses and, for TCP and UDP, the ports of a raw IP packet (no checks)."""
    if len(packet) < 20:
        return b""
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 15) * 4
        first = not packet[7] and not packet[6] & 0x1F  # fragment offset 0
        if packet[9] in (PROTO_TCP, PROTO_UDP) and first:
            return bytes(packet[12:20]) + packet[ihl : ihl + 4]
        return bytes(packet[12:20])
    if version == 6 and len(packet) >= 40:
        if packet[6] in (PROTO_TCP, PROTO_UDP):
            return bytes(packet[8:44])  # addresses and ports
        return bytes(packet[8:40])
    return b""


def split(
    packets: list[RawPacket], marks: list[bool], budget: int
) -> tuple[list[RawPacket], list[bool], list[RawPacket], list[bool]]:
    """``(now, now_marks, later, later_marks)``: each flow's packets up to ``budget``
    bytes (at least its first packet) now, the rest later; ``marks`` (the trusted
    checksum flags) go with their packets."""
    if sum(map(len, packets)) <= budget:
        return packets, marks, [], []
    spent: dict[bytes, int] = {}
    now: list[RawPacket] = []
    now_marks: list[bool] = []
    later: list[RawPacket] = []
    later_marks: list[bool] = []
    for packet, mark in zip(packets, marks, strict=True):
        key = flow_key(packet)
        used = spent.get(key, 0)
        if used >= budget:  # and so every later packet of this flow in the batch
            later.append(packet)
            later_marks.append(mark)
        else:
            spent[key] = used + len(packet)
            now.append(packet)
            now_marks.append(mark)
    return now, now_marks, later, later_marks
