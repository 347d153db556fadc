"""relay.service.stackbuild: which build of stack/ would run, and a compiled module
older than its source (Python would import it instead of the edited .py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay import cli
from relay.service import stackbuild
from relay.service.stackbuild import StackBuild, stack_build

SO = ".cpython-311-x86_64-linux-gnu.so"


def _touch(path: Path, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))


def test_no_compiled_module_is_the_pure_build(tmp_path: Path) -> None:
    _touch(tmp_path / "seq.py", 100)
    build = stack_build(tmp_path)
    assert build == StackBuild(compiled=(), stale=())
    assert (build.describe(), build.problem()) == ("pure Python", None)


def test_compiled_modules_newer_than_their_source(tmp_path: Path) -> None:
    for name in ("seq", "tcp/core"):
        _touch(tmp_path / f"{name}.py", 100)
        _touch(tmp_path / f"{name}{SO}", 200)
    _touch(tmp_path / f"native__mypyc{SO}", 50)  # the modules' shared library: no source
    build = stack_build(tmp_path)
    assert len(build.compiled) == 2 and build.stale == ()
    assert build.describe() == "compiled with mypyc (2 modules)"
    assert build.problem() is None


def test_an_edited_source_or_a_removed_one_makes_its_module_stale(tmp_path: Path) -> None:
    _touch(tmp_path / "seq.py", 100)
    _touch(tmp_path / f"seq{SO}", 200)
    _touch(tmp_path / "tcp" / "core.py", 300)  # edited after the build
    _touch(tmp_path / "tcp" / f"core{SO}", 200)
    _touch(tmp_path / f"gone{SO}", 200)  # its .py was removed
    build = stack_build(tmp_path)
    assert build.stale == (tmp_path / f"gone{SO}", tmp_path / "tcp" / f"core{SO}")
    problem = build.problem()
    assert problem is not None and "scripts/build-compiled" in problem
    assert str(tmp_path / "tcp" / f"core{SO}") in problem


def test_the_installed_stack_is_found_without_importing_it() -> None:
    assert (stackbuild._stack_dir() / "tcp" / "connection.py").is_file()


def test_tunrelay_run_refuses_a_stale_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = StackBuild(compiled=(tmp_path / f"seq{SO}",), stale=(tmp_path / f"seq{SO}",))
    monkeypatch.setattr(cli, "stack_build", lambda: stale)
    assert cli.main(["run", "--tun", "tr0", "--client-net", "198.18.1.0/24"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tunrelay run: stack/ has compiled modules older than their source")
    assert err.count("\n") == 1


def test_the_installed_stack_imports_from_anywhere(tmp_path: Path) -> None:
    # The way `tunrelay` runs: no PYTHONPATH, the working directory elsewhere. A
    # compiled build must find its shared library there too (it lives in stack/).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import stack.tcp.connection as m; from stack import Stack\n"
        "from relay.service.stackbuild import stack_build\n"
        "print(m.__file__, bool(stack_build().compiled))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    path, compiled = out.stdout.split()
    assert path.endswith(".so") == (compiled == "True")
