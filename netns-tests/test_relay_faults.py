"""Faults around `tunrelay run`: it degrades per flow, or stops cleanly; never hangs.

* Out of file descriptors: the worker's RLIMIT_NOFILE is lowered (prlimit(2)
  on its PID) to what it holds plus ``SPARE_FDS``. Flows that fit are relayed;
  the next connection requests are refused with an RST (the client's connect
  fails with ECONNREFUSED, at once) and counted (``connect_failed``); the flows
  already open go on byte-exact; once they close and free their descriptors,
  a new flow is relayed again. The relay never stops.
* The worker killed with SIGKILL mid-transfer (one worker): the service stops
  with status 1 and removes its TUN device, policy rules, routes and
  forwarding sysctls (the gateway is as it was before it started).
* The upstream vanishes mid-transfer (an nftables rule in the server's
  namespace drops everything): with ``--upstream-timeout 2`` the relay's
  upstream socket fails once its bytes stay unacknowledged 2 s, and the
  client's connection is reset within ``UPSTREAM_GONE_LIMIT`` (10 s) of the
  drop, counted as an upstream error; without the option the kernel would
  retransmit for ~15 minutes and the client would hang that long.
* The client vanishes mid-transfer (its namespace drops everything): with
  ``--client-idle-timeout 2`` the flow is reset and its upstream socket closed
  (the server's send fails) within ``CLIENT_GONE_LIMIT`` (10 s), and the flow
  log has the flow; without it, keepalive would find the client after 2 h.
* The memory budget reached: ``--memory-budget`` 1 MiB (the least allowed)
  for ``BUDGET_FLOWS`` (8) flows moving ``BUDGET_BYTES`` (4 MiB) each way at
  once: buffers cannot grow past their initial sizes, so data waits (windows
  close) but every stream arrives byte-exact within ``BUDGET_LIMIT`` (120 s)
  and the relay goes on; its exit line counts the refusals
  (``memory_budget_reached``).
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable

import pytest

from relay.lab.topology import Topology

from relay_harness import (
    IO_TIMEOUT,
    MIB,
    STOP_TIMEOUT,
    WORKER_USER,
    RelayProcess,
    addrs,
    expected_digest,
    gateway_leftovers,
    listener,
    recv_stream,
    run_in,
    run_threads,
    send_pattern,
)

SPARE_FDS = 2  # descriptors left to the worker: two upstream sockets
FD_SLACK = 4  # descriptors open when counted that close by themselves soon after
UPSTREAM_TIMEOUT = 2.0
UPSTREAM_GONE_LIMIT = 10.0
CLIENT_IDLE_TIMEOUT = 2.0
CLIENT_GONE_LIMIT = 10.0
BUDGET_FLOWS = 8
BUDGET_BYTES = 4 * MIB
BUDGET_LIMIT = 120.0
PAYLOAD = b"x" * 100_000


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _echo_once(client: socket.socket, conn: socket.socket, data: bytes) -> None:
    """``data`` client -> server and back, byte-exact."""
    client.sendall(data)
    got = bytearray()
    while len(got) < len(data):
        chunk = conn.recv(65536)
        assert chunk, f"EOF after {len(got)} of {len(data)} bytes"
        got += chunk
    conn.sendall(bytes(got))
    back = bytearray()
    while len(back) < len(data):
        chunk = client.recv(65536)
        assert chunk, f"EOF after {len(back)} of {len(data)} bytes back"
        back += chunk
    assert bytes(back) == data


def test_fd_exhaustion_refuses_new_flows_and_recovers(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    family = socket.AF_INET
    relay = start_relay()
    srv, port = listener(topology, family)
    server_ip = addrs(topology, family)[1]

    def connect() -> tuple[socket.socket, socket.socket]:
        client = topology.socket("cli", family)
        client.settimeout(IO_TIMEOUT)
        client.connect((server_ip, port))
        conn, _ = srv.accept()
        conn.settimeout(IO_TIMEOUT)
        return client, conn

    # Warm up (the first flow opens files and sockets the worker keeps), then cap.
    first = connect()
    _echo_once(*first, PAYLOAD)
    for s in first:
        s.close()
    worker = relay.worker_pid
    time.sleep(0.5)  # the first flow's upstream socket is closed by now
    limit = _open_fds(worker) + SPARE_FDS
    # As the worker's own user: this lab's root has no CAP_SYS_RESOURCE, and a
    # process may lower the limits of another with its uids and gids.
    user = pwd.getpwnam(WORKER_USER)
    subprocess.run(
        [
            "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
            "prlimit", f"--pid={worker}", f"--nofile={limit}:{limit}",
        ],
        check=True, timeout=10,
    )  # fmt: skip
    with open(f"/proc/{worker}/limits") as f:
        (row,) = [line.split() for line in f if line.startswith("Max open files")]
    assert row[3:5] == [str(limit), str(limit)], row
    kept: list[tuple[socket.socket, socket.socket]] = []
    try:
        # Flows are relayed until the descriptors run out (about SPARE_FDS of them;
        # the count at the cap may include a few closing or transient ones), then
        # refused at once.
        refused = 0
        for _ in range(SPARE_FDS + FD_SLACK + 3):
            client = topology.socket("cli", family)
            client.settimeout(IO_TIMEOUT)
            t0 = time.monotonic()
            try:
                client.connect((server_ip, port))
            except ConnectionRefusedError:
                assert time.monotonic() - t0 < 2.0, "refused, but not at once"
                refused += 1
                client.close()
                if refused == 3:
                    break
                continue
            assert not refused, "a flow was relayed after one was refused, fds unchanged"
            conn, _ = srv.accept()
            conn.settimeout(IO_TIMEOUT)
            kept.append((client, conn))
        assert 1 <= len(kept) <= SPARE_FDS + FD_SLACK, len(kept)
        assert refused == 3
        for pair in kept:  # the flows that got their descriptors go on
            _echo_once(*pair, PAYLOAD)
        for pair in kept:
            for s in pair:
                s.close()
        kept = []
        # Recovery: the closed flows' descriptors are free again.
        deadline = time.monotonic() + 10.0
        while True:
            try:
                again = connect()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "no recovery 10 s after fds were freed"
                time.sleep(0.2)
        _echo_once(*again, PAYLOAD)
        for s in again:
            s.close()
    finally:
        for pair in kept:
            for s in pair:
                s.close()
    relay.check_running()
    relay.stop()
    assert relay.counter("connect_failed") >= refused
    assert relay.counter("flow_errors") == 0


def test_worker_killed_mid_transfer_stops_the_service_and_cleans_up(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    family = socket.AF_INET6
    relay = start_relay()
    srv, port = listener(topology, family)
    client = topology.socket("cli", family)
    client.settimeout(IO_TIMEOUT)
    client.connect((addrs(topology, family)[1], port))
    conn, _ = srv.accept()
    _echo_once(client, conn, PAYLOAD)  # mid-transfer: a live flow with its socket
    os.kill(relay.worker_pid, signal.SIGKILL)
    status = relay.proc.wait(timeout=STOP_TIMEOUT)
    relay.stopped = True  # checked here: the fixture would expect status 0
    assert status == 1, relay.describe()
    assert gateway_leftovers(topology, relay.gateway_before) == []
    assert not relay.run_state.exists()
    client.close()
    conn.close()


def test_an_upstream_that_vanishes_resets_the_client_within_the_timeout(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    family = socket.AF_INET
    relay = start_relay(args=["--upstream-timeout", str(UPSTREAM_TIMEOUT)])
    srv, port = listener(topology, family)
    client = topology.socket("cli", family)
    client.settimeout(IO_TIMEOUT)
    client.connect((addrs(topology, family)[1], port))
    conn, _ = srv.accept()
    conn.settimeout(IO_TIMEOUT)
    _echo_once(client, conn, PAYLOAD)  # the flow works, then the server's namespace goes dark
    for rule in (
        "add table inet gone",
        "add chain inet gone in { type filter hook input priority 0 ; policy drop ; }",
    ):
        out = run_in(topology, "srv", ["nft", rule])
        assert out == "", out
    t0 = time.monotonic()
    chunk = b"y" * 65536
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        for _ in range(64 * MIB // len(chunk)):  # bounded: the client's window closes first
            client.sendall(chunk)
            assert time.monotonic() - t0 < UPSTREAM_GONE_LIMIT, "still sending"
        client.recv(1)  # the window closed: wait for the reset
    took = time.monotonic() - t0
    assert UPSTREAM_TIMEOUT <= took < UPSTREAM_GONE_LIMIT, took
    client.close()
    conn.close()
    relay.check_running()
    relay.stop()
    assert relay.counter("upstream_errors") >= 1


def test_a_client_that_vanishes_frees_its_flow_and_upstream_socket(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    family = socket.AF_INET6
    relay = start_relay(args=["--client-idle-timeout", str(CLIENT_IDLE_TIMEOUT)])
    srv, port = listener(topology, family)
    client = topology.socket("cli", family)
    client.settimeout(IO_TIMEOUT)
    client.connect((addrs(topology, family)[1], port))
    client_port = client.getsockname()[1]
    conn, _ = srv.accept()
    conn.settimeout(CLIENT_GONE_LIMIT + 5.0)
    _echo_once(client, conn, PAYLOAD)
    for rule in (
        "add table inet gone",
        "add chain inet gone in { type filter hook input priority 0 ; policy drop ; }",
        "add chain inet gone out { type filter hook output priority 0 ; policy drop ; }",
    ):
        out = run_in(topology, "cli", ["nft", rule])
        assert out == "", out
    t0 = time.monotonic()
    chunk = b"z" * 65536
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        for _ in range(256 * MIB // len(chunk)):  # bounded; the relay's window closes first
            conn.sendall(chunk)  # the server goes on sending to the vanished client
            assert time.monotonic() - t0 < CLIENT_GONE_LIMIT, "upstream still open"
    took = time.monotonic() - t0
    # The idle clock started at the client's last ACK, a little before the drop.
    assert CLIENT_IDLE_TIMEOUT / 2 <= took < CLIENT_GONE_LIMIT, took
    record = relay.flow_of(client_port)  # the flow ended and was logged
    assert record["id.orig_p"] == client_port
    conn.close()
    client.close()
    relay.check_running()
    relay.stop()


def test_a_reached_memory_budget_slows_flows_but_loses_nothing(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    family = socket.AF_INET
    relay = start_relay(args=["--memory-budget", str(1 << 20)])
    srv, port = listener(topology, family)
    pairs = []
    for _ in range(BUDGET_FLOWS):
        client = topology.socket("cli", family)
        client.settimeout(BUDGET_LIMIT)
        client.connect((addrs(topology, family)[1], port))
        conn, _ = srv.accept()
        conn.settimeout(BUDGET_LIMIT)
        pairs.append((client, conn))
    jobs: list[Callable[[], object]] = []
    for i, (client, conn) in enumerate(pairs):
        jobs += [
            lambda c=client, i=i: send_pattern(c, 100 + i, BUDGET_BYTES),
            lambda c=conn, i=i: send_pattern(c, 200 + i, BUDGET_BYTES),
            lambda c=conn: recv_stream(c),
            lambda c=client: recv_stream(c),
        ]
    results, errors, stuck = run_threads(*jobs, timeout=BUDGET_LIMIT)
    assert not stuck, f"not done in {BUDGET_LIMIT} s: {stuck}\n{relay.state_dump()}"
    assert errors == [None] * len(jobs), errors
    for i in range(BUDGET_FLOWS):
        got_c2s, got_s2c = results[4 * i + 2], results[4 * i + 3]
        assert (got_c2s.count, got_c2s.sha256) == (
            BUDGET_BYTES, expected_digest(100 + i, BUDGET_BYTES),
        )  # fmt: skip
        assert (got_s2c.count, got_s2c.sha256) == (
            BUDGET_BYTES, expected_digest(200 + i, BUDGET_BYTES),
        )  # fmt: skip
    for pair in pairs:
        for sock in pair:
            sock.close()
    relay.check_running()
    relay.stop()
    assert relay.counter("memory_budget_reached") > 0, relay.exit_line()
