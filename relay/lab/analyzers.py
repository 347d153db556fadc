"""Analyzers that misbehave on purpose, for the relay's isolation tests (and one
that does nothing, for the benchmarks).

* ``Failing`` raises ``InjectedFailure`` from ``data``: the relay must log it,
  detach the analyzer from that flow and carry on (or reset the flow when
  fail-closed).
* ``Slow`` sleeps in ``data`` on flows to one port: only those flows may be
  slowed down (their window closes), never the others.
* ``PassThrough`` returns every chunk unchanged from ``data``: the inline path
  (``benchmarks/bench_netns.py`` configuration i) with nothing to judge.
* ``StreamReader`` is a stream analyzer (``relay.analysis.streams``) that reads
  both directions of every TCP flow to the end and counts the bytes: what a
  passive stream analyzer costs a flow (``benchmarks/bench_netns.py``, s).
* ``StateDump`` has no hooks: on SIGUSR1 it writes the TCP state of every
  connection in the stack to a file (``TUNRELAY_STATE_DUMP``), for tests that
  need to show why a flow stalled.

The CLI instantiates analyzer classes without arguments, so both read their
settings from the environment when not given to the constructor:

``TUNRELAY_FAILING_PORT``  ``Failing`` raises only on flows to this server port
                           (default: on every flow).
``TUNRELAY_SLOW_PORT``     ``Slow`` sleeps only on flows to this server port
                           (default: on every flow).
``TUNRELAY_SLOW_SECONDS``  how long ``Slow`` sleeps in each ``data`` call
                           (default 2).
"""

from __future__ import annotations

import collections
import enum
import gc
import os
import signal
from typing import Any

import trio

from relay.analysis.hooks import Direction, FlowInfo

__all__ = ["Failing", "InjectedFailure", "PassThrough", "Slow", "StateDump"]

FAILING_PORT_ENV = "TUNRELAY_FAILING_PORT"
SLOW_PORT_ENV = "TUNRELAY_SLOW_PORT"
SLOW_SECONDS_ENV = "TUNRELAY_SLOW_SECONDS"


class InjectedFailure(RuntimeError):
    """Raised by ``Failing``; a test recognises its tracebacks by this name."""


