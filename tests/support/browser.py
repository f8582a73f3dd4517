"""Debian's Chromium for the browser tests: where it is, how it is started, and what a
test does without it (skip; fail where COLLAB_REQUIRE_BROWSER=1, as CI sets)."""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "require_chromium"]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# This machine has no network beyond package registries: keep Chromium from trying.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> str:
    """Chromium's path; skips the test without it, or fails it where it is required."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("COLLAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"Chromium is required (COLLAB_REQUIRE_BROWSER=1) but {CHROMIUM} is missing")
        pytest.skip(f"no Chromium at {CHROMIUM}")
    return CHROMIUM
