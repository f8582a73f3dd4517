"""RateLimiter: a token bucket per key, driven with explicit times."""

from __future__ import annotations

import pytest

from collab_grpc.errors import RateLimited
from collab_grpc.ratelimit import RateLimiter


def drain(limiter: RateLimiter, key: str, now: float) -> int:
    """Acquire until refused; how many were allowed."""
    allowed = 0
    while True:
        try:
            limiter.acquire(key, now)
        except RateLimited:
            return allowed
        allowed += 1
        assert allowed < 10_000, "the limiter never refused"


@pytest.mark.parametrize("rate", [0, 0.0, -1.0])
def test_disabled(rate: float) -> None:
    limiter = RateLimiter(rate)
    assert not limiter.enabled
    for _ in range(1000):
        limiter.acquire("agent_1", 0.0)


def test_default_burst() -> None:
    assert RateLimiter(10).burst == 10
    assert RateLimiter(0.5).burst == 1.0
    assert RateLimiter(10, burst=3).burst == 3
    assert RateLimiter(10).enabled


def test_burst_then_refused_with_retry_after() -> None:
    limiter = RateLimiter(10)
    assert drain(limiter, "agent_1", 100.0) == 10
    with pytest.raises(RateLimited) as info:
        limiter.acquire("agent_1", 100.0)
    assert info.value.retry_after == pytest.approx(0.1)
    assert "agent_1" in str(info.value)
    assert "10 records per second" in str(info.value)


def test_refill_over_time() -> None:
    limiter = RateLimiter(2)  # burst 2
    assert drain(limiter, "a", 0.0) == 2
    with pytest.raises(RateLimited) as info:
        limiter.acquire("a", 0.25)  # half a token back
    assert info.value.retry_after == pytest.approx(0.25)
    limiter.acquire("a", 0.5)  # a whole token after 1 / rate seconds
    with pytest.raises(RateLimited):
        limiter.acquire("a", 0.5)
    assert drain(limiter, "a", 1.5) == 2


def test_refill_is_capped_at_burst() -> None:
    limiter = RateLimiter(1, burst=3)
    assert drain(limiter, "a", 0.0) == 3
    assert drain(limiter, "a", 3600.0) == 3


def test_refused_acquire_takes_nothing() -> None:
    limiter = RateLimiter(1)
    limiter.acquire("a", 0.0)
    for _ in range(5):
        with pytest.raises(RateLimited) as info:
            limiter.acquire("a", 0.5)
        assert info.value.retry_after == pytest.approx(0.5)
    limiter.acquire("a", 1.0)


def test_keys_are_independent() -> None:
    limiter = RateLimiter(1)
    limiter.acquire("a", 0.0)
    limiter.acquire("b", 0.0)
    with pytest.raises(RateLimited):
        limiter.acquire("a", 0.0)
    with pytest.raises(RateLimited):
        limiter.acquire("b", 0.0)
    limiter.acquire("c", 0.0)


def test_fractional_rate() -> None:
    limiter = RateLimiter(0.1)
    limiter.acquire("a", 0.0)
    with pytest.raises(RateLimited) as info:
        limiter.acquire("a", 0.0)
    assert info.value.retry_after == pytest.approx(10.0)
    limiter.acquire("a", 10.0)


def test_prune_forgets_only_full_buckets() -> None:
    limiter = RateLimiter(1)
    for key in ("a", "b", "c"):
        limiter.acquire(key, 0.0)  # each bucket now empty
    limiter.acquire("d", 0.0)  # none full, none dropped
    assert len(limiter._buckets) == 4
    with pytest.raises(RateLimited):
        limiter.acquire("a", 0.0)  # still remembered as spent
    limiter.acquire("e", 5.0)  # every bucket has refilled: all dropped before adding e
    assert set(limiter._buckets) == {"e"}
    limiter.acquire("a", 5.0)
