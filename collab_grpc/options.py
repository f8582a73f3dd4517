"""Settings declared once, as fields of a frozen dataclass, read from flags and COLLAB_* variables.

A field declared with :func:`option` is a command-line flag and an environment variable named
after it (``history_limit``: ``--history-limit`` and ``COLLAB_HISTORY_LIMIT``); a flag wins
over the variable, the variable over the default, and an empty value means the default.
The field's type says how its text is read, the declaration says the bounds. :func:`parse`
builds the ``--help`` of collab-server and collab-bridge from these declarations and
scripts/config_docs.py the tables of docs/OPERATIONS.md, so the two cannot drift.

This module imports nothing of the server: the bridge uses it on its own.
"""

from __future__ import annotations

import argparse
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "ENV_PREFIX",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "Option",
    "Rules",
    "build_parser",
    "comma_list",
    "names",
    "on_off",
    "option",
    "options_of",
    "parse",
    "require_together",
    "shown",
]

ENV_PREFIX = "COLLAB_"
# The choices of --log-level and --log-format, the same for both processes.
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
_METADATA_KEY = "collab.option"

Config = TypeVar("Config", bound="DataclassInstance")


def on_off(text: str) -> bool:
    """``on``/``true``/``1`` or ``off``/``false``/``0``, in any case."""
    if text.lower() not in {"on", "off", "true", "false", "1", "0"}:
        raise ValueError("expected on or off")
    return text.lower() in {"on", "true", "1"}


