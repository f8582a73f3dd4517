"""The configuration tables in docs/OPERATIONS.md are the processes' own option lists."""

from __future__ import annotations

from scripts.config_docs import DOC, render


def test_the_configuration_tables_match_the_options() -> None:
    document = DOC.read_text()
    assert render(document) == document, "run: python scripts/config_docs.py --write"
