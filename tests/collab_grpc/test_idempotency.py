"""IdempotencyCache: first answers per (method, key), guarded by the request fingerprint."""

from __future__ import annotations

import pytest

from collab_grpc.errors import FailedPrecondition
from collab_grpc.idempotency import IdempotencyCache

METHOD = "RecordActivity"


def test_lookup_miss() -> None:
    cache = IdempotencyCache()
    assert cache.lookup(METHOD, "k1", b"fp", 0.0) is None
    assert len(cache) == 0


def test_store_then_lookup() -> None:
    cache = IdempotencyCache()
    cache.store(METHOD, "k1", b"fp", b"answer", 0.0)
    assert len(cache) == 1
    assert cache.lookup(METHOD, "k1", b"fp", 1.0) == b"answer"
    assert cache.lookup(METHOD, "k1", b"fp", 2.0) == b"answer"  # a lookup does not consume it
    assert cache.lookup(METHOD, "k2", b"fp", 1.0) is None


def test_keys_are_per_method() -> None:
    cache = IdempotencyCache()
    cache.store(METHOD, "k1", b"fp-a", b"a", 0.0)
    assert cache.lookup("RecordDecision", "k1", b"fp-b", 0.0) is None
    cache.store("RecordDecision", "k1", b"fp-b", b"b", 0.0)
    assert cache.lookup(METHOD, "k1", b"fp-a", 0.0) == b"a"
    assert cache.lookup("RecordDecision", "k1", b"fp-b", 0.0) == b"b"
    assert len(cache) == 2


def test_same_key_different_request() -> None:
    cache = IdempotencyCache()
    cache.store(METHOD, "k1", b"fp-a", b"a", 0.0)
    with pytest.raises(
        FailedPrecondition, match=r"idempotency key 'k1' was already used for a different RecordActivity"
    ):
        cache.lookup(METHOD, "k1", b"fp-b", 1.0)
    assert cache.lookup(METHOD, "k1", b"fp-a", 1.0) == b"a"  # the refusal changed nothing


def test_ttl_expiry() -> None:
    cache = IdempotencyCache(ttl=60.0)
    cache.store(METHOD, "k1", b"fp", b"a", 100.0)
    assert cache.lookup(METHOD, "k1", b"fp", 160.0) == b"a"  # exactly ttl old: still kept
    assert cache.lookup(METHOD, "k1", b"fp", 160.5) is None
    assert len(cache) == 0  # an expired entry is dropped when found


def test_expired_key_may_be_reused_for_another_request() -> None:
    cache = IdempotencyCache(ttl=10.0)
    cache.store(METHOD, "k1", b"fp-a", b"a", 0.0)
    assert cache.lookup(METHOD, "k1", b"fp-b", 11.0) is None
    cache.store(METHOD, "k1", b"fp-b", b"b", 11.0)
    assert cache.lookup(METHOD, "k1", b"fp-b", 12.0) == b"b"


def test_capacity_evicts_oldest() -> None:
    cache = IdempotencyCache(capacity=2)
    for index, key in enumerate(("k1", "k2", "k3")):
        cache.store(METHOD, key, b"fp", key.encode(), float(index))
    assert len(cache) == 2
    assert cache.lookup(METHOD, "k1", b"fp", 5.0) is None
    assert cache.lookup(METHOD, "k2", b"fp", 5.0) == b"k2"
    assert cache.lookup(METHOD, "k3", b"fp", 5.0) == b"k3"


def test_storing_again_refreshes_position_and_answer() -> None:
    cache = IdempotencyCache(capacity=2, ttl=10.0)
    cache.store(METHOD, "k1", b"fp", b"old", 0.0)
    cache.store(METHOD, "k2", b"fp", b"k2", 1.0)
    cache.store(METHOD, "k1", b"fp2", b"new", 8.0)
    cache.store(METHOD, "k3", b"fp", b"k3", 9.0)
    assert cache.lookup(METHOD, "k2", b"fp", 9.0) is None  # k2 became the oldest and was evicted
    assert cache.lookup(METHOD, "k1", b"fp2", 15.0) == b"new"  # and its ttl counts from the new store


def test_bytes_bound_evicts_oldest_and_keeps_the_newest() -> None:
    cache = IdempotencyCache(capacity=100, max_bytes=250)
    for index in range(5):
        cache.store(METHOD, f"k{index}", b"f" * 32, b"a" * 68, float(index))  # 100 bytes each
    assert len(cache) == 2 and cache.size_bytes == 200
    assert cache.lookup(METHOD, "k2", b"f" * 32, 5.0) is None
    assert cache.lookup(METHOD, "k4", b"f" * 32, 5.0) == b"a" * 68
    # One answer larger than the bound is still kept (alone): the newest write is honoured.
    cache.store(METHOD, "big", b"f" * 32, b"b" * 1000, 6.0)
    assert len(cache) == 1 and cache.lookup(METHOD, "big", b"f" * 32, 6.0) == b"b" * 1000


def test_size_accounts_for_replaced_expired_and_cleared_entries() -> None:
    cache = IdempotencyCache(ttl=10.0)
    cache.store(METHOD, "k1", b"fp", b"old", 0.0)
    cache.store(METHOD, "k1", b"fp", b"newer", 1.0)
    assert cache.size_bytes == len(b"fp") + len(b"newer")
    cache.store(METHOD, "k2", b"fp", b"x", 2.0)
    assert cache.lookup(METHOD, "k1", b"fp", 20.0) is None  # expired and dropped
    assert cache.size_bytes == len(b"fp") + len(b"x")
    cache.clear()
    assert cache.size_bytes == 0 and len(cache) == 0


def test_answers_past_the_ttl_leave_memory_when_newer_ones_are_stored() -> None:
    cache = IdempotencyCache(ttl=10.0)
    cache.store("Record", "old", b"f", b"answer-old", now=100.0)
    cache.store("Record", "kept", b"f", b"answer-kept", now=105.0)
    cache.store("Record", "new", b"f", b"answer-new", now=111.0)  # "old" is now 11 s old
    assert len(cache) == 2 and cache.size_bytes == len(b"f" + b"answer-kept") + len(b"f" + b"answer-new")
    assert cache.lookup("Record", "kept", b"f", now=111.0) == b"answer-kept"
