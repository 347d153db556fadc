"""Operating the service: metrics, health, systemd notification, reload, log reopening.

* ``--metrics``: /metrics, fetched from inside the gateway namespace and parsed
  with prometheus-client's own parser, counts the flows and bytes just sent;
  /healthz turns 503 while the worker is SIGSTOPped and 200 after SIGCONT;
* ``$NOTIFY_SOCKET``: the messages arrive in order (STATUS, READY=1, WATCHDOG=1
  pings, STOPPING=1); a connection made right after READY=1 passes; the
  watchdog pings stop while the worker is stopped;
* SIGHUP with a config file that adds a ``block_domain``: ``dig`` gets NXDOMAIN
  for it afterwards, while a 32 MiB download started before the reload ends
  byte-exact; a changed ``mtu`` is refused (needs a restart); a file that does
  not parse changes nothing;
* SIGHUP with ``log_level = "debug"`` in place of ``"info"``: no worker logged a
  debug line before, each of two workers logs one for its next flows;
* SIGUSR2 after the flow log was renamed: new lines go to a new file, and
  ``--log-format json`` makes the service log JSON lines.

Bounds: every socket has ``IO_TIMEOUT``; waits for a metric, a health state or a
notify message are at most 10 s; clients run at most 20 s.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from test_relay_protocols import EXAMPLE_ADDRESS, run_client, start_dnsmasq

from relay.lab.topology import Topology

from relay_harness import (
    IO_TIMEOUT,
    RelayProcess,
    accept,
    connect,
    expected_digest,
    listener,
    pattern_chunks,
    recv_stream,
    run_parallel,
    send_pattern,
)

METRICS = ("127.0.0.1", 9464)  # in the gateway namespace
SO_TIMESTAMP = 29  # <asm-generic/socket.h>; not in the socket module
WAIT = 10.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(topo: Topology, path: str) -> tuple[int, str]:
    """GET ``path`` from the relay's metrics listener, from inside the gateway."""
    s = topo.socket("gw", socket.AF_INET)
    s.settimeout(IO_TIMEOUT)
    with s:
        s.connect(METRICS)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        data = bytearray()
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def samples(topo: Topology) -> Samples:
    """Every sample of /metrics: (name, labels without ``worker``) -> value."""
    status, text = http_get(topo, "/metrics")
    assert status == 200, text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = frozenset((k, v) for k, v in s.labels.items() if k != "worker")
            out[s.name, labels] = s.value
    return out


def value(
    snap: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return snap.get((name, frozenset(labels.items())), 0.0)


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s (last: {result!r})"
        time.sleep(0.1)


def exchange(topo: Topology, srv: socket.socket, up: int, down: int) -> int:
    """One TCP flow: ``up`` bytes to the server, ``down`` back, FINs both ways; its port."""
    c = connect(topo, socket.AF_INET, srv.getsockname()[1])
    conn = accept(srv)
    with c, conn:

        def server() -> None:
            got = recv_stream(conn)
            assert got.count == up and got.eof
            send_pattern(conn, 2, down)

        def client() -> None:
            send_pattern(c, 1, up)
            got = recv_stream(c)
            assert (got.count, got.sha256) == (down, expected_digest(2, down))

        run_parallel(server, client, timeout=20.0)
        return int(c.getsockname()[1])


def test_metrics_count_the_traffic_and_healthz_follows_a_stopped_worker(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    relay = start_relay(args=["--metrics", f"{METRICS[0]}:{METRICS[1]}"])
    srv, _ = listener(topology, socket.AF_INET)
    up, down = 100_000, 300_000
    with srv:
        ports = [exchange(topology, srv, up, down) for _ in range(3)]
    for port in ports:
        assert relay.flow_of(port)["ended"] == "fin"

    def counted() -> Any:
        snap = samples(topology)
        return (
            snap
            if value(snap, "tunrelay_flows_ended_total", proto="tcp", reason="fin") >= 3
            else None
        )

    snap = wait_for("3 TCP flows ended fin in /metrics", counted)
    assert value(snap, "tunrelay_flows_ended_total", proto="tcp", reason="fin") == 3
    assert value(snap, "tunrelay_flows_opened_total", proto="tcp") == 3
    assert value(snap, "tunrelay_flows_active", proto="tcp") == 0
    assert value(snap, "tunrelay_payload_bytes_total", direction="c2s") == 3 * up
    assert value(snap, "tunrelay_payload_bytes_total", direction="s2c") == 3 * down
    # Every client byte came in through the TUN, with its headers; with offloads (the
    # default) one packet may carry a GRO super-segment, so packets only have a floor:
    # each connection's handshake, data and FIN (at least 3 packets each).
    assert value(snap, "tunrelay_tun_bytes_total", direction="in") > 3 * up
    assert value(snap, "tunrelay_tun_packets_total", direction="in") >= 3 * 3
    assert value(snap, "tunrelay_parse_errors_total") == 0
    assert value(snap, "tunrelay_checksum_errors_total") == 0
    assert value(snap, "tunrelay_tcp_memory_limit_bytes") > 0
    # The three connections are gone: nothing of them buffered, reserved or timed.
    assert value(snap, "tunrelay_tcp_buffered_bytes") == 0
    assert value(snap, "tunrelay_tcp_memory_used_bytes") == 0
    assert value(snap, "tunrelay_timers_live") == 0
    assert value(snap, "tunrelay_memory_budget_reached_total") == 0
    passes = value(snap, "tunrelay_loop_iteration_seconds_count")
    assert passes > 0 and value(snap, "tunrelay_loop_iteration_seconds_bucket", le="+Inf") == passes

    assert http_get(topology, "/healthz") == (200, "ok\n")
    worker = relay.worker_pid
    os.kill(worker, signal.SIGSTOP)
    try:
        _, body = wait_for(
            "/healthz 503 while the worker is stopped",
            lambda: (r := http_get(topology, "/healthz"))[0] == 503 and r,
        )
        assert "worker 0: no heartbeat" in body
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_for("/healthz 200 after SIGCONT", lambda: http_get(topology, "/healthz")[0] == 200)
    assert http_get(topology, "/nothing")[0] == 404


def notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)  # for recv_stamped
    s.settimeout(WAIT)
    return s, path


def recv_stamped(sock: socket.socket) -> tuple[str, float]:
    """A message and when it was queued to ``sock`` (the kernel's stamp, wall clock):
    when the relay sent it, however late this process reads it."""
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16))
    for level, kind, value in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMP):
            seconds, micros = struct.unpack("qq", value[:16])
            return data.decode(), seconds + micros / 1e6
    raise AssertionError(f"no timestamp on {data!r}")


