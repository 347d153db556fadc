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
import socket
import sys
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import IO, TYPE_CHECKING

import trio

from relay.datapath.tun import TunDevice
from relay.service import privileges, sdnotify
from relay.service.logsetup import configure as configure_logging
from relay.service.logsetup import set_level
from relay.service.privileges import CAP_KILL, CAP_NET_ADMIN, Identity
from relay.service.run import (
    ConfigError,
    RunOptions,
    check_log_dir,
    load_analyzers,
    localize,
    open_capture_dir,
    open_flow_log,
    open_log_dir,
    open_queue,
    prepare_capture_dir,
    relay_queue,
    route_into,
    without_offload,
)
from relay.service.runstate import RunState
from relay.service.stackbuild import stack_build
from relay.service.worklink import Reload, WorkerLink, WorkerView, socket_pair

if TYPE_CHECKING:
    from relay.analysis.capture import Capture
    from relay.analysis.flowlog import FlowLog
    from relay.analysis.zeeklog import ZeekLogs
    from relay.host.netconfig import NetConfig

__all__ = ["READY_TIMEOUT", "STOP_TIMEOUT", "supervise"]

log = logging.getLogger("tunrelay")

READY_TIMEOUT = 30.0  # a worker's start: interpreter, imports, analyzers, its queue
STOP_TIMEOUT = 15.0  # after SIGTERM; above RelayConfig.flow_end_timeout (5 s)
_STATUS_CONFIG = 2  # a worker's exit status for a ConfigError (as the CLI's)


COMMAND_TIMEOUT = 10.0  # for every worker to answer a reload or a reopen


class _Worker:
    def __init__(
        self, index: int, process: BaseProcess, ready: Connection, view: WorkerView
    ) -> None:
        self.index = index
        self.process = process
        self.ready = ready  # read end; the worker writes once it relays
        self.view = view  # its control link: snapshots, commands (relay.service.worklink)

    def __repr__(self) -> str:
        return f"worker {self.index} (pid {self.process.pid})"


