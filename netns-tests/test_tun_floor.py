"""The TUN floor (``benchmarks/tun_floor.py``) relays what its benchmark rows claim.

bench_netns.py's configurations f and l measure an upload and short
connections through the floor, and compare tunrelay and the targets with
them; a floor that lost or reordered bytes would make those figures
meaningless. So, with one worker and with two (each on its own queue):

(a) 32 MiB client -> server on one connection arrive byte-exact (SHA-256),
    and the client's FIN reaches the server after the last byte (also through
    ``--epoll``, the floor without trio, configuration g);
(b) 200 connections one after another, each connect, a 64-byte request, the
    server's 64-byte echo, close, all complete.

Bounds: each transfer within ``LIMIT`` seconds, each socket operation
``IO_TIMEOUT``; the floor is stopped with the lab.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relay.lab.topology import Topology

from relay_harness import (
    IO_TIMEOUT,
    MIB,
    Received,
    Sent,
    accept,
    connect,
    listener,
    recv_stream,
    run_parallel,
    send_pattern,
)

FLOOR = Path(__file__).resolve().parent.parent / "benchmarks" / "tun_floor.py"
SIZE = 32 * MIB
CONNECTIONS = 200
LIMIT = 30.0


def start_floor(topo: Topology, workers: int, *extra: str) -> None:
    argv = [sys.executable, str(FLOOR), "--tun", "trb0", "--client-net", topo.client_net_v4]
    proc = topo.spawn("gw", [*argv, "--workers", str(workers), *extra], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()  # the floor prints it once it relays
    assert line.startswith("relaying TCP"), f"the floor said {line!r} ({proc.poll()})"


@pytest.mark.parametrize(("workers", "extra"), [(1, ()), (2, ()), (1, ("--epoll",))])
def test_an_upload_through_the_floor_is_byte_exact(
    topology: Topology, workers: int, extra: tuple[str, ...]
) -> None:
    start_floor(topology, workers, *extra)
    srv, port = listener(topology, socket.AF_INET)
    client = connect(topology, socket.AF_INET, port)
    server = accept(srv)

    def client_send() -> Sent:
        return send_pattern(client, 1, SIZE)

    def server_recv() -> Received:
        return recv_stream(server)  # to EOF: the FIN comes after every byte

    sent, got = run_parallel(client_send, server_recv, timeout=LIMIT)
    assert got.count == sent.count == SIZE
    assert got.sha256 == sent.sha256
    for sock in (client, server, srv):
        sock.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_short_connections_through_the_floor_all_complete(topology: Topology, workers: int) -> None:
    start_floor(topology, workers)
    srv, port = listener(topology, socket.AF_INET, backlog=64)

    def serve() -> int:
        served = 0
        for _ in range(CONNECTIONS):
            conn = accept(srv)
            with conn:
                request = conn.recv(64)
                conn.sendall(request)
                assert conn.recv(64) == b""  # the client's FIN, relayed by the floor
            served += 1
        return served

    def clients() -> int:
        answered = 0
        for i in range(CONNECTIONS):
            with connect(topology, socket.AF_INET, port, timeout=IO_TIMEOUT) as sock:
                request = i.to_bytes(4, "big") * 16
                sock.sendall(request)
                got = b""
                while len(got) < len(request):
                    chunk = sock.recv(64)
                    assert chunk, f"connection {i}: EOF after {len(got)} bytes"
                    got += chunk
                assert got == request
            answered += 1
        return answered

    served, answered = run_parallel(serve, clients, timeout=LIMIT)
    assert served == answered == CONNECTIONS
    srv.close()
