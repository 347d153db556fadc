"""The lab's impairment SPEC, the pytest plugin's option merging, its entry point, its
import cost and its skip without root (no root or namespaces needed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from relay.lab.impair import Impairment
from relay.lab.impairspec import parse_spec
from relay.lab.pytest_plugin import NOT_ROOT, merge_options

ROOT = Path(__file__).resolve().parent.parent


def test_spec_per_direction_units_and_seed() -> None:
    spec = parse_spec("loss=5%,delay=10ms,dir=c2g; dup=0.01,reorder=10%,gap=4,dir=g2c,seed=7")
    assert spec.c2g == Impairment(loss=0.05, delay=0.01)
    assert spec.g2c == Impairment(dup=0.01, reorder=0.1, reorder_gap=4)
    assert spec.seed == 7 and spec.active
    assert spec.describe() == "c2g: 5% loss, 10 ms delay; g2c: 1% dup, 10% held behind 4"
    both = parse_spec("delay=500us")
    assert both.c2g == both.g2c == Impairment(delay=0.0005)
    assert parse_spec("delay=0.2s").c2g.delay == pytest.approx(0.2)
    for empty in ("", "none", " NONE "):
        assert not parse_spec(empty).active and parse_spec(empty).seed == 0


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("loss=150%", "loss=150%"),
        ("loss=five", "loss=five"),
        ("delay=10", "delay=10"),
        ("delay=9s", "delay=9s"),
        ("gap=0", "gap=0"),
        ("dir=up", "dir=up"),
        ("jitter=1ms", "jitter"),
        ("loss", "'loss'"),
        ("loss=1%;delay=1ms", "dir c2g"),
        ("seed=1;seed=2,dir=g2c", "seed=2"),
    ],
)
def test_bad_specs_name_the_item(spec: str, names: str) -> None:
    with pytest.raises(ValueError, match=re.escape(names)):
        parse_spec(spec)


def test_merge_options_adds_lists_merges_env_and_chains_setup() -> None:
    calls: list[str] = []
    merged = merge_options(
        {"analyzers": ["a:A"], "env": {"X": "1"}, "setup": lambda lab: calls.append("first")},
        {"analyzers": ["b:B"], "env": {"Y": "2"}, "probe": False},
        {"setup": lambda lab: calls.append("then"), "probe": True, "args": ("--mtu", "1400")},
    )
    assert merged["analyzers"] == ["a:A", "b:B"]
    assert merged["env"] == {"X": "1", "Y": "2"}
    assert merged["probe"] is True and merged["args"] == ["--mtu", "1400"]
    merged["setup"](None)
    assert calls == ["first", "then"]


def test_the_entry_point_is_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"tunrelay": "relay.lab.pytest_plugin"}


def test_the_plugin_imports_cheaply() -> None:
    """Every pytest run loads it: it must not pull in trio, pyroute2 or the lab."""
    code = (
        "import sys, relay.lab.pytest_plugin as p; "
        "print(sorted(m for m in ('trio', 'pyroute2', 'relay.lab.lab', 'relay.lab.impair', "
        "'relay.host.netns') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert done.stdout.strip() == "[]", done.stdout


def test_without_root_a_lab_test_skips_saying_why(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text("import os\nos.geteuid = lambda: 65534\n")
    (tmp_path / "test_it.py").write_text(
        "def test_it(tunrelay_lab):\n    raise AssertionError('ran without root')\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "-p", "no:tunrelay", "-p", "relay.lab.pytest_plugin", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout and NOT_ROOT in done.stdout, done.stdout


def test_the_lab_puts_the_directory_holding_relay_on_the_childrens_path() -> None:
    """``Topology.spawn`` adds ``REPO_ROOT`` to PYTHONPATH: ``import relay`` must then
    find this tree's package even without site-packages (``-S``: no installed copy)."""
    from relay.lab.topology import REPO_ROOT

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run(
        [sys.executable, "-S", "-c", "import relay; print(relay.__file__)"],
        capture_output=True, text=True, timeout=30, env=env, cwd="/", check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "relay" / "__init__.py"
