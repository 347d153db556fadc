"""Analyzers as trio streams: one ``ReceiveStream`` per direction of a TCP flow.

A *stream analyzer* is an object with

    async def stream(self, flow: FlowInfo, c2s: trio.abc.ReceiveStream,
                     s2c: trio.abc.ReceiveStream) -> None

called once per TCP flow, in a task of its own, so a protocol parser is
straight-line code (``async for chunk in c2s``, ``await s2c.receive_some()``).
It may also have ``flow_start`` and ``flow_end`` (``relay.analysis.hooks``),
but neither ``data`` nor record hooks (``TypeError`` at load time): its bytes
come from the streams.

Theory of operation: ``StreamAdapter`` wraps such an analyzer in the hook
interface, so ``AnalyzerChain`` runs it like any other, at its place in the
chain (it sees what the analyzers before it forwarded). ``flow_start`` starts
the ``stream`` task in the relay's nursery (``Relay.run`` binds it:
``StreamAdapter.nursery``); ``data`` hands each chunk to that direction's
``FlowStream``; ``data_finished`` (the direction's FIN) ends that stream;
``flow_end`` ends both and waits for the task. The flows stay unaware of all
this, and a chain without stream analyzers has no adapter at all, so its
flows keep their direct paths.

* End of stream: ``receive_some`` returns ``b""`` (``async for`` ends) once the
  buffered bytes are read and that direction's sender finished with a FIN.
  A direction that never got its FIN when the flow ended (a reset from either
  side, an abort, a timeout, an analyzer's verdict, the relay shutting down)
  raises ``trio.BrokenResourceError`` instead, after its buffered bytes: a
  parser can tell a cut stream from a finished one. Letting that exception out
  of ``stream`` is a normal end, not an analyzer error.
* Passive (the default): ``data`` never waits; each direction buffers what the
  analyzer has not read yet. Once more than ``stream_buffer`` bytes (class
  attribute, default 1 MiB) wait besides the latest chunk, the analyzer has
  fallen behind: it is detached from that flow (one warning line with the
  flow; its task is cancelled, it gets no ``flow_end`` for that flow) and the
  flow goes on at full speed, on its direct path again. The latest chunk does
  not count because a reader that keeps up may be one chunk behind, as trio
  orders tasks, and one chunk may be large (the client's bytes queued while
  the upstream socket was full, several MiB with a large window): memory is
  bounded by ``stream_buffer`` and two of the flow's chunks.
* ``inline = True``: ``data`` returns only once the analyzer has read the
  chunk, so the analyzer has seen each byte before it goes on, and a slow
  analyzer closes its own flow's TCP window (as a slow ``data`` hook does).
  It must read the direction that has bytes: an analyzer waiting on ``s2c``
  while the client's request waits on it stalls the flow.
* ``stream`` returning (or ``aclose`` of both streams) means it has seen
  enough: the rest of the flow is not handed over, and the adapter leaves the
  flow at its next bytes.
* An exception out of ``stream`` is logged with the flow and a traceback and
  counted as an analyzer error; the analyzer leaves that flow. When the chain
  is fail-closed (``--fail-closed``) the flow is aborted at its next bytes.
* End of the flow: ``flow_end`` ends both streams, waits up to
  ``stream_end_timeout`` (class attribute, default 1 s) for ``stream`` to
  return, then cancels it; the analyzer's own ``flow_end`` runs after.
* TCP only: UDP and ICMP echo flows are never shown to a stream analyzer
  (nor to its ``flow_start`` and ``flow_end``); they keep their direct path.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import trio

from relay.analysis.hooks import (
    RECORD_HOOKS,
    Detach,
    Direction,
    FlowEnd,
    FlowInfo,
    Verdict,
    _Hook,
    _lookup,
)

__all__ = [
    "DEFAULT_STREAM_BUFFER",
    "DEFAULT_STREAM_END_TIMEOUT",
    "FlowStream",
    "StreamAdapter",
    "StreamAnalyzer",
    "adapt_stream_analyzers",
    "check_stream_analyzer",
    "is_stream_analyzer",
]

log = logging.getLogger(__name__)

DEFAULT_STREAM_BUFFER: Final = 1 << 20  # bytes per direction a passive analyzer may lag
DEFAULT_STREAM_END_TIMEOUT: Final = 1.0  # seconds stream() gets after the flow ended


class StreamAnalyzer(Protocol):
    """The stream analyzer API (``inline``, ``stream_buffer`` and
    ``stream_end_timeout`` are optional class attributes)."""

    async def stream(
        self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
    ) -> None: ...


def is_stream_analyzer(analyzer: object) -> bool:
    return getattr(analyzer, "stream", None) is not None


class FlowStream(trio.abc.ReceiveStream):
    """One direction of one flow, as its stream analyzer reads it.

    The relay side (sync, except ``send``) appends chunks and ends it; the
    analyzer side is the ``ReceiveStream`` API: ``receive_some()`` returns
    everything waiting, ``receive_some(n)`` at most ``n`` bytes of the oldest
    chunk. (Chunk boundaries are the relay's, and mean nothing.)
    """

    def __init__(self, direction: Direction, limit: int) -> None:
        self.direction = direction
        self.limit = limit  # passive: bytes that may wait besides the latest chunk
        self.buffered = 0  # bytes handed over, not read yet
        self.taken = 0  # bytes read by the analyzer so far
        self.closed = False  # by the analyzer (aclose) or its task's end
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # into the first chunk: what max_bytes left of it
        self._latest = 0  # the size of the chunk handed over last
        self._eof = False
        self._broken = False
        self._receiving = False
        self._readers = trio.lowlevel.ParkingLot()
        self._writers = trio.lowlevel.ParkingLot()  # an inline send waiting to be read

    # --- the relay's side -------------------------------------------------------

    def offer(self, data: bytes) -> bool:
        """Buffer ``data``, unless more than ``limit`` bytes wait besides the
        latest chunk (see the module docstring); False: the reader fell behind."""
        if self.buffered - self._latest > self.limit:
            return False
        self._push(data)
        return True

    async def send(self, data: bytes) -> None:
        """Hand ``data`` over and wait until the analyzer read it (or closed the stream)."""
        self._push(data)
        target = self.taken + self.buffered
        while self.taken < target and not self.closed:
            await self._writers.park()

    def _push(self, data: bytes) -> None:
        if self.closed or self._eof or self._broken or not data:
            return
        self._chunks.append(data)
        self.buffered += len(data)
        self._latest = len(data)
        self._readers.unpark_all()

    def finish(self) -> None:
        """The sender's FIN: ``b""`` after the buffered bytes."""
        if not self._broken:
            self._eof = True
            self._readers.unpark_all()

    def cut(self) -> bool:
        """The flow ended without this direction's FIN: ``BrokenResourceError``
        after the buffered bytes. True if it was cut (had no FIN)."""
        if self._eof:
            return False
        self._broken = True
        self._readers.unpark_all()
        return True

    def discard(self) -> None:
        """No more reading: drop what is buffered, release readers and senders."""
        self.closed = True
        self._chunks.clear()
        self.buffered = self._offset = 0
        self._readers.unpark_all()
        self._writers.unpark_all()

    # --- the analyzer's side: trio.abc.ReceiveStream ------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next bytes of this direction, in order; ``b""`` after its FIN.

        Raises:
            trio.BrokenResourceError: the flow ended without this direction's FIN
                (reset, abort, timeout), once the buffered bytes were read.
            trio.ClosedResourceError: the stream was closed (``aclose``).
            trio.BusyResourceError: another task is receiving on it.
        """
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            while not (self._chunks or self._eof or self._broken or self.closed):
                await self._readers.park()
        finally:
            self._receiving = False
        # Taken only after the last await: a cancelled receive loses no bytes.
        if self.closed:
            raise trio.ClosedResourceError("this stream was closed")
        if not self._chunks:
            if self._broken:
                raise trio.BrokenResourceError(
                    f"{self.direction.value}: the flow ended without a FIN in this direction"
                )
            return b""
        if max_bytes is None and len(self._chunks) > 1:
            # Everything waiting, at once: a reader one chunk behind catches up
            # (it reads once per scheduling pass, as the relay hands over at most).
            first = self._chunks.popleft()
            out = b"".join([first[self._offset :], *self._chunks])
            self._chunks.clear()
            self._offset = 0
            return self._took(out)
        chunk, start = self._chunks[0], self._offset
        end = len(chunk) if max_bytes is None else min(len(chunk), start + max_bytes)
        out = chunk if start == 0 and end == len(chunk) else chunk[start:end]
        if end == len(chunk):
            self._chunks.popleft()
            self._offset = 0
        else:
            self._offset = end
        return self._took(out)

    def _took(self, out: bytes) -> bytes:
        self.buffered -= len(out)
        self.taken += len(out)
        self._writers.unpark_all()
        return out

    async def aclose(self) -> None:
        """The analyzer wants no more of this direction: the rest is not handed over."""
        self.discard()
        await trio.lowlevel.checkpoint()


def _only_broken(exc: BaseException) -> bool:
    if isinstance(exc, trio.BrokenResourceError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_broken(e) for e in exc.exceptions)
    return False


class _FlowState:
    """One flow's streams and stream task."""

    __slots__ = ("c2s", "cut", "done", "failed", "s2c", "scope")

    def __init__(self, limit: int) -> None:
        self.c2s = FlowStream(Direction.CLIENT_TO_SERVER, limit)
        self.s2c = FlowStream(Direction.SERVER_TO_CLIENT, limit)
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.failed = False  # stream() raised
        self.cut = False  # a direction ended without its FIN


class StreamFailed(RuntimeError):
    """A fail-closed chain's report that a stream analyzer raised earlier on the flow."""


class StreamAdapter:
    """A stream analyzer in the hook interface (see the module docstring).

    Args:
        analyzer: an object with an async ``stream`` method.
        fail_closed: an exception in ``stream`` fails its flow (at its next bytes).
        on_error: called once per exception in ``stream`` (for counters).

    Attributes:
        nursery: where the stream tasks run; the relay sets it while it runs.

    Raises:
        TypeError: ``stream`` is not an async method, the analyzer also has
            ``data`` or record hooks, or ``stream_buffer`` is not a positive int.
    """

    def __init__(
        self,
        analyzer: object,
        *,
        fail_closed: bool = False,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        check_stream_analyzer(analyzer)
        stream = _lookup(analyzer, "stream")
        assert stream is not None
        self.analyzer = analyzer
        self._stream: _Hook = stream
        self._own_start = _lookup(analyzer, "flow_start")
        self._own_end = _lookup(analyzer, "flow_end")
        self.inline = bool(getattr(analyzer, "inline", False))
        self.buffer: int = getattr(analyzer, "stream_buffer", DEFAULT_STREAM_BUFFER)
        self.end_timeout = float(
            getattr(analyzer, "stream_end_timeout", DEFAULT_STREAM_END_TIMEOUT)
        )
        self.fail_closed = fail_closed
        self.on_error = on_error
        self.nursery: trio.Nursery | None = None
        self._flows: dict[str, _FlowState] = {}  # by FlowInfo.uid

    def __repr__(self) -> str:
        return f"<stream analyzer {self.analyzer!r}>"

    @property
    def active_flows(self) -> int:
        """Flows with a stream task (started, not ended or left)."""
        return len(self._flows)

    async def flow_start(self, flow: FlowInfo) -> Verdict | None:
        if flow.proto != "tcp":
            raise Detach
        nursery = self.nursery
        if nursery is None:
            raise RuntimeError("the stream adapter is not bound to a running relay's nursery")
        verdict = await self._own_start(flow) if self._own_start is not None else None
        state = _FlowState(self.buffer)
        self._flows[flow.uid] = state
        nursery.start_soon(self._run, flow, state, name=f"stream {flow.uid}")
        result: Verdict | None = verdict
        return result

    async def _run(self, flow: FlowInfo, state: _FlowState) -> None:
        try:
            with state.scope:
                await self._stream(flow, state.c2s, state.s2c)
        except Exception as exc:
            if state.cut and _only_broken(exc):
                log.debug("stream analyzer %r: flow %s was cut", self.analyzer, flow.describe())
            else:
                state.failed = True
                action = "failing the flow" if self.fail_closed else "detached for this flow"
                log.exception(
                    "stream analyzer %r raised on flow %s; %s",
                    self.analyzer, flow.describe(), action,
                )  # fmt: skip
                if self.on_error is not None:
                    self.on_error()
        finally:
            state.c2s.discard()
            state.s2c.discard()
            state.done.set()

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        state = self._flows.get(flow.uid)
        if state is None:
            raise Detach
        self._check_failed(flow, state)
        stream = state.c2s if direction is Direction.CLIENT_TO_SERVER else state.s2c
        if stream.closed:
            if state.done.is_set():  # stream() is over: leave the flow to its fast path
                del self._flows[flow.uid]
                raise Detach
            return
        if self.inline:
            await stream.send(data)
            self._check_failed(flow, state)
        elif not stream.offer(data):
            del self._flows[flow.uid]
            state.scope.cancel()
            log.warning(
                "stream analyzer %r fell behind on flow %s: %d bytes %s unread, over its"
                " stream_buffer of %d; detached from this flow",
                self.analyzer, flow.describe(), stream.buffered, direction.value, stream.limit,
            )  # fmt: skip
            raise Detach

    def _check_failed(self, flow: FlowInfo, state: _FlowState) -> None:
        if state.failed:
            self._flows.pop(flow.uid, None)
            if self.fail_closed:
                raise StreamFailed(f"{self.analyzer!r}.stream raised earlier on this flow")
            raise Detach

    def data_finished(self, flow: FlowInfo, direction: Direction) -> None:
        state = self._flows.get(flow.uid)
        if state is not None:
            (state.c2s if direction is Direction.CLIENT_TO_SERVER else state.s2c).finish()

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        state = self._flows.pop(flow.uid, None)
        if state is not None:
            cut_c2s = state.c2s.cut()
            cut_s2c = state.s2c.cut()
            state.cut = cut_c2s or cut_s2c
            with trio.move_on_after(self.end_timeout):
                await state.done.wait()
            if not state.done.is_set():
                state.scope.cancel()
                with trio.move_on_after(self.end_timeout):  # unless it ignores cancellation
                    await state.done.wait()
        if self._own_end is not None:
            await self._own_end(flow, end)


def check_stream_analyzer(analyzer: object) -> None:
    """Raises ``TypeError`` unless ``analyzer`` is a valid stream analyzer."""
    if _lookup(analyzer, "stream") is None:
        raise TypeError(f"{analyzer!r} has no stream method")
    extra = [n for n in ("data", *RECORD_HOOKS) if getattr(analyzer, n, None) is not None]
    if extra:
        raise TypeError(
            f"{analyzer!r} has stream and {', '.join(extra)}: a stream analyzer gets its"
            " bytes from its streams; write the other hooks as another analyzer"
        )
    size: Any = getattr(analyzer, "stream_buffer", DEFAULT_STREAM_BUFFER)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise TypeError(f"{analyzer!r}.stream_buffer must be a positive int (bytes), not {size!r}")


def adapt_stream_analyzers(
    analyzers: Sequence[object],
    *,
    fail_closed: bool = False,
    on_error: Callable[[], None] | None = None,
) -> tuple[list[object], list[StreamAdapter]]:
    """``analyzers`` with each stream analyzer wrapped in a ``StreamAdapter``
    (same order), and the adapters, for the relay to bind to its nursery."""
    out: list[object] = []
    adapters: list[StreamAdapter] = []
    for analyzer in analyzers:
        if is_stream_analyzer(analyzer):
            adapter = StreamAdapter(analyzer, fail_closed=fail_closed, on_error=on_error)
            adapters.append(adapter)
            analyzer = adapter
        out.append(analyzer)
    return out, adapters
