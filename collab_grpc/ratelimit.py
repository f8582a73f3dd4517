"""Per-agent rate limit: a token bucket per agent, refilled continuously."""

from __future__ import annotations

from dataclasses import dataclass

from collab_grpc.errors import RateLimited

__all__ = ["RateLimiter"]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Allows ``rate`` records per second per key, in bursts of up to ``burst``.

    ``rate`` of 0 (or less) turns the limit off.
    """

    # Full buckets are forgotten once this many keys are tracked, so idle agents cost nothing.
    _PRUNE_AT = 10_000

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key: str, now: float) -> None:
        """Take one token for ``key`` or raise RateLimited with the wait until one is free."""
        if not self.enabled:
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._PRUNE_AT:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens < 1.0:
            retry_after = (1.0 - bucket.tokens) / self.rate
            raise RateLimited(
                f"agent {key!r} is over its rate limit of {self.rate:g} records per second; "
                f"retry after {retry_after:.2f} s",
                retry_after,
            )
        bucket.tokens -= 1.0

    def _prune(self, now: float) -> None:
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.updated) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
