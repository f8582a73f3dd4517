"""tests/contract/ must be an exact copy of the binding contract in ../shared/contract/."""

from __future__ import annotations

import pytest

from tests.support.contract import CONTRACT_DIR, SHARED_CONTRACT_DIR


def test_the_contract_copy_matches_shared() -> None:
    if not SHARED_CONTRACT_DIR.is_dir():
        pytest.skip(f"{SHARED_CONTRACT_DIR} is not beside this checkout (CI places it there)")
    shared = {path.name: path.read_bytes() for path in SHARED_CONTRACT_DIR.iterdir()}
    copied = {path.name: path.read_bytes() for path in CONTRACT_DIR.iterdir()}
    assert copied == shared, "tests/contract/ differs from ../shared/contract/: copy it again"
