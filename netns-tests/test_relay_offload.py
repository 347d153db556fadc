"""TUN offloads on (the default) and off (``--no-offload``): byte-exact relaying, v4 and v6.

With IFF_VNET_HDR and TSO/checksum offloads the client's segments reach the
relay coalesced into super-segments (up to ~64 KiB) with partial checksums.
64 MiB go each way, one direction at a time and both at once; the SHA-256 each
receiver computed must equal what the sender sent and what ``StreamDigest``
saw, and the relay's exit line must show that it really received
super-segments (``gso_packets_in``) and trusted the kernel's checksums
(``csum_trusted_in``) without a single checksum error, and that runs of the
client's pure ACKs were merged (``acks_merged``) while downloading. With
``--no-offload`` the same transfers must pass with none of those counters
moving (``offload='off'``): the plain path stays tested.

Bounds: the transfer within ``TRANSFER_LIMIT`` (60 s), any one socket
operation ``IO_TIMEOUT`` (20 s). Throughput is printed (pytest -s).
"""

from __future__ import annotations

import socket
import time

import pytest

from relay.lab.topology import Topology

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
C2S_STREAM, S2C_STREAM = 11, 12


def transfer(topology: Topology, family: int, c2s: int, s2c: int) -> tuple[int, str]:
    """Move ``c2s`` and ``s2c`` bytes over one relayed connection, check them; return
    (client port, a throughput summary)."""
    srv, port = listener(topology, family)
    client = topology.socket("cli", family)
    client.settimeout(IO_TIMEOUT)
    client.connect((addrs(topology, family)[1], port))
    conn, _ = srv.accept()
    conn.settimeout(IO_TIMEOUT)

    def client_send() -> Sent:
        return send_pattern(client, C2S_STREAM, c2s)

    def client_recv() -> Received:
        return recv_stream(client)

    def server_send() -> Sent | None:
        return send_pattern(conn, S2C_STREAM, s2c) if s2c else None

    def server_recv() -> Received:
        got = recv_stream(conn)
        if not s2c:
            conn.shutdown(socket.SHUT_WR)
        return got

    sent_c2s, got_s2c, sent_s2c, got_c2s = run_parallel(
        client_send, client_recv, server_send, server_recv, timeout=TRANSFER_LIMIT
    )
    assert (got_c2s.count, got_c2s.sha256) == (c2s, expected_digest(C2S_STREAM, c2s))
    assert sent_c2s.sha256 == got_c2s.sha256
    assert (got_s2c.count, got_s2c.sha256) == (s2c, expected_digest(S2C_STREAM, s2c))
    if sent_s2c is not None:
        assert sent_s2c.sha256 == got_s2c.sha256
    assert got_c2s.eof and got_s2c.eof
    rates = []
    if c2s:
        rates.append(f"c2s {got_c2s.mbps():.1f} MB/s")
    if s2c:
        rates.append(f"s2c {got_s2c.mbps():.1f} MB/s")
    return client.getsockname()[1], ", ".join(rates)


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
@pytest.mark.parametrize(
    ("c2s", "s2c"), [(SIZE, 0), (0, SIZE), (SIZE, SIZE)], ids=["upload", "download", "both"]
)
def test_offload_64mib_byte_exact(
    topology: Topology, start_relay: object, family: int, c2s: int, s2c: int, offload: bool
) -> None:
    # No flag: offloads are the default.
    args = [] if offload else ["--no-offload"]
    relay: RelayProcess = start_relay(args=args)  # type: ignore[operator]
    t0 = time.perf_counter()
    client_port, rates = transfer(topology, family, c2s, s2c)
    name = f"{'v4' if family == socket.AF_INET else 'v6'} {'on' if offload else 'off'}"
    print(f"\n[offload {name} c2s={c2s >> 20} MiB s2c={s2c >> 20} MiB] {rates}; "
          f"total {time.perf_counter() - t0:.2f} s")  # fmt: skip

    digest = relay.digest_of(client_port)
    assert (digest["c2s"]["bytes"], digest["s2c"]["bytes"]) == (c2s, s2c), digest
    assert digest["c2s"]["sha256"] == expected_digest(C2S_STREAM, c2s)
    assert digest["s2c"]["sha256"] == expected_digest(S2C_STREAM, s2c)
    flow = relay.flow_of(client_port)
    assert (flow["orig_bytes"], flow["resp_bytes"], flow["ended"]) == (c2s, s2c, "fin"), flow

    relay.stop()
    gso, trusted = relay.counter("gso_packets_in"), relay.counter("csum_trusted_in")
    gso_out, merged = relay.counter("gso_packets_out"), relay.counter("acks_merged")
    print(
        f"[offload {name}] gso_packets_in={gso} csum_trusted_in={trusted} "
        f"gso_packets_out={gso_out} acks_merged={merged}"
    )
    assert relay.counter("checksum_errors") == 0
    said = "on" if offload else "off"
    assert all(f"offload='{said}'" in line for line in relay.exit_lines()), relay.exit_lines()
    if not offload:  # every packet whole and checked: nothing came or went as a super-segment
        assert (gso, trusted, gso_out) == (0, 0, 0)
        return
    assert trusted > 0
    if c2s:  # client data arrives coalesced: far fewer packets than 1448-byte segments
        assert gso > 0
        assert relay.counter("packets_in") < c2s // 1448
    if s2c:  # and leaves as GSO super-segments the kernel cuts (byte-exact above)
        assert gso_out > 0
        assert relay.counter("packets_out") < s2c // 1448
        # The client's ACKs (one per two segments) come in runs per TUN read,
        # merged by the Stack (byte-exactness above says nothing was lost by it).
        assert merged > 0
