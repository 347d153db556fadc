"""Sequence-number arithmetic modulo 2**32 (RFC 9293 section 3.4).

Plain functions on ints: a wrapper object per comparison would cost more than
the comparison. Every comparison of sequence numbers in the stack goes through
these; raw ints are never compared directly.
"""

from __future__ import annotations

MOD = 1 << 32
MASK = MOD - 1
HALF = 1 << 31


def seq_add(a: int, n: int) -> int:
    """``a + n`` modulo 2**32 (``n`` may be negative)."""
    return (a + n) & MASK


def seq_sub(a: int, b: int) -> int:
    """Signed distance ``a - b``, in [-2**31, 2**31)."""
    return ((a - b + HALF) & MASK) - HALF


def seq_lt(a: int, b: int) -> bool:
    return ((a - b) & MASK) >= HALF


def seq_le(a: int, b: int) -> bool:
    return a == b or ((a - b) & MASK) >= HALF


def seq_gt(a: int, b: int) -> bool:
    return a != b and ((a - b) & MASK) < HALF


def seq_ge(a: int, b: int) -> bool:
    return ((a - b) & MASK) < HALF


def seq_in(x: int, lo: int, hi: int) -> bool:
    """``lo <= x < hi`` on the sequence circle (an empty range holds nothing)."""
    return ((x - lo) & MASK) < ((hi - lo) & MASK)