def comma_list(text: str) -> tuple[str, ...]:
    """The comma-separated parts of ``text``, stripped, empty ones dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


# How a field's text is read when its declaration names no parser: by the field's type.
_PARSER_OF_TYPE: dict[object, Callable[[str], object]] = {
    str: str,
    int: int,
    float: float,
    Path: Path,
    bool: on_off,
    tuple[str, ...]: comma_list,
}


def shown(value: object) -> str:
    """A value as --help and the docs show it: none, on/off, a, b -> a,b, 3600.0 -> 3600."""
    if value is None or value == "" or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Rules:
    """What a declaration says besides the default: help, parser, bounds, choices (see option())."""

    help: str
    parse: Callable[[str], object] | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple[str, ...] | None = None
    shown_default: str | None = None
    variable: str | None = None

    @property
    def accepts(self) -> str:
        """What a value must be, in words (``at least 1 and at most 1000``, ``one of a, b``); or empty."""
        if self.choices is not None:
            return f"one of {', '.join(self.choices)}"
        bounds = (("at least", self.minimum), ("more than", self.above), ("at most", self.maximum))
        return " and ".join(f"{relation} {shown(bound)}" for relation, bound in bounds if bound is not None)

    def check(self, value: object) -> None:
        """ValueError when a number is not finite or out of bounds, or a text not one of the choices."""
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"expected {self.accepts}")
        if not isinstance(value, int | float) or isinstance(value, bool):
            return
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        if (
            (self.minimum is not None and value < self.minimum)
            or (self.above is not None and value <= self.above)
            or (self.maximum is not None and value > self.maximum)
        ):
            raise ValueError(f"must be {self.accepts}")


def option(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], object] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    shown_default: str | None = None,
    variable: str | None = None,
) -> Any:
    """A dataclass field that is also a flag and a COLLAB_* variable.

    ``parse`` reads the text (default: by the field's type, see ``_PARSER_OF_TYPE``); a number
    must be finite, at least ``minimum``, more than ``above`` and at most ``maximum``; a text
    with ``choices`` is one of them in any case (kept in lower case); --help and the docs say
    so. ``secret`` keeps the value out of the dataclass's
    repr and out of error messages. ``shown_default`` is what --help and the docs say when the
    default itself says nothing (None standing for a value). ``variable`` names the
    environment variable when COLLAB_ + the field's name would not say whose it is.
    """
    rules = Rules(help, parse, minimum, maximum, above, choices, shown_default, variable)
    return field(default=default, repr=not secret, metadata={_METADATA_KEY: rules})


@dataclass(frozen=True)
class Option:
    """One setting: its field, default, how its text is read, and the rules it was declared with."""

    name: str
    default: object
    read: Callable[[str], object]
    secret: bool
    rules: Rules

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def variable(self) -> str:
        return self.rules.variable or ENV_PREFIX + self.name.upper()

    @property
    def names(self) -> str:
        """``--flag / COLLAB_VARIABLE``, as error messages name a setting."""
        return f"{self.flag} / {self.variable}"

    @property
    def help(self) -> str:
        return self.rules.help

    @property
    def accepts(self) -> str:
        """What a value must be, in words; empty when any text of its type will do."""
        return "on or off" if self.read is on_off else self.rules.accepts

    @property
    def default_text(self) -> str:
        return self.rules.shown_default or shown(self.default)

    def convert(self, text: str) -> object:
        """The value of ``text``; ValueError saying why when it is not one."""
        value = self.read(text)
        if self.rules.choices is not None and isinstance(value, str):
            value = value.lower()
        self.rules.check(value)
        return value


def _parser_for(hint: object) -> Callable[[str], object] | None:
    if hint in _PARSER_OF_TYPE:
        return _PARSER_OF_TYPE[hint]
    if typing.get_origin(hint) in {typing.Union, types.UnionType}:
        others = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(others) == 1:
            return _parser_for(others[0])
    return None


def options_of(config_type: type[DataclassInstance]) -> tuple[Option, ...]:
    """The options declared on ``config_type``, in field order."""
    hints = typing.get_type_hints(config_type)
    found = []
    for declared in fields(config_type):
        rules = declared.metadata.get(_METADATA_KEY)
        if not isinstance(rules, Rules):
            continue
        read = rules.parse or _parser_for(hints[declared.name])
        if read is None:
            raise TypeError(f"{config_type.__name__}.{declared.name}: no parser for its type; give parse=")
        found.append(Option(declared.name, declared.default, read, secret=not declared.repr, rules=rules))
    return tuple(found)


def names(config_type: type[DataclassInstance], name: str) -> str:
    """``--flag / COLLAB_VARIABLE`` of the option in field ``name``."""
    return next(each.names for each in options_of(config_type) if each.name == name)


def require_together(config: DataclassInstance, *field_names: str) -> None:
    """ValueError unless the options in ``field_names`` are all set or all unset."""
    if len({getattr(config, name) is None for name in field_names}) > 1:
        listed = [names(type(config), name) for name in field_names]
        raise ValueError(f"{' and '.join(listed)} must be set together")


def build_parser(config_type: type[DataclassInstance], prog: str, description: str) -> argparse.ArgumentParser:
    """The argparse parser of ``config_type``: a flag per option; its help names the variable, default and bounds."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [--option VALUE ...]",
        description=description,
        epilog="Every flag can also be set with the environment variable shown; a flag wins over it.",
    )
    for each in options_of(config_type):
        text = f"{each.help} [{', '.join(filter(None, (each.variable, 'default ' + each.default_text, each.accepts)))}]"
        parser.add_argument(each.flag, dest=each.name, default=None, help=text.replace("%", "%%"))
    return parser


def parse(
    config_type: type[Config],
    argv: Sequence[str] | None,
    env: Mapping[str, str] | None,
    *,
    prog: str,
    description: str,
    check: Callable[[Config], None] | None = None,
) -> Config:
    """``config_type`` from flags (``argv``, else sys.argv), then ``env`` (else os.environ), then defaults.

    A value that is not one, or a ``check`` of the whole that fails (ValueError), ends the
    process as argparse does: usage, ``prog: error:`` naming the flag and variable, exit 2.
    """
    parser = build_parser(config_type, prog, description)
    flags = parser.parse_args(argv)
    environ = os.environ if env is None else env
    values: dict[str, object] = {}
    for each in options_of(config_type):
        text = getattr(flags, each.name)
        if text is None:
            text = environ.get(each.variable)
        if text is None or text == "":
            continue
        try:
            values[each.name] = each.convert(text)
        except ValueError as exc:
            if each.secret:  # the reason may quote the text too
                parser.error(f"{each.names}: invalid value (hidden): {str(exc).replace(text, '(hidden)')}")
            parser.error(f"{each.names}: invalid value {text!r}: {exc}")
    config = config_type(**values)
    if check is not None:
        try:
            check(config)
        except ValueError as exc:
            parser.error(str(exc))
    return config
