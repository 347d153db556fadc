"""``tunrelay run`` options: validation, the CLI flags, and what a worker process is given."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from relay.cli import _parser, default_workers, main
from relay.service.run import MAX_WORKERS, ConfigError, validate

NETS = ["198.18.1.0/24", "fd00:1::/64"]


def test_offload_and_workers_are_validated_and_kept() -> None:
    opts = validate(tun="tr0", client_nets=NETS, offload=True, workers=3)
    assert (opts.offload, opts.workers) == (True, 3)
    plain = validate(tun="tr0", client_nets=NETS)
    assert (plain.offload, plain.workers) == (False, 1)
    for bad in (0, -1, MAX_WORKERS + 1):
        with pytest.raises(ConfigError, match="--workers"):
            validate(tun="tr0", client_nets=NETS, workers=bad)


def test_options_survive_pickling_for_spawned_workers() -> None:
    # multiprocessing's 'spawn' pickles the options into each worker.
    opts = validate(tun="tr0", client_nets=NETS, offload=True, workers=2, flow_log="/x")
    assert pickle.loads(pickle.dumps(opts)) == opts


def test_a_worker_process_does_not_import_pyroute2() -> None:
    # A spawned worker imports relay.service.workers (its entry point) and the CLI module
    # (multiprocessing re-imports the parent's main module), and attaches its
    # queue without netlink: pyroute2 would add about 22 MB to every worker.
    code = "import sys, relay.cli, relay.service.workers; print('pyroute2' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_cli_flags() -> None:
    args = _parser().parse_args(["run", "--tun", "tr0", "--client-net", NETS[0]])
    assert (args.offload, args.workers) == (False, None)  # None: one worker per CPU
    args = _parser().parse_args(
        ["run", "--tun", "tr0", "--client-net", NETS[0], "--offload", "--workers", "4"]
    )
    assert (args.offload, args.workers) == (True, 4)
    assert 1 <= default_workers() <= MAX_WORKERS


def test_profile_needs_one_worker(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--tun", "tr0", "--client-net", NETS[0], "--workers", "2", "--profile", "/x"]
    assert main(argv) == 2
    assert "--profile: needs --workers 1" in capsys.readouterr().err
