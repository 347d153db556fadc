"""Real protocol bytes for the dissector tests, made in-process (no network).

TLS comes from Python's ``ssl`` driving a client and a server through
``MemoryBIO``s; ``split_feeds`` checks that a dissector's records do not
depend on where its input is cut.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import re
import shutil
import ssl
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.analysis.dissect.ja4 import is_grease
from relay.analysis.dissect.tls import TlsClientHello
from relay.analysis.hooks import Direction
from relay.lab.certs import self_signed

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT


@functools.cache
def cert_files() -> tuple[str, str]:
    """A self-signed P-256 certificate and key for example.test, as PEM file paths."""
    d = Path(tempfile.mkdtemp(prefix="dissect-cert-"))
    atexit.register(shutil.rmtree, d, True)
    return self_signed(d, "example.test")


@dataclass
class TlsConversation:
    """The bytes of a TLS handshake, in the order they were sent."""

    flights: list[tuple[Direction, bytes]]
    session: ssl.SSLSession | None

    def side(self, direction: Direction) -> bytes:
        return b"".join(d for dr, d in self.flights if dr is direction)


def client_context(
    alpn: Sequence[str] = (), max_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = max_version
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def server_context(alpn: Sequence[str] = ()) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert_files())
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def tls_conversation(
    *,
    server_name: str | None = "example.test",
    alpn: Sequence[str] = (),
    server_alpn: Sequence[str] = (),
    max_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    session: ssl.SSLSession | None = None,
    client_ctx: ssl.SSLContext | None = None,
    server_ctx: ssl.SSLContext | None = None,
    app_data: bytes = b"",
) -> TlsConversation:
    """Run a full handshake between Python ``ssl`` client and server objects."""
    client_ctx = client_ctx or client_context(alpn, max_version)
    server_ctx = server_ctx or server_context(server_alpn)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name, session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    flights: list[tuple[Direction, bytes]] = []
    c_done = s_done = False
    for _ in range(20):
        if not c_done:
            try:
                client.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        if data := c_out.read():
            flights.append((C2S, data))
            s_in.write(data)
        if not s_done:
            try:
                server.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
        if data := s_out.read():
            flights.append((S2C, data))
            c_in.write(data)
        if c_done and s_done and not c_out.pending and not s_out.pending:
            break
    if app_data:
        client.write(app_data)
        flights.append((C2S, c_out.read()))
        s_in.write(flights[-1][1])
        server.read()  # reading also lets a TLS 1.3 server send its session tickets
        if data := s_out.read():
            flights.append((S2C, data))
            c_in.write(data)
        server.write(app_data)
        flights.append((S2C, s_out.read()))
        c_in.write(flights[-1][1])
        client.read()
    return TlsConversation(flights, client.session)


def feed_all(
    make: Callable[[], object],
    flights: Sequence[tuple[Direction, bytes]],
    cuts: Callable[[bytes], Sequence[bytes]] = lambda b: [b],
    now: float = 1.0,
) -> list[object]:
    """Feed each flight (cut into pieces by ``cuts``) to a new dissector; all records."""
    d = make()
    out: list[object] = []
    for direction, data in flights:
        for piece in cuts(data):
            out += d.feed(direction, piece, now)  # type: ignore[attr-defined]
    return out


def two_pieces(at: int) -> Callable[[bytes], list[bytes]]:
    return lambda b: [b[:at], b[at:]]


def bytewise(b: bytes) -> list[bytes]:
    return [b[i : i + 1] for i in range(len(b))]


# Runs inside a fresh network namespace (unshare -n): only its own loopback
# exists there, so nothing the client sends can leave the machine.
_CAPTURE = r"""
import socket, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
response, cmd = bytes.fromhex(sys.argv[1]), sys.argv[2:]
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
port = str(srv.getsockname()[1])
client = subprocess.Popen([a.replace("{port}", port) for a in cmd], stdin=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    srv.settimeout(10)
    conn, _ = srv.accept()
    conn.settimeout(0.3)
    data, deadline = b"", time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            if data:
                break
            continue
        if not chunk:
            break
        data += chunk
    if response:
        conn.sendall(response)
    conn.close()
    try:
        client.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass
finally:
    if client.poll() is None:
        client.kill()
        client.wait()
sys.stdout.write(data.hex())
"""


def netns_available() -> bool:
    import os
    import shutil

    return os.geteuid() == 0 and bool(shutil.which("unshare")) and bool(shutil.which("ip"))


def capture_client_bytes(cmd: Sequence[str], response: bytes = b"") -> bytes:
    """What a real client sends first, captured in a private network namespace.

    ``cmd`` is the client command with ``{port}`` where the listener's port
    goes (it listens on 127.0.0.1 inside the namespace); once the client has
    been quiet for 0.3 s, ``response`` is sent back and the connection closed.
    The namespace disappears with the process.
    """
    import subprocess
    import sys

    result = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", _CAPTURE, response.hex(), *cmd],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return bytes.fromhex(result.stdout)


# Hand-built TLS messages (RFC 8446 §4.1.2), for published fingerprint vectors.


def u16s(values: Sequence[int]) -> bytes:
    return b"".join(v.to_bytes(2) for v in values)


def vec(data: bytes, size: int) -> bytes:
    return len(data).to_bytes(size) + data


def ext(ext_type: int, data: bytes = b"") -> tuple[int, bytes]:
    return ext_type, data


def ext_sni(name: str) -> tuple[int, bytes]:
    return 0, vec(b"\x00" + vec(name.encode(), 2), 2)


def ext_alpn(*names: bytes) -> tuple[int, bytes]:
    return 16, vec(b"".join(vec(n, 1) for n in names), 2)


def ext_u16_list(ext_type: int, values: Sequence[int], length_size: int = 2) -> tuple[int, bytes]:
    return ext_type, vec(u16s(values), length_size)


def client_hello_message(
    ciphers: Sequence[int],
    extensions: Sequence[tuple[int, bytes]] | None,
    *,
    version: int = 0x0303,
    session_id: bytes = b"",
) -> bytes:
    """A ClientHello handshake message (with its 4-byte header)."""
    body = (
        version.to_bytes(2) + bytes(32) + vec(session_id, 1) + vec(u16s(ciphers), 2) + b"\x01\x00"
    )
    if extensions is not None:
        body += vec(b"".join(t.to_bytes(2) + vec(d, 2) for t, d in extensions), 2)
    return b"\x01" + vec(body, 3)


def tls_records(payload: bytes, size: int = 2**14, content_type: int = 22) -> bytes:
    """``payload`` cut into records of at most ``size`` bytes (RFC 8446 §5.1)."""
    return b"".join(
        bytes([content_type, 3, 1]) + vec(payload[i : i + size], 2)
        for i in range(0, len(payload), size)
    )


def check_structure(hello: TlsClientHello, transport: str = "t") -> None:
    """JA4 of a real client, recomputed independently from the parsed fields."""
    a, b, c = hello.ja4.split("_")
    assert re.fullmatch(rf"{transport}1[0-3][di]\d{{4}}[0-9a-z]{{2}}", a)
    ciphers = sorted(x for x in hello.cipher_suites if not is_grease(x))
    assert int(a[4:6]) == min(len(ciphers), 99)
    assert int(a[6:8]) == min(len([e for e in hello.extensions if not is_grease(e)]), 99)
    want_b = hashlib.sha256(",".join(f"{x:04x}" for x in ciphers).encode()).hexdigest()[:12]
    assert b == want_b
    exts = sorted(e for e in hello.extensions if not is_grease(e) and e not in (0, 16))
    text = ",".join(f"{x:04x}" for x in exts)
    sigs = [s for s in hello.signature_algorithms if not is_grease(s)]
    if sigs:
        text += "_" + ",".join(f"{x:04x}" for x in sigs)
    assert c == hashlib.sha256(text.encode()).hexdigest()[:12]


def quic_handshake(
    alpn: Sequence[str], version: int, server_name: str = "example.test"
) -> tuple[list[bytes], list[bytes]]:
    """The first datagrams of an in-process aioquic client and server."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    config = QuicConfiguration(
        is_client=True, alpn_protocols=list(alpn), server_name=server_name,
        supported_versions=[version],
    )  # fmt: skip
    client = QuicConnection(configuration=config)
    client.connect(("198.18.0.1", 443), now=0.0)
    c2s = [d for d, _ in client.datagrams_to_send(now=0.0)]
    server_config = QuicConfiguration(
        is_client=False, alpn_protocols=list(alpn[:1]), supported_versions=[version]
    )
    server_config.load_cert_chain(*cert_files())
    dcid = c2s[0][6 : 6 + c2s[0][5]]
    server = QuicConnection(configuration=server_config, original_destination_connection_id=dcid)
    for d in c2s:
        server.receive_datagram(d, ("198.18.0.2", 40000), now=0.0)
    s2c = [d for d, _ in server.datagrams_to_send(now=0.0)]
    return c2s, s2c
