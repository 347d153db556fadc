"""SIGHUP's reload plan: what changes live, what is refused (needs a restart), and the
settings then running; and the worker's side of it (``Relay.reconfigure``)."""

from __future__ import annotations

import dataclasses
import types
from typing import Any

from relay.service.reload import plan
from relay.service.run import RunOptions, validate

BASE: dict[str, Any] = {"tun": "tun0", "client_nets": ["198.18.0.0/24"]}


def opts(**over: Any) -> RunOptions:
    return validate(**{**BASE, **over})


def test_no_change() -> None:
    p = plan(opts(), opts())
    assert (p.live, p.refused, p.command) == ((), (), None)


def test_block_rules_egress_analyzers_and_stats_interval_change_live() -> None:
    old = opts(block_domains=["a.example"])
    new = opts(
        block_domains=["a.example", "*.b.example"],
        egress_rules=[("deny", "198.51.100.0/24")],
        analyzers=["mod:Cls"],
        stats_interval=5.0,
    )
    p = plan(old, new)
    assert p.refused == ()
    assert "--block-domain/--block-list: 2 rules (+1 -0)" in p.live
    assert "--stats-interval: 0.0 -> 5.0" in p.live
    assert any(x.startswith("egress policy: ") for x in p.live)
    assert any(x.startswith("--analyzer: ") for x in p.live)
    assert p.command is not None
    assert p.command.block_rules == new.block_rules
    assert p.command.egress == new.relay.egress
    assert p.command.analyzers == ("mod:Cls",) and p.command.stats_interval == 5.0
    assert p.running == new


def test_what_needs_a_restart_is_refused_and_keeps_its_running_value() -> None:
    old = opts()
    new = opts(
        tun="tun1", client_nets=["198.18.1.0/24"], workers=2, mtu=1400,
        connect_timeout=3.0, max_flows=1000, block_domains=["x.example"],
    )  # fmt: skip
    p = plan(old, new)
    refused = "\n".join(p.refused)
    for option in ("--tun", "--client-net", "--workers", "--mtu", "--connect-timeout",
                   "TCP/stack settings"):  # fmt: skip
        assert option in refused, (option, p.refused)
    assert "--tun ('tun0' -> 'tun1')" in p.refused
    # The live change of the same file is applied; the rest keeps running as it was.
    assert p.live == ("--block-domain/--block-list: 1 rules (+1 -0)",)
    assert p.running == dataclasses.replace(old, block_rules=new.block_rules)
    # The next reload of the same file refuses the same, applies nothing new.
    again = plan(p.running, new)
    assert again.live == () and again.refused == p.refused and again.command is None


def test_only_the_hosts_addresses_changed_is_said_so() -> None:
    from relay.datapath.egress import HostRoutes

    old = opts()
    host = HostRoutes(("198.51.100.7/32",))  # an address added since the start
    new = dataclasses.replace(
        old, relay=dataclasses.replace(old.relay, egress=old.relay.egress.with_host(host))
    )
    p = plan(old, new)
    assert p.live == ("egress policy: the host's addresses, read again",)
    assert p.command is not None and p.command.egress == new.relay.egress


def test_a_changed_mtu_is_one_refusal_naming_it() -> None:
    # The stack's copies of --mtu (its mtu, the MSS) and of --offload are no second change.
    p = plan(opts(), opts(mtu=1400, offload=False))
    assert p.refused == ("--mtu (1500 -> 1400)", "--offload (True -> False)")
    assert p.live == () and p.command is None


def test_a_changed_txqueuelen_is_one_refusal_naming_it() -> None:
    # The window budget derived from it (and --mtu) is no second change.
    p = plan(opts(), opts(txqueuelen=4000))
    assert p.refused == ("--txqueuelen (16384 -> 4000)",)


def test_the_log_level_changes_live() -> None:
    p = plan(opts(), opts(log_level="debug", mtu=1400))
    assert p.live == ("log level: info -> debug",)
    assert p.refused == ("--mtu (1500 -> 1400)",)
    assert p.command is not None and p.command.log_level == "debug"
    assert p.running == opts(log_level="debug")
    # Any live change carries the running level to the workers, unchanged.
    p = plan(opts(log_level="warning"), opts(log_level="warning", stats_interval=1.0))
    assert p.command is not None and p.command.log_level == "warning"


def test_a_worker_sets_its_log_level_on_a_reload() -> None:
    import logging
    import socket

    from relay.analysis.flowcounts import FlowCounts
    from relay.service.worklink import WorkerLink

    reconfigured: list[object] = []
    relay = types.SimpleNamespace(reconfigure=lambda **kw: reconfigured.append(kw))
    ours, theirs = socket.socketpair()
    root = logging.getLogger()
    level = root.level
    try:
        link = WorkerLink(ours, 0, FlowCounts(), lambda _r: [], [], 0.0, True)
        command = plan(opts(), opts(log_level="debug")).command
        assert command is not None
        assert link._reload(relay, command) is None  # type: ignore[arg-type]
        assert root.level == logging.DEBUG and len(reconfigured) == 1
        command = plan(opts(log_level="debug"), opts(log_level="error")).command
        assert command is not None
        assert link._reload(relay, command) is None  # type: ignore[arg-type]
        assert root.level == logging.ERROR
    finally:
        root.setLevel(level)
        ours.close()
        theirs.close()
