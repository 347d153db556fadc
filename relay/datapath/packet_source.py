"""Where the relay's packet loop gets IP packets from and writes them to.

Theory of operation: the packet loop is the only consumer of a PacketSource.
It calls `drain()` to take every packet available now (never blocking), feeds
them to the stack, writes the stack's output with `write_all()`, and then
sleeps in `wait_readable()` (under a cancel scope for the next timer). There
is no task or channel hop per packet; a full queue drops the packet and counts
it, which is what a NIC or the TUN device's txqueue does too.

`TunDevice` (relay.datapath.tun) is the kernel implementation; `MemoryPacketSource` is
for a VPN server that feeds packets from its own loop, and for tests. A source
that can tell which packets' checksums the kernel already vouches for (a TUN
with offloads) also implements `CsumPacketSource`, and the packet loop then
drains with `drain_csum()` instead of `drain()`.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeAlias, runtime_checkable

import trio

__all__ = ["CsumPacketSource", "MemoryPacketSource", "PacketSource", "PacketStats", "RawPacket"]

# A packet read: bytes, or a view of the buffer it was read into (a TUN frame's GRO
# super-segment past its virtio-net header: relay.datapath.tun, not copied).
RawPacket: TypeAlias = bytes | memoryview


class PacketSource(Protocol):
    """A bidirectional packet interface for one packet loop."""

    def drain(self, max_batch: int) -> list[bytes]:
        """Return the packets available now, at most `max_batch`; never blocks."""
        ...

    def write_all(self, packets: Iterable[bytes]) -> None:
        """Send packets towards the clients; a full queue drops and counts."""
        ...

    async def wait_readable(self) -> None:
        """Return when `drain()` may return packets (it can still return [])."""
        ...

    def close(self) -> None:
        """Release the source; safe to call twice."""
        ...


@runtime_checkable
class CsumPacketSource(PacketSource, Protocol):
    """A PacketSource that may know, per packet, that the transport checksum is good.

    With TUN offloads the kernel hands over packets whose TCP/UDP checksum is
    only partial (locally generated or forwarded from a virtual link) or was
    already verified; the packet loop passes that on as ``Stack.receive(...,
    csum_ok=True)``.
    """

    @property
    def csum_offload(self) -> bool:
        """``drain_csum`` can mark packets (else use ``drain``: every mark is False)."""
        ...

    def drain_csum(self, max_batch: int) -> tuple[list[RawPacket], list[bool]]:
        """Like ``drain``, plus a parallel list: True where the checksum is trusted."""
        ...


@dataclass(slots=True)
class PacketStats:
    """Counters, seen from the relay: "in" is towards the relay, "out" from it."""

    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    drops_in: int = 0  # arrived while the inbound queue was full (or a frame had no packet)
    drops_out: int = 0  # written while the outbound queue was full
    gso_packets_in: int = 0  # GRO super-segments (TUN offloads)
    gso_packets_out: int = 0  # GSO super-segments written (TUN offloads)
    csum_trusted_in: int = 0  # checksum partial or verified by the kernel (TUN offloads)
    offload: str = "off"  # TUN offloads: "on", "off" (--no-offload), "off(fallback)" (refused)


class MemoryPacketSource:
    """An in-process PacketSource: the VPN side injects and takes packets.

    Both directions are bounded FIFO queues. All methods must be called from
    the trio thread (or before `trio.run`), like trio's memory channels.

    Args:
        inbound_capacity: packets waiting for the relay before `inject` drops.
        outbound_capacity: packets waiting for the VPN side before `write_all`
            drops.
    """

    def __init__(self, *, inbound_capacity: int = 4096, outbound_capacity: int = 4096) -> None:
        if inbound_capacity < 1 or outbound_capacity < 1:
            raise ValueError("capacities must be at least 1")
        self.stats = PacketStats()
        self._inbound: collections.deque[bytes] = collections.deque()
        self._outbound: collections.deque[bytes] = collections.deque()
        self._inbound_capacity = inbound_capacity
        self._outbound_capacity = outbound_capacity
        self._readable = trio.lowlevel.ParkingLot()
        self._receivable = trio.lowlevel.ParkingLot()
        self._closed = False

    # --- VPN side -----------------------------------------------------------

    def inject(self, packet: bytes) -> None:
        """Queue one packet from the VPN side for the relay.

        Raises:
            trio.ClosedResourceError: the source was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("packet source is closed")
        if len(self._inbound) >= self._inbound_capacity:
            self.stats.drops_in += 1
            return
        self._inbound.append(packet)
        if self._readable:
            self._readable.unpark_all()

    def take(self) -> list[bytes]:
        """Return (and remove) every packet the relay has written so far."""
        packets = list(self._outbound)
        self._outbound.clear()
        return packets

    async def receive_batch(self) -> list[bytes]:
        """Wait until the relay has written packets, then return all of them.

        Raises:
            trio.EndOfChannel: the source was closed and nothing is left.
        """
        if self._outbound:
            await trio.lowlevel.checkpoint()
        while not self._outbound:
            if self._closed:
                raise trio.EndOfChannel
            await self._receivable.park()
        return self.take()

    # --- relay side (PacketSource) -------------------------------------------

    def drain(self, max_batch: int) -> list[bytes]:
        inbound = self._inbound
        n = min(max_batch, len(inbound))
        if n <= 0:
            return []
        packets = [inbound.popleft() for _ in range(n)]
        self.stats.packets_in += n
        self.stats.bytes_in += sum(map(len, packets))
        return packets

    def write_all(self, packets: Iterable[bytes]) -> None:
        if self._closed:
            raise trio.ClosedResourceError("packet source is closed")
        outbound = self._outbound
        room = self._outbound_capacity - len(outbound)
        stats = self.stats
        for packet in packets:
            if room <= 0:
                stats.drops_out += 1
                continue
            outbound.append(packet)
            room -= 1
            stats.packets_out += 1
            stats.bytes_out += len(packet)
        if outbound and self._receivable:
            self._receivable.unpark_all()

    async def wait_readable(self) -> None:
        """Return when packets are queued; raise ClosedResourceError once closed."""
        if self._inbound:
            await trio.lowlevel.checkpoint()
        while not self._inbound:
            if self._closed:
                raise trio.ClosedResourceError("packet source is closed")
            await self._readable.park()

    def close(self) -> None:
        """Close both directions and wake every waiter. Safe to call twice.

        Packets already written stay available to `take`/`receive_batch`.
        """
        self._closed = True
        self._inbound.clear()
        self._readable.unpark_all()
        self._receivable.unpark_all()

    @property
    def closed(self) -> bool:
        return self._closed