def messages_until(sock: socket.socket, stop: Callable[[str], bool]) -> list[str]:
    got = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        msg = sock.recv(4096).decode()
        got.append(msg)
        if stop(msg):
            return got
    raise AssertionError(f"not within {WAIT} s: {got}")


def test_sd_notify_ready_only_when_relaying_watchdog_only_while_turning(
    topology: Topology, start_relay: Callable[..., RelayProcess], tmp_path: Path
) -> None:
    sock, path = notify_socket(tmp_path)
    srv, port = listener(topology, socket.AF_INET)
    with sock, srv:
        relay = start_relay(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        before = messages_until(sock, lambda m: "READY=1" in m)
        # Right after READY=1: a connection passes, and bytes go through.
        c = connect(topology, socket.AF_INET, port)
        conn = accept(srv)
        with c, conn:
            c.sendall(b"probe")
            assert conn.recv(5) == b"probe"
        assert before[0] == "STATUS=starting workers", before
        assert not any("WATCHDOG" in m for m in before), before
        assert before[-1].startswith("READY=1\nSTATUS=relaying on "), before
        pings = messages_until(sock, lambda m: m == "WATCHDOG=1")
        assert pings[-1] == "WATCHDOG=1"

        worker = relay.worker_pid
        stopped = time.time()
        os.kill(worker, signal.SIGSTOP)
        try:
            # Pings may go on while the heartbeat is still fresh: up to HEARTBEAT_TIMEOUT
            # (3 s) and one more ping interval, and 0.1 s more; then none for three ping
            # intervals. Read until that silence rather than sleeping past the 4 s.
            sock.settimeout(1.5)  # three ping intervals
            while True:
                try:
                    stray, sent = recv_stamped(sock)
                except TimeoutError:
                    break
                late = sent - stopped
                assert late < 4.1, f"a watchdog ping {late:.2f} s into the stop: {stray!r}"
        finally:
            os.kill(worker, signal.SIGCONT)
        sock.settimeout(WAIT)
        messages_until(sock, lambda m: m == "WATCHDOG=1")
        relay.stop()
        rest = messages_until(sock, lambda m: "STOPPING=1" in m)
        assert rest[-1] == "STOPPING=1\nSTATUS=stopping", rest


def test_sighup_blocks_a_domain_and_keeps_a_running_download_byte_exact(
    topology: Topology, start_relay: Callable[..., RelayProcess], tmp_path: Path
) -> None:
    config = tmp_path / "tunrelay.toml"
    config.write_text("stats_interval = 0.0\n")
    relay = start_relay(args=["--config", str(config), "--udp-idle-timeout", "2"])
    start_dnsmasq(topology)
    dig = ["dig", f"@{topology.srv_v4}", "A", "+tries=1", "+time=5"]
    name = "www.blocked.example.test"
    before = run_client(topology, [*dig, name])
    assert before.returncode == 0 and EXAMPLE_ADDRESS in before.stdout, before

    size = 32 << 20
    srv, port = listener(topology, socket.AF_INET)
    c = connect(topology, socket.AF_INET, port)
    conn = accept(srv)
    halfway = threading.Event()
    reloaded = threading.Event()

    def server() -> None:
        first = send_pattern(conn, 7, size // 2, shut=False)
        halfway.set()
        assert reloaded.wait(WAIT)  # the second half flows after the reload
        second = send_pattern(conn, 7, size, shut=True)  # the same stream again, from 0
        assert (first.count, second.count) == (size // 2, size)

    def client() -> Any:
        return recv_stream(c)

    def reload() -> None:
        assert halfway.wait(WAIT)
        config.write_text(
            'stats_interval = 0.0\nblock_domain = ["*.blocked.example.test"]\nmtu = 1400\n'
        )
        os.kill(relay.pid, signal.SIGHUP)
        wait_for("the reload logged", lambda: "reload: --block-domain" in relay.log_text())
        reloaded.set()

    client_port = c.getsockname()[1]
    with srv, c, conn:
        _, got, _ = run_parallel(server, client, reload, timeout=60.0)
    # Half the stream, then the whole stream again (pattern_chunks restarts at 0).
    assert got.eof and got.count == size // 2 + size
    whole = hashlib.sha256()
    for piece in itertools.chain(pattern_chunks(7, size // 2), pattern_chunks(7, size)):
        whole.update(piece)
    assert got.sha256 == whole.hexdigest(), "the download is not byte-exact"
    log = relay.log_text()
    assert "reload: --mtu (1500 -> 1400) needs a restart" in log, relay.log_tail()
    assert "TCP/stack settings" not in log, relay.log_tail()  # the MTU's one line only
    assert "reload: --block-domain/--block-list: 1 rules (+1 -0)" in log, relay.log_tail()
    flow = relay.flow_of(client_port)
    assert flow["ended"] == "fin" and flow["resp_bytes"] == size // 2 + size

    after = run_client(topology, [*dig, name])
    assert after.returncode == 0 and "status: NXDOMAIN" in after.stdout, after
    ok = run_client(topology, [*dig, "ok.example.test"])
    assert ok.returncode == 0 and EXAMPLE_ADDRESS in ok.stdout, ok

    # A file that does not parse changes nothing: the name stays blocked.
    config.write_text("block_domain = [\n")
    os.kill(relay.pid, signal.SIGHUP)
    wait_for("the failed reload logged", lambda: "reload failed: " in relay.log_text())
    assert f"{config}:" in relay.log_text().split("reload failed: ", 1)[1].splitlines()[0]
    still = run_client(topology, [*dig, name])
    assert still.returncode == 0 and "status: NXDOMAIN" in still.stdout, still


def test_sighup_turns_on_debug_logging_in_every_worker(
    topology: Topology, start_relay: Callable[..., RelayProcess], tmp_path: Path
) -> None:
    config = tmp_path / "tunrelay.toml"
    config.write_text('log_level = "info"\n')
    relay = start_relay(args=["--config", str(config), "--workers", "2"])
    srv, _ = listener(topology, socket.AF_INET)
    debug = re.compile(r" DEBUG relay\.datapath\.tcpflow\[w(\d)\]: flow .* ended: ")
    with srv:
        for _ in range(4):
            relay.flow_of(exchange(topology, srv, 1000, 1000))  # ended, and logged if at all
        assert " DEBUG " not in relay.log_text(), relay.log_tail()
        config.write_text('log_level = "debug"\n')
        os.kill(relay.pid, signal.SIGHUP)
        wait_for(
            "the reload logged", lambda: "reload: log level: info -> debug" in relay.log_text()
        )
        # The kernel spreads flows over the two queues by their hash: 32 flows reach
        # both with a probability of 1 - 2**-31.
        for _ in range(32):
            relay.flow_of(exchange(topology, srv, 1000, 1000))
            if set(debug.findall(relay.log_text())) == {"0", "1"}:
                break
    assert set(debug.findall(relay.log_text())) == {"0", "1"}, relay.log_tail()


def test_sigusr2_reopens_the_flow_log_and_json_log_lines(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    relay = start_relay(args=["--log-format", "json"])
    srv, _ = listener(topology, socket.AF_INET)
    with srv:
        first = exchange(topology, srv, 1000, 1000)
        relay.flow_of(first)
        rotated = relay.flow_log.with_name(relay.flow_log.name + ".1")
        relay.flow_log.rename(rotated)
        os.kill(relay.pid, signal.SIGUSR2)
        wait_for("the reopen", lambda: relay.flow_log.exists())
        second = exchange(topology, srv, 2000, 2000)
        (rec,) = relay.wait_records("flow", lambda r: r.get("id.orig_p") == second)
    old = [json.loads(line) for line in rotated.read_text().splitlines()]
    assert [r["id.orig_p"] for r in old] == [first]
    assert rec["orig_bytes"] == 2000
    lines = [line for line in relay.log_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert any(r["msg"].startswith("relaying TCP") and "worker" not in r for r in records)
    assert any(r.get("worker") == 0 and r["logger"] == "tunrelay" for r in records)
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
