"""``tunrelay run --config FILE`` and ``tunrelay check-config FILE``: the keys derived
from the run parser, command-line overrides, [[analyzer]] options, and errors that
name the file, the line and the key."""

from __future__ import annotations

import pickle
import types
from pathlib import Path

import pytest

import relay.cli
from relay.service.configfile import keys_of
from relay.service.run import ConfigError, RunOptions, load_analyzers

ROOT = Path(__file__).resolve().parent.parent
BASE = 'tun = "tunrelay0"\nclient_net = ["10.8.0.0/24"]\n'


class Recorder:
    """A test analyzer with options (loaded as test_configfile:Recorder)."""

    seen: list[dict[str, object]] = []  # noqa: RUF012

    def __init__(self, **options: object) -> None:
        self.options = options
        Recorder.seen.append(options)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tunrelay.toml"
    path.write_text(text)
    return str(path)


def run(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> RunOptions:
    """``tunrelay run argv`` up to the point where it would set the network up."""
    started: list[RunOptions] = []
    fake_trio = types.SimpleNamespace(run=lambda _fn, opts, _level: started.append(opts) or 0)
    monkeypatch.setattr(relay.cli, "trio", fake_trio)
    monkeypatch.setattr(
        relay.cli, "current_caps", lambda: types.SimpleNamespace(has=lambda _c: True)
    )
    monkeypatch.setattr(relay.cli, "resolve_worker", lambda _user: None)
    assert relay.cli.main(["run", *argv]) == 0
    return started[0]


def check(path: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = relay.cli.main(["check-config", path])
    out, err = capsys.readouterr()
    return status, out, err


def test_keys_come_from_the_parser() -> None:
    keys = keys_of(relay.cli._run_parser(relay.cli._parser()))
    for name in ("tun", "client_net", "iif", "max_flows", "offload", "fail_closed_routing",
                 "allow", "deny", "analyzer", "fwmark", "workers", "udp_idle_timeout"):  # fmt: skip
        assert name in keys
    assert "config" not in keys and "help" not in keys and "egress_rules" not in keys


def test_scalar_bool_and_repeatable_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, BASE + """iif = ["wg0", "wg1"]
max_flows = 100000
connect_timeout = 3
offload = false
fail_closed_routing = false
workers = 1
allow = ["10.0.0.0/8"]
deny = ["192.0.2.0/24:443"]
fwmark = 0x10
""")  # fmt: skip
    opts = run(monkeypatch, ["--config", path])
    assert opts.tun == "tunrelay0" and opts.client_nets == ("10.8.0.0/24",)
    assert opts.iifs == ("wg0", "wg1")
    assert opts.stack.max_flows == 100000
    assert opts.relay.connect_timeout == 3.0
    assert opts.offload is False and opts.fail_closed_routing is False
    assert opts.stack.offload is False
    assert [r.allow for r in opts.relay.egress.rules] == [True, False]
    assert opts.relay.upstream.fwmark == 16


def test_command_line_overrides_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, BASE + 'mtu = 9000\niif = ["wg0"]\nworkers = 1\ntable = 77\n')
    opts = run(monkeypatch, ["--config", path, "--mtu", "1400", "--iif", "wg9", "--tun", "t1"])
    assert opts.mtu == 1400 and opts.iifs == ("wg9",) and opts.tun == "t1"
    assert opts.table == 77  # not on the command line: the file's


def test_offload_key_and_both_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # --offload/--no-offload share one key; either flag overrides the file.
    off = write(tmp_path, BASE + "workers = 1\noffload = false\n")
    assert run(monkeypatch, ["--config", off]).offload is False
    assert run(monkeypatch, ["--config", off, "--offload"]).offload is True
    on = write(tmp_path, BASE + "workers = 1\noffload = true\n")
    assert run(monkeypatch, ["--config", on, "--no-offload"]).offload is False


def test_a_bad_command_line_value_is_blamed_on_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, BASE + "mtu = 1400\n")
    assert relay.cli.main(["run", "--config", path, "--mtu", "20"]) == 2
    assert capsys.readouterr().err == "tunrelay run: --mtu: 20 is outside 1280..65535\n"


def test_analyzer_tables_with_options_reach_the_constructor(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, BASE + """workers = 1
[[analyzer]]
path = "test_configfile:Recorder"
[analyzer.options]
threshold = 5
names = ["a", "b"]

[[analyzer]]
path = "test_configfile:Recorder"
""")  # fmt: skip
    opts = run(monkeypatch, ["--config", path])
    Recorder.seen.clear()
    analyzers = load_analyzers(opts)
    assert Recorder.seen == [{"threshold": 5, "names": ["a", "b"]}, {}]
    assert all(isinstance(a, Recorder) for a in analyzers)


