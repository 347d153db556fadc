"""stack.tcp.sendbuf.SendBuffer against a bytearray used as the same queue."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stack.tcp.sendbuf import MERGE_MAX, VIEW_MIN, SendBuffer

_sizes = st.one_of(st.integers(0, 64), st.integers(0, 3 * MERGE_MAX), st.integers(0, 70_000))
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), _sizes, st.sampled_from(["bytes", "bytearray", "view"])),
        st.tuples(st.just("drop"), st.integers(0, 80_000), st.just("")),
        st.tuples(st.just("view"), st.integers(0, 80_000), st.integers(0, 80_000)),
    ),
    max_size=60,
)


@given(_ops)
def test_the_buffer_holds_what_a_bytearray_would(ops: list[tuple[str, int, object]]) -> None:
    buf, ref = SendBuffer(), bytearray()
    counter = 0
    for op, a, b in ops:
        if op == "append":
            data = bytes((counter + i) & 0xFF for i in range(a))
            counter += a
            given_as = {"bytes": data, "bytearray": bytearray(data), "view": memoryview(data)}
            buf.append(given_as[str(b)])
            ref += data
        elif op == "drop":
            n = min(a, len(ref))
            buf.drop(a)
            del ref[:n]
        else:
            assert isinstance(b, int)
            offset = min(a, len(ref))
            n = min(b, len(ref) - offset)
            got = buf.view(offset, n)
            assert bytes(got) == bytes(ref[offset : offset + n])
            assert type(got) in (bytes, memoryview)
        assert len(buf) == len(ref) and bool(buf) == bool(ref)
    assert bytes(buf.view(0, len(ref))) == bytes(ref)


def test_a_segment_in_one_chunk_is_not_copied() -> None:
    buf = SendBuffer()
    read = bytes(range(256)) * 1024  # one 256 KiB read
    buf.append(read)
    assert buf.view(0, len(read)) is read
    seg = buf.view(1000, 64_000)
    assert type(seg) is memoryview and seg.obj is read and seg == read[1000:65_000]
    small = buf.view(10, VIEW_MIN - 1)
    assert type(small) is bytes and small == read[10 : 10 + VIEW_MIN - 1]
    # Across two reads: joined, one copy.
    buf.append(b"x" * 100_000)
    across = buf.view(len(read) - 10, 20)
    assert across == read[-10:] + b"x" * 10
    # A view outlives the acknowledgment of its bytes and later appends.
    buf.drop(len(read) + 5)
    buf.append(b"y" * 10)
    assert seg == read[1000:65_000] and len(buf) == 100_000 - 5 + 10


def test_small_writes_are_merged_and_a_bytearray_is_copied() -> None:
    buf = SendBuffer()
    for _ in range(1000):
        buf.append(b"ab")
    assert len(buf._chunks) == 1 and len(buf) == 2000
    data = bytearray(b"z" * 10_000)
    buf.append(data)
    data[:] = b"q" * 10_000  # the caller's buffer changes; the queued bytes do not
    assert buf.view(2000, 10_000) == b"z" * 10_000


def test_an_empty_buffer_shares_its_empty_lists() -> None:
    a, b = SendBuffer(), SendBuffer()
    assert a._chunks is b._chunks and a._ends is b._ends
    a.append(b"x" * 10_000)
    a.drop(10_000)
    assert a._chunks is b._chunks and not a
    a.append(b"y")
    a.clear()
    assert a._chunks is b._chunks and len(a) == 0
