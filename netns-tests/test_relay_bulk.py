"""Bulk transfers through `tunrelay run`, byte-exact, over IPv4 and IPv6.

64 MiB client -> server, 64 MiB server -> client, and both at once on one
connection. The SHA-256 each receiver computed must equal what the sender
sent, and equal the SHA-256 of what ``StreamDigest`` (in the relay) saw in
that direction. Client and server are threads of this process whose sockets
were created in the client and server namespaces.

Bounds: the whole transfer within ``TRANSFER_LIMIT`` (60 s; it takes 1-3 s at
the relay's current 0.4-0.7 Gbit/s per direction), any one socket operation
``IO_TIMEOUT`` (20 s). The throughput of each direction is printed (pytest -s).
"""

from __future__ import annotations

import socket
import time

import pytest

from relay.lab.lab import Lab

from relay_harness import (
    IO_TIMEOUT,
    MIB,
    Received,
    RelayProcess,
    Sent,
    addrs,
    expected_digest,
    listener,
    recv_stream,
    run_parallel,
    send_pattern,
)

SIZE = 64 * MIB
TRANSFER_LIMIT = 60.0
C2S_STREAM, S2C_STREAM = 1, 2


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
@pytest.mark.parametrize(
    ("c2s", "s2c"), [(SIZE, 0), (0, SIZE), (SIZE, SIZE)], ids=["upload", "download", "both"]
)
def test_bulk_64mib_byte_exact(tunrelay_lab: Lab, family: int, c2s: int, s2c: int) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    srv, port = listener(topology, family)
    client = topology.socket("cli", family)
    client.settimeout(IO_TIMEOUT)
    client.connect((addrs(topology, family)[1], port))
    conn, _ = srv.accept()
    conn.settimeout(IO_TIMEOUT)
    # Who closes first: the client once it has sent (at once if it sends nothing);
    # a server with nothing to send only after the client's EOF. So in the one-way
    # cases the relay is the passive closer and logs the flow without a TIME-WAIT.
    t0 = time.perf_counter()

    def client_send() -> Sent:
        return send_pattern(client, C2S_STREAM, c2s)

    def client_recv() -> Received:
        return recv_stream(client)

    def server_send() -> Sent | None:
        if s2c:
            return send_pattern(conn, S2C_STREAM, s2c)
        return None

    def server_recv() -> Received:
        got = recv_stream(conn)
        if not s2c:
            conn.shutdown(socket.SHUT_WR)
        return got

    sent_c2s, got_s2c, sent_s2c, got_c2s = run_parallel(
        client_send, client_recv, server_send, server_recv, timeout=TRANSFER_LIMIT
    )
    seconds = time.perf_counter() - t0
    name = "v4" if family == socket.AF_INET else "v6"
    rates = []
    if c2s:
        rates.append(f"c2s {got_c2s.mbps():.1f} MB/s ({got_c2s.seconds:.2f} s)")
    if s2c:
        rates.append(f"s2c {got_s2c.mbps():.1f} MB/s ({got_s2c.seconds:.2f} s)")
    print(f"\n[bulk {name} c2s={c2s >> 20} MiB s2c={s2c >> 20} MiB] {', '.join(rates)}; "
          f"total {seconds:.2f} s")  # fmt: skip

    # What each receiver got is exactly what the other side sent.
    assert (got_c2s.count, got_c2s.sha256) == (c2s, expected_digest(C2S_STREAM, c2s))
    assert sent_c2s.sha256 == got_c2s.sha256
    assert (got_s2c.count, got_s2c.sha256) == (s2c, expected_digest(S2C_STREAM, s2c))
    if sent_s2c is not None:
        assert sent_s2c.sha256 == got_s2c.sha256
    assert got_c2s.eof and got_s2c.eof

    # And exactly what the analyzer saw in each direction.
    client_port = client.getsockname()[1]
    digest = relay.digest_of(client_port)
    assert digest["c2s"] == {"bytes": c2s, "sha256": got_c2s.sha256}, digest
    assert digest["s2c"] == {"bytes": s2c, "sha256": got_s2c.sha256}, digest
    flow = relay.flow_of(client_port)
    server_ip = addrs(topology, family)[1]
    assert (flow["id.resp_h"], flow["id.resp_p"], flow["ended"]) == (server_ip, port, "fin")
    assert (flow["orig_bytes"], flow["resp_bytes"]) == (c2s, s2c), flow
