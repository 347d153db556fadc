"""`tunrelay run` quota and log options: parsed, checked by name, applied to the stack."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from relay.cli import _options, _parser
from relay.service.limits import Limits
from relay.service.run import ConfigError, RunOptions, validate

NETS = ["198.18.1.0/24"]


def parse(*extra: str) -> RunOptions:
    return _options(_parser().parse_args(["run", "--tun", "tr0", "--client-net", NETS[0], *extra]))


def test_the_defaults_reach_the_stack_config() -> None:
    opts = validate(tun="tr0", client_nets=NETS)
    stack = opts.stack
    assert stack.clients.prefix_v6 == 64 and stack.clients.pending == 256
    assert stack.tcp.synrecv_timeout == 5.0 and stack.max_pending == 4096
    assert opts.limits.flow_log_max_bytes == 1 << 30
    assert stack.tcp.keepalive  # the service's own TcpConfig is kept


def test_command_line_options_are_applied() -> None:
    opts = parse(
        "--client-prefix-v6", "56", "--client-pending", "8", "--connect-rate", "50",
        "--synrecv-timeout", "2.5", "--flow-log-max-bytes", "0", "--flow-log-rotate",
    )  # fmt: skip
    assert opts.stack.clients.prefix_v6 == 56 and opts.stack.clients.pending == 8
    assert opts.stack.connects_per_second == 50.0 and opts.stack.tcp.synrecv_timeout == 2.5
    assert opts.limits.flow_log_max_bytes == 0 and opts.limits.flow_log_rotate
    pickle.loads(pickle.dumps(opts))  # the workers are spawned with them


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("client_prefix_v6", 129, "--client-prefix-v6"),
        ("client_pending", 0, "--client-pending"),
        ("connect_rate", 0.0, "--connect-rate"),
        ("synrecv_timeout", 0.0, "--synrecv-timeout"),
        ("flow_log_max_bytes", -1, "--flow-log-max-bytes"),
        ("error_log_interval", -1.0, "--error-log-interval"),
    ],
)
def test_a_bad_value_names_its_option(field: str, value: float, option: str) -> None:
    with pytest.raises(ConfigError, match=f"^{option}: "):
        validate(tun="tr0", client_nets=NETS, limits=Limits(**{field: value}))


def test_every_limit_is_an_option_with_help_and_a_checked_range() -> None:
    from relay.service.limits import _OPTIONS  # the table the options are made from

    names = [f.name for f in dataclasses.fields(Limits)]
    assert list(_OPTIONS) == names  # one entry per field, in the field order
    for name in names:
        option = _OPTIONS[name]
        assert option.help
        default = getattr(Limits(), name)
        if isinstance(default, bool):
            assert option.lo is None and option.hi is None
        else:
            assert option.lo is not None and option.hi is not None
            assert option.lo <= default <= option.hi, name  # the default passes its check