def test_plain_analyzer_array(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, BASE + 'workers = 1\nanalyzer = ["test_configfile:Recorder"]\n')
    assert run(monkeypatch, ["--config", path]).analyzers == ("test_configfile:Recorder",)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("\nmax_flow = 5\n", ":4: max_flow: unknown key (did you mean 'max_flows'?)"),
        ('max_flows = "many"\n', ':3: max_flows: expected an integer, got "many"'),
        ("offload = 1\n", ":3: offload: expected true or false, got 1"),
        ('iif = "wg0"\n', ':3: iif: expected an array, got "wg0"'),
        ("\n\nmtu = 5\n", ":5: mtu: 5 is outside 1280..65535"),
        ('allow = ["10.0.0.0/33"]\n', ":3: allow: "),
        ('tun = "again"\n', ":3:14: Cannot overwrite a value"),
        (
            "\n[[analyzer]]\npaht = 'x:Y'\n",
            ":4: analyzer: unknown key 'paht' in [[analyzer]] (did you mean 'path'?)",
        ),
        ("\n[[analyzer]]\npath = 'nocolon'\n", ":4: analyzer: 'nocolon' is not of the form"),
        (
            "\n[[analyzer]]\npath = 'a:B'\n[analyzer.options]\nx = 1\n\n"
            "[[analyzer]]\npath = 'bad'\n",
            ":9: analyzer: 'bad' is not of the form",
        ),
    ],
)
def test_errors_name_the_file_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, error: str
) -> None:
    path = write(tmp_path, BASE + text)
    status, out, err = check(path, capsys)
    assert status == 2 and out == ""
    assert err.startswith(f"tunrelay check-config: {path}{error}"), err
    assert err.count("\n") == 1
    assert relay.cli.main(["run", "--config", path]) == 2
    assert capsys.readouterr().err.startswith(f"tunrelay run: {path}{error}")


def test_toml_syntax_error_has_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, BASE + "mtu = = 5\n")
    status, _, err = check(path, capsys)
    assert status == 2 and err.startswith(f"tunrelay check-config: {path}:3:7: "), err


def test_missing_required_and_unreadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = check(write(tmp_path, 'tun = "t0"\n'), capsys)
    assert status == 2 and "--client-net: required" in err
    status, _, err = check(str(tmp_path / "absent.toml"), capsys)
    assert status == 2 and err.startswith("tunrelay check-config: ") and "cannot read" in err


def test_check_config_prints_every_setting_and_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, BASE + "max_flows = 1000\nworkers = 2\n")
    status, out, err = check(path, capsys)
    assert status == 0 and err == ""
    lines = out.splitlines()
    keys = keys_of(relay.cli._run_parser(relay.cli._parser()))
    assert len(lines) == 1 + len(keys)
    assert 'tun = "tunrelay0"  # file' in lines
    assert "max_flows = 1000  # file" in lines
    assert "mtu = 1500  # default" in lines
    assert "fail_closed_routing = true  # default" in lines


def test_the_contrib_example_validates(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = check(str(ROOT / "contrib" / "tunrelay.toml"), capsys)
    assert (status, err) == (0, ""), err
    assert 'tun = "tunrelay0"  # file' in out


def test_the_contrib_example_names_every_key() -> None:
    text = (ROOT / "contrib" / "tunrelay.toml").read_text()
    for name in keys_of(relay.cli._run_parser(relay.cli._parser())):
        assert f"\n{name} = " in text or f"\n# {name} = " in text or f"[[{name}]]" in text, name


def test_help_lists_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        relay.cli.main(["run", "--help"])
    assert "max_flows" in capsys.readouterr().out.replace("\n", " ")


recorder = Recorder()  # an analyzer object, not a class


def test_analyzer_options_are_picklable_and_only_for_classes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        BASE
        + """workers = 1
[[analyzer]]
path = "test_configfile:recorder"
[analyzer.options]
size = 3
""",
    )
    opts = run(monkeypatch, ["--config", path])
    assert pickle.loads(pickle.dumps(opts)).analyzers == (
        ("test_configfile:recorder", {"size": 3}),
    )
    with pytest.raises(ConfigError, match="is not a class, so it takes no options"):
        load_analyzers(opts)
