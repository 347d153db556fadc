"""The Internet checksum (RFC 1071) and the TCP/UDP pseudo-header sums.

Theory of operation: the 16-bit one's-complement sum of a byte string is
congruent, modulo 0xFFFF, to the integer the bytes spell, because
2**16 == 1 (mod 0xFFFF). So ``int.from_bytes`` plus one ``% 0xFFFF`` computes
the sum in C, about 25x faster than a Python word loop.

We read the bytes as a *little*-endian integer, which CPython converts about
25% faster than big-endian. Read that way, byte ``i`` weighs 256**i, which is
1 for even ``i`` and 256 for odd ``i`` (mod 0xFFFF): the words come out
byte-swapped, and a swap is a multiplication by 256 (RFC 1071 2(B), byte order
independence). Multiplying by 256 once more (256 * 256 == 1) restores network
order: ``S == 256 * int.from_bytes(data, "little") (mod 0xFFFF)``. An odd
trailing byte lands at an even index, as the high byte of a zero-padded word,
exactly as RFC 1071 4.1 pads. Large inputs are first folded by splitting the
integer in halves at a multiple of 16 bits (2**16k == 1), which is cheaper
than the per-digit division of ``%``.

The only subtlety is the representation of zero: one's-complement arithmetic
has two, 0x0000 and 0xFFFF. The end-around-carry fold of the RFC 1071
reference loop yields 0x0000 only when every word is zero, and 0xFFFF for any
other multiple of 0xFFFF, while ``% 0xFFFF`` yields 0 for both. ``ones_sum``
maps them exactly as the reference loop does. A packet verifies when the sum
over it, checksum field included, is 0xFFFF (RFC 1071 section 1, step 3).

All "sums" passed around (``initial``, pseudo-header sums) are plain
non-negative ints, folded or not: adding unfolded sums is correct modulo
0xFFFF.
"""

from __future__ import annotations

__all__ = [
    "checksum",
    "ones_sum",
    "pseudo_sum_v4",
    "pseudo_sum_v6",
    "udp_checksum_value",
    "verify",
]

_from_bytes = int.from_bytes
_FOLD_BITS = 4096  # below this, one % is cheaper than folding
_MASKS = {1 << e: (1 << (1 << e)) - 1 for e in range(11, 20)}  # 2048 bits .. 64 KiB


def _fold(x: int) -> int:
    # Halve x at a power-of-two multiple of 16 bits until it is small.
    b = x.bit_length()
    while b > _FOLD_BITS:
        k = 1 << (b.bit_length() - 2)
        x = (x >> k) + (x & (_MASKS.get(k) or (1 << k) - 1))
        b = x.bit_length()
    return x


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """One's-complement sum of ``data`` as 16-bit big-endian words.

    An odd trailing byte is padded with a zero byte (RFC 1071 section 4.1).

    Args:
        data: the bytes to sum.
        initial: a partial sum (folded or not) to add, e.g. a pseudo-header sum.

    Returns:
        The sum folded to 16 bits and not inverted: 0 only when ``data`` and
        ``initial`` are all zero, otherwise in ``1..0xFFFF``.
    """
    x = _from_bytes(data, "little")
    if x.bit_length() > _FOLD_BITS:
        x = _fold(x)
    if not x and not initial:
        return 0
    return (((x % 0xFFFF) << 8) + initial) % 0xFFFF or 0xFFFF


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum value to store in a header whose checksum field is zero.

    Args:
        data: the covered bytes, with the checksum field set to zero.
        initial: a partial sum to add (the pseudo-header sum for TCP/UDP/ICMPv6).

    Returns:
        ``~ones_sum(data, initial) & 0xFFFF``. This may be 0; UDP must then
        transmit 0xFFFF instead (see ``udp_checksum_value``).
    """
    return ~ones_sum(data, initial) & 0xFFFF


def udp_checksum_value(c: int) -> int:
    """Map a computed UDP checksum to its transmitted value.

    RFC 768 / RFC 8200 8.1: a computed checksum of zero is sent as 0xFFFF,
    because a zero field means "no checksum" (IPv4) or is invalid (IPv6).
    """
    return c or 0xFFFF


def verify(data: bytes | bytearray | memoryview, initial: int = 0) -> bool:
    """Whether ``data``, with its checksum field in place, verifies.

    Args:
        data: the covered bytes, checksum field included.
        initial: the pseudo-header sum, or 0 when there is none (IPv4, ICMPv4).

    Returns:
        True when the one's-complement sum is 0xFFFF (negative zero).
    """
    x = _from_bytes(data, "little")
    if x.bit_length() > _FOLD_BITS:
        x = _fold(x)
    return (((x % 0xFFFF) << 8) + initial) % 0xFFFF == 0 and (x != 0 or initial != 0)


def pseudo_sum_v4(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Sum of the IPv4 pseudo-header (RFC 9293 3.1, RFC 768).

    Args:
        src: 4-byte source address.
        dst: 4-byte destination address.
        proto: the transport protocol number.
        length: the transport segment length (header plus data).

    Returns:
        The folded, non-inverted sum (never 0 for a nonzero ``proto``).
    """
    # A 32-bit address is congruent to the sum of its two 16-bit words.
    x = _from_bytes(src, "big") + _from_bytes(dst, "big") + proto + length
    return x % 0xFFFF or (0xFFFF if x else 0)


def pseudo_sum_v6(src: bytes, dst: bytes, next_header: int, length: int) -> int:
    """Sum of the IPv6 pseudo-header (RFC 8200 8.1).

    Args:
        src: 16-byte source address.
        dst: 16-byte destination address.
        next_header: the upper-layer protocol number (not an extension header).
        length: the upper-layer packet length (32-bit field).

    Returns:
        The folded, non-inverted sum.
    """
    x = _from_bytes(src, "big") + _from_bytes(dst, "big") + next_header + length
    return x % 0xFFFF or (0xFFFF if x else 0)
