"""bench/otlp.py runs end to end on a small load (every path's spans all taken)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.otlp import run_otlp, table

pytestmark = pytest.mark.integration


def test_small_run(tmp_path: Path) -> None:
    results = run_otlp(tmp_path, spans=60, batch=25, rounds=1)
    assert [r.path for r in results] == ["native bulk (100 a message)", "OTLP/gRPC", "OTLP/HTTP protobuf"]
    assert all(r.rate > 0 for r in results)
    assert "OTLP/gRPC" in table(results)
