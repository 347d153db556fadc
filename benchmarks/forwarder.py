"""A trio TCP port forwarder between two kernel sockets: the Python ceiling.

Usage: forwarder.py --listen HOST --forward LPORT=DHOST:DPORT [--forward ...]
                    [--chunk BYTES] [--max-seconds S]

For each accepted connection on HOST:LPORT it connects to DHOST:DPORT and
runs one task per direction: ``receive_some(CHUNK)`` then ``send_all``, where
CHUNK is ``--chunk`` (default 65536; bench_netns runs it with 262144 too). EOF
is relayed as a half-close (``send_eof``); an error in either direction
closes both sockets. This is the least work a trio relay between kernel
sockets can do per byte, so it bounds what tunrelay (which adds a userspace
TCP stack on the client side) can reach on the same machine.

It prints ``ready`` once every listener is bound, raises RLIMIT_NOFILE (two
fds per relayed connection) and exits by itself after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import resource
import sys
from collections.abc import Sequence

import trio

CHUNK = 65536  # bytes per receive_some, unless --chunk says otherwise


def raise_nofile(want: int = 65536) -> None:
    """Two fds per connection: raise the soft (and, as root, the hard) limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        want = hard
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def pump(
    src: trio.abc.ReceiveStream,
    dst: trio.abc.HalfCloseableStream,
    scope: trio.CancelScope,
    chunk: int,
) -> None:
    """Copy src to dst, at most `chunk` bytes per read, until EOF (then half-close dst);
    on error cancel both directions."""
    try:
        while data := await src.receive_some(chunk):
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        scope.cancel()


async def handle(dst_host: str, dst_port: int, chunk: int, client: trio.SocketStream) -> None:
    async with client:
        try:
            upstream = await trio.open_tcp_stream(dst_host, dst_port)
        except OSError:
            return
        async with upstream, trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream, nursery.cancel_scope, chunk)
            nursery.start_soon(pump, upstream, client, nursery.cancel_scope, chunk)


def parse_forward(spec: str) -> tuple[int, str, int]:
    """``LPORT=DHOST:DPORT`` (DHOST may be a bracketed IPv6 address)."""
    lport, _, dest = spec.partition("=")
    host, _, dport = dest.rpartition(":")
    host = host.strip("[]")
    if not lport.isdigit() or not dport.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected LPORT=DHOST:DPORT, got {spec!r}")
    return int(lport), host, int(dport)


def positive(text: str) -> int:
    """A byte count of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


async def serve(
    listen: str, forwards: Sequence[tuple[int, str, int]], max_seconds: float, chunk: int = CHUNK
) -> None:
    with trio.move_on_after(max_seconds):
        async with trio.open_nursery() as nursery:
            for lport, host, dport in forwards:
                handler = functools.partial(handle, host, dport, chunk)
                await nursery.start(
                    functools.partial(trio.serve_tcp, handler, lport, host=listen, backlog=4096)
                )
            print("ready", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="trio TCP port forwarder (benchmark peer)")
    parser.add_argument("--listen", required=True, help="address to listen on")
    parser.add_argument(
        "--forward", action="append", type=parse_forward, required=True, metavar="LPORT=HOST:PORT"
    )
    parser.add_argument(
        "--chunk",
        type=positive,
        default=CHUNK,
        metavar="BYTES",
        help=f"bytes per read, each direction (default {CHUNK})",
    )
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    raise_nofile()
    trio.run(serve, args.listen, args.forward, args.max_seconds, args.chunk)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
