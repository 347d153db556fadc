"""The virtio-net header that frames every packet on a TUN opened with IFF_VNETHEADER.

Theory of operation: with IFF_VNET_HDR each packet read from or written to the
TUN starts with a 10-byte ``struct virtio_net_hdr`` (little-endian; TUN's
default TUNSETVNETHDRSZ). On reads it says what the kernel left undone:

* ``NEEDS_CSUM``: the TCP/UDP checksum field holds only the pseudo-header sum
  (CHECKSUM_PARTIAL: locally generated or forwarded from a virtual link, never
  checked against the wire), so it must not be verified; ``DATA_VALID``: the
  kernel already verified it. Either way the relay trusts the payload.
* ``gso_type`` TCPV4/TCPV6: a GRO super-segment (up to ~64 KiB of payload,
  ``gso_size`` bytes per wire segment) that the relay takes as one segment.

On writes an all-zero header means "a plain packet with every checksum
computed". A ``stack.wire.tcp.OffloadPacket`` (the Stack makes them with
``StackConfig.offload``) goes with NEEDS_CSUM, ``csum_start`` (the TCP header),
``csum_offset`` 16 and the folded pseudo-header sum in the checksum field; a
GSO super-segment also carries the TCP gso_type, ``hdr_len`` and ``gso_size``
(the segment size the stack cut the run to, within the client's MSS).

``relay.datapath.tun.TunDevice`` strips and adds the header in its own hot loop; this
module is the one definition of the layout, for it, for tests and for tools.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "DATA_VALID",
    "GSO_ECN",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP_L4",
    "HEADER",
    "NEEDS_CSUM",
    "VNET_HDR_LEN",
    "ZERO_HEADER",
    "VnetHeader",
    "csum_trusted",
    "frame",
    "pack_header",
    "parse_header",
    "strip",
]

VNET_HDR_LEN = 10
NEEDS_CSUM = 0x01  # VIRTIO_NET_HDR_F_NEEDS_CSUM
DATA_VALID = 0x02  # VIRTIO_NET_HDR_F_DATA_VALID
GSO_NONE = 0x00
GSO_TCPV4 = 0x01
GSO_TCPV6 = 0x04
GSO_UDP_L4 = 0x05  # USO, only with TUN_F_USO4/6 (not enabled)
GSO_ECN = 0x80  # flag: the super-segment had CWR set (only with TUN_F_TSO_ECN)

HEADER = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
ZERO_HEADER = bytes(VNET_HDR_LEN)


class VnetHeader(NamedTuple):
    """A ``struct virtio_net_hdr``; field names as in linux/virtio_net.h."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0  # bytes of headers (IP + TCP) before the payload of a GSO packet
    gso_size: int = 0  # payload bytes per segment once split (the MSS)
    csum_start: int = 0  # where checksumming starts (the transport header)
    csum_offset: int = 0  # where the result goes, from csum_start (16 for TCP, 6 for UDP)

    @property
    def gso(self) -> bool:
        """This is a super-segment (any GSO type)."""
        return self.gso_type & ~GSO_ECN != GSO_NONE


def parse_header(buf: bytes | bytearray | memoryview) -> VnetHeader:
    """Decode the header at the start of ``buf``.

    Raises:
        ValueError: ``buf`` is shorter than the header.
    """
    if len(buf) < VNET_HDR_LEN:
        raise ValueError(f"virtio-net header needs {VNET_HDR_LEN} bytes, got {len(buf)}")
    return VnetHeader._make(HEADER.unpack_from(buf))


def pack_header(header: VnetHeader) -> bytes:
    """Encode ``header`` (10 bytes)."""
    return HEADER.pack(*header)


def csum_trusted(flags: int) -> bool:
    """The kernel vouches for the transport checksum: skip verifying it."""
    return flags & (NEEDS_CSUM | DATA_VALID) != 0


def strip(frame: bytes) -> tuple[bytes, VnetHeader]:
    """Split a framed packet as read from the TUN into (IP packet, header).

    Raises:
        ValueError: ``frame`` is shorter than the header.
    """
    return frame[VNET_HDR_LEN:], parse_header(frame)


def frame(packet: bytes, header: VnetHeader | None = None) -> bytes:
    """Prepend ``header`` (default all zeros: a plain, fully checksummed packet)."""
    return (ZERO_HEADER if header is None else pack_header(header)) + packet