async def supervise(
    opts: RunOptions,
    log_level: str = "info",
    reread: Callable[[], RunOptions] | None = None,
) -> int:
    """Set up the device and routing, run ``opts.workers`` workers, tear down.

    ``reread`` reads the config file again (SIGHUP: ``relay.service.reload``).

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
    check_log_dir(opts)  # the same for --log-dir (a ConfigError naming it)
    notifier = sdnotify.from_environment()  # and out of the workers' environment
    listener = None
    if opts.metrics is not None:
        from relay.service.metrics import open_listener

        try:  # now, while any port may be bound
            listener = open_listener(opts.metrics)
        except OSError as exc:
            host, port = opts.metrics
            why = f"--metrics: cannot listen on {host} port {port}: {exc.strerror}"
            raise ConfigError(why) from None
    prepare_capture_dir(opts, user)  # --capture-dir, the workers' user's (ConfigError)
    from relay.host.netconfig import NetConfig  # here: the workers import this module

    ctx = multiprocessing.get_context("spawn")
    opts = _replace_user(opts, user)
    # Signals are ours from here on: none may kill the supervisor half set up.
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
    service = _Service(notifier, listener, reread, log_level)
    try:
        with trio.open_signal_receiver(*handled) as signals:
            state = RunState.claim(opts.state_dir, opts.tun)
            net = NetConfig(journal=state.record)
            try:
                with net, open_queue(opts, multi_queue=True, exclusive=True) as anchor:
                    anchor.detach()
                    if opts.offload and not anchor.vnet_hdr:  # refused: open_queue warned
                        opts = without_offload(opts)
                    opts = localize(opts, net)  # the host's addresses: workers have no netlink
                    return await _run(ctx, opts, service, net, anchor, signals)
            finally:
                if net.undo_failures:
                    log.error(
                        "could not undo everything: run `tunrelay cleanup --tun %s`", opts.tun
                    )
                else:
                    state.remove()
    finally:
        if listener is not None:
            listener.close()
        if notifier is not None:
            notifier.close()


class _Service:
    """The supervisor's roles beside the workers: systemd notification, metrics,
    reload."""

    def __init__(
        self,
        notifier: sdnotify.Notifier | None,
        listener: socket.socket | None,
        reread: Callable[[], RunOptions] | None,
        log_level: str,
    ) -> None:
        self.notifier = notifier
        self.listener = listener
        self.reread = reread
        self.log_level = log_level

    def notify(self, **fields: str | int) -> None:
        if self.notifier is not None:
            self.notifier.notify(**fields)


async def _run(
    ctx: multiprocessing.context.SpawnContext,
    opts: RunOptions,
    service: _Service,
    net: NetConfig,
    anchor: TunDevice,
    signals: AsyncIterator[int],
) -> int:
    assert opts.user is not None
    workers: list[_Worker] = []
    status = 0
    service.notify(STATUS="starting workers")
    try:
        async with trio.open_nursery() as nursery:
            stop = nursery.cancel_scope
            running = _Running(opts, workers, net)
            nursery.start_soon(_forward_signals, signals, running, service, nursery)
            for index in range(opts.workers):
                workers.append(_start(ctx, opts, index, service.log_level))
                nursery.start_soon(workers[-1].view.run)
            if service.listener is not None:
                _serve_metrics(nursery, service.listener, workers)
            # The workers have exec'd with our credentials; from here on this process
            # needs only to undo the routing and to signal workers of another uid.
            keep = {CAP_NET_ADMIN} | ({CAP_KILL} if opts.user.uid != os.geteuid() else set())
            privileges.reduce_supervisor(frozenset(keep))
            status = await _wait_ready(workers)
            if status == 0:
                route_into(net, anchor, opts, ping_gid=opts.user.gid)
                log.info(
                    "relaying TCP from %s through %s with %d workers%s; workers run as %s "
                    "(uid %d, gid %d)%s; stack: %s", ", ".join(opts.client_nets), anchor.name,
                    len(workers), " and offloads" if opts.offload else " without offloads",
                    opts.user.name, opts.user.uid, opts.user.gid,
                    f", only from {', '.join(opts.iifs)}" if opts.iifs else "",
                    stack_build().describe(),
                )  # fmt: skip
                turning = await _turning(workers)
                if turning is True:
                    service.notify(
                        READY=1, STATUS=f"relaying on {anchor.name} with {len(workers)} workers"
                    )
                    if service.notifier is not None and service.notifier.watchdog:
                        nursery.start_soon(_watchdog, service.notifier, workers)
                # A worker that went meanwhile is _first_exit's to report.
                status = await _first_exit(workers) if turning is not None else 1
            stop.cancel()
    finally:
        service.notify(STOPPING=1, STATUS="stopping")
        with trio.CancelScope(shield=True):
            status = max(status, await _stop(workers))
    return status


class _Running:
    """The settings the workers run with (a reload changes the live ones)."""

    def __init__(self, opts: RunOptions, workers: list[_Worker], net: NetConfig) -> None:
        self.opts = opts
        self.workers = workers
        self.net = net
        self.commands = trio.Lock()  # one reload or reopen at a time


def _alive(workers: list[_Worker]) -> Callable[[int], bool]:
    def alive(index: int) -> bool:
        return workers[index].process.exitcode is None

    return alive


def _health(workers: list[_Worker]) -> str | None:
    from relay.service.metrics import health

    return health([w.view for w in workers], _alive(workers), trio.current_time())


async def _turning(workers: list[_Worker]) -> bool | None:
    """Wait (bounded) for a snapshot from every worker sent after this call: each
    packet loop turns, with the routing in place. False when a worker's link
    closed first (it is exiting), None (logged) when they took too long."""
    seen = [w.view.snapshots for w in workers]
    with trio.move_on_after(READY_TIMEOUT):
        while any(w.view.snapshots <= n for w, n in zip(workers, seen, strict=True)):
            if any(w.view.closed for w in workers):
                return False
            await trio.sleep(0.05)
        return True
    log.error("workers did not report their packet loops turning: %s", _health(workers))
    return None


async def _watchdog(notifier: sdnotify.Notifier, workers: list[_Worker]) -> None:
    """WATCHDOG=1 every half $WATCHDOG_USEC, only while every worker's loop turns."""
    assert notifier.watchdog is not None
    last_problem = None
    while True:
        problem = _health(workers)
        if problem is None:
            notifier.notify(WATCHDOG=1)
        elif problem != last_problem:
            log.warning("watchdog: not pinging systemd: %s", problem)
        last_problem = problem
        await trio.sleep(notifier.watchdog / 2)


