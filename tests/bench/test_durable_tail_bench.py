"""`python -m bench.durable_tail --direct`: the server's path beside the gRPC floor, each
row a measured latency for every event sent."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_the_direct_run_measures_each_server_and_the_grpc_floor() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.durable_tail", "--direct", "--seconds", "1", "--rates", "20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^\| 1 \| 20 \| ([a-z ]+) \| ([0-9.]+) \| ([0-9.]+) \|$", result.stdout, re.MULTILINE)
    assert [name for name, _, _ in rows] == ["sqlite", "memory", "grpc floor"], result.stdout
    assert all(0 < float(p50) <= float(p99) for _, p50, p99 in rows), result.stdout
