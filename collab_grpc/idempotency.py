"""Idempotency keys: a retried write returns its first answer and records nothing new.

Answers are stored as opaque bytes (the edge decides the encoding), keyed by the
method and the caller's key, together with a fingerprint of the request so that a key
reused for a different request is refused rather than silently answered.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from collab_grpc.errors import FailedPrecondition

__all__ = ["IdempotencyCache"]


@dataclass(slots=True)
class _Entry:
    fingerprint: bytes
    answer: bytes
    stored_at: float


class IdempotencyCache:
    """Remembers the newest ``capacity`` answers for ``ttl`` seconds."""

    def __init__(self, capacity: int = 100_000, ttl: float = 24 * 3600.0) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        # A store that keeps answers across restarts: called with each stored entry.
        self.sink: Callable[[str, str, bytes, bytes, float], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, method: str, key: str, fingerprint: bytes, now: float) -> bytes | None:
        """The first answer for this key, or None when the write must run."""
        entry = self._entries.get((method, key))
        if entry is None:
            return None
        if now - entry.stored_at > self.ttl:
            del self._entries[(method, key)]
            return None
        if entry.fingerprint != fingerprint:
            raise FailedPrecondition(f"idempotency key {key!r} was already used for a different {method} request")
        return entry.answer

    def store(self, method: str, key: str, fingerprint: bytes, answer: bytes, now: float) -> None:
        self.remember(method, key, fingerprint, answer, now)
        if self.sink is not None:
            self.sink(method, key, fingerprint, answer, now)

    def clear(self) -> None:
        self._entries.clear()

    def remember(self, method: str, key: str, fingerprint: bytes, answer: bytes, stored_at: float) -> None:
        """Hold an answer in memory only (as a store restores them)."""
        self._entries[(method, key)] = _Entry(fingerprint, answer, stored_at)
        self._entries.move_to_end((method, key))
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
