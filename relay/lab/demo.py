"""``tunrelay demo``: the relay end to end in three throw-away network namespaces.

Theory of operation: ``Topology.build()`` (relay.lab.topology) makes client, gateway
and server namespaces joined by veths, using only 198.18.0.0/15 and fd00::/8
and with no route to any real network. ``tunrelay run`` is spawned in the
gateway with the flow log and ``DemoAnalyzer``, only for packets arriving on
the gateway's client-facing link (``--iif``, as a VPN server would name its
tunnel), with its workers as ``nobody`` (the interpreter's installation made
reachable for them, ``relay.lab.reachable``) and its state file in the temp
directory; its output (log and analyzer lines) goes to a temp file. The
servers are threads of this process whose sockets were created in the server
namespace, and the client sockets are created in the client namespace (a
socket stays in the namespace it was created in), so the demo needs no helper
tools. The client drives HTTP over
IPv4 and IPv6, HTTPS (TLS with SNI and ALPN, to a self-signed certificate made
here), a DNS query over UDP, a bulk upload and download with SHA-256 checks,
and a connect to a closed port; then the relay is stopped and its analyzer
lines, flow log and Zeek-compatible logs (``--log-dir``: the ssl, http and
dns rows, and each flow's conn.log service, state and history) are printed.

Every wait has a timeout. SIGINT and SIGTERM raise ``_Stopped`` in the main
thread; the ``ExitStack`` then stops the servers, and ``Topology.close()``
kills the relay and removes the namespaces. Signals are blocked while the
topology is being built and entered, and ignored (with a note) during
tear-down, so neither can be skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rrset

from relay.lab.certs import self_signed
from relay.lab.demo_analyzer import endpoint
from relay.lab.topology import Topology, stop_process

__all__ = ["run_demo"]

MIB = 1 << 20
TUN = "tunrelay0"
HTTP_PORT, SINK_PORT, SOURCE_PORT, CLOSED_PORT = 80, 5001, 5002, 5003
TLS_PORT, DNS_PORT = 443, 53
TLS_NAME = "demo.example"  # the SNI the HTTPS client sends (and the certificate's name)
DNS_NAME = "www.demo.example"  # what the client looks up; answered with the server's address
UDP_IDLE = 2.0  # the relay's --udp-idle-timeout: the DNS flow ends (and is logged) soon
HTTP_BODY = b"Hello from the server namespace, via tunrelay!\n"
IO_TIMEOUT = 20.0  # any one client or server socket operation
READY_TIMEOUT = 15.0  # relay start-up
FLOWLOG_TIMEOUT = 5.0  # last flow-log lines after the traffic
SERVE_LIMIT = 300.0  # a server thread gives up after this long, whatever happens
CHUNK = 256 * 1024
MAX_BULK_MIB = 256
ANALYZER_PREFIXES = ("→ ", "  c2s ", "  s2c ", "■ ")
OK, BAD = "✓", "✗"


class _Stopped(BaseException):
    """SIGINT or SIGTERM arrived: unwind, tear down, exit 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def say(*parts: object) -> None:
    print(*parts, flush=True)


def pattern(seed: int, mib: int) -> bytes:
    """``mib`` MiB of deterministic pseudo-random bytes."""
    rng = random.Random(seed)  # randbytes() overflows above 256 MiB: draw by the MiB
    return b"".join(rng.randbytes(MIB) for _ in range(mib))


def gbps(size: int, seconds: float) -> str:
    return f"{size * 8 / max(seconds, 1e-9) / 1e9:.2f} Gbit/s"


# --- servers (threads; sockets in the server namespace) ------------------------------


