"""bench/scaleout.py runs end to end on a tiny load: replicas on a private Redis answer,
and the failover run finds nothing lost and nothing recorded twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.scaleout import PrivateRedis, failover_table, run_failover, run_throughput, throughput_table
from tests.support.services import require_redis

pytestmark = pytest.mark.integration


def test_small_run(tmp_path: Path) -> None:
    require_redis()  # the machine has Redis, so redis-server is installed
    private = PrivateRedis(tmp_path / "redis")
    try:
        throughput = run_throughput(tmp_path, private, writers=4, seconds=1.0, targets=("sqlite", "2"))
        failover = run_failover(tmp_path, private, writers=4, seconds=3.0)
    finally:
        private.stop()
    assert [r.target for r in throughput] == ["sqlite server", "2 on redis"]
    assert all(r.acks > 0 and r.errors == 0 for r in throughput)
    assert all(n > 0 for n in throughput[1].per_replica)  # both replicas took writes
    assert failover.acks > 0 and failover.lost == [] and failover.twice == []
    assert "2 on redis" in throughput_table(throughput) and "keys recorded twice" in failover_table(failover)
