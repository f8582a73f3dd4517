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


def test_the_paced_run_compares_each_hub_with_the_raw_peer_and_its_control() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.durable_tail",
            *("--clients", "20", "--seconds", "1", "--rates", "20", "--workers", "2", "--sync-normal", "--control"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = r"^\| 1 \| 20 \| ([^|]+) \| ([0-9,]+) of ([0-9,]+) \| ([0-9.]+) \| ([0-9.]+) \|"
    rows = re.findall(row, result.stdout, re.MULTILINE)
    assert [name.strip() for name, *_ in rows] == [
        "collab hub (sqlite)",
        "collab hub (sqlite), 2 bridge workers",
        "collab hub (sqlite, synchronous normal)",
        "collab hub",
        "websockets.broadcast (limit)",
        "websockets.broadcast, the hub beside it",
    ], result.stdout
    for _, delivered, offered, p50, p99 in rows:
        assert delivered == offered == "400", result.stdout
        assert 0 < float(p50) <= float(p99), result.stdout
    # Each other row's p99 against the control's, in a table of its own.
    ratios = re.findall(r"^\| 1 \| 20 \| ([^|]+) \| [0-9.]+ \| ([0-9.]+)x \|$", result.stdout, re.MULTILINE)
    assert [name.strip() for name, _ in ratios] == [name.strip() for name, *_ in rows[:-1]], result.stdout
    assert all(float(ratio) > 0 for _, ratio in ratios), result.stdout
    # Across the rounds (one here): the median ratio to the raw peer, its range, the rounds within the bound.
    summary = re.findall(
        r"^\| 20 \| ([^|]+) \| 1 \| ([0-9.]+)x \| ([0-9.]+)-([0-9.]+)x \| ([01]) of 1 \|$", result.stdout, re.MULTILINE
    )
    assert [name.strip() for name, *_ in summary] == [name.strip() for name, *_ in rows if "limit" not in name]
    for _, median, low, high, within in summary:
        assert float(median) == float(low) == float(high) > 0, result.stdout
        if abs(float(median) - 1.5) > 0.01:  # the median as printed, rounded
            assert within == ("1" if float(median) < 1.5 else "0"), result.stdout
