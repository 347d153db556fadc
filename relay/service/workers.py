"""``tunrelay run``: one packet loop per TUN queue, in N unprivileged worker processes.

Theory of operation: this process (the supervisor) claims the state file
(``relay.service.runstate``), creates the TUN device with IFF_MULTI_QUEUE, sets its
link options and offloads, and *detaches* its own queue: a detached queue
receives nothing but keeps the device alive, so the device and its routes
outlive any one worker. It then starts N workers with multiprocessing's
'spawn' context (a fresh interpreter: nothing of this process's trio run or
open fds leaks into them). Each worker attaches one queue of its own
(``TunDevice.open(name, multi_queue=True)``), opens the flow log and the
``--log-dir`` files, and then drops its privileges for good
(``relay.service.privileges.drop``: the ``--user``, no capabilities,
no_new_privs) before it imports any analyzer; it then runs
the ordinary single-queue relay (``relay.service.run.relay_queue``) with its own
stack, flow table, upstream sockets and analyzers: shared nothing. Once the
workers are started the supervisor keeps only CAP_NET_ADMIN (to undo the
routing) and CAP_KILL (to stop workers of another uid). Only when every worker
has reported ready are the client networks routed into the device; every
change is written to the state file before it is made.

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
dies (PR_SET_PDEATHSIG); the routing then fails closed (``relay.host.netconfig``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import marshal
import multiprocessing
import os
import signal
import sys
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import IO, TYPE_CHECKING

import trio

from relay.analysis.flowlog import FlowLog
from relay.datapath.tun import TunDevice
from relay.service import privileges
from relay.service.privileges import CAP_KILL, CAP_NET_ADMIN, Identity
from relay.service.run import (
    ConfigError,
    RunOptions,
    load_analyzers,
    localize,
    open_flow_log,
    open_log_dir,
    open_queue,
    relay_queue,
    route_into,
    without_offload,
)
from relay.service.runstate import RunState

if TYPE_CHECKING:
    from relay.analysis.zeeklog import ZeekLogs
    from relay.host.netconfig import NetConfig

__all__ = ["READY_TIMEOUT", "STOP_TIMEOUT", "supervise"]

log = logging.getLogger("tunrelay")

READY_TIMEOUT = 30.0  # a worker's start: interpreter, imports, analyzers, its queue
STOP_TIMEOUT = 15.0  # after SIGTERM; above RelayConfig.flow_end_timeout (5 s)
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
        ConfigError: the flow log cannot be opened, or ``--user`` is wrong.
        StateError: a relay runs on this TUN already (relay.service.runstate).
        OSError: the device cannot be created or the routing installed.
    """
    try:
        user = opts.user or privileges.resolve_worker(None)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if opts.flow_log not in (None, "-"):
        try:  # fail here, before anything is set up, rather than in every worker
            os.close(os.open(opts.flow_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        except OSError as exc:
            raise ConfigError(
                f"--flow-log: cannot open {opts.flow_log!r}: {exc.strerror}"
            ) from None
    probe = open_log_dir(opts)  # the same for --log-dir (a ConfigError naming it)
    if probe is not None:
        probe.close()
    from relay.host.netconfig import NetConfig  # here: the workers import this module

    ctx = multiprocessing.get_context("spawn")
    opts = _replace_user(opts, user)
    # Signals are ours from here on: none may kill the supervisor half set up.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
        state = RunState.claim(opts.state_dir, opts.tun)
        net = NetConfig(journal=state.record)
        try:
            with net, open_queue(opts, multi_queue=True, exclusive=True) as anchor:
                anchor.detach()
                if opts.offload and not anchor.vnet_hdr:  # refused: open_queue warned
                    opts = without_offload(opts)
                opts = localize(opts, net)  # the host's addresses: workers have no netlink
                return await _run(ctx, opts, log_level, net, anchor, signals)
        finally:
            if net.undo_failures:
                log.error("could not undo everything: run `tunrelay cleanup --tun %s`", opts.tun)
            else:
                state.remove()


async def _run(
    ctx: multiprocessing.context.SpawnContext,
    opts: RunOptions,
    log_level: str,
    net: NetConfig,
    anchor: TunDevice,
    signals: AsyncIterator[int],
) -> int:
    assert opts.user is not None
    workers: list[_Worker] = []
    status = 0
    try:
        async with trio.open_nursery() as nursery:
            stop = nursery.cancel_scope
            nursery.start_soon(_forward_signals, signals, workers, stop)
            for index in range(opts.workers):
                workers.append(_start(ctx, opts, index, log_level))
            # The workers have exec'd with our credentials; from here on this process
            # needs only to undo the routing and to signal workers of another uid.
            keep = {CAP_NET_ADMIN} | ({CAP_KILL} if opts.user.uid != os.geteuid() else set())
            privileges.reduce_supervisor(frozenset(keep))
            status = await _wait_ready(workers)
            if status == 0:
                route_into(net, anchor, opts, ping_gid=opts.user.gid)
                log.info(
                    "relaying TCP from %s through %s with %d workers%s; workers run as %s "
                    "(uid %d, gid %d)%s", ", ".join(opts.client_nets), anchor.name, len(workers),
                    " and offloads" if opts.offload else " without offloads", opts.user.name,
                    opts.user.uid, opts.user.gid,
                    f", only from {', '.join(opts.iifs)}" if opts.iifs else "",
                )  # fmt: skip
                status = await _first_exit(workers)
            stop.cancel()
    finally:
        with trio.CancelScope(shield=True):
            status = max(status, await _stop(workers))
    return status


def _replace_user(opts: RunOptions, user: Identity) -> RunOptions:
    return dataclasses.replace(opts, user=user)


def _no_resource_tracker() -> None:
    """'spawn' starts multiprocessing's resource tracker first: a process with this
    one's privileges at that moment (root), which every worker could write to.
    Workers create no named resources (semaphores, shared memory), so they get
    /dev/null in its place and there is no such process."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    if tracker._fd is None:  # type: ignore[attr-defined]
        tracker._fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)  # type: ignore[attr-defined]


def _start(
    ctx: multiprocessing.context.SpawnContext, opts: RunOptions, index: int, level: str
) -> _Worker:
    _no_resource_tracker()
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
                w.ready.recv_bytes(maxlength=64)  # bounded: what a worker says is not trusted
            except (EOFError, OSError):
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
    privileges.set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(1)
    # Out of the terminal's process group: Ctrl-C reaches the supervisor only, which
    # stops the workers; so a worker exiting on its own is always a failure.
    os.setpgid(0, 0)
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s",
    )
    tun: TunDevice | None = None
    flow_log: FlowLog | None = None
    logs: ZeekLogs | None = None
    try:
        # What needs privileges, first: the TUN queue, the files named on the command line.
        tun = open_queue(opts, attach=True)
        flow_log = open_flow_log(opts, index)
        logs = open_log_dir(opts, index)
        profile = open(opts.profile, "wb") if opts.profile and index == 0 else None  # noqa: SIM115
        _drop(opts, parent)
        # Only now may analyzer code run (load_analyzers, in _worker).
        if profile is None:
            trio.run(_worker, opts, index, ready, tun, flow_log, logs)
        else:
            with profile:
                _profiled(opts, index, ready, tun, flow_log, logs, profile)
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(_STATUS_CONFIG)
    except OSError as exc:
        log.error("cannot relay: %s", exc)
        sys.exit(1)
    finally:
        if flow_log is not None:
            flow_log.close()
        if logs is not None:
            logs.close()  # writes what the last flows left in its buffers
        if tun is not None:
            tun.close()


def _drop(opts: RunOptions, parent: int) -> None:
    """Become the workers' user with no capabilities (or only ``opts.worker_caps``).

    Raises:
        ConfigError: that user cannot read the Python installation or the relay.
        PrivilegeError: the drop failed.
    """
    user = opts.user
    assert user is not None
    privileges.drop(user, opts.worker_caps)
    privileges.set_dumpable(False)  # another process of this uid may not ptrace us
    # The uid change cleared the parent-death signal.
    privileges.set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(1)
    import relay

    for where in (os.path.dirname(os.__file__), os.path.dirname(relay.__file__)):
        if not os.access(where, os.R_OK | os.X_OK):
            raise ConfigError(
                f"--user: {user.name!r} cannot read {where}: install tunrelay and its Python "
                "where the workers' user can read them"
            )


def _profiled(
    opts: RunOptions,
    index: int,
    ready: Connection,
    tun: TunDevice,
    flow_log: FlowLog | None,
    logs: ZeekLogs | None,
    out: IO[bytes],
) -> None:
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    try:
        trio.run(_worker, opts, index, ready, tun, flow_log, logs)
    finally:
        profile.disable()
        profile.create_stats()
        marshal.dump(profile.stats, out)  # what Profile.dump_stats writes (pstats format)


async def _worker(
    opts: RunOptions,
    index: int,
    ready: Connection,
    tun: TunDevice,
    flow_log: FlowLog | None,
    logs: ZeekLogs | None,
) -> None:
    analyzers = load_analyzers(opts, flow_log, logs)

    def on_ready() -> None:
        log.info("worker %d (pid %d) relaying on a queue of %s", index, os.getpid(), tun.name)
        ready.send_bytes(b"ready")
        ready.close()

    await relay_queue(opts, tun, analyzers, on_ready=on_ready, logs=logs)
