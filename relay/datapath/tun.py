"""The kernel TUN device as a PacketSource.

Theory of operation: the device is created with python-pytun (TUNSETIFF) in
the network namespace of the *calling thread* (the kernel uses the namespace
in which /dev/net/tun was opened), then configured with pyroute2 from the same
thread, so both always agree. The fd is non-blocking: `drain()` reads with
`os.read` until EAGAIN and `wait_readable()` parks on the fd in trio. A write
that the kernel refuses for lack of room (EAGAIN, ENOBUFS) is a drop, like a
full NIC queue: it is counted and the packet loop carries on.

With `vnet_hdr=True` (IFF_VNET_HDR, needed for offloads) every packet on the
fd is framed by a virtio-net header (relay.datapath.vnet). The framing stays in here:
`drain()` returns bare IP packets, `drain_csum()` also says per packet whether
the kernel vouches for its TCP/UDP checksum, and `write_all()` prepends an
all-zero header with `os.writev` (no copy of the packet). Without vnet_hdr the
fd carries bare packets and none of this code runs.

With `multi_queue=True` each `open()` of the same name attaches one more
queue; the kernel steers each flow to one queue (by a symmetric flow hash,
then by the queue its replies are written to), so one worker per queue sees
whole flows.

pytun's own read/write are not used: its read raises pytun.Error instead of
BlockingIOError on an empty queue and its write rejects memoryview.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import pytun
import trio

from relay.datapath.packet_source import PacketStats, RawPacket
from relay.datapath.vnet import (
    DATA_VALID,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    HEADER,
    NEEDS_CSUM,
    VNET_HDR_LEN,
    ZERO_HEADER,
)
from relay.host import netns

if TYPE_CHECKING:
    from stack.wire.tcp import OffloadPacket

__all__ = [
    "IFF_MULTI_QUEUE",
    "IFF_NO_PI",
    "IFF_TUN",
    "IFF_TUN_EXCL",
    "IFF_VNET_HDR",
    "OFFLOADS",
    "TUNSETOFFLOAD",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TUN_F_TSO_ECN",
    "TUN_F_USO4",
    "TUN_F_USO6",
    "VNET_HDR_LEN",
    "TunDevice",
]

IFF_TUN = 0x0001
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000  # create only: EBUSY if a device of that name exists
# The ring of packets waiting for each queue's reader (tun_net_xmit drops beyond
# it). 200 Linux clients opening at once and sending 1 MiB each overflowed 4,000:
# about 16% of their packets were dropped, and a BBR client then paced at
# 55 kbit/s for ~20 s (as BBR v1's policer detection, bbr_lt_bw_sampling, would:
# inferred, not traced). With 16,384: 0 to 5,000 drops, and the whole run in 7
# to 14 s instead of 14 to 30 s. Kernel memory, taken only while full.
DEFAULT_TXQUEUELEN = 16384
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
IFNAMSIZ = 16
# What `tunrelay run` asks for (unless --no-offload): GRO super-segments in, partial checksums.
# (TSO needs CSUM, else EINVAL; TSO_ECN and USO are not handled.)
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
_TRUSTED = NEEDS_CSUM | DATA_VALID

# A read shorter than the packet truncates it silently: leave room for a
# 64 KiB GSO super-segment plus the virtio-net header.
READ_SIZE = 65536 + 64
_DROP_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS})
_OPEN_ERRORS = {
    errno.ENOENT: "no /dev/net/tun (is the tun module loaded?)",
    errno.ENODEV: "no /dev/net/tun (is the tun module loaded?)",
    errno.EPERM: "not permitted (needs CAP_NET_ADMIN)",
    errno.EACCES: "/dev/net/tun is not accessible",
    errno.EBUSY: "a network device of that name exists already",
}


class TunDevice:
    """One queue of a TUN device (IFF_TUN | IFF_NO_PI): raw IPv4/IPv6 packets.

    Create with `TunDevice.open()`. With `vnet_hdr=True` every packet on the
    fd starts with a 10-byte virtio_net_hdr, which `drain`/`drain_csum` strip
    and `write_all` adds (all zeros: the stack's packets are complete).
    """

    def __init__(self, dev: pytun.TunTapDevice, name: str, *, vnet_hdr: bool) -> None:
        self._dev = dev
        self._fd: int = dev.fileno()
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.csum_offload = vnet_hdr  # drain_csum() can tell trusted checksums apart
        self.stats = PacketStats()
        self._closed = False
        # stack.wire.tcp.OffloadPacket, from the first framed write on: the
        # supervisor opens a queue but never writes, and so does without the
        # stack's packet code (stack.wire, about 0.6 MiB).
        self._offload_type: type[OffloadPacket] | None = None

    @classmethod
    def open(
        cls,
        name: str,
        *,
        mtu: int = 1500,
        txqueuelen: int = DEFAULT_TXQUEUELEN,
        vnet_hdr: bool = False,
        multi_queue: bool = False,
        configure_link: bool = True,
        exclusive: bool = False,
    ) -> TunDevice:
        """Create (or, with `multi_queue`, attach one more queue to) a TUN device.

        The device lives in the current thread's network namespace; run this
        inside `relay.host.netns.entered()` to put it elsewhere. The link is set up
        with the given MTU and txqueuelen (the default 500 drops packets when
        the reader is briefly descheduled), unless `configure_link` is False:
        a queue attached to a device already set up (no netlink, no pyroute2).
        `exclusive`: fail with EBUSY rather than attach to an existing device.

        Raises:
            ValueError: `name` is empty or too long.
            OSError: the device could not be created or configured (EBUSY:
                the name is taken by a device of another kind or without
                IFF_MULTI_QUEUE).
        """
        if not 0 < len(name.encode()) < IFNAMSIZ:
            raise ValueError(f"TUN name {name!r} must be 1-{IFNAMSIZ - 1} bytes")
        flags = IFF_TUN | IFF_NO_PI
        if vnet_hdr:
            flags |= IFF_VNET_HDR
        if multi_queue:
            flags |= IFF_MULTI_QUEUE
        if exclusive:
            flags |= IFF_TUN_EXCL
        try:
            dev = pytun.TunTapDevice(name=name, flags=flags)
        except pytun.Error as exc:
            # pytun.Error carries (errno, message) from the failed ioctl/open.
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else errno.EIO
            why = _OPEN_ERRORS.get(code, os.strerror(code))
            raise OSError(code, f"cannot open TUN {name!r}: {why}") from None
        try:
            fd = dev.fileno()
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
            tun = cls(dev, dev.name, vnet_hdr=vnet_hdr)
            if configure_link:
                tun._configure_link(mtu=mtu, txqueuelen=txqueuelen)
        except BaseException:
            dev.close()
            raise
        return tun

    def _configure_link(self, *, mtu: int, txqueuelen: int) -> None:
        ipr = netns.ipr_here()
        try:
            (index,) = ipr.link_lookup(ifname=self.name)
            ipr.link("set", index=index, mtu=mtu, txqlen=txqueuelen, state="up")
        finally:
            ipr.close()

    def fileno(self) -> int:
        return self._fd

    def set_offload(self, flags: int) -> None:
        """Tell the kernel which offloads this reader handles (TUNSETOFFLOAD).

        `flags` is a mask of TUN_F_*; TSO needs TUN_F_CSUM (else EINVAL) and
        should only be used with `vnet_hdr=True`, since without it the kernel
        hands over 64 KiB packets with partial checksums and no header saying
        so. 0 turns offloads off.
        """
        fcntl.ioctl(self._fd, TUNSETOFFLOAD, flags)

    def detach(self) -> None:
        """Stop this queue receiving packets (TUNSETQUEUE IFF_DETACH_QUEUE; multi-queue only).

        A detached queue still keeps the device, its routes and its settings
        alive: `tunrelay run --workers N` holds one so the device outlives any
        one worker's queue.
        """
        self._dev.mq_attach(False)

    # --- PacketSource -------------------------------------------------------

    def drain(self, max_batch: int) -> list[bytes]:
        """Read up to `max_batch` packets without blocking (bare IP packets).

        Raises:
            trio.ClosedResourceError: the device was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("TUN device is closed")
        if self.vnet_hdr:
            return [bytes(p) for p in self._drain_framed(max_batch)[0]]
        packets: list[bytes] = []
        if max_batch <= 0:
            return packets
        read = os.read
        fd = self._fd
        append = packets.append
        try:
            while True:
                append(read(fd, READ_SIZE))
                if len(packets) >= max_batch:
                    break
        except BlockingIOError:
            pass
        if packets:
            stats = self.stats
            stats.packets_in += len(packets)
            stats.bytes_in += sum(map(len, packets))
        return packets

    def drain_csum(self, max_batch: int) -> tuple[list[RawPacket], list[bool]]:
        """Like `drain`, plus for each packet whether its transport checksum is
        trusted (virtio NEEDS_CSUM or DATA_VALID: the stack must not verify it).

        A GRO super-segment comes as a memoryview of the frame read, past the
        virtio-net header: not copied (Stack.receive takes it as it is); any
        other packet as bytes. Without `vnet_hdr` nothing is known, and every
        mark is False.

        Raises:
            trio.ClosedResourceError: the device was closed.
        """
        if not self.vnet_hdr:
            plain = self.drain(max_batch)
            return list(plain), [False] * len(plain)
        return self._drain_framed(max_batch)

    def _drain_framed(self, max_batch: int) -> tuple[list[RawPacket], list[bool]]:
        if self._closed:
            raise trio.ClosedResourceError("TUN device is closed")
        packets: list[RawPacket] = []
        trusted: list[bool] = []
        if max_batch <= 0:
            return packets, trusted
        read = os.read
        fd = self._fd
        append, mark = packets.append, trusted.append
        stats = self.stats
        gso = short = 0
        try:
            while True:
                frame = read(fd, READ_SIZE)
                if len(frame) <= VNET_HDR_LEN:  # never from the kernel; keep it out anyway
                    short += 1
                    continue
                mark(frame[0] & _TRUSTED != 0)
                if frame[1]:  # gso_type: a GRO super-segment (TCP), up to 64 KiB
                    gso += 1
                    append(memoryview(frame)[VNET_HDR_LEN:])  # not copied
                else:
                    append(frame[VNET_HDR_LEN:])  # small: a copy costs less than a view
                if len(packets) >= max_batch:
                    break
        except BlockingIOError:
            pass
        if packets:
            stats.packets_in += len(packets)
            stats.bytes_in += sum(map(len, packets))
            stats.csum_trusted_in += sum(trusted)
            stats.gso_packets_in += gso
        stats.drops_in += short
        return packets, trusted

    def write_all(self, packets: Iterable[bytes]) -> None:
        """Write each packet; EAGAIN/ENOBUFS are counted in `stats.drops_out`.

        Each write runs the kernel's receive path for that packet
        synchronously (3-12 us), so a packet written here is already routed
        when this returns. With `vnet_hdr` each packet goes out behind an
        all-zero virtio-net header: a plain packet, checksums complete.

        Raises:
            OSError: any other write error (for example EINVAL for a bad
                virtio_net_hdr, EIO while the link is down).
            trio.ClosedResourceError: the device was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("TUN device is closed")
        fd = self._fd
        stats = self.stats
        if self.vnet_hdr:
            self._write_framed(packets)
            return
        write = os.write
        for packet in packets:
            try:
                n = write(fd, packet)
            except OSError as exc:
                if exc.errno in _DROP_ERRNOS:
                    stats.drops_out += 1
                    continue
                raise
            stats.packets_out += 1
            stats.bytes_out += n

    def _write_framed(self, packets: Iterable[bytes]) -> None:
        offload_packet = self._offload_type
        if offload_packet is None:
            from stack.wire.tcp import OffloadPacket

            offload_packet = self._offload_type = OffloadPacket
        fd = self._fd
        stats = self.stats
        writev = os.writev
        for packet in packets:
            header = ZERO_HEADER
            if type(packet) is offload_packet:
                # NEEDS_CSUM from csum_start, checksum at +16; a TCP gso_type when
                # the stack made a super-segment (relay.datapath.vnet, LINUX-NOTES).
                gso = packet.gso_size
                kind = (GSO_TCPV4 if packet[0] >> 4 == 4 else GSO_TCPV6) if gso else GSO_NONE
                header = HEADER.pack(NEEDS_CSUM, kind, packet.hdr_len, gso, packet.csum_start, 16)
                if gso:
                    stats.gso_packets_out += 1
            try:
                n = writev(fd, (header, packet)) - VNET_HDR_LEN
            except OSError as exc:
                if exc.errno in _DROP_ERRNOS:
                    stats.drops_out += 1
                    continue
                raise
            stats.packets_out += 1
            stats.bytes_out += n

    async def wait_readable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TUN device is closed")
        await trio.lowlevel.wait_readable(self._fd)

    def close(self) -> None:
        """Close this queue; the device disappears with its last queue."""
        if self._closed:
            return
        self._closed = True
        # Wake any task parked in wait_readable with ClosedResourceError.
        with contextlib.suppress(RuntimeError):  # not inside trio.run
            trio.lowlevel.notify_closing(self._fd)
        self._dev.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<TunDevice {self.name} {state}>"
