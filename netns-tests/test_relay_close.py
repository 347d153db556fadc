"""Ending connections through `tunrelay run`: half-close, resets, and the relay's exit.

FIN is relayed as a half-close each way, RST as RST (never one as the other),
and `tunrelay run` removes everything it installed when it exits.

Bounds: any one socket operation ``IO_TIMEOUT`` (20 s), a whole exchange
``EXCHANGE_LIMIT`` (30 s), a reset reaches the other side within
``RESET_WITHIN`` (5 s) of the abort.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from relay.host import netns
from relay.lab.lab import Lab
from relay.lab.topology import Topology

from relay_harness import (
    MIB,
    TUN,
    Received,
    RelayProcess,
    addrs,
    expected_digest,
    listener,
    recv_stream,
    relay_installed,
    run_parallel,
    send_pattern,
)

V4_V6 = pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
EXCHANGE_LIMIT = 30.0
RESET_WITHIN = 5.0
ABORT_AFTER = 1 * MIB  # the aborting side waits until this much went through
LINGER_RST = struct.pack("ii", 1, 0)


def connected_pair(topo: Topology, family: int) -> tuple[socket.socket, socket.socket]:
    """(client socket, server's accepted socket), both blocking with IO_TIMEOUT."""
    srv, port = listener(topo, family)
    client = topo.socket("cli", family)
    client.settimeout(20.0)
    client.connect((addrs(topo, family)[1], port))
    conn, _ = srv.accept()
    conn.settimeout(20.0)
    topo.defer(conn.close)
    return client, conn


# --- half-close ------------------------------------------------------------------------


@V4_V6
def test_client_half_close_server_still_sends_1mib(tunrelay_lab: Lab, family: int) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    client, conn = connected_pair(topology, family)

    def client_side() -> Received:
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        return recv_stream(client)

    def server_side() -> tuple[Received, float]:
        got = recv_stream(conn)  # up to the client's EOF
        t_eof = time.monotonic()
        send_pattern(conn, 7, MIB)  # only after the EOF; then FIN
        return got, t_eof

    t0 = time.monotonic()
    client_got, (server_got, t_eof) = run_parallel(client_side, server_side, timeout=EXCHANGE_LIMIT)
    print(f"\n[half-close client] server saw EOF after {(t_eof - t0) * 1000:.1f} ms, "
          f"client got {client_got.count} bytes")  # fmt: skip
    assert server_got.eof and server_got.count == len(b"request"), server_got
    assert client_got.eof, client_got
    assert (client_got.count, client_got.sha256) == (MIB, expected_digest(7, MIB))
    rec = relay.flow_of(client.getsockname()[1])
    assert (rec["orig_bytes"], rec["resp_bytes"], rec["ended"]) == (7, MIB, "fin"), rec


@V4_V6
def test_server_half_close_client_still_sends_1mib(tunrelay_lab: Lab, family: int) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    client, conn = connected_pair(topology, family)

    def server_side() -> Received:
        conn.shutdown(socket.SHUT_WR)
        return recv_stream(conn)

    def client_side() -> Received:
        got = recv_stream(client)  # the server's EOF, at once
        send_pattern(client, 8, MIB)  # only after the EOF; then FIN
        return got

    client_got, server_got = run_parallel(client_side, server_side, timeout=EXCHANGE_LIMIT)
    assert client_got.eof and client_got.count == 0, client_got
    assert server_got.eof, server_got
    assert (server_got.count, server_got.sha256) == (MIB, expected_digest(8, MIB))
    # The relay closed first towards the client, so the flow is logged after the
    # stack's TIME-WAIT (2 s).
    rec = relay.flow_of(client.getsockname()[1])
    assert (rec["orig_bytes"], rec["resp_bytes"], rec["ended"]) == (MIB, 0, "fin"), rec


# --- resets ----------------------------------------------------------------------------


def read_until_error(sock: socket.socket, limit: float) -> tuple[str, int, float]:
    """Read until an error or EOF, for at most ``limit`` s: (outcome, bytes, time of it)."""
    sock.settimeout(limit)
    count = 0
    deadline = time.monotonic() + limit
    while True:
        try:
            data = sock.recv(256 * 1024)
        except ConnectionResetError:
            return "ECONNRESET", count, time.monotonic()
        except TimeoutError:
            return "timeout", count, time.monotonic()
        except OSError as exc:
            return repr(exc), count, time.monotonic()
        if not data:
            return "EOF", count, time.monotonic()
        count += len(data)
        if time.monotonic() > deadline:
            return "still receiving", count, time.monotonic()


@V4_V6
def test_server_abort_resets_the_client(tunrelay_lab: Lab, family: int) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    client, conn = connected_pair(topology, family)
    enough = threading.Event()
    aborted_at: list[float] = []

    def server_side() -> int:
        # Streams until the client has had ABORT_AFTER bytes, then aborts (RST).
        sent = send_pattern(conn, 9, 64 * MIB, shut=False, chunk=64 * 1024, stop=enough)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        aborted_at.append(time.monotonic())
        conn.close()
        return sent.count

    def client_side() -> tuple[str, int, float]:
        got = 0
        while got < ABORT_AFTER:
            data = client.recv(256 * 1024)
            assert data, "EOF before the abort"
            got += len(data)
        enough.set()
        outcome, more, t = read_until_error(client, RESET_WITHIN + 1)
        return outcome, got + more, t

    sent, (outcome, got, t_outcome) = run_parallel(server_side, client_side, timeout=EXCHANGE_LIMIT)
    delay = t_outcome - aborted_at[0]
    print(f"\n[server abort] server sent {sent} bytes; client got {got} bytes, "
          f"then {outcome} {delay * 1000:.1f} ms after the abort")  # fmt: skip
    assert outcome == "ECONNRESET", f"client saw {outcome}, not ECONNRESET: {relay.describe()}"
    assert delay < RESET_WITHIN
    rec = relay.flow_of(client.getsockname()[1])
    assert rec["ended"] == "rst", rec


@V4_V6
def test_client_abort_resets_the_server(tunrelay_lab: Lab, family: int) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    client, conn = connected_pair(topology, family)
    enough = threading.Event()
    aborted_at: list[float] = []
    client_port = client.getsockname()[1]

    def client_side() -> int:
        sent = send_pattern(client, 10, 64 * MIB, shut=False, chunk=64 * 1024, stop=enough)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        aborted_at.append(time.monotonic())
        client.close()
        return sent.count

    def server_side() -> tuple[str, int, float]:
        got = 0
        while got < ABORT_AFTER:
            data = conn.recv(256 * 1024)
            assert data, "EOF before the abort"
            got += len(data)
        enough.set()
        outcome, more, t = read_until_error(conn, RESET_WITHIN + 1)
        return outcome, got + more, t

    sent, (outcome, got, t_outcome) = run_parallel(client_side, server_side, timeout=EXCHANGE_LIMIT)
    delay = t_outcome - aborted_at[0]
    print(f"\n[client abort] client sent {sent} bytes; server got {got} bytes, "
          f"then {outcome} {delay * 1000:.1f} ms after the abort")  # fmt: skip
    assert outcome == "ECONNRESET", f"server saw {outcome}, not ECONNRESET: {relay.describe()}"
    assert delay < RESET_WITHIN
    rec = relay.flow_of(client_port)
    assert rec["ended"] == "rst", rec


# --- the relay's exit ------------------------------------------------------------------


def test_relay_exit_removes_its_tun_rule_and_routes(tunrelay_lab: Lab) -> None:
    """While `tunrelay run` runs, its TUN, rules and routes exist in the gateway;
    after SIGTERM (exit status 0) they are gone, and the namespace is still there."""
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    before = relay_installed(topology)
    assert before["tun"], before
    assert {r[0] for r in before["rules"]} == {socket.AF_INET, socket.AF_INET6}, before
    assert {r[0] for r in before["routes"]} == {socket.AF_INET, socket.AF_INET6}, before
    assert before["forwarding"] == {"ipv4/ip_forward": "1", "ipv6/conf/all/forwarding": "1"}
    # One flow open when the signal arrives: it must not keep the relay from exiting.
    client, conn = connected_pair(topology, socket.AF_INET)
    client.sendall(b"open")
    assert conn.recv(16) == b"open"

    relay.check_running()
    relay.stop()  # SIGTERM; asserts exit status 0 and that nothing is left
    assert relay.exit_status == 0
    assert netns.exists(topology.gw)
    after = relay_installed(topology)
    assert after == {
        "tun": False,
        "rules": [],
        "routes": [],
        "forwarding": {"ipv4/ip_forward": "0", "ipv6/conf/all/forwarding": "0"},
    }, after
    assert TUN not in str(after)
    (rec,) = relay.flow_records()
    assert rec["ended"] == "shutdown", rec
    # The open connection was reset, not left hanging: the server sees it end.
    conn.settimeout(5.0)
    with pytest.raises(ConnectionResetError):
        while conn.recv(4096):
            pass