def _serve_metrics(nursery: trio.Nursery, listener: socket.socket, workers: list[_Worker]) -> None:
    from relay.service.metrics import RelayCollector, registry_for, serve

    collector = RelayCollector(lambda: [w.view for w in workers], trio.current_time)
    nursery.start_soon(serve, listener, registry_for(collector), lambda: _health(workers))
    host, port = listener.getsockname()[:2]
    log.info(
        "metrics at http://%s/metrics", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    )


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
    ours, theirs = socket_pair()
    process = ctx.Process(
        target=_worker_main,
        args=(opts, index, writer, level, os.getpid(), theirs),
        name=f"tunrelay-worker-{index}",
    )
    process.start()
    writer.close()  # the worker holds the other copy: EOF here if it dies before "ready"
    theirs.close()
    log.debug("started worker %d (pid %d)", index, process.pid)
    return _Worker(index, process, reader, WorkerView(index, ours))


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
    signals: AsyncIterator[int], running: _Running, service: _Service, nursery: trio.Nursery
) -> None:
    workers = running.workers
    async for signum in signals:
        if signum == signal.SIGUSR1:  # diagnostics: every worker dumps its state
            for w in workers:
                _signal(w, signal.SIGUSR1)
            continue
        if signum in (signal.SIGHUP, signal.SIGUSR2):
            # In a task of its own: a SIGTERM meanwhile is not kept waiting for the answers.
            nursery.start_soon(_reload_and_reopen, running, service, signum == signal.SIGHUP)
            continue
        log.info("received %s: stopping %d workers", signal.Signals(signum).name, len(workers))
        nursery.cancel_scope.cancel()
        return


async def _reload_and_reopen(running: _Running, service: _Service, reload: bool) -> None:
    async with running.commands:
        if reload:
            await _reload(running, service)
        else:
            log.info("received SIGUSR2: reopening the log files")
        await _command(running.workers, "reopen")


async def _reload(running: _Running, service: _Service) -> None:
    """SIGHUP: re-read the config file and apply what can change live."""
    from relay.datapath.egress import host_routes
    from relay.service.reload import plan

    if service.reread is None:
        log.warning("received SIGHUP: no --config file to re-read; reopening the log files")
        return
    log.info("received SIGHUP: reloading the config file")
    try:
        new = service.reread()
        egress = new.relay.egress.with_host(host_routes(running.net.ipr))
        new = dataclasses.replace(new, relay=dataclasses.replace(new.relay, egress=egress))
    except Exception as exc:  # whatever the file holds, the running relay goes on
        log.error("reload failed: %s; keeping the running settings", exc)
        return
    p = plan(running.opts, new)
    for what in p.refused:
        log.warning("reload: %s needs a restart; keeping the running value", what)
    for what in p.live:
        log.info("reload: %s", what)
    if p.command is None:
        if not p.refused:
            log.info("reload: no change")
        return
    errors = await _command(running.workers, "reload", p.command)
    if errors:
        log.error("reload: %d workers refused the new settings; see their log lines", errors)
        return
    running.opts = p.running
    set_level(p.running.log_level)  # the workers have theirs; now the supervisor's
    service.notify(STATUS=f"reloaded: {'; '.join(p.live)}"[:200])


