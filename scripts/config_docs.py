"""The configuration tables of docs/OPERATIONS.md, made from the declarations `--help` is
made from (ServerConfig, BridgeConfig), so the two cannot drift (tests/test_config_docs.py).

    python scripts/config_docs.py          # print both tables
    python scripts/config_docs.py --write  # rewrite them in docs/OPERATIONS.md
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from bridge.config import BridgeConfig
from collab_grpc.config import ServerConfig
from collab_grpc.options import options_of

DOC = Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md"
TABLES = {"server": ServerConfig, "bridge": BridgeConfig}


def table(name: str) -> str:
    """The markdown table of one process's options: variable, flag, default, what it accepts, what it sets."""
    lines = ["| variable | flag | default | accepts | what it sets |", "|---|---|---|---|---|"]
    for each in options_of(TABLES[name]):
        help_text = each.help.replace("|", "\\|")
        row = f"| `{each.variable}` | `{each.flag}` | `{each.default_text}` | {each.accepts} | {help_text} |"
        lines.append(row)
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
