"""The configuration tables of docs/OPERATIONS.md, made from the processes' own option
lists, so `--help` and the docs cannot drift (tests/test_config_docs.py checks them).

    python scripts/config_docs.py          # print both tables
    python scripts/config_docs.py --write  # rewrite them in docs/OPERATIONS.md
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from bridge import config as bridge_config
from collab_grpc import config as server_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md"
TABLES: dict[str, tuple[Any, Any]] = {
    "server": (server_config.ServerConfig(), server_config._OPTIONS),
    "bridge": (bridge_config.BridgeConfig(), bridge_config._OPTIONS),
}


def _shown(value: object) -> str:
    if value is None or value == "" or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def table(name: str) -> str:
    """The markdown table of one process's options: variable, flag, default, what it sets."""
    defaults, options = TABLES[name]
    default_of = {field.name: getattr(defaults, field.name) for field in fields(defaults)}
    lines = ["| variable | flag | default | what it sets |", "|---|---|---|---|"]
    for flag, variable, dest, _parse, text in options:
        help_text = text.replace("|", "\\|")
        lines.append(f"| `{variable}` | `{flag}` | `{_shown(default_of[dest])}` | {help_text} |")
    return "\n".join(lines)


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- config:{name} -->\n)(?:.*?\n)?(<!-- /config:{name} -->)", re.S)


def render(document: str) -> str:
    """``document`` with each generated table replaced by what the code says now."""
    for name in TABLES:
        generated = table(name)

        def replace(match: re.Match[str], generated: str = generated) -> str:
            return match[1] + generated + "\n" + match[2]

        document, found = _block(name).subn(replace, document)
        if found != 1:
            raise SystemExit(f"{DOC}: no <!-- config:{name} --> ... <!-- /config:{name} --> block")
    return document


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite the tables in {DOC}")
    args = parser.parse_args(argv)
    if args.write:
        DOC.write_text(render(DOC.read_text()))
        return
    for name in TABLES:
        sys.stdout.write(f"{name}:\n\n{table(name)}\n\n")


if __name__ == "__main__":
    main()
