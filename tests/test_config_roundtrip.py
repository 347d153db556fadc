"""Every ``tunrelay run`` option, set to a non-default value in a config file, gives
the same settings as on the command line (the keys are derived from the parser, so a
new option is a new key; this table must name it)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
from pathlib import Path

import pytest

import relay.cli
from relay.service.configfile import keys_of
from relay.service.run import RunOptions


def table(tmp_path: Path) -> dict[str, object]:
    """A non-default value for every key (TOML value; the command line's is derived)."""
    blocked = tmp_path / "blocked.txt"
    blocked.write_text("ads.example\n")
    return {
        "tun": "tun9",
        "client_net": ["198.18.0.0/24", "fd00:8::/64"],
        "iif": ["wg0", "wg1"],
        "user": "daemon",
        "fail_closed_routing": False,
        "state_dir": str(tmp_path / "state"),
        "analyzer": ["relay.analysis.digest:StreamDigest"],
        "flow_log": str(tmp_path / "flows.json"),
        "log_dir": str(tmp_path),
        "capture_dir": str(tmp_path / "capture"),
        "capture_filter": ["port 443", "net 198.18.0.0/15"],
        "block_domain": ["*.tracker.example", "ads.example"],
        "block_list": [str(blocked)],
        "mtu": 1400,
        "txqueuelen": 1000,
        "table": 77,
        "priority": 300,
        "connect_timeout": 3.5,
        "upstream_timeout": 20.0,
        "client_idle_timeout": 600.0,
        "memory_budget": 64 << 20,
        "max_flows": 1000,
        "flow_pass_bytes": 1 << 20,
        "flow_read_bytes": 128 << 10,
        "rcv_buf": 1 << 20,
        "snd_buf": 2 << 20,
        "udp_idle_timeout": 30.0,
        "fail_closed": True,
        "stats_interval": 5.0,
        "metrics": "127.0.0.1:9464",
        "log_format": "json",
        "log_level": "debug",
        "offload": False,
        "workers": 1,
        "allow": ["198.19.0.0/16"],
        "deny": ["198.19.1.0/24:443"],
        "allow_client_to_client": True,
        "fwmark": "0x10",
        "bind_address": ["198.19.0.1"],
        "bind_interface": "eth1",
        "profile": str(tmp_path / "p.prof"),
        "client_prefix_v6": 56,
        "client_tcp_flows": 100,
        "client_pending": 10,
        "client_connect_rate": 20.5,
        "client_connect_burst": 30,
        "client_udp_flows": 40,
        "client_echo_flows": 5,
        "client_fragment_bytes": 65536,
        "client_memory": 1 << 24,
        "max_pending": 500,
        "max_pending_per_destination": 50,
        "connect_rate": 100.0,
        "connect_burst": 150,
        "synrecv_timeout": 2.0,
        "flow_log_max_bytes": 1 << 20,
        "flow_log_rotate": True,
        "error_log_interval": 1.0,
    }


def argv_of(values: dict[str, object], keys: dict[str, object]) -> list[str]:
    argv: list[str] = []
    for name, value in values.items():
        option = keys[name].option  # type: ignore[attr-defined]
        if isinstance(value, bool):
            action = keys[name].action  # type: ignore[attr-defined]
            if isinstance(action, argparse.BooleanOptionalAction) and not value:
                option = "--no-" + option.removeprefix("--")  # --offload's off
            argv.append(option)  # --no-fail-closed-routing for False: its key's flag
        elif isinstance(value, list):
            for item in value:
                argv += [option, str(item)]
        else:
            argv += [option, str(value)]
    return argv


def toml_of(values: dict[str, object]) -> str:
    # JSON's literals, strings and arrays of these are TOML too.
    return "".join(f"{name} = {json.dumps(value)}\n" for name, value in values.items())


def started(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[RunOptions, list[str]]:
    opts: list[RunOptions] = []
    users: list[str] = []
    fake_trio = types.SimpleNamespace(run=lambda _fn, o, _level: opts.append(o) or 0)
    monkeypatch.setattr(relay.cli, "trio", fake_trio)
    monkeypatch.setattr(relay.cli, "configure_logging", lambda *_a, **_k: None)
    monkeypatch.setattr(
        relay.cli, "current_caps", lambda: types.SimpleNamespace(has=lambda _c: True)
    )
    monkeypatch.setattr(relay.cli, "resolve_worker", lambda user: users.append(user))
    assert relay.cli.main(["run", *argv]) == 0
    return opts[0], users


def test_every_option_round_trips_through_the_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    keys = keys_of(relay.cli._run_parser(relay.cli._parser()))
    values = table(tmp_path)
    assert set(values) == set(keys), "name every option in this table"
    path = tmp_path / "tunrelay.toml"
    path.write_text(toml_of(values))
    from_file, file_users = started(monkeypatch, ["--config", str(path)])
    from_cli, cli_users = started(monkeypatch, argv_of(values, keys))
    assert from_file == from_cli
    assert file_users == cli_users == ["daemon"]
    # And none of them is the default.
    defaults, _ = started(monkeypatch, ["--tun", "t0", "--client-net", "198.18.0.0/24"])
    for field in ("iifs", "analyzers", "flow_log", "log_dir", "block_rules", "mtu", "metrics",
                  "log_format", "log_level", "offload", "stats_interval", "profile", "state_dir",
                  "limits", "stack"):  # fmt: skip
        assert getattr(from_file, field) != getattr(defaults, field), field
    for f in dataclasses.fields(from_file.limits):  # each quota and log option
        assert getattr(from_file.limits, f.name) != getattr(defaults.limits, f.name), f.name
