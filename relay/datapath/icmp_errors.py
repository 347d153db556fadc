"""ICMP errors about the relay's own upstream sockets.

The UDP and ping sockets have ``IP_RECVERR``/``IPV6_RECVERR`` on, so the kernel
queues every ICMP error it receives for them; ``read_socket_errors`` reads the
destination-unreachable ones so the flow can relay them to its client.
``LOCAL_ERRORS`` maps an errno raised by the socket itself (no route) to the
ICMP error a router would have sent the client instead.
"""

from __future__ import annotations

import errno
import socket
import struct

from stack import Unreachable

__all__ = [
    "IPV6_RECVERR",
    "IP_RECVERR",
    "LOCAL_ERRORS",
    "SOL_IP",
    "SOL_IPV6",
    "read_socket_errors",
]

# <linux/in.h>, <linux/in6.h>, <linux/errqueue.h>
SOL_IP = 0
SOL_IPV6 = 41
IP_RECVERR = 11
IPV6_RECVERR = 25
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # errno, origin, type, code, pad, info, data
_ICMP_DEST_UNREACH = 3
_ICMP_FRAG_NEEDED = 4  # path MTU: the kernel's business for the relay's own socket
_ICMP6_DEST_UNREACH = 1

# errno raised by the relay's own socket -> what a router would have told the client.
LOCAL_ERRORS = {
    errno.ENETUNREACH: Unreachable.NET,
    errno.ENETDOWN: Unreachable.NET,
    errno.EHOSTUNREACH: Unreachable.HOST,
    errno.EHOSTDOWN: Unreachable.HOST,
    errno.ECONNREFUSED: Unreachable.PORT,
    errno.EACCES: Unreachable.ADMIN,
    errno.EPERM: Unreachable.ADMIN,
}


def read_socket_errors(sock: socket.socket, limit: int = 32) -> list[tuple[int, bytes]]:
    """Drain the socket's error queue (MSG_ERRQUEUE, up to ``limit`` entries).

    Returns:
        (destination-unreachable code, quoted payload) for each ICMP/ICMPv6
        destination unreachable; other entries (fragmentation needed, packet too
        big, time exceeded, local errors) are the relay's own and are skipped.
    """
    found = []
    for _ in range(limit):
        try:
            data, ancillary, _, _ = sock.recvmsg(2048, 512, socket.MSG_ERRQUEUE)
        except OSError:  # EAGAIN: empty
            break
        for level, kind, cdata in ancillary:
            if (level, kind) not in ((SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)):
                continue
            if len(cdata) < _EXTENDED_ERR.size:
                continue
            _, origin, type_, code, _, _, _ = _EXTENDED_ERR.unpack_from(cdata)
            if origin == SO_EE_ORIGIN_ICMP and type_ == _ICMP_DEST_UNREACH:
                if code != _ICMP_FRAG_NEEDED:
                    found.append((code, data))
            elif origin == SO_EE_ORIGIN_ICMP6 and type_ == _ICMP6_DEST_UNREACH:
                found.append((code, data))
    return found
