"""``tunrelay run --workers 2``: a multi-queue TUN, one worker process per queue.

64 TCP flows (each bound to its own client port, to its own listener), 16 at
a time, each moving 256 KiB both ways. The kernel must keep every flow on one
queue: a packet that reached the other worker would find no connection there
and be answered with a reset, so besides byte-exact transfers the test checks

* the flow log has exactly one line per flow, from one worker, with the byte
  counts sent, and ``StreamDigest`` (which lives in the worker) saw exactly
  the bytes sent each way;
* no reset reached a client before that flow's FIN from the relay (a capture
  on the client's link): a packet that reached the other worker mid-flow is
  answered with one, and the workers' connection counts add up to the 64
  flows. (A reset *after* the FIN is allowed: a late duplicate, such as the
  client's re-ACK of a FIN sent twice, meets a connection already closed by
  LAST-ACK and is answered with a reset, as Linux does; ``rst_sent`` counts
  those as well, so it alone cannot tell a misrouted packet from them.)
* both workers served flows, and each logged its own "stopped" line.

With offloads (the default) and with ``--no-offload``. Bounds: each batch within ``BATCH_LIMIT``
(60 s), any socket operation ``IO_TIMEOUT`` (20 s).

Also the supervisor's failure handling: a worker killed with SIGKILL stops
the service with status 1 (and everything it installed is removed), and
killing the supervisor itself makes the workers exit (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from relay.lab.topology import Topology

from relay_harness import (
    IO_TIMEOUT,
    STOP_TIMEOUT,
    Received,
    RelayProcess,
    Sent,
    addrs,
    expected_digest,
    gateway_leftovers,
    listener,
    recv_stream,
    relay_installed,
    run_parallel,
    send_pattern,
)

FLOWS = 64
AT_ONCE = 16
SIZE = 256 * 1024
BATCH_LIMIT = 60.0
WORKERS = 2
# Client ports are bound explicitly, below the ephemeral range (32768+): the
# kernel may reuse an ephemeral port for a flow to another listener, even
# while the first flow is open, and the test keys flows by client port.
CLIENT_PORT_BASE = 20000


# FIN or RST toward the client (IPv4; IPv6 without extension headers).
FIN_RST_FILTER = (
    "(tcp[tcpflags] & (tcp-fin|tcp-rst) != 0) or (ip6 and ip6[6] == 6 and ip6[53] & 5 != 0)"
)
CAPTURED = re.compile(r"^(\d+\.\d+) IP6? \S+ > \S+\.(\d+): Flags \[([^\]]*)\]")


class FinRstCapture:
    """tcpdump on the client's link, inbound only: when each FIN and RST reached
    the client, per client port."""

    def __init__(self, topology: Topology) -> None:
        argv = ["tcpdump", "--immediate-mode", "-i", topology.cli_if, "-Q", "in", "-nn", "-tt"]
        self.proc = topology.spawn(
            "cli",
            [*argv, "-l", FIN_RST_FILTER],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        said = ""
        while "listening on" not in said:  # blocks until it listens (or exits)
            line = self.proc.stderr.readline()
            assert line, f"tcpdump did not start: {said!r}"
            said += line

    def stop(self) -> dict[int, tuple[list[float], list[float]]]:
        """Stop the capture; client port -> (FIN times, RST times)."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        seen: dict[int, tuple[list[float], list[float]]] = collections.defaultdict(lambda: ([], []))
        for line in out.splitlines():
            if (m := CAPTURED.match(line)) is not None:
                when, port, flags = float(m[1]), int(m[2]), m[3]
                fins, rsts = seen[port]
                if "F" in flags:
                    fins.append(when)
                if "R" in flags:
                    rsts.append(when)
        return seen


def c2s_stream(i: int) -> int:
    return 1000 + 2 * i


def s2c_stream(i: int) -> int:
    return 1001 + 2 * i


