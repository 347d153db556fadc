"""``tunrelay run --workers N``: one packet loop per TUN queue, in N processes.

Theory of operation: this process (the supervisor) creates the TUN device with
IFF_MULTI_QUEUE, sets its link options and offloads, and *detaches* its own
queue: a detached queue receives nothing but keeps the device alive, so the
device and its routes outlive any one worker. It then starts N workers with
multiprocessing's 'spawn' context (a fresh interpreter: nothing of this
process's trio run or open fds leaks into them). Each worker attaches one queue
of its own (``TunDevice.open(name, multi_queue=True)``) and runs the ordinary
single-queue relay (``relay.service.run.relay_queue``) with its own stack, flow
table, upstream sockets and analyzers: shared nothing. Only when every worker
has reported ready are the client networks routed into the device.

The kernel picks the queue of a packet by a symmetric flow hash, and then
remembers the queue each flow's packets are *written* from, so both directions
of a flow stay with the worker that answered its SYN. Logs are shared: the flow
log is written with one O_APPEND ``write(2)`` per line, and every log line
names its worker.

SIGINT and SIGTERM here are forwarded to the workers (SIGUSR1 too: the
``StateDump`` diagnostics); the supervisor waits for them to exit (SIGKILL
after ``STOP_TIMEOUT``), closes its queue (the device goes) and undoes the
routing. A worker that dies on its own is logged and the whole service stops
with status 1: its flows are gone either way, and a service manager restarting
the service starts from a clean slate. Workers get SIGTERM if the supervisor
dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import trio

from relay.service.run import (
    ConfigError,
    RunOptions,
    load_analyzers,
    localize,
    open_queue,
    relay_queue,
    route_into,
)

__all__ = ["READY_TIMEOUT", "STOP_TIMEOUT", "supervise"]

log = logging.getLogger("tunrelay")

READY_TIMEOUT = 30.0  # a worker's start: interpreter, imports, analyzers, its queue
STOP_TIMEOUT = 15.0  # after SIGTERM; above RelayConfig.flow_end_timeout (5 s)
_PR_SET_PDEATHSIG = 1
_STATUS_CONFIG = 2  # a worker's exit status for a ConfigError (as the CLI's)


class _Worker:
    def __init__(self, index: int, process: BaseProcess, ready: Connection) -> None:
        self.index = index
        self.process = process
        self.ready = ready  # read end; the worker writes once it relays

    def __repr__(self) -> str:
        return f"worker {self.index} (pid {self.process.pid})"


async def supervise(opts: RunOptions, log_level: str = "info") -> int:
    """Set up the device and routing, run ``opts.workers`` workers, tear down.

    Returns:
        The exit status: 0 after SIGINT/SIGTERM with every worker stopping
        cleanly; 1 (2 for a bad setting) when a worker failed or died.

    Raises:
        ConfigError: the flow log cannot be opened.
        OSError: the device cannot be created or the routing installed.
    """
    if opts.flow_log not in (None, "-"):
        try:  # fail here, before anything is set up, rather than in every worker
            os.close(os.open(opts.flow_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        except OSError as exc:
            raise ConfigError(
                f"--flow-log: cannot open {opts.flow_log!r}: {exc.strerror}"
            ) from None
    from relay.host.netconfig import NetConfig  # here: the workers import this module

    ctx = multiprocessing.get_context("spawn")
    # Signals are ours from here on: none may kill the supervisor half set up.
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals,
        NetConfig() as net,
        open_queue(opts, multi_queue=True) as anchor,
    ):
        anchor.detach()
        opts = localize(opts, net)  # the host's addresses, read here: workers have no netlink
        workers: list[_Worker] = []
        status = 0
        try:
            async with trio.open_nursery() as nursery:
                stop = nursery.cancel_scope
                nursery.start_soon(_forward_signals, signals, workers, stop)
                for index in range(opts.workers):
                    workers.append(_start(ctx, opts, index, log_level))
                status = await _wait_ready(workers)
                if status == 0:
                    route_into(net, anchor, opts)
                    log.info(
                        "relaying TCP from %s through %s with %d workers%s",
                        ", ".join(opts.client_nets), anchor.name, len(workers),
                        " and offloads" if opts.offload else "",
                    )  # fmt: skip
                    status = await _first_exit(workers)
                stop.cancel()
        finally:
            with trio.CancelScope(shield=True):
                status = max(status, await _stop(workers))
    return status


def _start(
    ctx: multiprocessing.context.SpawnContext, opts: RunOptions, index: int, level: str
) -> _Worker:
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_worker_main,
        args=(opts, index, writer, level, os.getpid()),
        name=f"tunrelay-worker-{index}",
    )
    process.start()
    writer.close()  # the worker holds the other copy: EOF here if it dies before "ready"
    log.debug("started worker %d (pid %d)", index, process.pid)
    return _Worker(index, process, reader)


async def _wait_ready(workers: list[_Worker]) -> int:
    """0 once every worker relays; else the exit status for the first that did not."""
    with trio.move_on_after(READY_TIMEOUT):
        for w in workers:
            await trio.lowlevel.wait_readable(w.ready.fileno())
            try:
                w.ready.recv_bytes()
            except EOFError:
                await trio.lowlevel.wait_readable(w.process.sentinel)
                w.process.join()
                code = w.process.exitcode
                log.error("%s failed to start (exit status %s)", w, code)
                return _STATUS_CONFIG if code == _STATUS_CONFIG else 1
            finally:
                w.ready.close()
        return 0
    log.error("workers not ready after %.0f s", READY_TIMEOUT)
    return 1


async def _first_exit(workers: list[_Worker]) -> int:
    """Wait until any worker exits (it should not on its own): log it, return 1."""
    exited: list[_Worker] = []
    async with trio.open_nursery() as nursery:

        async def watch(w: _Worker) -> None:
            await trio.lowlevel.wait_readable(w.process.sentinel)
            exited.append(w)
            nursery.cancel_scope.cancel()

        for w in workers:
            nursery.start_soon(watch, w)
    w = exited[0]
    w.process.join()
    log.error("%s exited with status %s; stopping the service", w, w.process.exitcode)
    return 1


async def _forward_signals(
    signals: AsyncIterator[int], workers: list[_Worker], stop: trio.CancelScope
) -> None:
    async for signum in signals:
        if signum == signal.SIGUSR1:  # diagnostics: every worker dumps its state
            for w in workers:
                _signal(w, signal.SIGUSR1)
            continue
        log.info("received %s: stopping %d workers", signal.Signals(signum).name, len(workers))
        stop.cancel()
        return


async def _stop(workers: list[_Worker]) -> int:
    """SIGTERM every worker, wait (SIGKILL after STOP_TIMEOUT); 1 if any did not stop cleanly
    (exit 0, or killed by that SIGTERM before it could handle it: still starting)."""
    for w in workers:
        _signal(w, signal.SIGTERM)
    status = 0
    with trio.move_on_after(STOP_TIMEOUT):
        for w in workers:
            await trio.lowlevel.wait_readable(w.process.sentinel)
    for w in workers:
        # Readable sentinel: its fds are closed, but it may not be reapable for a moment yet.
        w.process.join(0.5)
        if w.process.exitcode is None:
            log.error("%s still running %.0f s after SIGTERM: killing it", w, STOP_TIMEOUT)
            w.process.kill()
            w.process.join()
        w.ready.close()
        code = w.process.exitcode
        if code not in (0, -signal.SIGTERM):
            log.warning("%s exited with status %s", w, code)
            status = 1
        w.process.close()
    return status


def _signal(w: _Worker, signum: int) -> None:
    # Only while unreaped: until then its pid cannot belong to another process.
    pid = w.process.pid
    if pid is not None and w.process.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


# --- in the worker process -------------------------------------------------------------


def _worker_main(opts: RunOptions, index: int, ready: Connection, level: str, parent: int) -> None:
    # SIGTERM when the supervisor dies, even by SIGKILL; it may have died already.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        sys.exit(1)
    # Out of the terminal's process group: Ctrl-C reaches the supervisor only, which
    # stops the workers; so a worker exiting on its own is always a failure.
    os.setpgid(0, 0)
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s",
    )
    try:
        trio.run(_worker, opts, index, ready)
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(_STATUS_CONFIG)
    except OSError as exc:
        log.error("cannot relay: %s", exc)
        sys.exit(1)


async def _worker(opts: RunOptions, index: int, ready: Connection) -> None:
    analyzers, flow_log = load_analyzers(opts, index)
    try:
        with open_queue(opts, attach=True) as tun:

            def on_ready() -> None:
                log.info(
                    "worker %d (pid %d) relaying on a queue of %s", index, os.getpid(), tun.name
                )
                ready.send_bytes(b"ready")
                ready.close()

            await relay_queue(opts, tun, analyzers, on_ready=on_ready)
    finally:
        if flow_log is not None:
            flow_log.close()
