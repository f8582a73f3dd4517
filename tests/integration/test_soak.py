"""The soak of bench/soak.py at CI size: 30 s, 500 WebSocket clients, 3 agents at the
default rate limit (10 records/s each, plus a completion per record: 60 events/s, 30,000
deliveries/s). `python -m bench.soak` runs it for 5 minutes (docs/RELIABILITY.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import run_soak

pytestmark = pytest.mark.integration

# RSS growth allowed from 25 % of the run to its end, for each process. Measured at this
# size: server +2.4 MB, bridge +0.2 MB. The server's is its idempotency answers: every SDK
# write carries a key, and each answer (~0.6 KB, tracemalloc) is kept 24 h, up to 100,000.
RSS_BOUND_MB = 10.0


@pytest.mark.timeout(240)
def test_thirty_seconds_at_the_rate_limit_with_500_clients(tmp_path: Path) -> None:
    result = run_soak(tmp_path, seconds=30, clients=500, agents=3, rate=10, retain=300)
    print("\n" + result.summary())
    assert result.opened == 500
    assert result.records > 0 and result.events == result.records + result.completions
    assert result.expected == result.received and result.out_of_order == 0, result.problems
    assert result.expected >= 500 * result.records, "every record (and its completion) reached every client"
    assert result.cut_off == 0
    assert result.failures(RSS_BOUND_MB) == []
