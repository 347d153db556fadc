"""benchmarks/forwarder.py, the trio forwarder bench_netns measures as b and k: one
direction's pump over a Unix socket pair (no network), and its --chunk option."""

from __future__ import annotations

import socket

import pytest
import trio

from benchmarks import forwarder


class RecordingStream(trio.abc.ReceiveStream):
    """A SocketStream's receiving side that remembers the max_bytes of each receive_some."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.stream = trio.SocketStream(sock)
        self.asked: list[int | None] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self.asked.append(max_bytes)
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.mark.parametrize("chunk", [65536, 262144])
async def test_pump_copies_everything_in_reads_of_chunk_bytes_then_half_closes(
    chunk: int,
) -> None:
    client, src_sock = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dst_sock, server = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    src, dst = RecordingStream(src_sock), trio.SocketStream(dst_sock)
    payload = bytes(range(256)) * 4096  # 1 MiB
    received = bytearray()

    async def send() -> None:
        await trio.SocketStream(client).send_all(payload)
        client.shutdown(socket.SHUT_WR)

    async def receive() -> None:
        reader = trio.SocketStream(server)
        while data := await reader.receive_some():
            received.extend(data)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
            nursery.start_soon(forwarder.pump, src, dst, nursery.cancel_scope, chunk)
    assert received == payload  # and EOF reached the far end (receive returned)
    assert src.asked and set(src.asked) == {chunk}
    for s in (client, src_sock, dst_sock, server):
        s.close()


def test_chunk_option_rejects_zero_and_non_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "-1", "64k"):
        with pytest.raises(SystemExit):
            forwarder.main(
                ["--listen", "198.18.1.1", "--forward", "1=198.18.2.2:1", "--chunk", bad]
            )
    assert "--chunk" in capsys.readouterr().err