def one_flow(topology: Topology, family: int, i: int, client_port: int) -> Callable[[], int]:
    """A function that runs flow ``i`` from ``client_port`` (256 KiB each way,
    checked) and returns the client port it used."""

    def run() -> int:
        srv, port = listener(topology, family, backlog=1)
        client = topology.socket("cli", family)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        client.bind((addrs(topology, family)[0], client_port))
        client.settimeout(IO_TIMEOUT)
        client.connect((addrs(topology, family)[1], port))
        conn, _ = srv.accept()
        conn.settimeout(IO_TIMEOUT)

        def server_recv() -> Received:
            return recv_stream(conn)

        def client_recv() -> Received:
            return recv_stream(client)

        def server_send() -> Sent:
            return send_pattern(conn, s2c_stream(i), SIZE)

        sent_c2s, got_c2s, sent_s2c, got_s2c = run_parallel(
            lambda: send_pattern(client, c2s_stream(i), SIZE),
            server_recv,
            server_send,
            client_recv,
            timeout=BATCH_LIMIT,
        )
        assert (got_c2s.count, got_c2s.sha256) == (SIZE, sent_c2s.sha256), f"flow {i} c2s"
        assert (got_s2c.count, got_s2c.sha256) == (SIZE, sent_s2c.sha256), f"flow {i} s2c"
        assert got_c2s.eof and got_s2c.eof
        port_used: int = client.getsockname()[1]
        return port_used

    return run


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
def test_each_flow_is_served_whole_by_one_worker(
    topology: Topology, start_relay: Callable[..., RelayProcess], offload: bool
) -> None:
    args = ["--workers", str(WORKERS)] + ([] if offload else ["--no-offload"])
    relay = start_relay(args=args)
    ready = re.findall(r"worker (\d+) \(pid \d+\) relaying", relay.log_text())
    assert sorted(map(int, ready)) == list(range(WORKERS)), relay.describe()

    capture = FinRstCapture(topology)
    ports: dict[int, int] = {}  # client port -> flow index
    for start in range(0, FLOWS, AT_ONCE):
        batch = range(start, min(start + AT_ONCE, FLOWS))
        family = socket.AF_INET if start % (2 * AT_ONCE) == 0 else socket.AF_INET6
        results = run_parallel(
            *(one_flow(topology, family, i, CLIENT_PORT_BASE + i) for i in batch),
            timeout=BATCH_LIMIT + 10,
        )
        ports.update(zip(results, batch, strict=True))
    assert ports == {CLIENT_PORT_BASE + i: i for i in range(FLOWS)}, ports
    captured = capture.stop()
    early_resets = {
        port: (fins, rsts)
        for port, (fins, rsts) in captured.items()
        if rsts and (not fins or min(rsts) < min(fins))
    }
    assert not early_resets, f"a reset before the relay's FIN: {early_resets}"
    assert set(captured) >= set(ports), "the capture missed some flow's FIN"

    flows = relay.wait_records("flow", lambda r: r.get("id.orig_p") in ports, count=FLOWS)
    by_port: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for rec in flows:
        by_port[rec["id.orig_p"]].append(rec)
    assert all(len(recs) == 1 for recs in by_port.values()), [
        recs for recs in by_port.values() if len(recs) != 1
    ]
    assert len(relay.flow_records()) == FLOWS, "flows that were not ours (a misrouted SYN?)"
    served = collections.Counter()
    for port, (rec,) in by_port.items():
        assert (rec["orig_bytes"], rec["resp_bytes"], rec["ended"]) == (SIZE, SIZE, "fin"), rec
        assert rec["worker"] in range(WORKERS), rec
        served[rec["worker"]] += 1
        i = ports[port]
        digest = relay.digest_of(port)
        assert digest["uid"] == rec["uid"]
        assert digest["c2s"] == {"bytes": SIZE, "sha256": expected_digest(c2s_stream(i), SIZE)}
        assert digest["s2c"] == {"bytes": SIZE, "sha256": expected_digest(s2c_stream(i), SIZE)}
    print(f"\n[multiqueue offload={offload}] flows per worker: {dict(sorted(served.items()))}")
    assert set(served) == set(range(WORKERS)), f"one worker served every flow: {served}"

    relay.stop()
    lines = relay.exit_lines()
    assert len(lines) == WORKERS, lines
    late_resets = sum(len(rsts) for _, rsts in captured.values())
    print(f"resets: {relay.counter('rst_sent')} sent, {late_resets} seen after a FIN")
    assert relay.counter("connections_opened") == FLOWS
    assert relay.counter("checksum_errors") == 0
    if offload:
        assert relay.counter("csum_trusted_in") > 0


def worker_pids(relay: RelayProcess) -> dict[int, int]:
    """Worker index -> pid, from the workers' "relaying" lines; each checked to be a
    live child of the relay (so a pid is never one an unrelated process reused)."""
    found = re.findall(r"worker (\d+) \(pid (\d+)\) relaying", relay.log_text())
    pids = {int(index): int(pid) for index, pid in found}
    for pid in pids.values():
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        assert ppid == relay.pid, f"pid {pid} is not a worker of relay {relay.pid}"
    return pids


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True  # exited; its parent has not reaped it yet
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_a_dead_worker_stops_the_service_with_status_1(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    relay = start_relay(args=["--workers", str(WORKERS)])
    pids = worker_pids(relay)
    assert len(pids) == WORKERS
    os.kill(pids[1], signal.SIGKILL)
    status = relay.proc.wait(timeout=STOP_TIMEOUT)
    relay.stopped = True  # checked here: the fixture would expect status 0
    assert status == 1, relay.describe()
    assert re.search(r"worker 1 \(pid \d+\) exited with status -9; stopping", relay.log_text())
    assert wait_gone(pids[0], 5.0), "the other worker was not stopped"
    assert gateway_leftovers(topology) == []


def test_workers_exit_when_the_supervisor_is_killed(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    relay = start_relay(args=["--workers", str(WORKERS)])
    pids = worker_pids(relay)
    relay.proc.kill()  # no clean-up possible: the workers must notice by themselves
    relay.proc.wait(timeout=5)
    relay.stopped = True
    for index, pid in pids.items():
        assert wait_gone(pid, STOP_TIMEOUT), f"worker {index} outlived the supervisor"
    # With every queue closed the device is gone (the policy rules stay: no undo ran).
    assert not relay_installed(topology)["tun"]
