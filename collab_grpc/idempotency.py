"""Idempotency keys: a retried write returns its first answer and records nothing new.

Answers are stored as opaque bytes (the edge decides the encoding), keyed by the
method and the caller's key, together with a fingerprint of the request so that a key
reused for a different request is refused rather than silently answered.

Keys are scoped to the caller: the key held is ``"<scope> <key>"``, the scope being a
digest of who the credential belongs to (collab_grpc/auth.py, Grant), so that one
caller can neither replay another's key (and read its answer) nor claim it first.
Callers' keys are printable without white space, so the space tells a scoped key from
one stored unscoped before keys were scoped: such an answer is still given, to any
caller, until it expires (the TTL, a day by default), so a write retried across the
upgrade is not recorded twice; no new answer is ever stored unscoped. Stores keep the
held key as it is, so their schema does not change.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from collab_grpc.errors import FailedPrecondition

__all__ = ["IdempotencyCache", "scoped_key"]


def scoped_key(scope: str, key: str) -> str:
    """The key as held for the caller ``scope`` ("" with auth off: every caller is one)."""
    return f"{scope} {key}" if scope else key


@dataclass(slots=True)
class _Entry:
    fingerprint: bytes
    answer: bytes
    stored_at: float

    @property
    def size(self) -> int:
        return len(self.fingerprint) + len(self.answer)


class IdempotencyCache:
    """Remembers answers for ``ttl`` seconds: the newest ``capacity`` of them, holding at
    most ``max_bytes`` of answers and fingerprints (answers can carry 64 KiB of metadata,
    so a count alone would not bound the memory)."""

    def __init__(self, capacity: int = 100_000, ttl: float = 24 * 3600.0, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._bytes = 0
        # A store that keeps answers across restarts: called with each stored entry.
        self.sink: Callable[[str, str, bytes, bytes, float], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, method: str, key: str, fingerprint: bytes, now: float, scope: str = "") -> bytes | None:
        """The first answer for this caller's key, or None when the write must run."""
        held = scoped_key(scope, key)
        entry = self._entries.get((method, held))
        if entry is None and scope:
            held = key  # an answer stored before keys were scoped
            entry = self._entries.get((method, held))
        if entry is None:
            return None
        if now - entry.stored_at > self.ttl:
            del self._entries[(method, held)]
            self._bytes -= entry.size
            return None
        if entry.fingerprint != fingerprint:
            raise FailedPrecondition(f"idempotency key {key!r} was already used for a different {method} request")
        return entry.answer

    def store(self, method: str, key: str, fingerprint: bytes, answer: bytes, now: float, scope: str = "") -> None:
        held = scoped_key(scope, key)
        self.remember(method, held, fingerprint, answer, now)
        if self.sink is not None:
            self.sink(method, held, fingerprint, answer, now)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        """What the answers and fingerprints held take (their bytes, not Python's overhead)."""
        return self._bytes

    def remember(self, method: str, key: str, fingerprint: bytes, answer: bytes, stored_at: float) -> None:
        """Hold an answer in memory only (as a store restores them); ``key`` as held (scoped)."""
        replaced = self._entries.pop((method, key), None)
        if replaced is not None:
            self._bytes -= replaced.size
        entry = _Entry(fingerprint, answer, stored_at)
        self._entries[(method, key)] = entry
        self._bytes += entry.size
        while len(self._entries) > self.capacity or (self._bytes > self.max_bytes and len(self._entries) > 1):
            _, oldest = self._entries.popitem(last=False)
            self._bytes -= oldest.size
        # Held oldest first: those past the TTL go now, not only when looked up or pushed out.
        cutoff = stored_at - self.ttl
        while self._entries:
            oldest_key = next(iter(self._entries))
            oldest = self._entries[oldest_key]
            if oldest.stored_at >= cutoff:
                break
            del self._entries[oldest_key]
            self._bytes -= oldest.size
