"""``tunrelay run --config FILE``: the options of ``tunrelay run`` in a TOML file.

The keys are derived from the ``run`` argument parser, so every option has one:
the long option name with ``_`` for ``-`` where the option has its own
destination (``client_net``, ``max_flows``; ``--no-fail-closed-routing`` stores
into ``fail_closed_routing``, so that is its key, a boolean), the option name
where several share one (``allow`` and ``deny``). Repeatable options take an
array, the others a scalar of the option's type, booleans ``true``/``false``.
``[[analyzer]]`` tables give ``path = "module:Class"`` and an optional
``[analyzer.options]`` table of keyword arguments for the class.

Errors name the file, the line of the key (tomllib reports no positions, so the
text is scanned for it) and the key: ``FILE:LINE: key: why``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from relay.service.run import ConfigError

# Options a file may give in another TOML type as well (--fwmark 0x1: an integer).
EXTRA_TYPES: dict[str, tuple[type, ...]] = {"fwmark": (int,)}
ANALYZER_KEYS = ("path", "options")


@dataclass(frozen=True, slots=True)
class Key:
    """One config file key and the argparse action it stands for."""

    name: str
    action: argparse.Action

    @property
    def dest(self) -> str:
        return self.action.dest

    @property
    def option(self) -> str:
        if isinstance(self.action, argparse.BooleanOptionalAction):
            return self.action.option_strings[0]  # --offload, not --no-offload
        return max(self.action.option_strings, key=len)

    @property
    def repeatable(self) -> bool:
        return isinstance(self.action, argparse._AppendAction)

    @property
    def flag(self) -> bool:
        if isinstance(self.action, argparse.BooleanOptionalAction):
            return True  # --offload/--no-offload: offload = true|false
        return self.action.nargs == 0 and isinstance(self.action.const, bool)


def keys_of(parser: argparse.ArgumentParser) -> dict[str, Key]:
    """The config file keys of ``parser``'s options (all but --help and --config)."""
    actions = [
        a
        for a in parser._actions
        if a.option_strings and a.dest not in ("help", "config") and a.help != argparse.SUPPRESS
    ]
    shared = {a.dest for a in actions if sum(b.dest == a.dest for b in actions) > 1}
    keys: dict[str, Key] = {}
    for action in actions:
        name = action.dest
        if action.dest in shared:
            name = max(action.option_strings, key=len).lstrip("-").replace("-", "_")
        keys[name] = Key(name, action)
    return keys


@dataclass(slots=True)
class ConfigFile:
    """A read config file: argparse destinations and their values, and where each is."""

    path: str
    values: dict[str, object] = field(default_factory=dict)
    # dest -> the key that set it (the first of allow/deny for egress_rules)
    key_of: dict[str, str] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)  # key -> line
    keys: set[str] = field(default_factory=set)  # the keys the file gives
    # "FILE:LINE: analyzer" of each analyzer spec ([[analyzer]] tables: the table's)
    analyzer_where: dict[str, str] = field(default_factory=dict)

    def where(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.path}:{line}: {key}" if line else f"{self.path}: {key}"


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return str(value)


def _close_match(name: str, choices: Sequence[str]) -> list[str]:
    """The nearest of ``choices`` to a mistyped key (difflib: loaded on a mistake)."""
    import difflib

    return difflib.get_close_matches(name, choices, n=1)


