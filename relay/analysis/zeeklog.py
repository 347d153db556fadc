"""Zeek-compatible logs (``tunrelay run --log-dir DIR``): conn, ssl, http, dns, quic.

``ZeekLogs`` is an analyzer: its record hooks turn dissection on, and it writes
one JSON object per line to ``DIR/conn.log``, ``ssl.log``, ``http.log``,
``dns.log`` and ``quic.log`` with Zeek's field names and types: ``ts`` in
epoch seconds (a float), ``uid`` (the flow's, shared by every row of the
flow: the logs join on it), ``id.orig_h``, ``id.orig_p``, ``id.resp_h``,
``id.resp_p``. A field Zeek would leave unset is left out.

Rows:

* conn.log, one per flow at its end: the flow log's fields
  (``relay.analysis.flowlog``: ``proto``, ``duration``, ``orig_bytes``,
  ``resp_bytes``, and our ``orig_bytes_forwarded``, ``resp_bytes_forwarded``,
  ``ended``, ``rule``, ``worker``) plus ``service``
  (the protocols whose dissector confirmed them: ``ssl``, ``http``, ``dns``,
  ``quic``), ``conn_state``, ``history``, ``missed_bytes`` (always 0: the
  relay sees every byte, in order), ``orig_pkts`` and ``resp_pkts`` (TCP:
  packets from and to the client on its connection with the relay, counted by
  the stack; with TUN offloads (the default) a GRO super-segment or GSO write counts once.
  UDP: datagrams).
* ssl.log, one per TLS connection, once the handshake completed (or at the
  flow's end if it never did): ``version``, ``cipher``, ``curve``,
  ``server_name``, ``resumed``, ``next_protocol``, ``established``, ``ja4``,
  ``ja3`` (the MD5 hash, as Zeek's ja3 package logs it). ``next_protocol`` is
  the server's ALPN choice, which only TLS 1.2 and earlier send in the clear:
  in TLS 1.3 it is encrypted and the field is left out.
* http.log, one per request/response, when the response ended:
  ``trans_depth``, ``method``, ``host``, ``uri``, ``referrer``, ``version``
  (the response's, else the request's), ``user_agent``, ``origin``,
  ``request_body_len``, ``response_body_len``, ``status_code``,
  ``status_msg``, ``info_code``, ``info_msg``.
* dns.log, one per query (answered or not) or unmatched reply: ``proto``,
  ``trans_id``, ``rtt``, ``query``, ``qclass``, ``qclass_name``, ``qtype``,
  ``qtype_name``, ``rcode``, ``rcode_name``, ``AA``, ``TC``, ``RD``, ``RA``,
  ``Z``, ``answers``, ``TTLs``, ``rejected``.
* quic.log, one per QUIC connection, once the server's Initial was read (or at
  the flow's end): ``version``, ``client_initial_dcid``, ``client_scid``,
  ``server_scid``, ``server_name``, ``client_protocol`` (the first ALPN the
  client offered), and ``ja4``.

conn_state and history: Zeek's history letters, upper case for the client
(the originator), lower case for the server, each recorded once, in the order
first seen. The relay sees the client's packets through its stack and the
server only through a kernel socket, so:

==========  ===============================================================
``S``       the client's SYN (the stack's ConnectionRequest)
``h``       the server's SYN-ACK: the upstream connect succeeded
``A``       the client's ACK of the relay's SYN-ACK (the stack's Connected)
``D``/``d`` the first payload from the client / from the server
``F``/``f`` the client's FIN (PeerFinished) / the server's: EOF on the socket
``R``/``r`` the client's RST / the server's: ECONNREFUSED at connect, or
            ECONNRESET on the socket
==========  ===============================================================

The server's pure ACKs (``a``) never reach the relay (its kernel socket
takes them), so ``a`` is never logged: a plain exchange reads ``ShADdFf``
where a sensor on the wire would write ``ShADadFf``. What the relay decides
itself (an egress denial, an analyzer's REJECT, a connect timeout, a flow it
aborts) adds no letter: ``ended`` says what happened. ``conn_state`` is then
computed from the history as Zeek's ``conn_state`` does from its endpoint
states: ``r`` without ``h``: ``REJ`` (refused); with ``h``: ``RSTR``; ``R``
(and no ``r``) without ``h``: ``RSTOS0``, with it ``RSTO``; ``F`` and ``f``:
``SF``; ``F`` alone: ``S2`` (``SH`` without ``h``); ``f`` alone: ``S3``; no
``h``: ``S0`` (denied, rejected, unreachable, timed out); else ``S1``.
UDP: ``SF`` with datagrams both ways, ``S0`` from the client only; ICMP
echo: ``OTH``, no history.

Writing never blocks the trio loop: a row is appended to its file's
in-memory buffer, and ``run()`` (a task the host starts) writes the buffers
from a worker thread every ``flush_interval`` seconds or as soon as
``flush_at`` bytes are waiting, with one ``os.write`` per file per batch of
whole lines. The files are opened ``O_APPEND`` (by a worker before it drops
its privileges), so several worker processes can share them and their lines
never interleave. At most ``buffer_limit`` bytes wait; a row that does not
fit is dropped and counted (``stats.dropped``), never waited for.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from relay.analysis.dissect.tls import cipher_name, group_name
from relay.analysis.flowlog import flow_record
from relay.analysis.hooks import FlowEnd, FlowInfo
from relay.analysis.logfiles import LOGS, OPEN_FLAGS, log_paths, open_logs

if TYPE_CHECKING:
    from relay.analysis.dissect import (
        DnsTransaction,
        HttpTransaction,
        QuicClientHello,
        QuicServerHello,
        TlsClientHello,
        TlsEstablished,
        TlsServerHello,
    )

__all__ = ["LOGS", "LogStats", "ZeekLogs", "conn_state"]

log = logging.getLogger(__name__)

_CONN, _SSL, _HTTP, _DNS, _QUIC = range(len(LOGS))

BUFFER_LIMIT: Final = 4 << 20  # bytes waiting for the writer, all files together
FLUSH_AT: Final = 64 << 10  # wake the writer early once this much waits
FLUSH_INTERVAL: Final = 0.5  # seconds


def conn_state(proto: str, history: str) -> str:
    """Zeek's conn_state from a history of the letters the relay records
    (see the module docstring)."""
    if proto == "udp":
        if "D" in history:
            return "SF" if "d" in history else "S0"
        return "SHR" if "d" in history else "OTH"
    if proto != "tcp":
        return "OTH"
    handshake = "h" in history
    if "r" in history:
        return "RSTR" if handshake else "REJ"
    if "R" in history:
        return "RSTO" if handshake else "RSTOS0"
    fin, server_fin = "F" in history, "f" in history
    if fin and server_fin:
        return "SF"
    if fin:
        return "S2" if handshake else "SH"
    if server_fin:
        return "S3"
    return "S1" if handshake else "S0"


def _ids(flow: FlowInfo, ts: float) -> dict[str, Any]:
    return {
        "ts": round(ts, 6),
        "uid": flow.uid,
        "id.orig_h": flow.client_ip,
        "id.orig_p": flow.client_port,
        "id.resp_h": flow.server_ip,
        "id.resp_p": flow.server_port,
    }


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


def conn_row(flow: FlowInfo, end: FlowEnd, worker: int | None = None) -> dict[str, Any]:
    """The conn.log row of a finished flow."""
    base = flow_record(flow, end, worker)
    row = _ids(flow, flow.start)
    row["proto"] = flow.proto
    if end.services:
        row["service"] = ",".join(end.services)
    row["duration"] = base["duration"]
    row["orig_bytes"] = end.bytes_c2s
    row["resp_bytes"] = end.bytes_s2c
    row["conn_state"] = conn_state(flow.proto, end.history)
    row["missed_bytes"] = 0
    if end.history:
        row["history"] = end.history
    row["orig_pkts"] = end.packets_c2s
    row["resp_pkts"] = end.packets_s2c
    for key in ("orig_bytes_forwarded", "resp_bytes_forwarded", "ended", "rule", "worker"):
        if key in base:
            row[key] = base[key]
    return row


def ssl_row(
    flow: FlowInfo,
    hello: TlsClientHello,
    server: TlsServerHello | None,
    established: TlsEstablished | None,
) -> dict[str, Any]:
    """The ssl.log row of a TLS connection."""
    row = _ids(flow, hello.ts)
    if server is not None and not server.hello_retry_request:
        row["version"] = server.version_name
        row["cipher"] = cipher_name(server.cipher_suite)
        if server.key_share_group is not None:
            row["curve"] = group_name(server.key_share_group)
    if hello.server_name is not None:
        row["server_name"] = hello.server_name
    row["resumed"] = established is not None and established.resumed
    if server is not None and server.alpn is not None:
        row["next_protocol"] = _text(server.alpn)
    row["established"] = established is not None
    row["ja4"] = hello.ja4
    row["ja3"] = hello.ja3_hash
    return row


def http_row(flow: FlowInfo, tx: HttpTransaction) -> dict[str, Any]:
    """The http.log row of a request and its response."""
    req, resp = tx.request, tx.response
    row = _ids(flow, tx.ts)
    row["trans_depth"] = tx.trans_depth
    if req is not None:
        row["method"] = req.method
        if req.host is not None:
            row["host"] = req.host
        row["uri"] = req.uri
        for name, key in (("referer", "referrer"),):
            value = next((v for k, v in req.headers if k.lower() == name), None)
            if value is not None:
                row[key] = value
    version = resp.version if resp is not None else req.version if req is not None else None
    if version is not None:
        row["version"] = version
    if req is not None:
        if req.user_agent is not None:
            row["user_agent"] = req.user_agent
        origin = next((v for k, v in req.headers if k.lower() == "origin"), None)
        if origin is not None:
            row["origin"] = origin
    row["request_body_len"] = tx.request_body_len
    row["response_body_len"] = tx.response_body_len
    if resp is not None:
        row["status_code"] = resp.status_code
        row["status_msg"] = resp.status_msg
    if tx.info_code is not None:
        row["info_code"] = tx.info_code
        row["info_msg"] = tx.info_msg
    return row


def dns_row(flow: FlowInfo, a: DnsTransaction) -> dict[str, Any]:
    """The dns.log row of a query and its answer (or either alone)."""
    row = _ids(flow, a.ts)
    row["proto"] = a.proto
    row["trans_id"] = a.trans_id
    if a.rtt is not None:
        row["rtt"] = round(a.rtt, 6)
    for key in ("query", "qclass", "qclass_name", "qtype", "qtype_name", "rcode", "rcode_name"):
        value = getattr(a, key)
        if value is not None:
            row[key] = value
    row["AA"], row["TC"], row["RD"], row["RA"], row["Z"] = a.aa, a.tc, a.rd, a.ra, a.z
    if a.answers:
        row["answers"] = list(a.answers)
        row["TTLs"] = [float(t) for t in a.ttls]
    row["rejected"] = a.rejected
    return row


def quic_row(
    flow: FlowInfo, hello: QuicClientHello, server: QuicServerHello | None
) -> dict[str, Any]:
    """The quic.log row of a QUIC connection."""
    row = _ids(flow, hello.ts)
    row["version"] = hello.version_name
    row["client_initial_dcid"] = hello.dcid.hex()
    row["client_scid"] = hello.scid.hex()
    if server is not None:
        row["server_scid"] = server.scid.hex()
    if hello.hello.server_name is not None:
        row["server_name"] = hello.hello.server_name
    if hello.hello.alpn:
        row["client_protocol"] = _text(hello.hello.alpn[0])
    row["ja4"] = hello.hello.ja4
    return row


@dataclass(slots=True)
class LogStats:
    """What the logs wrote and what they could not."""

    rows: int = 0  # rows taken into the buffers
    dropped: int = 0  # rows that found the buffers full
    written: int = 0  # bytes written to the files
    write_errors: int = 0  # failed writes (their rows are lost)


class _Pending:
    """A TLS or QUIC connection's hellos until its row is written."""

    __slots__ = ("client", "server")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.server: Any = None


