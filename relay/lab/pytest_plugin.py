"""The ``tunrelay`` pytest plugin: a real relay in network namespaces for each test.

Installed with the package (entry point ``pytest11``: ``tunrelay``), so any
project's tests can use it after ``pip install tunrelay``; it needs root and
skips, saying so, without it. Fixtures (the names are prefixed so they meet no
project's own):

``tunrelay_lab``
    A `relay.lab.lab.Lab`, built for the test and always torn down: client,
    gateway and server namespaces (198.18.0.0/15, fd00::/8, no route out) and
    ``tunrelay run`` in the gateway, ready (a probe connection went through it).
    Its options come from ``tunrelay_lab_options`` and the test's
    ``@pytest.mark.tunrelay(...)`` markers (keyword arguments of
    `relay.lab.lab.LabOptions`: ``analyzers``, ``args``, ``rules``, ``env``,
    ``log_dir``, ``impair``, ``wire``, ``relay``, ``probe``, ``workers``,
    ``pythonpath``, ``setup``; lists add to the defaults, ``env`` merges, the
    ``setup`` functions all run, the rest replace). ``lab.addresses``,
    ``lab.client_v4``/``server_v4``/...;
    ``lab.run(role, *cmd)``, ``lab.spawn(role, *cmd)``, ``lab.socket(role)``,
    ``with lab.entered(role):`` (this thread only); for trio tests ``await
    lab.arun(role, *cmd)`` and ``await lab.acall(role, fn, *args)`` (a worker
    thread inside the namespace); ``lab.flow_records()``, ``lab.conn_log()``,
    ``lab.log_text()``, ``lab.stop_relay()`` then ``lab.counters()``;
    ``lab.impair(SPEC)`` (needs ``impair=`` or ``wire=True``).
``tunrelay_lab_factory``
    ``tunrelay_lab_factory(**options)``: more labs, or one built mid-test.
``tunrelay_lab_options``
    The defaults (a dict, empty here): override it in a ``conftest.py``.

At tear-down a relay the test did not stop must still be running, and must
exit with status 0 on SIGTERM; otherwise the test fails with its log. Then
every process in the lab is stopped and the namespaces removed (checked).

The relay's workers import analyzers from the test file's directory and the
rootdir (``pythonpath``); both are made readable for its workers (``nobody``)
in the relay's own mount namespace. This module imports only pytest at load
time: the plugin is loaded by every pytest run in the environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from relay.lab.lab import Lab

NOT_ROOT = "tunrelay_lab needs root: it creates network namespaces"
MARKER = (
    "tunrelay(**options): options of the test's tunrelay_lab (relay.lab.lab.LabOptions: "
    "analyzers, args, rules, env, log_dir, impair, wire, relay, probe, workers, pythonpath, "
    "setup)"
)
_ADDED = ("analyzers", "args", "rules", "pythonpath")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


def merge_options(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win; list options are concatenated, ``env`` is merged and the
    ``setup`` functions all run, the earlier layer's first."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in _ADDED and key in out:
                out[key] = [*out[key], *value]
            elif key == "env" and key in out:
                out[key] = {**out[key], **value}
            elif key == "setup" and out.get(key) is not None and value is not None:
                out[key] = _chain(out[key], value)
            else:
                out[key] = list(value) if key in _ADDED else value
    return out


def _chain(first: Callable[[Lab], object], then: Callable[[Lab], object]) -> Callable[[Lab], None]:
    def both(lab: Lab) -> None:
        first(lab)
        then(lab)

    return both


@pytest.fixture
def tunrelay_lab_options() -> dict[str, Any]:
    """Default options of every ``tunrelay_lab`` (override in a ``conftest.py``)."""
    return {}


@pytest.fixture
def tunrelay_lab_factory(
    request: pytest.FixtureRequest, tunrelay_lab_options: dict[str, Any]
) -> Iterator[Callable[..., Lab]]:
    """``tunrelay_lab_factory(**options)`` -> a new `Lab`; all torn down after the test."""
    if os.geteuid() != 0:
        pytest.skip(NOT_ROOT)
    from relay.lab.lab import Lab, LabOptions
    from relay.lab.topology import remove_stale_namespaces

    remove_stale_namespaces()  # of test processes killed earlier (tr-<pid>-*, pid gone)
    labs: list[Lab] = []
    here = [str(request.path.parent), str(request.config.rootpath)]

    def make(**options: Any) -> Lab:
        merged = merge_options({"pythonpath": here}, tunrelay_lab_options, options)
        lab = Lab.build(LabOptions(**merged))
        labs.append(lab)
        return lab

    yield make

    problems = [p for lab in labs for p in finish(lab)]
    if problems:
        pytest.fail("tunrelay lab tear-down:\n" + "\n\n".join(problems), pytrace=False)


@pytest.fixture
def tunrelay_lab(request: pytest.FixtureRequest, tunrelay_lab_factory: Callable[..., Lab]) -> Lab:
    """A lab with ``tunrelay run`` in its gateway, ready; options from the markers."""
    # Closest marker last, so it wins.
    markers = list(request.node.iter_markers("tunrelay"))[::-1]
    return tunrelay_lab_factory(**merge_options(*(m.kwargs for m in markers)))


def finish(lab: Lab) -> list[str]:
    """Tear ``lab`` down; what went wrong (the relay died, exited non-zero, leftovers)."""
    from relay.host import netns

    problems = []
    try:
        for check in lab.teardown_checks:
            try:
                check()
            except AssertionError as exc:
                problems.append(str(exc))
        if lab.relay_proc is not None:
            if lab.exit_status is None:  # not stopped by the test: it must still run
                if not lab.relay_alive():
                    problems.append(f"the relay died during the test:\n{lab.log_tail()}")
                lab.stop_relay()
            if lab.exit_status != 0 and not problems:
                problems.append(
                    f"the relay exited with status {lab.exit_status}:\n{lab.log_tail()}"
                )
    finally:
        lab.close()
    left = [ns for ns in lab.namespaces.values() if netns.exists(ns)]
    if left:
        problems.append(f"namespaces left behind: {left}")
    return problems