def _key_lines(text: str, names: Iterable[str]) -> dict[str, int]:
    """The line of each top-level key (before the first table header) and of the
    first ``[[analyzer]]`` or ``[name]`` table."""
    lines: dict[str, int] = {}
    top = True
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[\[?\s*([A-Za-z0-9_\-\"']+)", line)
        if header:
            top = False
            lines.setdefault(header.group(1).strip("\"'"), number)
            continue
        if top:
            match = re.match(r"""\s*["']?([A-Za-z0-9_\-]+)["']?\s*[=.]""", line)
            if match:
                lines.setdefault(match.group(1), number)
    return {name: lines[name] for name in names if name in lines} | lines


def _analyzer_lines(text: str) -> list[int]:
    return [
        n
        for n, line in enumerate(text.splitlines(), 1)
        if re.match(r"\s*\[\[\s*analyzer\s*\]\]", line)
    ]


def _scalar(key: Key, value: object, where: str) -> object:
    """``value`` (a TOML scalar) as the option's type, or ConfigError."""
    kind = key.action.type
    extra = EXTRA_TYPES.get(key.name, ())
    if isinstance(value, extra) and not isinstance(value, bool):
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
    elif kind is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}")
        value = float(value)
    elif not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {_show(value)}")
    else:
        if key.action.choices is not None and value not in key.action.choices:
            choices = ", ".join(map(str, key.action.choices))
            raise ConfigError(f"{where}: {_show(value)} is not one of {choices}")
        if callable(kind):
            value = kind(value)
    return value


def _analyzer(item: object, where: str) -> str | tuple[str, dict[str, object]]:
    if isinstance(item, str):
        return item
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a string or a table, got {_show(item)}")
    for name in item:
        if name not in ANALYZER_KEYS:
            close = _close_match(name, ANALYZER_KEYS)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {name!r} in [[analyzer]]{hint}")
    path = item.get("path")
    if not isinstance(path, str):
        raise ConfigError(f"{where}: path: expected a string \"module:Class\", got "
                          f"{'nothing' if path is None else _show(path)}")  # fmt: skip
    options = item.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: options: expected a table, got {_show(options)}")
    return (path, options) if options else path


def read_config(path: str, keys: Mapping[str, Key]) -> ConfigFile:
    """Read and check the TOML file ``path`` against ``keys``.

    Raises:
        ConfigError: ``FILE:LINE: key: why`` (or ``FILE: why``).
    """
    import tomllib  # here: a supervisor started without --config does without it

    try:
        with open(path, "rb") as file:
            raw = file.read()
        text = raw.decode()
        data = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8: {exc.reason}") from None
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        why = str(exc)[: match.start()].strip() if match else str(exc)
        where = f"{path}:{match.group(1)}:{match.group(2)}" if match else path
        raise ConfigError(f"{where}: {why}") from None
    config = ConfigFile(path, lines=_key_lines(text, data))
    analyzer_tables = _analyzer_lines(text)
    for name, value in data.items():
        key = keys.get(name)
        where = config.where(name)
        if key is None:
            close = _close_match(name, list(keys))
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key{hint}")
        if key.flag:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
            converted: object = value
        elif key.repeatable:
            if not isinstance(value, list):
                what = "an array of tables" if key.name == "analyzer" else "an array"
                raise ConfigError(f"{where}: expected {what}, got {_show(value)}")
            items: list[object] = []
            for index, item in enumerate(value):
                if key.name == "analyzer":
                    if index < len(analyzer_tables) and name not in config.lines:
                        config.lines[name] = analyzer_tables[index]
                    at = _analyzer_where(config, analyzer_tables, index)
                    spec = _analyzer(item, at)
                    config.analyzer_where.setdefault(spec if isinstance(spec, str) else spec[0], at)
                    items.append(spec)
                else:
                    items.append(_scalar(key, item, where))
            if key.dest in config.values:  # allow and deny: one list, in file order
                previous = config.values[key.dest]
                assert isinstance(previous, list)
                items = previous + items
            converted = items
        else:
            converted = _scalar(key, value, where)
        config.values[key.dest] = converted
        config.key_of.setdefault(key.dest, name)
        config.keys.add(name)
    return config


def _analyzer_where(config: ConfigFile, tables: Sequence[int], index: int) -> str:
    if "analyzer" in config.lines and (not tables or config.lines["analyzer"] not in tables):
        return config.where("analyzer")  # analyzer = [...]
    line = tables[index] if index < len(tables) else None
    return f"{config.path}:{line}: analyzer" if line else f"{config.path}: analyzer"


def given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the options actually on the command line ``argv``
    (``parser`` is changed: every default suppressed)."""
    for action in _all_actions(parser):
        action.default = argparse.SUPPRESS
        action.required = False if action.option_strings else action.required
    return set(vars(parser.parse_args(argv)))


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    actions = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                actions += _all_actions(sub)
        elif action.dest != "help":
            actions.append(action)
    return actions


def merge(args: argparse.Namespace, config: ConfigFile, on_command_line: set[str]) -> None:
    """Set into ``args`` what ``config`` gives and the command line does not."""
    for dest, value in config.values.items():
        if dest not in on_command_line:
            setattr(args, dest, value)


def overridden(
    config: ConfigFile, keys: Mapping[str, Key], args: argparse.Namespace, on_command_line: set[str]
) -> list[str]:
    """``FILE:LINE: key: overridden by --option on the command line`` for each key
    ``config`` gives a value other than the command line's, which wins (``merge``):
    a reload says so, since an edit of such a key changes nothing."""
    out = []
    options = {key.dest: key.option for key in keys.values()}
    for dest, value in config.values.items():
        if dest in on_command_line and getattr(args, dest, value) != value:
            where = config.where(config.key_of[dest])
            out.append(f"{where}: overridden by {options[dest]} on the command line")
    return out


def blame(
    exc: ConfigError, keys: Mapping[str, Key], config: ConfigFile, on_command_line: set[str]
) -> ConfigError:
    """``exc`` (``--option: why``, from ``validate``) as ``FILE:LINE: key: why`` if the
    option's value came from ``config`` (not overridden on the command line ``argv``);
    else ``exc`` itself."""
    option, sep, why = str(exc).partition(": ")
    if not sep:
        return exc
    for key in keys.values():
        if (
            option in key.action.option_strings
            and key.dest in config.values
            and key.dest not in on_command_line
        ):
            # the key the message names (allow or deny, which share a destination)
            name = key.name if key.name in config.lines else config.key_of[key.dest]
            for spec, where in config.analyzer_where.items():
                if key.name == "analyzer" and repr(spec) in why:
                    return ConfigError(f"{where}: {why}")
            return ConfigError(f"{config.where(name)}: {why}")
    return exc