def _env_port(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value else None


class Failing:
    """Raises ``InjectedFailure`` in ``data`` (on flows to ``port``, or all).

    Args:
        port: server port whose flows fail; default ``$TUNRELAY_FAILING_PORT``,
            or every flow when that is unset.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port if port is not None else _env_port(FAILING_PORT_ENV)
        self.calls = 0

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        if self.port is None or flow.server_port == self.port:
            self.calls += 1
            raise InjectedFailure(
                f"injected analyzer failure on {flow.uid} {direction.value} ({len(data)} bytes)"
            )


class Slow:
    """Sleeps ``seconds`` in every ``data`` call (on flows to ``port``, or all).

    Args:
        port: server port whose flows are slowed; default ``$TUNRELAY_SLOW_PORT``,
            or every flow when that is unset.
        seconds: sleep per call; default ``$TUNRELAY_SLOW_SECONDS`` or 2.
    """

    def __init__(self, port: int | None = None, seconds: float | None = None) -> None:
        self.port = port if port is not None else _env_port(SLOW_PORT_ENV)
        if seconds is None:
            seconds = float(os.environ.get(SLOW_SECONDS_ENV, "") or 2.0)
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        self.seconds = seconds
        self.calls = 0

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        if self.port is None or flow.server_port == self.port:
            self.calls += 1
            await trio.sleep(self.seconds)


class PassThrough:
    """Returns each chunk as it came: the very object, so ``FlowHooks.data`` reports it
    unchanged and the flow keeps the unchanged-bytes accounting (the client's window
    reopens as the kernel takes the bytes). What it costs is the inline path itself:
    every client chunk through the c2s queue and task instead of the direct write,
    and a hook call per chunk each way. (A copy would add the rewrite path's
    accounting, which holds a chunk's window until all of it is upstream, and a
    memcpy.)"""

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> bytes:
        return data


STATE_DUMP_ENV = "TUNRELAY_STATE_DUMP"
_SCALARS = (int, float, str, bool, type(None), enum.Enum)


def _fields(obj: object) -> dict[str, Any]:
    """An object's plain attributes (numbers, strings, enums; sizes of buffers)."""
    out: dict[str, Any] = {}
    names = list(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        names += [n for n in getattr(cls, "__slots__", ()) if n not in names]
    for name in names:
        try:
            value = getattr(obj, name)
        except AttributeError:
            continue
        if isinstance(value, enum.Enum):
            out[name] = value.name
        elif isinstance(value, _SCALARS):
            out[name] = value
        elif isinstance(value, bytes | bytearray | list | dict | set | collections.deque):
            out[name] = f"<{type(value).__name__} len {len(value)}>"
        elif type(value).__name__ in ("FlowId", "FlowInfo"):
            out[name] = repr(value)
    return out


class StateDump:
    """Diagnostics, no hooks: on SIGUSR1 it appends the state of every TCP connection
    in the relay's stack, and of every relayed flow, to a file.

    For a test that sees a flow stall: send SIGUSR1 to the relay and read the
    file. It finds the ``Stack`` and ``Relay`` objects with ``gc`` (an analyzer
    is not given them), and writes each object's plain attributes, so it keeps
    working as their fields change. Deadlines are also shown relative to now.

    Args:
        path: where to append; default ``$TUNRELAY_STATE_DUMP``.

    Raises:
        ValueError: no path given and ``TUNRELAY_STATE_DUMP`` is unset.
    """

    def __init__(self, path: str | None = None) -> None:
        target = path or os.environ.get(STATE_DUMP_ENV)
        if not target:
            raise ValueError(f"StateDump needs a path: set {STATE_DUMP_ENV}")
        self.path = target
        # Constructed by `tunrelay run` in its main thread, where handlers may be set.
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        try:
            text = self.snapshot()
        except Exception as exc:  # a diagnostic must never take the relay down
            text = f"StateDump failed: {exc!r}\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)

    def snapshot(self) -> str:
        try:
            now: float | None = trio.current_time()
        except RuntimeError:
            now = None
        lines = [f"=== state dump, trio time {now} ==="]
        for obj in gc.get_objects():
            kind = type(obj).__module__ + "." + type(obj).__qualname__
            if kind == "stack.stack.Stack":
                lines += self._stack(obj, now)
            elif kind == "relay.datapath.engine.Relay":
                lines.append(f"relay: {_fields(obj)}")
                lines.append(f"relay stats: {_fields(getattr(obj, 'stats', None))}")
            elif kind == "relay.datapath.tcpflow.TcpFlow":
                lines.append(f"flow {getattr(obj, 'flow', None)}: {_fields(obj)}")
        lines.append("=== end ===\n")
        return "\n".join(lines)

    @staticmethod
    def _stack(stack: Any, now: float | None) -> list[str]:
        lines = [f"stack: {_fields(stack)}", f"stack stats: {_fields(stack.stats)}"]
        filed = getattr(stack, "_filed", {})
        touched = getattr(stack, "_touched", {})
        heap = getattr(stack, "_timers", [])
        for conn in list(getattr(stack, "_by_key", {}).values()):
            fields = _fields(conn)
            for name in ("cc", "_rtt", "_ooo"):
                part = getattr(conn, name, None)
                if part is not None:
                    fields[name] = _fields(part)
            if now is not None:
                for name, value in list(fields.items()):
                    if name.endswith("deadline") and isinstance(value, float):
                        fields[name] = f"{value} (in {value - now:+.3f} s)"
            entries = [d for d, _, c in heap if c is conn]
            lines.append(
                f"conn {conn.flow}: filed={filed.get(conn)} heap={entries} "
                f"touched={conn in touched} {fields}"
            )
        return lines


class StreamReader:
    """A passive stream analyzer that reads everything and only counts it."""

    def __init__(self) -> None:
        self.bytes = 0

    async def stream(
        self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._count, c2s)
            nursery.start_soon(self._count, s2c)

    async def _count(self, side: trio.abc.ReceiveStream) -> None:
        async for chunk in side:
            self.bytes += len(chunk)
