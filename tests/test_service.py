"""``tunrelay run`` options: validation, the CLI flags, and what a worker process is given."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from relay.cli import _parser, default_workers, main
from relay.datapath.config import RelayConfig
from relay.datapath.egress import Upstream
from relay.service.run import MAX_WORKERS, ConfigError, validate

NETS = ["198.18.1.0/24", "fd00:1::/64"]


def test_offload_and_workers_are_validated_and_kept() -> None:
    opts = validate(tun="tr0", client_nets=NETS, offload=False, workers=3)
    assert (opts.offload, opts.stack.offload, opts.workers) == (False, False, 3)
    default = validate(tun="tr0", client_nets=NETS)
    assert (default.offload, default.stack.offload, default.workers) == (True, True, 1)
    for bad in (0, -1, MAX_WORKERS + 1):
        with pytest.raises(ConfigError, match="--workers"):
            validate(tun="tr0", client_nets=NETS, workers=bad)


def test_upstream_timeout_is_validated_and_reaches_the_relay_config() -> None:
    assert validate(tun="tr0", client_nets=NETS).relay.upstream_timeout == 0.0  # the kernel's
    opts = validate(tun="tr0", client_nets=NETS, upstream_timeout=2.5)
    assert opts.relay.upstream_timeout == 2.5
    args = _parser().parse_args(["run", "--tun", "tr0", "--upstream-timeout", "7"])
    assert args.upstream_timeout == 7.0
    for bad in (-1.0, 1e9):
        with pytest.raises(ConfigError, match=r"^--upstream-timeout: "):
            validate(tun="tr0", client_nets=NETS, upstream_timeout=bad)


def test_flow_pass_bytes_is_validated_and_reaches_the_relay_config() -> None:
    assert validate(tun="tr0", client_nets=NETS).relay.flow_pass_bytes == 256 * 1024
    assert validate(tun="tr0", client_nets=NETS, flow_pass_bytes=0).relay.flow_pass_bytes == 0
    args = _parser().parse_args(["run", "--tun", "tr0", "--flow-pass-bytes", "1048576"])
    assert args.flow_pass_bytes == 1 << 20
    assert _parser().parse_args(["run", "--tun", "tr0"]).flow_pass_bytes == 256 * 1024
    with pytest.raises(ConfigError, match=r"^--flow-pass-bytes: -1 must be 0"):
        validate(tun="tr0", client_nets=NETS, flow_pass_bytes=-1)


def test_flow_read_bytes_is_validated_and_reaches_the_relay_config() -> None:
    # The default is RelayConfig's, on the command line and in validate() alike.
    default = RelayConfig().recv_size
    assert validate(tun="tr0", client_nets=NETS).relay.recv_size == default
    assert _parser().parse_args(["run", "--tun", "tr0"]).flow_read_bytes == default
    args = _parser().parse_args(["run", "--tun", "tr0", "--flow-read-bytes", "65536"])
    assert args.flow_read_bytes == 64 << 10
    opts = validate(tun="tr0", client_nets=NETS, flow_read_bytes=64 << 10)
    assert opts.relay.recv_size == 64 << 10
    for bad in (0, 4095, (1 << 20) + 1):
        with pytest.raises(ConfigError, match=rf"^--flow-read-bytes: {bad} is outside 4096\.\."):
            validate(tun="tr0", client_nets=NETS, flow_read_bytes=bad)


def test_client_idle_timeout_is_off_by_default_and_validated() -> None:
    assert validate(tun="tr0", client_nets=NETS).stack.tcp.idle_timeout is None
    opts = validate(tun="tr0", client_nets=NETS, client_idle_timeout=30)
    assert opts.stack.tcp.idle_timeout == 30
    with pytest.raises(ConfigError, match=r"^--client-idle-timeout: "):
        validate(tun="tr0", client_nets=NETS, client_idle_timeout=-1)


def test_memory_budget_reaches_the_stack_and_is_validated() -> None:
    assert validate(tun="tr0", client_nets=NETS).stack.tcp.memory_budget == 1 << 30
    opts = validate(tun="tr0", client_nets=NETS, memory_budget=4 << 20)
    assert opts.stack.tcp.memory_budget == 4 << 20
    with pytest.raises(ConfigError, match=r"^--memory-budget: "):
        validate(tun="tr0", client_nets=NETS, memory_budget=1000)


def test_window_budget_is_half_the_tun_queue_of_full_segments() -> None:
    # The clients' windows together fit the TUN queue, with room left for their ACKs.
    assert validate(tun="tr0", client_nets=NETS).stack.tcp.rcv_window_budget == 16384 * 1460 // 2
    opts = validate(tun="tr0", client_nets=NETS, txqueuelen=4000, mtu=1400)
    assert opts.stack.tcp.rcv_window_budget == 4000 * 1360 // 2


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


def test_a_worker_without_log_dir_does_not_import_the_dissectors() -> None:
    # The dissectors and httptools (and dnspython and cryptography, which they load on
    # the first DNS message and QUIC Initial): memory a worker needs only with --log-dir
    # (or an analyzer with a record hook, which the engine sees and imports them for).
    code = (
        "import sys, relay.cli, relay.service.workers, relay.datapath.engine;"
        "heavy = ('relay.analysis.dissect', 'dns', 'httptools');"
        "print(any(m.startswith(heavy) for m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_log_dir_is_checked_and_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate(tun="tr0", client_nets=NETS, log_dir=str(tmp_path)).log_dir == str(tmp_path)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"^--log-dir: .*nowhere' is not a directory"):
        validate(tun="tr0", client_nets=NETS, log_dir=missing)
    assert main(["run", "--tun", "tr0", "--client-net", NETS[0], "--log-dir", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tunrelay run: --log-dir:") and err.count("\n") == 1


def test_cli_flags() -> None:
    args = _parser().parse_args(["run", "--tun", "tr0", "--client-net", NETS[0]])
    assert (args.offload, args.workers) == (True, None)  # None: one worker per CPU
    args = _parser().parse_args(
        ["run", "--tun", "tr0", "--client-net", NETS[0], "--no-offload", "--workers", "4"]
    )
    assert (args.offload, args.workers) == (False, 4)
    args = _parser().parse_args(["run", "--tun", "tr0", "--client-net", NETS[0], "--offload"])
    assert args.offload is True  # the explicit form of the default
    assert 1 <= default_workers() <= MAX_WORKERS


def test_profile_needs_one_worker(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--tun", "tr0", "--client-net", NETS[0], "--workers", "2", "--profile", "/x"]
    assert main(argv) == 2
    assert "--profile: needs --workers 1" in capsys.readouterr().err


def test_egress_rules_keep_their_command_line_order() -> None:
    argv = ["run", "--tun", "tr0", "--client-net", NETS[0], "--deny", "198.18.3.0/24"]
    argv += ["--allow", "198.18.0.0/15", "--allow-client-to-client", "--deny", "[fd00::/8]:443"]
    args = _parser().parse_args(argv)
    assert args.egress_rules == [
        ("deny", "198.18.3.0/24"),
        ("allow", "198.18.0.0/15"),
        ("deny", "[fd00::/8]:443"),
    ]
    opts = validate(
        tun="tr0",
        client_nets=NETS,
        egress_rules=args.egress_rules,
        allow_client_to_client=args.allow_client_to_client,
    )
    egress = opts.relay.egress
    assert [r.name for r in egress.rules] == [
        "deny 198.18.3.0/24",
        "allow 198.18.0.0/15",
        "deny [fd00::/8]:443",
    ]
    assert egress.client_nets == tuple(NETS) and egress.client_to_client
    assert pickle.loads(pickle.dumps(opts)) == opts


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"egress_rules": [("allow", "10.0.0.1/8")]}, "--allow: '10.0.0.1/8' is not a network"),
        ({"egress_rules": [("deny", "[fd00::/8]:http")]}, "--deny: '[fd00::/8]:http': 'http'"),
        ({"fwmark": "mark"}, "--fwmark: 'mark' is not a number"),
        ({"fwmark": "0"}, "--fwmark: 0 is outside"),
        ({"fwmark": 1 << 32}, "--fwmark: 4294967296 is outside"),
        ({"bind_addresses": ["198.18.2.1", "198.18.2.9"]}, "--bind-address: two IPv4"),
        ({"bind_addresses": ["host.example"]}, "--bind-address: 'host.example' is not an IP"),
        ({"bind_addresses": ["::"]}, "--bind-address: :: cannot be a source"),
        ({"bind_addresses": ["198.18.1.9"]}, "--bind-address: 198.18.1.9 is inside --client-net"),
        ({"bind_interface": "a-very-long-ifname0"}, "--bind-interface: 'a-very-long-ifname0'"),
    ],
)
def test_bad_egress_options_are_named(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(tun="tr0", client_nets=NETS, **kw)  # type: ignore[arg-type]
    assert str(info.value).startswith(message), info.value


def test_upstream_options() -> None:
    opts = validate(
        tun="tr0",
        client_nets=NETS,
        fwmark="0x5197",
        bind_addresses=["198.18.2.1", "fd00:2::1"],
        bind_interface="eth0",
    )
    up = opts.relay.upstream
    assert (up.fwmark, up.bind_v4, up.bind_v6, up.interface) == (
        0x5197,
        "198.18.2.1",
        "fd00:2::1",
        "eth0",
    )
    assert validate(tun="tr0", client_nets=NETS).relay.upstream == Upstream()


def test_a_bad_rule_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--tun", "tr0", "--client-net", NETS[0], "--deny", "[fd00::/8"]
    assert main(argv) == 2
    assert "tunrelay run: --deny: '[fd00::/8': no closing ']'" in capsys.readouterr().err


def test_tune_malloc_sets_fixed_thresholds_where_glibc_has_mallopt() -> None:
    import ctypes

    from relay.service.run import tune_malloc

    has_mallopt = hasattr(ctypes.CDLL(None), "mallopt")
    assert tune_malloc() is has_mallopt
    assert tune_malloc() is has_mallopt  # idempotent


def test_free_heap_is_given_back_once_when_bulk_traffic_ends() -> None:
    from relay.service.run import BulkEnd, malloc_trimmer

    mib = 1 << 20
    edge = BulkEnd(0, bulk=16 * mib, quiet=mib)
    total, seen = 0, []
    # idle, small traffic, two bulk seconds, a quiet one, quiet again, small again
    for moved in (0, 200_000, 20 * mib, 30 * mib, 100_000, 0, 500_000):
        total += moved
        seen.append(edge.observe(total))
    assert seen == [False, False, False, False, True, False, False]
    # Traffic that stays bulk, or never was, never trims.
    edge = BulkEnd(0, bulk=16 * mib, quiet=mib)
    assert not any(edge.observe(n * 20 * mib) for n in range(1, 6))
    edge = BulkEnd(0, bulk=16 * mib, quiet=mib)
    assert not any(edge.observe(n * mib) for n in range(1, 6))
    trim = malloc_trimmer()
    assert trim is not None  # glibc, this project's platform
    trim()