def serve_http(conn: socket.socket) -> None:
    """Answer one HTTP/1.1 request: ``GET /`` gets ``HTTP_BODY``, anything else a 404."""
    request = b""
    while b"\r\n\r\n" not in request and len(request) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            return
        request += chunk
    ok = request.startswith(b"GET / ")
    body = HTTP_BODY if ok else b"not found\n"
    head = (
        f"HTTP/1.1 {'200 OK' if ok else '404 Not Found'}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    conn.sendall(head.encode() + body)


def tls_handler(cert: str, key: str) -> Callable[[socket.socket], None]:
    """HTTPS: TLS (ALPN http/1.1), then ``serve_http`` inside it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])

    def serve_https(conn: socket.socket) -> None:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            serve_http(tls)
            # close_notify both ways before the close: the client's, unread, would
            # make the kernel answer with a reset.
            with contextlib.suppress(OSError):
                tls.unwrap()

    return serve_https


def dns_handler(address: str) -> Callable[[bytes], bytes | None]:
    """A tiny authoritative server: ``DNS_NAME`` A is ``address``; anything else NXDOMAIN."""

    def answer(wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        q = query.question[0] if query.question else None
        if q is not None and q.name.to_text(omit_final_dot=True) == DNS_NAME and q.rdtype == 1:
            reply.answer.append(dns.rrset.from_text(q.name, 300, "IN", "A", address))
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply.to_wire()

    return answer


def serve_sink(conn: socket.socket) -> None:
    """Read to EOF, then answer ``<bytes> <sha256 hex>\\n``."""
    digest, total = hashlib.sha256(), 0
    while chunk := conn.recv(CHUNK):
        digest.update(chunk)
        total += len(chunk)
    conn.sendall(f"{total} {digest.hexdigest()}\n".encode())


@dataclass
class Servers:
    """Listening sockets in the server namespace, each served by one thread."""

    topo: Topology
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    active: set[socket.socket] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def listen(
        self, family: int, addr: str, port: int, handler: Callable[[socket.socket], None]
    ) -> None:
        sock = self.topo.socket("srv", family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(8)
        sock.settimeout(0.2)  # poll `stop`
        name = f"{handler.__name__} {endpoint(addr, port)}"
        thread = threading.Thread(target=self._loop, args=(sock, handler, name), daemon=True)
        thread.start()
        self.threads.append(thread)

    def datagrams(
        self, family: int, addr: str, port: int, handler: Callable[[bytes], bytes | None]
    ) -> None:
        """A UDP server: ``handler`` answers each datagram (None: no answer)."""
        sock = self.topo.socket("srv", family, socket.SOCK_DGRAM)
        sock.bind((addr, port))
        sock.settimeout(0.2)  # poll `stop`

        def loop() -> None:
            deadline = time.monotonic() + SERVE_LIMIT
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    data, peer = sock.recvfrom(65535)
                except TimeoutError:
                    continue
                except OSError:
                    return  # closed under us at tear-down
                reply = handler(data)
                if reply is not None:
                    with contextlib.suppress(OSError):
                        sock.sendto(reply, peer)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _loop(
        self, sock: socket.socket, handler: Callable[[socket.socket], None], name: str
    ) -> None:
        deadline = time.monotonic() + SERVE_LIMIT
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed under us at tear-down
            with conn:
                conn.settimeout(IO_TIMEOUT)
                with self.lock:
                    self.active.add(conn)
                try:
                    handler(conn)
                except OSError as exc:
                    if not self.stop.is_set():
                        self.errors.append(f"{name}: {exc!r}")
                finally:
                    with self.lock:
                        self.active.discard(conn)

    def close(self) -> None:
        """Stop accepting, cut open connections, and give the threads 1 s in all."""
        self.stop.set()
        with self.lock:
            for conn in self.active:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv/send
        deadline = time.monotonic() + 1.0
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


# --- the relay -------------------------------------------------------------------------


def start_relay(
    topo: Topology, log_path: Path, flow_log: Path, log_dir: Path
) -> subprocess.Popen[Any]:
    argv = [
        sys.executable, "-m", "relay.cli", "run", "--tun", TUN,
        "--client-net", topo.client_net_v4, "--client-net", topo.client_net_v6,
        "--iif", topo.gw_cli_if, "--state-dir", str(log_path.parent),
        "--flow-log", str(flow_log), "--analyzer", "relay.lab.demo_analyzer:DemoAnalyzer",
        "--log-dir", str(log_dir), "--udp-idle-timeout", str(UDP_IDLE),
        # The lab's server networks are in ranges denied by default (reserved, private).
        "--allow", topo.server_net_v4, "--allow", f"[{topo.server_net_v6}]",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as out:
        return topo.spawn(
            "gw", argv, stdout=out, stderr=subprocess.STDOUT, env=env, reachable_by="nobody"
        )


def wait_ready(proc: subprocess.Popen[Any], log_path: Path) -> str | None:
    """None when the relay logged "relaying TCP"; otherwise why not."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if "relaying TCP" in log_path.read_text(errors="replace"):
            return None
        if proc.poll() is not None:
            return f"the relay exited with status {proc.returncode}"
        time.sleep(0.02)
    return f"the relay was not ready after {READY_TIMEOUT:.0f} s"


# --- the client (sockets in the client namespace) --------------------------------------


class Client:
    def __init__(self, topo: Topology) -> None:
        self.topo = topo

    @contextlib.contextmanager
    def connect(self, addr: str, port: int) -> Iterator[socket.socket]:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = self.topo.socket("cli", family)
        with sock:
            sock.settimeout(IO_TIMEOUT)
            sock.connect((addr, port))
            yield sock

    @staticmethod
    def read_all(sock: socket.socket, limit: int) -> bytes:
        data = bytearray()
        while len(data) <= limit and (chunk := sock.recv(CHUNK)):
            data += chunk
        return bytes(data)

    def http_get(self, addr: str) -> bool:
        request = (
            f"GET / HTTP/1.1\r\nHost: {endpoint(addr, HTTP_PORT)}\r\n"
            "User-Agent: tunrelay-demo\r\nConnection: close\r\n\r\n"
        )
        with self.connect(addr, HTTP_PORT) as sock:
            sock.sendall(request.encode())
            response = self.read_all(sock, 65536)
        head, _, body = response.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        ok = status == "HTTP/1.1 200 OK" and body == HTTP_BODY
        say(f"  {status}  body {body!r}  {OK if ok else BAD}")
        return ok

    def https_get(self, addr: str) -> bool:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the demo's own throw-away certificate
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        request = (
            f"GET / HTTP/1.1\r\nHost: {TLS_NAME}\r\nUser-Agent: tunrelay-demo\r\n"
            "Connection: close\r\n\r\n"
        )
        with (
            self.connect(addr, TLS_PORT) as sock,
            ctx.wrap_socket(sock, server_hostname=TLS_NAME) as tls,
        ):
            version, alpn = tls.version(), tls.selected_alpn_protocol()
            cipher = (tls.cipher() or ("?",))[0]
            tls.sendall(request.encode())
            response = self.read_all(tls, 65536)
        head, _, body = response.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        ok = status == "HTTP/1.1 200 OK" and body == HTTP_BODY
        say(f"  {version} {cipher}, SNI {TLS_NAME}, ALPN {alpn}")
        say(f"  {status}  body {body!r}  {OK if ok else BAD}")
        return ok

    def dns_lookup(self, addr: str, expected: str) -> bool:
        sock = self.topo.socket("cli", socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(IO_TIMEOUT)  # (dnspython wants a non-blocking socket: this is one)
            reply = dns.query.udp(
                dns.message.make_query(DNS_NAME, "A"), addr, timeout=IO_TIMEOUT, sock=sock
            )
        answers = [rd.to_text() for rrset in reply.answer for rd in rrset]
        ok = answers == [expected]
        say(f"  {DNS_NAME} A → {', '.join(answers) or '(none)'}  {OK if ok else BAD}")
        return ok

    def upload(self, addr: str, data: bytes) -> bool:
        sent = hashlib.sha256(data).hexdigest()
        start = time.perf_counter()
        with self.connect(addr, SINK_PORT) as sock:
            view = memoryview(data)
            for offset in range(0, len(data), CHUNK):  # the timeout is per chunk
                sock.sendall(view[offset : offset + CHUNK])
            sock.shutdown(socket.SHUT_WR)
            reply = self.read_all(sock, 4096).decode(errors="replace").split()
        seconds = time.perf_counter() - start
        count, got = (int(reply[0]), reply[1]) if len(reply) == 2 else (-1, repr(reply))
        ok = count == len(data) and got == sent
        say(f"  sent     {len(data)} bytes, sha256 {sent}")
        say(f"  server   {count} bytes, sha256 {got}")
        say(f"  match {OK if ok else BAD}   {seconds:.3f} s, {gbps(len(data), seconds)}")
        return ok

    def download(self, addr: str, expected: bytes) -> bool:
        want = hashlib.sha256(expected).hexdigest()
        digest, total = hashlib.sha256(), 0
        start = time.perf_counter()
        with self.connect(addr, SOURCE_PORT) as sock:
            while chunk := sock.recv(CHUNK):
                digest.update(chunk)
                total += len(chunk)
        seconds = time.perf_counter() - start
        ok = total == len(expected) and digest.hexdigest() == want
        say(f"  expected {len(expected)} bytes, sha256 {want}")
        say(f"  received {total} bytes, sha256 {digest.hexdigest()}")
        say(f"  match {OK if ok else BAD}   {seconds:.3f} s, {gbps(total, seconds)}")
        return ok

    def refused(self, addr: str) -> bool:
        start = time.perf_counter()
        try:
            with self.connect(addr, CLOSED_PORT):
                outcome, ok = "connected (a server is listening?)", False
        except ConnectionRefusedError:
            outcome, ok = "connection refused (as without a relay)", True
        except OSError as exc:
            outcome, ok = f"{exc!r} (expected a refusal)", False
        ms = (time.perf_counter() - start) * 1000
        say(f"  {outcome} after {ms:.1f} ms  {OK if ok else BAD}")
        return ok


# --- what the analyzers saw ------------------------------------------------------------


def read_flow_log(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def wait_flow_log(path: Path, count: int) -> None:
    """Wait (bounded) until the flow log has ``count`` records.

    A flow is logged when the stack forgets it: after its TIME-WAIT when the
    relay closed first (the HTTP server closes first, for example).
    """
    deadline = time.monotonic() + FLOWLOG_TIMEOUT
    while len(read_flow_log(path)) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def read_rows(log_dir: Path, name: str) -> list[dict[str, Any]]:
    """The rows of ``log_dir/<name>.log`` (Zeek JSON lines)."""
    path = log_dir / f"{name}.log"
    return read_flow_log(path) if path.exists() else []


def protocol_lines(log_dir: Path) -> list[str]:
    """One line per ssl, http and dns row, and each flow's conn.log state."""
    out = []
    for r in read_rows(log_dir, "ssl"):
        out.append(
            f"  ssl.log   {endpoint(r['id.resp_h'], r['id.resp_p'])}  {r.get('version')} "
            f"{r.get('cipher')}  server_name {r.get('server_name')}  established "
            f"{r.get('established')}  next_protocol {r.get('next_protocol', '-')}  "
            f"ja4 {r.get('ja4')}"
        )
    for r in read_rows(log_dir, "http"):
        out.append(
            f"  http.log  {endpoint(r['id.resp_h'], r['id.resp_p'])}  {r.get('method')} "
            f"{r.get('host')}{r.get('uri')}  {r.get('status_code')} {r.get('status_msg')}  "
            f"{r.get('response_body_len')} bytes  user_agent {r.get('user_agent')}"
        )
    for r in read_rows(log_dir, "dns"):
        answers = ",".join(r.get("answers", [])) or "-"
        rtt = f"{r['rtt'] * 1000:.2f} ms" if "rtt" in r else "-"
        out.append(
            f"  dns.log   {endpoint(r['id.resp_h'], r['id.resp_p'])}  {r.get('proto')} "
            f"{r.get('query')} {r.get('qtype_name')} → {answers}  {r.get('rcode_name')}  "
            f"rtt {rtt}"
        )
    for r in sorted(read_rows(log_dir, "conn"), key=lambda r: float(r.get("ts", 0.0))):
        out.append(
            f"  conn.log  {r.get('proto')} {endpoint(r['id.resp_h'], r['id.resp_p'])}  "
            f"service {r.get('service', '-')}  {r.get('conn_state')}  "
            f"history {r.get('history', '-')}  packets {r.get('orig_pkts')}/{r.get('resp_pkts')}"
        )
    return out


def check_protocols(log_dir: Path, topo: Topology) -> bool:
    """The TLS, HTTP and DNS traffic each left its rows, joined to conn.log rows."""
    service = {r["uid"]: r.get("service") for r in read_rows(log_dir, "conn")}
    tls = [
        r for r in read_rows(log_dir, "ssl")
        if r.get("server_name") == TLS_NAME and r.get("established")
        and service.get(r["uid"]) == "ssl"
    ]  # fmt: skip
    http = [
        r for r in read_rows(log_dir, "http")
        if r.get("uri") == "/" and r.get("status_code") == 200 and service.get(r["uid"]) == "http"
    ]  # fmt: skip
    answered = [
        r for r in read_rows(log_dir, "dns")
        if r.get("query") == DNS_NAME and r.get("answers") == [topo.srv_v4]
        and service.get(r["uid"]) == "dns"
    ]  # fmt: skip
    ok = True
    for what, found in (
        ("an ssl.log row with the SNI", len(tls) == 1),
        ("http.log rows of both GETs", len(http) == 2),
        ("a dns.log row with the answer", len(answered) == 1),
    ):
        if not found:
            say(f"  --log-dir: no {what} {BAD}")
            ok = False
    return ok


def flow_table(records: list[dict[str, Any]]) -> list[str]:
    rows = [("proto", "client", "destination", "c→s bytes", "s→c bytes", "duration", "ended")]
    for r in sorted(records, key=lambda r: float(r.get("ts", 0.0))):
        rows.append((
            str(r.get("proto")),
            endpoint(str(r.get("id.orig_h")), int(r.get("id.orig_p", 0))),
            endpoint(str(r.get("id.resp_h")), int(r.get("id.resp_p", 0))),
            str(r.get("orig_bytes")),
            str(r.get("resp_bytes")),
            f"{float(r.get('duration', 0.0)):.3f} s",
            str(r.get("ended")),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {3, 4, 5}
    return [
        "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                         enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows
    ]  # fmt: skip


def check_flows(records: list[dict[str, Any]], expected: dict[tuple[str, int], int]) -> bool:
    """Every expected destination has a flow; the bulk ones carried every byte.

    ``expected`` maps (server ip, port) to the bulk size, or 0 for "any".
    """
    ok = True
    for (ip, port), size in expected.items():
        match = [r for r in records if (r.get("id.resp_h"), r.get("id.resp_p")) == (ip, port)]
        carried = [max(int(r.get("orig_bytes", 0)), int(r.get("resp_bytes", 0))) for r in match]
        if not match or (size and size not in carried):
            say(f"  flow log: no {'complete ' if size else ''}flow to {endpoint(ip, port)} {BAD}")
            ok = False
    return ok


# --- signals ---------------------------------------------------------------------------


@dataclass
class _SignalState:
    tearing_down: bool = False


@contextlib.contextmanager
def _signals_raise(state: _SignalState) -> Iterator[None]:
    """SIGINT/SIGTERM raise ``_Stopped``, except during tear-down; restored after."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if state.tearing_down:
            print(f"({signal.Signals(signum).name}: still tearing down)", file=sys.stderr)
            return
        raise _Stopped(signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --- the demo --------------------------------------------------------------------------


def _demo(bulk_mib: int, state: _SignalState) -> int:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        try:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tunrelay-demo-")))
            with _signals_blocked():  # no gap between creating and owning the namespaces
                topo = stack.enter_context(Topology.build())
            results = _exercise(topo, stack, tmp, bulk_mib, timings)
        finally:
            state.tearing_down = True  # a second Ctrl-C must not cut the tear-down short
    timings["tear-down"] = topo.teardown_seconds
    passed = sum(results)
    verdict = "all checks passed" if all(results) else f"{len(results) - passed} checks FAILED"
    spent = ", ".join(f"{what} {seconds:.2f}" for what, seconds in timings.items())
    say(f"\n{verdict} ({passed}/{len(results)}) in {time.perf_counter() - t_start:.2f} s")
    say(f"seconds: {spent}")
    return 0 if results and all(results) else 1


def _exercise(
    topo: Topology, stack: contextlib.ExitStack, tmp: Path, bulk_mib: int, timings: dict[str, float]
) -> list[bool]:
    """Start the relay and the servers, drive the traffic, show what the analyzers saw."""
    size = bulk_mib * MIB
    upload_data, download_data = pattern(1, bulk_mib), pattern(2, bulk_mib)
    timings["set-up"] = topo.setup_seconds
    say(
        f"namespaces {topo.cli}, {topo.gw}, {topo.srv} built in "
        f"{topo.setup_seconds * 1000:.0f} ms (198.18.0.0/15 and fd00::/8, no route out)"
    )

    log_path, flow_log, log_dir = tmp / "relay.log", tmp / "flows.jsonl", tmp / "zeek"
    log_dir.mkdir()
    t0 = time.perf_counter()
    relay = start_relay(topo, log_path, flow_log, log_dir)
    problem = wait_ready(relay, log_path)
    if problem is not None:
        say(f"tunrelay demo: {problem}; its output:")
        say(log_path.read_text(errors="replace").rstrip() or "(none)")
        return [False]
    timings["relay start"] = time.perf_counter() - t0
    say(
        f"relay: `tunrelay run --tun {TUN}` in {topo.gw} (pid {relay.pid}), "
        f"ready in {timings['relay start']:.2f} s, analyzers: flow log, DemoAnalyzer, "
        "Zeek-compatible logs (--log-dir)"
    )

    servers = Servers(topo)
    stack.callback(servers.close)
    for family, addr in ((socket.AF_INET, topo.srv_v4), (socket.AF_INET6, topo.srv_v6)):
        servers.listen(family, addr, HTTP_PORT, serve_http)
    servers.listen(socket.AF_INET, topo.srv_v4, SINK_PORT, serve_sink)

    def serve_source(conn: socket.socket) -> None:
        view = memoryview(download_data)
        for offset in range(0, len(view), CHUNK):  # the timeout is per chunk, not for all
            conn.sendall(view[offset : offset + CHUNK])

    servers.listen(socket.AF_INET6, topo.srv_v6, SOURCE_PORT, serve_source)
    servers.listen(socket.AF_INET, topo.srv_v4, TLS_PORT, tls_handler(*self_signed(tmp, TLS_NAME)))
    servers.datagrams(socket.AF_INET, topo.srv_v4, DNS_PORT, dns_handler(topo.srv_v4))
    say(
        f"servers in {topo.srv}: HTTP on port {HTTP_PORT} (IPv4, IPv6), HTTPS on {TLS_PORT} "
        f"and DNS on {DNS_PORT} (IPv4), SHA-256 sink on {SINK_PORT}, {bulk_mib} MiB source "
        f"on {SOURCE_PORT}, nothing on {CLOSED_PORT}"
    )

    client = Client(topo)
    steps: list[tuple[str, Callable[[], bool]]] = [
        (f"HTTP GET {endpoint(topo.srv_v4, HTTP_PORT)}", lambda: client.http_get(topo.srv_v4)),
        (f"HTTP GET {endpoint(topo.srv_v6, HTTP_PORT)}", lambda: client.http_get(topo.srv_v6)),
        (
            f"HTTPS GET {endpoint(topo.srv_v4, TLS_PORT)} (SNI {TLS_NAME})",
            lambda: client.https_get(topo.srv_v4),
        ),
        (
            f"DNS query {DNS_NAME} A to {endpoint(topo.srv_v4, DNS_PORT)} over UDP",
            lambda: client.dns_lookup(topo.srv_v4, topo.srv_v4),
        ),
        (
            f"upload {bulk_mib} MiB to {endpoint(topo.srv_v4, SINK_PORT)}",
            lambda: client.upload(topo.srv_v4, upload_data),
        ),
        (
            f"download {bulk_mib} MiB from {endpoint(topo.srv_v6, SOURCE_PORT)}",
            lambda: client.download(topo.srv_v6, download_data),
        ),
        (
            f"connect to closed port {endpoint(topo.srv_v4, CLOSED_PORT)}",
            lambda: client.refused(topo.srv_v4),
        ),
    ]
    results: list[bool] = []
    t0 = time.perf_counter()
    for title, step in steps:
        say(f"\n{topo.cli} → {title}")
        try:
            results.append(step())
        except OSError as exc:
            say(f"  failed: {exc!r}  {BAD}")
            results.append(False)
    for error in servers.errors:
        say(f"  server error: {error}  {BAD}")
        results.append(False)

    expected = {
        (topo.srv_v4, HTTP_PORT): 0,
        (topo.srv_v6, HTTP_PORT): 0,
        (topo.srv_v4, SINK_PORT): size,
        (topo.srv_v6, SOURCE_PORT): size,
        (topo.srv_v4, CLOSED_PORT): 0,
        (topo.srv_v4, TLS_PORT): 0,
        (topo.srv_v4, DNS_PORT): 0,  # logged once idle (UDP_IDLE)
    }
    t1 = time.perf_counter()
    timings["traffic"] = t1 - t0
    wait_flow_log(flow_log, len(expected))
    t2 = time.perf_counter()
    timings["last flow ends"] = t2 - t1
    status = stop_process(relay)
    timings["relay stop"] = time.perf_counter() - t2
    say(f"\nrelay stopped (exit status {status})")
    results.append(status == 0)
    records = read_flow_log(flow_log)

    output = log_path.read_text(errors="replace").splitlines()
    say("\nwhat DemoAnalyzer printed:")
    for line in output:
        if line.startswith(ANALYZER_PREFIXES):
            say(f"  {line}")
    noisy = [ln for ln in output if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
    if noisy:
        say("\nrelay warnings and errors:")
        for line in noisy:
            say(f"  {line}")
    say(f"\nflow log ({len(records)} flows):")
    for line in flow_table(records):
        say(line)
    results.append(check_flows(records, expected))
    say("\nZeek-compatible logs (--log-dir: conn.log, ssl.log, http.log, dns.log, quic.log):")
    for line in protocol_lines(log_dir):
        say(line)
    results.append(check_protocols(log_dir, topo))
    return results


def run_demo(bulk_mib: int = 16) -> int:
    """Run the demo; 0 when every check matched, 1 if one did not, 2 on bad use.

    Interrupted by SIGINT or SIGTERM it tears everything down and returns
    128 + the signal number.
    """
    if os.geteuid() != 0:
        print(
            "tunrelay demo: needs root to create network namespaces (try: sudo tunrelay demo)",
            file=sys.stderr,
        )
        return 2
    if not 1 <= bulk_mib <= MAX_BULK_MIB:  # both directions' data are held in memory
        print(f"tunrelay demo: --bulk-mib {bulk_mib} is outside 1..{MAX_BULK_MIB}", file=sys.stderr)
        return 2
    state = _SignalState()
    try:
        with _signals_raise(state):
            return _demo(bulk_mib, state)
    except _Stopped as stop:
        name = signal.Signals(stop.signum).name
        print(f"tunrelay demo: {name}: stopped; everything torn down", file=sys.stderr)
        return 128 + stop.signum
