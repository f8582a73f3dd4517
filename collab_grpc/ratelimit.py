"""Per-agent rate limit: a token bucket per agent, refilled continuously."""

from __future__ import annotations

from collections import OrderedDict
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

    Only keys used within the last ``burst / rate`` seconds are remembered: a bucket left
    alone that long is full again, the same as a new one, so it is forgotten. Buckets are
    kept least recently used first and forgotten from the front as each call comes, so
    the memory is bounded by the keys recently active, not by every key ever seen, and no
    call scans them all.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    @property
    def tracked(self) -> int:
        """How many keys are remembered."""
        return len(self._buckets)

    def acquire(self, key: str, now: float) -> None:
        """Take one token for ``key`` or raise RateLimited with the wait until one is free."""
        if not self.enabled:
            return
        self._forget_full(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            self._buckets.move_to_end(key)
        if bucket.tokens < 1.0:
            retry_after = (1.0 - bucket.tokens) / self.rate
            raise RateLimited(
                f"agent {key!r} is over its rate limit of {self.rate:g} records per second; "
                f"retry after {retry_after:.2f} s",
                retry_after,
            )
        bucket.tokens -= 1.0

    def _forget_full(self, now: float) -> None:
        """Forget the least recently used buckets that have refilled (amortised O(1):
        each bucket is forgotten once)."""
        buckets = self._buckets
        while buckets:
            oldest = buckets[next(iter(buckets))]
            if oldest.tokens + (now - oldest.updated) * self.rate < self.burst:
                return
            buckets.popitem(last=False)
