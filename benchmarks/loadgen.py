"""Load programs that ``bench_netns.py`` spawns inside the lab's namespaces.

Usage (each is one process; all are bounded in time and exit by themselves):

    loadgen.py server   --port P [--host H] [--max-seconds S]
    loadgen.py connrate --host H --port P --seconds T [--concurrency 8] [--size 64]
    loadgen.py latency  --host H --port P [--count 2000] [--size 64]
    loadgen.py idle     --host H --port P --count N [--limit-seconds S] [--hold-seconds S]

``server`` is an echo server (one epoll loop): it echoes whatever a
connection sends and closes when the peer closes, so it serves the
connection-rate client, the ping-pong latency client and the idle
connections alike. It prints ``listening`` once bound.

``connrate`` keeps ``--concurrency`` connections in flight, each doing
connect, a ``--size``-byte request, a ``--size``-byte response, close, in a
loop for ``--seconds``; a connection that has not finished after
``STALL_SECONDS`` is counted as stalled and abandoned. ``latency`` does
ping-pong on one persistent connection. ``idle`` opens ``--count``
connections (at most ``--inflight`` connects at once), prints one JSON line
when they are all open or ``--limit-seconds`` ran out, then holds them until
its stdin closes or ``--hold-seconds`` ran out.

The clients print one JSON object on stdout. Only the standard library is
imported, so a process starts in ~30 ms. Raw non-blocking sockets and epoll
are the fastest pure-Python way to generate this load, so the load generator
is less likely to be the bottleneck than the thing measured (on a 2-core
machine it still competes with it for CPU; see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import resource
import select
import socket
import statistics
import sys
import time
from collections.abc import Sequence

STALL_SECONDS = 3.0  # a connrate connection older than this is a stall
MAX_LIFETIME = 900.0  # no program runs longer than this, whatever it was told


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE to at least ``want`` if allowed (root may raise the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --- server ----------------------------------------------------------------------------


def run_server(host: str, port: int, max_seconds: float) -> int:
    """Echo server: accept everything, echo every byte, close on EOF or error."""
    raise_nofile()
    lsock = socket.socket(_family(host), socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    ep = select.epoll()
    ep.register(lsock.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    print("listening", flush=True)
    deadline = time.monotonic() + min(max_seconds, MAX_LIFETIME)
    lfd = lsock.fileno()
    try:
        while time.monotonic() < deadline:
            for fd, _ev in ep.poll(0.5):
                if fd == lfd:
                    while True:
                        try:
                            conn, _ = lsock.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as exc:  # EMFILE and friends: back off
                            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS):
                                time.sleep(0.01)
                                break
                            continue
                        conn.setblocking(False)
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        conns[conn.fileno()] = conn
                        ep.register(conn.fileno(), select.EPOLLIN)
                    continue
                conn = conns[fd]
                try:
                    data = conn.recv(65536)
                    if data:
                        # Responses are small; a short write only happens if the
                        # peer stops reading, which no client here does.
                        conn.send(data)
                        continue
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    pass
                ep.unregister(fd)
                del conns[fd]
                conn.close()
    finally:
        for conn in conns.values():
            conn.close()
        ep.close()
        lsock.close()
    return 0


# --- connrate --------------------------------------------------------------------------


class _Conn:
    """One connrate connection in flight."""

    __slots__ = ("got", "sending", "sock", "start")

    def __init__(self, sock: socket.socket, start: float) -> None:
        self.sock = sock
        self.start = start
        self.sending = True  # connecting; False once the request is sent
        self.got = 0


def run_connrate(host: str, port: int, seconds: float, concurrency: int, size: int) -> int:
    """connect + request + response + close, ``concurrency`` at a time, for ``seconds``."""
    raise_nofile()
    family = _family(host)
    request = b"q" * size
    ep = select.epoll()
    live: dict[int, _Conn] = {}
    completed = errors = stalled = 0
    error_kinds: dict[str, int] = {}

    def count_error(why: str) -> None:
        nonlocal errors
        errors += 1
        error_kinds[why] = error_kinds.get(why, 0) + 1

    def start() -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rc = sock.connect_ex((host, port))
        if rc not in (0, errno.EINPROGRESS):
            count_error(errno.errorcode.get(rc, str(rc)))
            sock.close()
            time.sleep(0.001)  # do not spin on an immediate failure
            return
        live[sock.fileno()] = _Conn(sock, time.monotonic())
        ep.register(sock.fileno(), select.EPOLLOUT)

    def finish(fd: int, why: str = "") -> None:
        nonlocal completed
        conn = live.pop(fd)
        ep.unregister(fd)
        conn.sock.close()
        if why:
            count_error(why)
        else:
            completed += 1

    t0 = time.monotonic()
    end = t0 + min(seconds, MAX_LIFETIME)
    next_stall_check = t0 + 0.25
    while (now := time.monotonic()) < end:
        while len(live) < concurrency:
            start()
        for fd, _ev in ep.poll(min(0.25, end - now)):
            conn = live.get(fd)
            if conn is None:
                continue
            if conn.sending:
                err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(fd, errno.errorcode.get(err, str(err)))
                    continue
                try:
                    conn.sock.send(request)
                except OSError as exc:
                    finish(fd, errno.errorcode.get(exc.errno or 0, "send"))
                    continue
                conn.sending = False
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                finish(fd, errno.errorcode.get(exc.errno or 0, "recv"))
                continue
            if not data:
                finish(fd, "early-eof")
                continue
            conn.got += len(data)
            if conn.got >= size:
                finish(fd)
        now = time.monotonic()
        if now >= next_stall_check:
            next_stall_check = now + 0.25
            for fd in [fd for fd, c in live.items() if now - c.start > STALL_SECONDS]:
                stalled += 1
                finish(fd, "stalled")
    elapsed = time.monotonic() - t0
    for conn in live.values():
        conn.sock.close()
    ep.close()
    emit(
        {
            "completed": completed,
            "errors": errors,
            "stalled": stalled,
            "error_kinds": error_kinds,
            "elapsed": elapsed,
            "per_second": completed / elapsed if elapsed > 0 else 0.0,
        }
    )
    return 0


# --- latency ---------------------------------------------------------------------------


def run_latency(host: str, port: int, count: int, size: int, timeout: float) -> int:
    """Ping-pong ``size`` bytes ``count`` times on one connection; median and p99 in µs."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"p" * size
    samples: list[float] = []
    warmup = min(100, count)
    deadline = time.monotonic() + timeout
    try:
        for i in range(warmup + count):
            if time.monotonic() > deadline:
                break
            t = time.perf_counter_ns()
            sock.sendall(msg)
            got = 0
            while got < size:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                got += len(chunk)
            if i >= warmup:
                samples.append((time.perf_counter_ns() - t) / 1000.0)
    finally:
        sock.close()
    if not samples:
        emit({"count": 0})
        return 1
    samples.sort()
    emit(
        {
            "count": len(samples),
            "p50_us": statistics.median(samples),
            "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
            "max_us": samples[-1],
            "mean_us": statistics.fmean(samples),
        }
    )
    return 0