async def _command(workers: list[_Worker], *command: object) -> int:
    """Send ``command`` to every worker and wait (bounded) for their answers; the
    number that failed or did not answer."""
    sent = []
    for w in workers:
        if w.view.closed:
            continue
        while True:  # answers to an earlier command that timed out
            try:
                w.view.answers.receive_nowait()
            except trio.WouldBlock:
                break
        try:
            await w.view.command(*command)
            sent.append(w)
        except OSError as exc:
            log.error("%s: cannot send %s: %s", w, command[0], exc)
    failed = len(workers) - len(sent)
    with trio.move_on_after(COMMAND_TIMEOUT) as scope:
        for w in sent:
            answer = await w.view.answers.receive()
            if answer.get("error") is not None:
                failed += 1
    if scope.cancelled_caught:
        log.error("workers did not answer %s within %.0f s", command[0], COMMAND_TIMEOUT)
        failed = len(workers)
    return failed


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
        w.view.close()
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


def _worker_main(
    opts: RunOptions, index: int, ready: Connection, level: str, parent: int, link: socket.socket
) -> None:
    # SIGTERM when the supervisor dies, even by SIGKILL; it may have died already.
    privileges.set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(1)
    # Out of the terminal's process group: Ctrl-C reaches the supervisor only, which
    # stops the workers; so a worker exiting on its own is always a failure.
    os.setpgid(0, 0)
    configure_logging(level, opts.log_format, worker=index)
    tun: TunDevice | None = None
    flow_log: FlowLog | None = None
    logs: ZeekLogs | None = None
    capture: Capture | None = None
    try:
        # What needs privileges, first: the TUN queue, the files named on the command line.
        tun = open_queue(opts, attach=True)
        flow_log = open_flow_log(opts, index)
        logs = open_log_dir(opts, index)
        capture = open_capture_dir(opts)
        profile = open(opts.profile, "wb") if opts.profile and index == 0 else None  # noqa: SIM115
        _drop(opts, parent)
        # Only now may analyzer code run (load_analyzers, in _worker).
        if profile is None:
            trio.run(_worker, opts, index, ready, tun, flow_log, logs, capture, link)
        else:
            with profile:
                _profiled(opts, index, ready, tun, flow_log, logs, capture, link, profile)
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
        if capture is not None:
            capture.close()  # writes what is still queued
            log.info("capture: %s", capture.stats)
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
    capture: Capture | None,
    link: socket.socket,
    out: IO[bytes],
) -> None:
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    try:
        trio.run(_worker, opts, index, ready, tun, flow_log, logs, capture, link)
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
    capture: Capture | None,
    link_socket: socket.socket,
) -> None:
    from relay.analysis.flowcounts import FlowCounts

    counts = FlowCounts()  # for the metrics (relay.service.worklink snapshots)
    analyzers = [*load_analyzers(opts, flow_log, logs, capture), counts]

    def rebuild(reload: Reload) -> list[object]:
        new = dataclasses.replace(opts, analyzers=reload.analyzers, block_rules=reload.block_rules)
        return [*load_analyzers(new, flow_log, logs, capture), counts]

    reopen = [f.reopen for f in (flow_log, logs) if f is not None]
    link = WorkerLink(
        link_socket, index, counts, rebuild, reopen, opts.stats_interval, opts.relay.fail_closed
    )

    def on_ready() -> None:
        log.info("worker %d (pid %d) relaying on a queue of %s", index, os.getpid(), tun.name)
        ready.send_bytes(b"ready")
        ready.close()

    await relay_queue(
        opts, tun, analyzers, on_ready=on_ready, logs=logs, on_running=link.start,
        stats_interval=lambda: link.stats_interval,
    )  # fmt: skip