class ZeekLogs:
    """Writes Zeek-compatible logs into a directory; see the module docstring.

    Args:
        directory: where conn.log, ssl.log, http.log, dns.log and quic.log are
            (created if missing, appended to otherwise).
        worker: the worker index to record in conn.log rows, if any.
        buffer_limit, flush_at, flush_interval: see the module docstring.

    Raises:
        OSError: a file cannot be opened (the others are closed again).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        worker: int | None = None,
        buffer_limit: int = BUFFER_LIMIT,
        flush_at: int = FLUSH_AT,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.stats = LogStats()
        self._worker = worker
        self._limit = buffer_limit
        self._flush_at = flush_at
        self._interval = flush_interval
        self._paths = log_paths(directory)
        self._fds = open_logs(directory)
        self._bufs = [bytearray() for _ in LOGS]
        self._waiting = 0  # bytes in the buffers
        self._wake = trio.Event()
        self._tls: dict[str, _Pending] = {}
        self._quic: dict[str, _Pending] = {}
        # Rules that blocked a flow (by uid) or a DNS query (by uid and id), for the rows.
        self._blocked: dict[str, str] = {}
        self._blocked_dns: dict[tuple[str, int], str] = {}

    def note_block(self, uid: str, rule: str, dns_id: int | None = None) -> None:
        """A blocked flow or query (``relay.analysis.blocklist``): its rows name the rule."""
        if dns_id is None:
            self._blocked[uid] = rule
        else:
            self._blocked_dns[(uid, dns_id)] = rule
            self._blocked.setdefault(uid, rule)

    # --- rows -------------------------------------------------------------------------

    def _emit(self, log_index: int, row: dict[str, Any], rule: str | None = None) -> None:
        if rule is not None:
            row["rule"] = rule
        line = (json.dumps(row, separators=(",", ":")) + "\n").encode()
        if self._waiting + len(line) > self._limit:
            self.stats.dropped += 1
            return
        self._bufs[log_index] += line
        self._waiting += len(line)
        self.stats.rows += 1
        if self._waiting >= self._flush_at:
            self._wake.set()

    async def tls_clienthello(self, flow: FlowInfo, hello: TlsClientHello) -> None:
        pending = self._tls.get(flow.uid)
        if pending is None:
            self._tls[flow.uid] = _Pending(hello)
        else:
            pending.client = hello  # the second, after a HelloRetryRequest

    async def tls_serverhello(self, flow: FlowInfo, hello: TlsServerHello) -> None:
        pending = self._tls.get(flow.uid)
        if pending is not None:
            pending.server = hello

    async def tls_established(self, flow: FlowInfo, established: TlsEstablished) -> None:
        pending = self._tls.pop(flow.uid, None)
        if pending is not None:
            self._emit(
                _SSL,
                ssl_row(flow, pending.client, pending.server, established),
                self._blocked.get(flow.uid),
            )

    async def http_transaction(self, flow: FlowInfo, tx: HttpTransaction) -> None:
        self._emit(_HTTP, http_row(flow, tx), self._blocked.get(flow.uid))

    async def dns_answer(self, flow: FlowInfo, a: DnsTransaction) -> None:
        self._emit(_DNS, dns_row(flow, a), self._blocked_dns.pop((flow.uid, a.trans_id), None))

    async def quic_clienthello(self, flow: FlowInfo, hello: QuicClientHello) -> None:
        self._quic.setdefault(flow.uid, _Pending(hello))

    async def quic_serverhello(self, flow: FlowInfo, hello: QuicServerHello) -> None:
        pending = self._quic.pop(flow.uid, None)
        if pending is not None:
            self._emit(_QUIC, quic_row(flow, pending.client, hello), self._blocked.get(flow.uid))

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        rule = self._blocked.pop(flow.uid, None)
        if rule is not None:
            for key in [k for k in self._blocked_dns if k[0] == flow.uid]:
                del self._blocked_dns[key]
        if (tls := self._tls.pop(flow.uid, None)) is not None:
            self._emit(_SSL, ssl_row(flow, tls.client, tls.server, None), rule)
        if (quic := self._quic.pop(flow.uid, None)) is not None:
            self._emit(_QUIC, quic_row(flow, quic.client, None), rule)
        self._emit(_CONN, conn_row(flow, end, self._worker))

    # --- writing ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write the buffers every ``flush_interval`` seconds, or sooner when they
        fill, until cancelled (the host's task; ``close()`` writes what is left)."""
        task_status.started()
        while True:
            with trio.move_on_after(self._interval):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Write what waits, from a worker thread."""
        batches = self._take()
        if batches:
            await trio.to_thread.run_sync(self._write, batches)

    def _take(self) -> list[tuple[int, bytes]]:
        batches = [(fd, bytes(buf)) for fd, buf in zip(self._fds, self._bufs, strict=True) if buf]
        for buf in self._bufs:
            buf.clear()
        self._waiting = 0
        return batches

    def _write(self, batches: list[tuple[int, bytes]]) -> None:
        for fd, data in batches:
            try:
                # One write of whole lines: O_APPEND keeps other workers' lines out of it.
                n = os.write(fd, data)
                while n < len(data):  # only on a full disk or a signal, in practice
                    n += os.write(fd, data[n:])
                self.stats.written += len(data)
            except OSError as exc:
                self.stats.write_errors += 1
                if self.stats.write_errors & (self.stats.write_errors - 1) == 0:  # 1, 2, 4...
                    log.warning(
                        "--log-dir: write failed (%d so far): %s", self.stats.write_errors, exc
                    )

    def reopen(self) -> None:
        """Open the files by name again (after a rotation renamed them). ``dup2`` puts
        each new file under the old descriptor, so a write in flight in the writer
        thread goes whole to one file or the other.

        Raises:
            OSError: a file cannot be opened (the rest still go to the old files).
        """
        for fd, path in zip(self._fds, self._paths, strict=True):
            new = os.open(path, OPEN_FLAGS, 0o644)
            try:
                os.dup2(new, fd, inheritable=False)
            finally:
                os.close(new)

    def close(self) -> None:
        """Write what waits (blocking: at exit) and close the files. Safe to call twice."""
        if self._fds and hasattr(self, "_bufs"):
            self._write(self._take())
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> ZeekLogs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
