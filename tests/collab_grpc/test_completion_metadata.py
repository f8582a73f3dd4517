"""Metadata given at completion (CompleteActivity's `metadata`): merged into the activity,
carried by the completion's event, counted in the byte budgets, refused whole when the
merge would pass the limit, and kept by every store across a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collab_grpc import convert
from collab_grpc.errors import BudgetExhausted, FailedPrecondition, InvalidArgument
from collab_grpc.events import payload_size
from collab_grpc.model import Activity, ActivityCompletion, ActivityStatus, ActivityType, EventKind
from collab_grpc.state import CollaborationState, StateSettings
from collab_grpc.store import RedisStore, SQLiteStore
from collab_grpc.store.codec import decode_payload, encode
from collab_grpc.validation import Limits
from tests.support.services import redis_store_url

RECORDED = {"gen_ai.request.model": "gpt-test", "step": 1}
LATE = {"gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 34, "step": 2}
MERGED = {
    "gen_ai.request.model": "gpt-test",
    "step": 2,
    "gen_ai.usage.input_tokens": 1200,
    "gen_ai.usage.output_tokens": 34,
}


def recorded(state: CollaborationState, metadata: dict[str, Any] | None = None) -> Activity:
    return state.record_activity(
        agent_id="alice", activity_type=ActivityType.MESSAGE_SENT, metadata=RECORDED if metadata is None else metadata
    )


def completion(state: CollaborationState) -> ActivityCompletion:
    event = list(state.log.events_after(0))[-1]
    assert event.kind is EventKind.ACTIVITY_COMPLETED and isinstance(event.payload, ActivityCompletion)
    return event.payload


def test_the_keys_given_are_merged_and_replace_the_recorded_ones() -> None:
    state = CollaborationState()
    activity = recorded(state)
    done = state.complete_activity(activity.activity_id, metadata=LATE)
    assert done.metadata == MERGED
    assert done.status is ActivityStatus.COMPLETED
    stored = state.get_activity(activity.activity_id)
    assert stored is not None and stored.metadata == MERGED
    event = completion(state)
    assert event.activity.metadata == MERGED
    assert event.added_keys == list(LATE)  # only the names of what this completion added or replaced
    # The recorded event still holds the activity as it was recorded.
    first = next(iter(state.log.events_after(0)))
    assert isinstance(first.payload, Activity) and first.payload.metadata == RECORDED


def test_a_failure_may_carry_metadata_too() -> None:
    state = CollaborationState()
    activity = recorded(state)
    done = state.complete_activity(activity.activity_id, success=False, failure_reason="boom", metadata={"t": 1})
    assert (done.status, done.failure_reason, done.metadata) == (ActivityStatus.FAILED, "boom", {**RECORDED, "t": 1})


def test_no_metadata_changes_nothing_and_the_event_says_none_was_added() -> None:
    state = CollaborationState()
    activity = recorded(state)
    before = state.history_bytes
    done = state.complete_activity(activity.activity_id, metadata={})
    assert done.metadata == RECORDED and completion(state).added_keys == []
    assert state.history_bytes == before
    message = convert.event_to_proto(list(state.log.events_after(0))[-1])
    assert not message.activity_completed.added_keys


def test_the_event_as_protobuf_carries_the_merged_activity_and_the_added_keys_names() -> None:
    state = CollaborationState()
    activity = recorded(state)
    retained = state.log.retained_bytes
    state.complete_activity(activity.activity_id, metadata=LATE)
    event = list(state.log.events_after(0))[-1]
    message = convert.event_to_proto(event).activity_completed
    assert list(message.added_keys) == list(LATE)
    assert convert.struct_to_dict(message.activity.metadata) == MERGED
    # Each value once: the event counts the merged activity and the keys' names, no second copy,
    # as a replica or a restart measures it.
    size = state.history_bytes + sum(len(key) for key in LATE)
    assert state.log.retained_bytes - retained == size == payload_size(event.payload)


def test_the_history_budget_counts_the_merged_size() -> None:
    state = CollaborationState()
    activity = recorded(state, {})
    before = state.history_bytes
    state.complete_activity(activity.activity_id, metadata={"blob": "x" * 10_000})
    assert state.history_bytes >= before + 10_000
    assert state.open_activity_bytes == 0


def test_a_merge_over_the_limit_is_refused_naming_the_sizes_and_changes_nothing() -> None:
    limits = Limits(max_metadata_bytes=1000)
    state = CollaborationState(StateSettings(limits=limits))
    activity = recorded(state, {"a": "x" * 600})
    seq, history = state.log.last_seq, state.history_bytes
    with pytest.raises(InvalidArgument) as refused:
        state.complete_activity(activity.activity_id, metadata={"b": "y" * 600})
    message = str(refused.value)
    assert "metadata merged at completion would be 1215 bytes" in message
    assert "the activity's 608 bytes" in message and "the limit is 1000" in message
    assert state.log.last_seq == seq and state.history_bytes == history
    still = state.get_activity(activity.activity_id)
    assert still is not None and still.status is ActivityStatus.ACTIVE and still.metadata == {"a": "x" * 600}
    # Replacing the big key instead fits: the merge is measured, not the sum.
    done = state.complete_activity(activity.activity_id, metadata={"a": "z" * 600})
    assert done.metadata == {"a": "z" * 600}


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ({"n": float("nan")}, "metadata is not valid JSON"),
        ({"big": "x" * 70_000}, "metadata is 70010 bytes serialised; the limit is 65536"),
    ],
)
def test_bad_metadata_is_refused_before_anything_changes(metadata: dict[str, Any], fragment: str) -> None:
    state = CollaborationState()
    activity = recorded(state)
    with pytest.raises(InvalidArgument, match=fragment):
        state.complete_activity(activity.activity_id, metadata=metadata)
    assert state.log.last_seq == 1
    again = state.get_activity(activity.activity_id)
    assert again is not None and again.status is ActivityStatus.ACTIVE


STORE_FULL = "the database uses 2000 bytes, over its budget of 1000 bytes (--max-db-bytes / COLLAB_MAX_DB_BYTES)"


def test_metadata_at_completion_is_refused_while_the_store_is_over_its_budget() -> None:
    """The merge grows what the store holds, as a record does: refused (changing
    nothing) while the store is full, saying a plain completion is still taken."""
    state = CollaborationState()
    activity = recorded(state)
    state.storage_refusal = lambda: STORE_FULL
    seq, history = state.log.last_seq, state.history_bytes
    with pytest.raises(BudgetExhausted) as refused:
        state.complete_activity(activity.activity_id, metadata=LATE)
    assert refused.value.budget == "max-db-bytes"
    assert str(refused.value) == f"{STORE_FULL}; a completion without metadata is still accepted"
    assert state.log.last_seq == seq and state.history_bytes == history
    still = state.get_activity(activity.activity_id)
    assert still is not None and still.status is ActivityStatus.ACTIVE and still.metadata == RECORDED


@pytest.mark.parametrize("metadata", [None, {}])
def test_a_completion_without_metadata_is_taken_while_the_store_is_over_its_budget(
    metadata: dict[str, Any] | None,
) -> None:
    """Finishing work is never refused for space."""
    state = CollaborationState()
    activity = recorded(state)
    state.storage_refusal = lambda: STORE_FULL
    done = state.complete_activity(activity.activity_id, success=False, failure_reason="cut", metadata=metadata)
    assert done.status is ActivityStatus.FAILED and done.metadata == RECORDED
    assert completion(state).added_keys == []


def test_a_completed_activity_takes_no_more_metadata() -> None:
    state = CollaborationState()
    activity = recorded(state)
    state.complete_activity(activity.activity_id)
    with pytest.raises(FailedPrecondition):
        state.complete_activity(activity.activity_id, metadata=LATE)
    done = state.get_activity(activity.activity_id)
    assert done is not None and done.metadata == RECORDED


def test_the_codec_keeps_the_added_keys_and_reads_events_stored_before_them() -> None:
    state = CollaborationState()
    activity = recorded(state)
    state.complete_activity(activity.activity_id, metadata=LATE)
    payload = completion(state)
    assert decode_payload(EventKind.ACTIVITY_COMPLETED, encode(payload)) == payload
    old = '{"activity":' + encode(payload.activity) + ',"success":true}'
    assert decode_payload(EventKind.ACTIVITY_COMPLETED, old) == ActivityCompletion(payload.activity, True, [])


def test_a_replica_applying_the_completion_merges_and_counts_it() -> None:
    decided = CollaborationState()
    follower = CollaborationState(epoch=decided.epoch)
    activity = recorded(decided)
    decided.complete_activity(activity.activity_id, metadata={"blob": "x" * 5000})
    for event in decided.log.events_after(0):
        follower.apply(event)
    seen = follower.get_activity(activity.activity_id)
    assert seen is not None and seen.metadata == {**RECORDED, "blob": "x" * 5000}
    assert follower.history_bytes == decided.history_bytes


async def test_sqlite_keeps_the_merged_metadata_across_a_restart(tmp_path: Path) -> None:
    state = CollaborationState()
    store = SQLiteStore(tmp_path)
    store.open(state)
    store.start()
    activity = recorded(state)
    async with store.writing():
        state.complete_activity(activity.activity_id, metadata=LATE)
    await store.durable(state.log.last_seq)
    await store.close()

    again = CollaborationState()
    reopened = SQLiteStore(tmp_path)
    reopened.open(again)
    reopened.start()
    try:
        restored = again.get_activity(activity.activity_id)
        assert restored is not None and restored.metadata == MERGED
        assert restored.status is ActivityStatus.COMPLETED
        replayed = list(again.log.events_after(0))[-1].payload
        assert isinstance(replayed, ActivityCompletion) and replayed.added_keys == list(LATE)
    finally:
        await reopened.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    with redis_store_url() as url:
        yield url


async def test_redis_keeps_the_merged_metadata_for_a_replica_and_across_a_restart(redis_url: str) -> None:
    state = CollaborationState()
    store = RedisStore(redis_url)
    await store.attach(state)
    store.start()
    other_state = CollaborationState()
    other = RedisStore(redis_url)
    await other.attach(other_state)
    other.start()
    try:
        async with store.writing():
            activity = recorded(state)
        async with store.writing():
            state.complete_activity(activity.activity_id, metadata=LATE)
        await store.durable(state.log.last_seq)
        async with other.writing():  # a write begins caught up with the other replica
            seen = other_state.get_activity(activity.activity_id)
        assert seen is not None and seen.metadata == MERGED
    finally:
        await other.close()
        await store.close()

    restarted = CollaborationState()
    again = RedisStore(redis_url)
    await again.attach(restarted)
    try:
        restored = restarted.get_activity(activity.activity_id)
        assert restored is not None and restored.metadata == MERGED
        assert restored.status is ActivityStatus.COMPLETED
    finally:
        await again.close()