# --- idle ------------------------------------------------------------------------------


def run_idle(
    host: str, port: int, count: int, inflight: int, limit_seconds: float, hold_seconds: float
) -> int:
    """Open ``count`` idle connections, report, hold them until stdin closes or time runs out."""
    limit = raise_nofile(count + 1024)
    family = _family(host)
    ep = select.epoll()
    pending: dict[int, tuple[socket.socket, float]] = {}
    opened: list[socket.socket] = []
    errors = timeouts = 0
    error_kinds: dict[str, int] = {}
    started = 0
    t0 = time.monotonic()
    end = t0 + min(limit_seconds, MAX_LIFETIME)
    while (started < count or pending) and time.monotonic() < end:
        while started < count and len(pending) < inflight:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            rc = sock.connect_ex((host, port))
            started += 1
            if rc not in (0, errno.EINPROGRESS):
                errors += 1
                name = errno.errorcode.get(rc, str(rc))
                error_kinds[name] = error_kinds.get(name, 0) + 1
                sock.close()
                continue
            pending[sock.fileno()] = (sock, time.monotonic())
            ep.register(sock.fileno(), select.EPOLLOUT)
        for fd, _ev in ep.poll(0.1):
            sock, _ = pending.pop(fd)
            ep.unregister(fd)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                errors += 1
                name = errno.errorcode.get(err, str(err))
                error_kinds[name] = error_kinds.get(name, 0) + 1
                sock.close()
            else:
                opened.append(sock)
        now = time.monotonic()
        for fd in [fd for fd, (_, t) in pending.items() if now - t > 10.0]:
            sock, _ = pending.pop(fd)
            ep.unregister(fd)
            sock.close()
            timeouts += 1
    for sock, _ in pending.values():
        sock.close()
    ep.close()
    emit(
        {
            "open": len(opened),
            "wanted": count,
            "errors": errors,
            "timeouts": timeouts,
            "not_started": count - started,
            "error_kinds": error_kinds,
            "seconds": time.monotonic() - t0,
            "nofile": limit,
        }
    )
    # Hold until the parent closes our stdin (or the hold time runs out).
    with contextlib.suppress(OSError):
        select.select([sys.stdin], [], [], min(hold_seconds, MAX_LIFETIME))
    for sock in opened:
        sock.close()
    return 0


# --- main ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    srv = sub.add_parser("server", help="echo server")
    srv.add_argument("--host", default="::")
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--max-seconds", type=float, default=600.0)
    cr = sub.add_parser("connrate", help="connections per second")
    cr.add_argument("--host", required=True)
    cr.add_argument("--port", type=int, required=True)
    cr.add_argument("--seconds", type=float, required=True)
    cr.add_argument("--concurrency", type=int, default=8)
    cr.add_argument("--size", type=int, default=64)
    lat = sub.add_parser("latency", help="request/response latency on one connection")
    lat.add_argument("--host", required=True)
    lat.add_argument("--port", type=int, required=True)
    lat.add_argument("--count", type=int, default=2000)
    lat.add_argument("--size", type=int, default=64)
    lat.add_argument("--timeout", type=float, default=30.0)
    idle = sub.add_parser("idle", help="hold many idle connections open")
    idle.add_argument("--host", required=True)
    idle.add_argument("--port", type=int, required=True)
    idle.add_argument("--count", type=int, required=True)
    idle.add_argument("--inflight", type=int, default=256)
    idle.add_argument("--limit-seconds", type=float, default=60.0)
    idle.add_argument("--hold-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.cmd == "server":
        return run_server(args.host, args.port, args.max_seconds)
    if args.cmd == "connrate":
        return run_connrate(args.host, args.port, args.seconds, args.concurrency, args.size)
    if args.cmd == "latency":
        return run_latency(args.host, args.port, args.count, args.size, args.timeout)
    return run_idle(
        args.host, args.port, args.count, args.inflight, args.limit_seconds, args.hold_seconds
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        sys.exit(main())
    sys.exit(130)
