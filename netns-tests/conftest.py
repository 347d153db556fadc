"""Fixtures for tests that need real network namespaces (root only)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Let `import relay` work from a plain checkout too (CI installs the package).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from relay_harness import relay_files_fixture  # noqa: E402, F401  (start_relay needs it)

from relay.lab import Topology, remove_stale_namespaces  # noqa: E402

NEEDS_ROOT = "needs root to create network namespaces"


@pytest.fixture(scope="session")
def netns_root() -> None:
    """Skip unless root; remove namespaces a killed earlier run left behind."""
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)
    # Only `tr-<pid>-*` names whose process is gone (SIGKILL, OOM, power loss).
    remove_stale_namespaces()


@pytest.fixture
def topology(netns_root: None) -> Iterator[Topology]:
    """A fresh client -> gateway -> server network, torn down after the test."""
    topo = Topology.build()
    try:
        yield topo
    finally:
        topo.close()
