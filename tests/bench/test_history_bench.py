"""bench/history.py runs end to end on a small store (every shape answers, both write runs)."""

from __future__ import annotations

from pathlib import Path

from bench.history import run_history, table


def test_small_run(tmp_path: Path) -> None:
    results = run_history(tmp_path, activities=600, runs=2, compare=1)
    search, *writes = results
    assert len(search.shapes) == 15 and all(len(shape.runs) == 2 for shape in search.shapes)
    by_name = {shape.shape: shape for shape in search.shapes}
    assert by_name["newest 50, no filter"].rows == 51
    assert by_name["metadata matching nothing (a call reads its scan budget)"].rows == 0
    assert [w.indexed for w in writes] == [True, False] and all(w.events_per_second > 0 for w in writes)
    assert "department + type" in table(results)
