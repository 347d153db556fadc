"""The fast paths change nothing but speed: header prediction on input
(``TcpConnection._predicted``) and the early return of ``segments_to_send``
when nothing is due (``_quiet``).

Each side of the lossy-link property runs (``test_tcp_property``) is a twin:
the real connection and one whose fast path is switched off get every call,
and after each call their answers and their whole state -- every slot,
recursively (buffers, RTT estimator, congestion controller, SACK scoreboard,
reassembly queue, queued events and segments) -- must be equal. The link and
the applications see the real one's answers; the two never diverge, so the
shortcut took exactly the steps the full path would have.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings

from stack.config import TcpConfig
from stack.tcp.connection import TcpConnection
from stack.tcp.timers import Timers

import test_tcp_property
from test_tcp_property import (
    MAX_EXAMPLES,
    PropertyRun,
    _run,
    app_scripts,
    configs,
    full_configs,
    property_runs,
)

_SKIP = {
    "config",  # shared
    "_readable",  # back-references to the connection
    # Scratch and memo, never read before they are written again: the options of
    # the segments being built (set by segments_to_send before anything uses
    # them) and the TSval clock's memo of its last ``now``.
    "_tx_opts",
    "_last_now",
    "_last_val",
}


class _FullPathOnly(TcpConnection):
    """A connection that never takes the fast paths (input or output)."""

    __slots__ = ()

    def _quiet(self, now: float) -> bool:
        return False

    def _predicted(self, *args: Any) -> bool:
        return False


class _Counted(TcpConnection):
    __slots__ = ("predicted", "quiet")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.predicted = self.quiet = 0

    def _quiet(self, now: float) -> bool:
        taken = super()._quiet(now)
        self.quiet += taken
        return taken

    def _predicted(self, *args: Any) -> bool:
        taken = super()._predicted(*args)
        self.predicted += taken
        return taken


def snapshot(obj: object) -> object:
    """Everything an object holds, as comparable values (slots and dicts, recursively)."""
    if obj is None or isinstance(obj, int | float | str | bytes | enum.Enum):
        return obj
    if isinstance(obj, bytearray | memoryview):
        return bytes(obj)
    if isinstance(obj, tuple | list | deque):
        return [type(obj).__name__, *map(snapshot, obj)]
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    names: dict[str, None] = {}  # ordered, once each
    for klass in type(obj).__mro__:
        # __slots__ in Python; compiled with mypyc, a native class lists its attributes,
        # its bases' too, in __mypyc_attrs__ instead
        slots = klass.__dict__.get("__slots__", klass.__dict__.get("__mypyc_attrs__", ()))
        names.update(dict.fromkeys([slots] if isinstance(slots, str) else slots))
    state = {n: snapshot(getattr(obj, n, "<unset>")) for n in names if n not in _SKIP}
    if hasattr(obj, "__dict__"):
        state.update({k: snapshot(v) for k, v in vars(obj).items() if k not in _SKIP})
    return (type(obj).__name__, state)


class Twin:
    """Drives a fast-path connection and a full-path one in lockstep."""

    def __init__(self, **kwargs: Any) -> None:
        self.fast = _Counted(**kwargs)
        self.full = _FullPathOnly(**kwargs)
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        fast, full = getattr(self.fast, name), getattr(self.full, name)
        if not callable(fast):
            assert snapshot(fast) == snapshot(full), name
            return fast

        def call(*args: Any, **kwargs: Any) -> Any:
            a, b = fast(*args, **kwargs), full(*args, **kwargs)
            self.calls += 1
            assert snapshot(a) == snapshot(b), f"{name}{args}: {a!r} != {b!r}"
            state_fast, state_full = snapshot(self.fast)[1], snapshot(self.full)[1]  # type: ignore[index]
            state_fast.pop("predicted")
            state_fast.pop("quiet")
            diff = {k for k in state_full if state_fast[k] != state_full[k]}
            assert not diff, f"after {name}{args}: {sorted(diff)} differ"
            return a

        return call


@settings(
    max_examples=max(MAX_EXAMPLES // 25, 1),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(run=property_runs(configs, app_scripts()))
def test_the_fast_path_leaves_the_same_state_as_the_full_path(run: PropertyRun) -> None:
    _run(run, factory=Twin)


@settings(
    max_examples=max(MAX_EXAMPLES // 50, 1),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(run=property_runs(full_configs, app_scripts(big=True)))
def test_the_fast_path_with_sack_timestamps_and_window_scaling(run: PropertyRun) -> None:
    _run(run, factory=Twin)


@pytest.fixture
def no_notes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_tcp_property, "note", lambda _text: None)  # outside @given


@pytest.mark.usefixtures("no_notes")
def test_the_fast_path_takes_most_segments_of_a_plain_exchange() -> None:
    # Not vacuous: both directions at once, no loss, closed well after the data.
    cfg = TcpConfig()
    a, b = ((200_000, [(0.0, 100_000), (0.5, 100_000)], 2.0, 0.0) for _ in "ab")  # App pops
    factory = cast(Callable[..., TcpConnection], Twin)
    run = PropertyRun(seed=7, loss=0.0, dup=0.0, reorder=0.0, cfg_a=cfg, cfg_b=cfg,
                      isn_a=1, isn_b=2, script_a=a, script_b=b)  # fmt: skip
    pair = _run(run, factory)
    twins = cast(list[Twin], [pair.a, pair.b])
    for twin in twins:
        assert twin.fast.predicted >= 200_000 // cfg.mss, twin.fast.predicted
    assert sum(twin.fast.quiet for twin in twins) > 0


def _divergence(broken: type[_Counted]) -> str:
    """Run a plain 20 kB exchange with ``broken`` as the fast twin; the twins'
    comparison must fail, and this returns its message."""

    class BrokenTwin(Twin):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.fast = broken(**kwargs)

    cfg = TcpConfig()
    a, b = ((20000, [(0.0, 20000)], 1.0, 0.0) for _ in "ab")
    run = PropertyRun(seed=1, loss=0.0, dup=0.0, reorder=0.0, cfg_a=cfg, cfg_b=cfg,
                      isn_a=1, isn_b=2, script_a=a, script_b=b)  # fmt: skip
    try:
        _run(run, cast(Callable[..., TcpConnection], BrokenTwin))
    except AssertionError as exc:
        return str(exc)
    raise AssertionError("the twins did not diverge")


@pytest.mark.usefixtures("no_notes")
def test_a_fast_path_that_skipped_a_step_is_caught() -> None:
    # The check itself: a shortcut that forgets one update (here, the window)
    # must make the twins diverge.
    class Broken(_Counted):
        __slots__ = ()

        def _update_window(self, seq: int, ack: int, window: int) -> None:
            if self.predicted:
                return  # once the fast path has been taken, forget window updates
            super()._update_window(seq, ack, window)

    message = _divergence(Broken)
    assert "snd_wl1" in message or "snd_wnd" in message, message


def test_the_snapshot_compares_every_timer() -> None:
    # The deadlines live in their own object (stack/tcp/timers.py): the twins'
    # comparison must reach into it, field by field.
    c = TcpConnection(local_port=80, remote_port=49152)
    timers = snapshot(c)[1]["timers"]  # type: ignore[index]
    assert timers == (
        "Timers",
        {name: None for name in getattr(Timers, "__slots__", None) or Timers.__mypyc_attrs__},
    )
    c.timers.set_ack(1.0)
    assert snapshot(c) != snapshot(TcpConnection(local_port=80, remote_port=49152))


@pytest.mark.usefixtures("no_notes")
def test_a_fast_path_that_skipped_a_timer_is_caught() -> None:
    # A shortcut that forgets to arm a timer (here, the delayed ACK) must make
    # the twins diverge on the Timers fields.
    class Broken(_Counted):
        __slots__ = ()

        def _delivered(self, now: float) -> None:
            ack = self.timers.ack
            super()._delivered(now)
            if self.predicted and ack is None and self.timers.ack is not None:
                self.timers.clear_ack()

    message = _divergence(Broken)
    assert "timers" in message, message
