"""The supervisor's imports stay light: the stack and the data path load only in
workers (memory: every process holds what it imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import stack

REPO = Path(__file__).resolve().parent.parent


def _loaded_after(code: str) -> set[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        check=True, capture_output=True, text=True, env=env, timeout=60,
    ).stdout  # fmt: skip
    return set(out.split())


def test_every_name_of_stack_resolves() -> None:
    for name in stack.__all__:
        assert getattr(stack, name) is not None, name
    assert set(stack.__all__) <= set(dir(stack))


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        stack.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("no AttributeError")


def test_the_supervisors_imports_leave_out_the_stack_and_the_data_path() -> None:
    loaded = _loaded_after(
        "import relay.cli, relay.service.workers, relay.service.reload, relay.datapath.echo"
    )
    assert "stack.config" in loaded
    heavy = {"stack.stack", "stack.tcp.connection", "relay.datapath.engine",
             "relay.datapath.tcpflow"}  # fmt: skip
    assert not heavy & loaded, heavy & loaded
