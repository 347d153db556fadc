"""SIGHUP: re-read ``--config`` and apply what can change without dropping a flow.

Live: the analyzers and their options (``analyzer``), the domain block rules
(``block_domain``, ``block_list``, whose files are read again), the egress
policy (``allow``, ``deny``, ``allow_client_to_client``), ``stats_interval``
and ``log_level`` (the supervisor's and every worker's). Each worker builds
its new analyzer chain and policy and gives them to the engine
(``Relay.reconfigure``): new flows get them, flows already open keep the
decision and the analyzers they started with, so no established flow is
touched.

Everything else (the TUN device, client networks, workers, buffers, routing
table, ...) is wired into the device, the routing or each stack at start: a
change there is refused with a message naming the option, and the running
value stays, while the live changes of the same file are applied. A file that
does not parse or validate changes nothing. An option given on the command line
pins its value: the re-read file cannot change it (``configfile.overridden``
names such keys).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from relay.service.run import RunOptions
from relay.service.worklink import Reload
from stack import StackConfig

__all__ = ["ReloadPlan", "plan"]

# RunOptions fields a reload applies, and the option names a message gives.
_LIVE = {
    "analyzers": "--analyzer",
    "block_rules": "--block-domain/--block-list",
    "stats_interval": "--stats-interval",
    "log_level": "log level",
}
# Fields named after their option where the name differs from "--" + field.
_OPTION = {
    "client_nets": "--client-net",
    "iifs": "--iif",
    "fail_closed_routing": "--no-fail-closed-routing",
    "worker_caps": "--fwmark",
    "user": "--user",
    "max_c2s_queue": "--rcv-buf",
}


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a reload does: ``live`` changes (applied), ``refused`` ones (need a
    restart; the running value stays), the settings then running, and the
    command for the workers (None when nothing live changed)."""

    live: tuple[str, ...]
    refused: tuple[str, ...]
    running: RunOptions
    command: Reload | None


def _option(name: str) -> str:
    return _OPTION.get(name, "--" + name.replace("_", "-"))


def plan(old: RunOptions, new: RunOptions) -> ReloadPlan:
    """Compare the running settings ``old`` with the re-read ``new`` (whose egress
    policy already has the host's addresses, as ``old``'s)."""
    live: list[str] = []
    refused: list[str] = []
    running = old
    for f in dataclasses.fields(RunOptions):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if f.name == "relay":
            # Only its egress policy is live (with the running client networks, which
            # the routing was set up for); the rest sets up each flow's sockets.
            after = dataclasses.replace(
                after,
                egress=dataclasses.replace(after.egress, client_nets=before.egress.client_nets),
            )
            if dataclasses.replace(before, egress=after.egress) != after:
                refused += _relay_fields(before, after)
            if before.egress != after.egress:
                if dataclasses.replace(before.egress, host=after.egress.host) == after.egress:
                    what = "the host's addresses, read again"  # as at start: denied
                else:
                    what = after.egress.describe()
                live.append(f"egress policy: {what}")
                running = dataclasses.replace(
                    running, relay=dataclasses.replace(running.relay, egress=after.egress)
                )
        elif f.name in ("profile",):
            continue  # command line only
        elif before != after:
            if f.name in _LIVE:
                live.append(_describe(f.name, before, after))
                running = dataclasses.replace(running, **{f.name: after})
            elif f.name == "stack":
                if _stack_changed(before, after):
                    refused.append("TCP/stack settings (--max-flows, --rcv-buf, --snd-buf, "
                                   "--udp-idle-timeout)")  # fmt: skip
            else:
                refused.append(f"{_option(f.name)} ({_short(before)} -> {_short(after)})")
    command = None
    if live:
        command = Reload(
            analyzers=running.analyzers,
            block_rules=running.block_rules,
            egress=running.relay.egress,
            stats_interval=running.stats_interval,
            log_level=running.log_level,
        )
    return ReloadPlan(tuple(live), tuple(dict.fromkeys(refused)), running, command)


def _stack_changed(before: StackConfig, after: StackConfig) -> bool:
    """Whether the stack changed beyond its copies of --mtu (the MSS too),
    --offload and --txqueuelen (with --mtu, the window budget), which are
    refused by their own names."""
    same = dataclasses.replace(
        before,
        mtu=after.mtu,
        offload=after.offload,
        tcp=dataclasses.replace(
            before.tcp, mss=after.tcp.mss, rcv_window_budget=after.tcp.rcv_window_budget
        ),
    )
    return same != after


def _relay_fields(before: object, after: object) -> list[str]:
    out = []
    for f in dataclasses.fields(before):  # type: ignore[arg-type]
        if f.name != "egress" and getattr(before, f.name) != getattr(after, f.name):
            name = "--bind-address/--bind-interface/--fwmark" if f.name == "upstream" else None
            out.append(name or _option(f.name))
    return out


def _describe(name: str, before: object, after: object) -> str:
    if name == "block_rules":
        assert isinstance(before, tuple) and isinstance(after, tuple)
        added = len(set(after) - set(before))
        removed = len(set(before) - set(after))
        return f"{_LIVE[name]}: {len(after)} rules (+{added} -{removed})"
    if name == "log_level":
        return f"log level: {before} -> {after}"
    return f"{_LIVE[name]}: {_short(before)} -> {_short(after)}"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
