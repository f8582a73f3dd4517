"""The CollaborationService contract, through generated stubs.

Every test here takes the ``client`` fixture and so runs twice: against a grpc.aio
server in the test's own event loop, and against `collab-server` as a real process
(shared by the module, so each test uses agent and session ids of its own).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from collab_grpc import servicer
from collab_grpc.server import RunningServer
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.conftest import HubFactory
from tests.support.rpc import READ_KEY, Client, activity, drain, take

StatusCode = grpc.StatusCode


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def struct(**fields: Any) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(fields)
    return value


async def expect_status(call: object, code: StatusCode, fragment: str = "") -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    assert fragment in (caught.value.details() or ""), caught.value.details()
    return caught.value


async def head(client: Client) -> tuple[str, int]:
    """The current (epoch, seq): a snapshot-only subscription tells it."""
    stream = client.stub.SubscribeEvents(pb.SubscribeEventsRequest(include_snapshot=True), metadata=client.metadata)
    (first,) = await take(stream, 1)
    stream.cancel()
    return first.snapshot.epoch, first.snapshot.seq


async def test_record_complete_and_read_back(client: Client) -> None:
    agent = unique("agent")
    meta = client.metadata
    recorded = await client.stub.RecordActivity(
        activity(agent, metadata=struct(item_id="item_123", size_bytes=1024), related_agents=["agent_2"]),
        metadata=meta,
    )
    assert recorded.activity_id.startswith(f"act_{recorded.activity.timestamp.seconds}_{agent}_")
    assert recorded.activity.status == pb.ACTIVITY_STATUS_ACTIVE
    assert recorded.activity.metadata["size_bytes"] == 1024

    status = (await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=meta)).agent_status
    (mine,) = [a for a in status.agents if a.agent_id == agent]
    assert mine.status == pb.AGENT_STATE_ACTIVE
    assert mine.current_activity_id == recorded.activity_id
    assert mine.department == "engineering"

    completed = await client.stub.CompleteActivity(
        pb.CompleteActivityRequest(activity_id=recorded.activity_id, success=True), metadata=meta
    )
    assert completed.activity.status == pb.ACTIVITY_STATUS_COMPLETED
    assert completed.activity.HasField("completed_at")

    status = (await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=meta)).agent_status
    (mine,) = [a for a in status.agents if a.agent_id == agent]
    assert (mine.status, mine.current_activity_id, mine.last_activity_id) == (
        pb.AGENT_STATE_IDLE,
        "",
        recorded.activity_id,
    )
    assert status.total_agents == status.active_agents + status.idle_agents

    feed = await client.stub.GetActivityFeed(pb.GetActivityFeedRequest(agent_id=agent, limit=5), metadata=meta)
    assert [a.activity_id for a in feed.activities] == [recorded.activity_id]
    assert (feed.total, feed.agent_id) == (1, agent)
    got = await client.stub.GetActivity(pb.GetActivityRequest(activity_id=recorded.activity_id), metadata=meta)
    assert got.activity.status == pb.ACTIVITY_STATUS_COMPLETED


async def test_failed_completion_keeps_its_reason(client: Client) -> None:
    activity_id = await client.record(unique("agent"))
    failed = await client.stub.CompleteActivity(
        pb.CompleteActivityRequest(activity_id=activity_id, success=False, failure_reason="tool crashed"),
        metadata=client.metadata,
    )
    assert failed.activity.status == pb.ACTIVITY_STATUS_FAILED
    assert failed.activity.failure_reason == "tool crashed"


async def test_collaboration_lifecycle_with_activities_and_decisions(client: Client) -> None:
    meta = client.metadata
    a, b = unique("agent"), unique("agent")
    started = await client.stub.StartCollaboration(
        pb.StartCollaborationRequest(participants=[a, b], session_type="council"), metadata=meta
    )
    session_id = started.session_id
    assert started.session.session_type == "council"
    assert not started.session.HasField("ended_at")

    parent = await client.record(a, pb.ACTIVITY_TYPE_COUNCIL_DEBATE, session_id=session_id)
    child = await client.record(b, pb.ACTIVITY_TYPE_COUNCIL_SYNTHESIS, session_id=session_id, parent_activity_id=parent)
    decision = await client.stub.RecordDecision(
        pb.RecordDecisionRequest(
            session_id=session_id,
            agent_id=a,
            decision="ship it",
            rationale="tests pass",
            votes={a: "approve", b: "approve"},
        ),
        metadata=meta,
    )
    assert decision.decision_id.startswith("dec_")

    active = await client.stub.ListActiveCollaborations(pb.ListActiveCollaborationsRequest(), metadata=meta)
    (mine,) = [s for s in active.collaborations if s.session_id == session_id]
    assert (mine.activity_count, mine.decision_count) == (2, 1)
    assert active.total == len(active.collaborations)

    status = (await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=meta)).agent_status
    assert {x.agent_id: x.collaboration_count for x in status.agents if x.agent_id in (a, b)} == {a: 1, b: 1}

    detail = await client.stub.GetCollaboration(pb.GetCollaborationRequest(session_id=session_id), metadata=meta)
    assert [x.activity_id for x in detail.activities] == [parent, child]
    assert detail.activities[1].parent_activity_id == parent
    assert [d.decision for d in detail.decisions] == ["ship it"]
    assert dict(detail.decisions[0].votes) == {a: "approve", b: "approve"}

    ended = await client.stub.EndCollaboration(pb.EndCollaborationRequest(session_id=session_id), metadata=meta)
    assert ended.session.HasField("ended_at")
    history = await client.stub.ListEndedCollaborations(pb.ListEndedCollaborationsRequest(limit=500), metadata=meta)
    assert history.collaborations[0].session_id == session_id
    active = await client.stub.ListActiveCollaborations(pb.ListActiveCollaborationsRequest(), metadata=meta)
    assert session_id not in {s.session_id for s in active.collaborations}
    detail = await client.stub.GetCollaboration(pb.GetCollaborationRequest(session_id=session_id), metadata=meta)
    assert detail.session.HasField("ended_at")


async def test_memory_update(client: Client) -> None:
    agent = unique("agent")
    response = await client.stub.RecordMemoryUpdate(
        pb.RecordMemoryUpdateRequest(
            operation=pb.MEMORY_OPERATION_DELETE,
            item_id="item_123",
            agent_id=agent,
            metadata=struct(compression_ratio=13.3),
        ),
        metadata=client.metadata,
    )
    assert response.update.operation == pb.MEMORY_OPERATION_DELETE
    assert response.update.metadata["compression_ratio"] == pytest.approx(13.3)


async def test_bulk_record_acknowledges_each_in_order(client: Client) -> None:
    agent = unique("agent")
    items = [
        pb.BulkRecordActivitiesRequest(activity=activity(agent)),
        pb.BulkRecordActivitiesRequest(activity=activity(agent, pb.ACTIVITY_TYPE_UNSPECIFIED)),
        pb.BulkRecordActivitiesRequest(activity=activity(agent, session_id="collab_missing")),
        pb.BulkRecordActivitiesRequest(activity=activity(agent, pb.ACTIVITY_TYPE_TASK_ASSIGNED)),
    ]

    async def send() -> object:
        for item in items:
            yield item

    response = await client.stub.BulkRecordActivities(send(), metadata=client.metadata)  # type: ignore[arg-type]
    codes = [r.error_code for r in response.results]
    assert codes == ["", "INVALID_ARGUMENT", "NOT_FOUND", ""]
    assert (response.recorded, response.failed) == (2, 2)
    feed = await client.stub.GetActivityFeed(pb.GetActivityFeedRequest(agent_id=agent), metadata=client.metadata)
    assert [a.activity_id for a in reversed(feed.activities)] == [
        response.results[0].activity_id,
        response.results[3].activity_id,
    ]


async def test_bulk_messages_carrying_many_activities_are_answered_item_by_item(client: Client) -> None:
    agent = unique("agent")
    messages = [
        # activity, then activities, in order; a bad item fails alone
        pb.BulkRecordActivitiesRequest(
            activity=activity(agent),
            activities=[activity(agent, pb.ACTIVITY_TYPE_UNSPECIFIED), activity(agent, pb.ACTIVITY_TYPE_TASK_ASSIGNED)],
        ),
        pb.BulkRecordActivitiesRequest(activity=activity(agent, pb.ACTIVITY_TYPE_MESSAGE_SENT)),
        pb.BulkRecordActivitiesRequest(activities=[activity(agent, session_id="collab_missing"), activity(agent)]),
        pb.BulkRecordActivitiesRequest(),  # nothing in it: one empty, refused, activity
    ]

    async def send() -> object:
        for message in messages:
            yield message

    response = await client.stub.BulkRecordActivities(send(), metadata=client.metadata)  # type: ignore[arg-type]
    codes = [r.error_code for r in response.results]
    assert codes == ["", "INVALID_ARGUMENT", "", "", "NOT_FOUND", "", "INVALID_ARGUMENT"]
    assert "is required" in response.results[-1].error_message
    assert (response.recorded, response.failed) == (4, 3)
    feed = await client.stub.GetActivityFeed(pb.GetActivityFeedRequest(agent_id=agent), metadata=client.metadata)
    recorded = [r.activity_id for r in response.results if r.activity_id]
    assert [a.activity_id for a in reversed(feed.activities)] == recorded
    types = [a.activity_type for a in reversed(feed.activities)]
    assert types == [
        pb.ACTIVITY_TYPE_MEMORY_WRITE,
        pb.ACTIVITY_TYPE_TASK_ASSIGNED,
        pb.ACTIVITY_TYPE_MESSAGE_SENT,
        pb.ACTIVITY_TYPE_MEMORY_WRITE,
    ]


def reading_tasks() -> list[asyncio.Task[Any]]:
    """The tasks reading a bulk stream ahead (collab_grpc/readahead.py) in this loop."""
    return [task for task in asyncio.all_tasks() if task.get_name() == "collab-read-ahead"]


async def test_a_bulk_stream_over_the_limit_ends_after_recording_the_first_items(
    hub: tuple[RunningServer, Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer, "MAX_BULK_ITEMS", 5)
    _, client = hub
    agent = unique("agent")
    answered = asyncio.Event()

    async def send() -> object:
        for _ in range(6):  # one past the limit, then nothing: no write races the abort
            yield pb.BulkRecordActivitiesRequest(activity=activity(agent))
        await answered.wait()

    call = client.stub.BulkRecordActivities(send(), metadata=client.metadata)  # type: ignore[arg-type]
    try:
        await expect_status(call, StatusCode.INVALID_ARGUMENT, "at most 5 activities; the first 5 were processed")
    finally:
        answered.set()
    feed = await client.stub.GetActivityFeed(pb.GetActivityFeedRequest(agent_id=agent), metadata=client.metadata)
    assert len(feed.activities) == 5
    await asyncio.sleep(0.1)
    assert reading_tasks() == []


async def test_a_bulk_stream_the_client_cancels_leaves_no_reading_behind(hub: tuple[RunningServer, Client]) -> None:
    _, client = hub
    agent = unique("agent")
    sent = asyncio.Event()

    async def send() -> object:
        yield pb.BulkRecordActivitiesRequest(activity=activity(agent))
        sent.set()
        await asyncio.sleep(3600)  # the stream stays open until the client gives up

    call = client.stub.BulkRecordActivities(send(), metadata=client.metadata)  # type: ignore[arg-type]
    await sent.wait()
    for _ in range(100):  # until the server has the message and waits for the next
        feed = await client.stub.GetActivityFeed(pb.GetActivityFeedRequest(agent_id=agent), metadata=client.metadata)
        if feed.activities:
            break
        await asyncio.sleep(0.01)
    assert len(reading_tasks()) == 1
    call.cancel()
    for _ in range(100):
        if not reading_tasks():
            break
        await asyncio.sleep(0.01)
    assert reading_tasks() == []


async def test_a_bulk_item_with_a_key_replays_whole_through_record_activity(client: Client) -> None:
    """Bulk answers carry ids only, but a keyed item's stored answer is the whole one, so
    a retry of the same record through RecordActivity gets the activity back."""
    agent = unique("agent")
    keyed = activity(agent)
    keyed.idempotency_key = unique("key")

    async def send() -> object:
        yield pb.BulkRecordActivitiesRequest(activity=keyed)

    response = await client.stub.BulkRecordActivities(send(), metadata=client.metadata)  # type: ignore[arg-type]
    replay = await client.stub.RecordActivity(keyed, metadata=client.metadata)
    assert replay.activity_id == response.results[0].activity_id
    assert (replay.activity.activity_id, replay.activity.agent_id) == (replay.activity_id, agent)


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (activity("a", pb.ACTIVITY_TYPE_UNSPECIFIED), StatusCode.INVALID_ARGUMENT, "activity_type is required"),
        (activity("a", 99), StatusCode.INVALID_ARGUMENT, "not a known activity type"),  # type: ignore[arg-type]
        (activity(""), StatusCode.INVALID_ARGUMENT, "agent_id is required"),
        (activity("has space"), StatusCode.INVALID_ARGUMENT, "agent_id must be printable"),
        (activity("a", session_id="collab_nope"), StatusCode.NOT_FOUND, "collab_nope"),
        (activity("a", parent_activity_id="act_nope"), StatusCode.NOT_FOUND, "act_nope"),
        (activity("a", related_agents=["x", "x"]), StatusCode.INVALID_ARGUMENT, "duplicate"),
        (
            activity("a", metadata=struct(blob="x" * (64 * 1024))),
            StatusCode.INVALID_ARGUMENT,
            "the limit is 65536",
        ),
    ],
)
async def test_bad_activity_is_refused_and_changes_nothing(
    client: Client, request_: pb.RecordActivityRequest, code: StatusCode, fragment: str
) -> None:
    before = await head(client)
    status_before = await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=client.metadata)
    await expect_status(client.stub.RecordActivity(request_, metadata=client.metadata), code, fragment)
    assert await head(client) == before
    status_after = await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=client.metadata)
    assert status_after == status_before


async def test_error_statuses_of_every_write_and_read(client: Client) -> None:
    meta = client.metadata
    stub = client.stub
    before = await head(client)
    cases = [
        (
            stub.CompleteActivity(pb.CompleteActivityRequest(activity_id="act_unknown"), metadata=meta),
            StatusCode.NOT_FOUND,
        ),
        (stub.CompleteActivity(pb.CompleteActivityRequest(activity_id=""), metadata=meta), StatusCode.INVALID_ARGUMENT),
        (stub.EndCollaboration(pb.EndCollaborationRequest(session_id="collab_x"), metadata=meta), StatusCode.NOT_FOUND),
        (stub.StartCollaboration(pb.StartCollaborationRequest(), metadata=meta), StatusCode.INVALID_ARGUMENT),
        (
            stub.RecordDecision(
                pb.RecordDecisionRequest(session_id="collab_x", agent_id="a", decision="d"), metadata=meta
            ),
            StatusCode.NOT_FOUND,
        ),
        (
            stub.RecordMemoryUpdate(pb.RecordMemoryUpdateRequest(item_id="i", agent_id="a"), metadata=meta),
            StatusCode.INVALID_ARGUMENT,
        ),
        (stub.GetActivityFeed(pb.GetActivityFeedRequest(limit=501), metadata=meta), StatusCode.INVALID_ARGUMENT),
        (stub.GetActivityFeed(pb.GetActivityFeedRequest(limit=-1), metadata=meta), StatusCode.INVALID_ARGUMENT),
        (
            stub.ListEndedCollaborations(pb.ListEndedCollaborationsRequest(limit=501), metadata=meta),
            StatusCode.INVALID_ARGUMENT,
        ),
        (stub.GetActivity(pb.GetActivityRequest(activity_id="act_unknown"), metadata=meta), StatusCode.NOT_FOUND),
        (stub.GetCollaboration(pb.GetCollaborationRequest(session_id="collab_x"), metadata=meta), StatusCode.NOT_FOUND),
    ]
    for call, code in cases:
        await expect_status(call, code)
    assert await head(client) == before


async def test_completing_twice_and_ending_twice_fail_precondition(client: Client) -> None:
    meta = client.metadata
    activity_id = await client.record(unique("agent"))
    await client.stub.CompleteActivity(pb.CompleteActivityRequest(activity_id=activity_id, success=True), metadata=meta)
    await expect_status(
        client.stub.CompleteActivity(pb.CompleteActivityRequest(activity_id=activity_id, success=True), metadata=meta),
        StatusCode.FAILED_PRECONDITION,
        "already completed",
    )
    started = await client.stub.StartCollaboration(pb.StartCollaborationRequest(participants=["x"]), metadata=meta)
    await client.stub.EndCollaboration(pb.EndCollaborationRequest(session_id=started.session_id), metadata=meta)
    for call in (
        client.stub.EndCollaboration(pb.EndCollaborationRequest(session_id=started.session_id), metadata=meta),
        client.stub.RecordActivity(activity("x", session_id=started.session_id), metadata=meta),
    ):
        await expect_status(call, StatusCode.FAILED_PRECONDITION, "already ended")


async def test_idempotency_key_returns_the_first_answer_and_records_once(client: Client) -> None:
    meta = client.metadata
    agent = unique("agent")
    key = unique("key")
    first = await client.stub.RecordActivity(activity(agent, idempotency_key=key), metadata=meta)
    epoch, seq = await head(client)
    again = await client.stub.RecordActivity(activity(agent, idempotency_key=key), metadata=meta)
    assert again == first
    assert await head(client) == (epoch, seq)
    feed = await client.stub.GetActivityFeed(pb.GetActivityFeedRequest(agent_id=agent), metadata=meta)
    assert feed.total == 1

    await expect_status(
        client.stub.RecordActivity(activity(agent, pb.ACTIVITY_TYPE_TASK_ASSIGNED, idempotency_key=key), metadata=meta),
        StatusCode.FAILED_PRECONDITION,
        "different RecordActivity request",
    )
    done = pb.CompleteActivityRequest(activity_id=first.activity_id, success=True, idempotency_key=key)
    assert (await client.stub.CompleteActivity(done, metadata=meta)) == (
        await client.stub.CompleteActivity(done, metadata=meta)
    )


async def test_auth_is_required_and_read_keys_cannot_write(client: Client) -> None:
    stub = client.stub
    read = (("authorization", f"Bearer {READ_KEY}"),)
    await expect_status(
        stub.GetAgentStatus(pb.GetAgentStatusRequest()), StatusCode.UNAUTHENTICATED, "missing credential"
    )
    await expect_status(
        stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=(("authorization", "Bearer nope"),)),
        StatusCode.UNAUTHENTICATED,
        "invalid credential",
    )
    await expect_status(
        stub.SubscribeEvents(pb.SubscribeEventsRequest()).read(), StatusCode.UNAUTHENTICATED, "missing credential"
    )
    assert (await stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=read)).HasField("agent_status")
    assert (await stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=(("x-api-key", READ_KEY),))).agent_status
    before = await head(client)
    await expect_status(stub.RecordActivity(activity("a"), metadata=read), StatusCode.PERMISSION_DENIED, "read-only")

    async def one() -> object:
        yield pb.BulkRecordActivitiesRequest(activity=activity("a"))

    await expect_status(
        stub.BulkRecordActivities(one(), metadata=read),  # type: ignore[arg-type]
        StatusCode.PERMISSION_DENIED,
    )
    assert await head(client) == before


async def test_subscriber_receives_every_event_in_order(client: Client) -> None:
    agent = unique("agent")
    stream = await client.subscribe(agent_ids=[agent])
    ids = [await client.record(agent) for _ in range(20)]
    for activity_id in ids[:5]:
        await client.stub.CompleteActivity(
            pb.CompleteActivityRequest(activity_id=activity_id, success=True), metadata=client.metadata
        )
    messages = await asyncio.wait_for(take(stream, 25), 10)
    stream.cancel()
    seqs = [m.event.seq for m in messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == 25
    assert [m.event.activity_recorded.activity_id for m in messages[:20]] == ids
    assert [m.event.activity_completed.activity.activity_id for m in messages[20:]] == ids[:5]


async def test_filters_by_kind_and_activity_type(client: Client) -> None:
    agent = unique("agent")
    stream = await client.subscribe(
        agent_ids=[agent],
        kinds=[pb.EVENT_KIND_ACTIVITY_RECORDED, pb.EVENT_KIND_MEMORY_UPDATED],
        activity_types=[pb.ACTIVITY_TYPE_TASK_ASSIGNED],
    )
    skipped = await client.record(agent, pb.ACTIVITY_TYPE_MEMORY_READ)
    wanted = await client.record(agent, pb.ACTIVITY_TYPE_TASK_ASSIGNED)
    await client.stub.CompleteActivity(pb.CompleteActivityRequest(activity_id=wanted), metadata=client.metadata)
    await client.stub.RecordMemoryUpdate(
        pb.RecordMemoryUpdateRequest(operation=pb.MEMORY_OPERATION_READ, item_id="i", agent_id=agent),
        metadata=client.metadata,
    )
    first, second = await asyncio.wait_for(take(stream, 2), 10)
    stream.cancel()
    assert first.event.activity_recorded.activity_id == wanted != skipped
    assert second.event.memory_updated.agent_id == agent


async def test_resume_replays_exactly_the_missed_events(client: Client) -> None:
    agent = unique("agent")
    await client.record(agent)
    epoch, since = await head(client)
    missed = [await client.record(agent) for _ in range(5)]
    stream = client.stub.SubscribeEvents(
        pb.SubscribeEventsRequest(agent_ids=[agent], since_seq=since, epoch=epoch), metadata=client.metadata
    )
    resume, *replayed = await asyncio.wait_for(take(stream, 6), 10)
    assert resume.resume.recovered and resume.resume.since_seq == since and resume.resume.epoch == epoch
    assert [m.event.activity_recorded.activity_id for m in replayed] == missed
    live = await client.record(agent)
    (next_message,) = await asyncio.wait_for(take(stream, 1), 10)
    stream.cancel()
    assert next_message.event.activity_recorded.activity_id == live
    assert next_message.event.seq > replayed[-1].event.seq


async def test_a_reader_asking_for_batches_gets_the_waiting_events_in_few_messages(client: Client) -> None:
    """max_batch: a replay (and a burst) comes as EventBatches of at most that many, in
    order, each event once; a lone live event as an Event; over 1,000 is refused."""
    agent = unique("agent")
    await client.record(agent)
    epoch, since = await head(client)
    await bulk(client, agent, 25)
    stream = client.stub.SubscribeEvents(
        pb.SubscribeEventsRequest(agent_ids=[agent], since_seq=since, epoch=epoch, max_batch=10),
        metadata=client.metadata,
    )
    resume, *batches = await asyncio.wait_for(take(stream, 4), 10)
    assert resume.resume.recovered
    assert [m.WhichOneof("message") for m in batches] == ["events"] * 3
    assert [len(m.events.events) for m in batches] == [10, 10, 5]
    seqs = [event.seq for m in batches for event in m.events.events]
    assert seqs == list(range(since + 1, since + 26))
    live = await client.record(agent)
    (alone,) = await asyncio.wait_for(take(stream, 1), 10)
    stream.cancel()
    assert alone.WhichOneof("message") == "event" and alone.event.activity_recorded.activity_id == live
    await expect_status(
        client.stub.SubscribeEvents(pb.SubscribeEventsRequest(max_batch=1001), metadata=client.metadata).read(),
        StatusCode.INVALID_ARGUMENT,
        "max_batch must be between 0 and 1000",
    )


async def bulk(client: Client, agent: str, count: int) -> None:
    items = [activity(agent, pb.ACTIVITY_TYPE_MEMORY_WRITE) for _ in range(count)]
    request = pb.BulkRecordActivitiesRequest(activities=items)
    reply = await client.stub.BulkRecordActivities(iter([request]), metadata=client.metadata)
    assert reply.recorded == count


async def test_resume_from_another_epoch_gets_a_fresh_snapshot(client: Client) -> None:
    epoch, seq = await head(client)
    stream = client.stub.SubscribeEvents(
        pb.SubscribeEventsRequest(since_seq=seq, epoch="not-" + epoch), metadata=client.metadata
    )
    resume, snapshot = await asyncio.wait_for(take(stream, 2), 10)
    stream.cancel()
    assert not resume.resume.recovered and "epoch" in resume.resume.reason
    assert (snapshot.snapshot.epoch, snapshot.snapshot.seq) == (epoch, seq)
    await expect_status(
        client.stub.SubscribeEvents(pb.SubscribeEventsRequest(since_seq=1), metadata=client.metadata).read(),
        StatusCode.INVALID_ARGUMENT,
        "epoch is required",
    )


async def test_snapshot_then_live_misses_nothing_under_concurrent_writes(client: Client) -> None:
    agent = unique("agent")
    writes = 150
    recorded: list[str] = []

    async def writer() -> None:
        for _ in range(writes):
            recorded.append(await client.record(agent))

    writing = asyncio.create_task(writer())
    await asyncio.sleep(0.02)  # subscribe while the writer is running
    stream = client.stub.SubscribeEvents(
        pb.SubscribeEventsRequest(include_snapshot=True, agent_ids=[agent]), metadata=client.metadata
    )
    (first,) = await take(stream, 1)
    await writing
    status = {a.agent_id: a for a in first.snapshot.agent_status.agents}
    already = {status[agent].last_activity_id} if agent in status else set()
    seen_in_snapshot = recorded.index(status[agent].last_activity_id) + 1 if already else 0
    remaining = writes - seen_in_snapshot
    live = await asyncio.wait_for(take(stream, remaining), 20) if remaining else []
    stream.cancel()
    assert [m.event.activity_recorded.activity_id for m in live] == recorded[seen_in_snapshot:]
    assert all(m.event.seq > first.snapshot.seq for m in live)


async def test_agent_status_stream_ticks_at_the_requested_interval(client: Client) -> None:
    request = pb.StreamAgentStatusRequest()
    request.interval.FromMilliseconds(100)
    stream = client.stub.StreamAgentStatus(request, metadata=client.metadata)
    updates = []
    async for update in stream:
        updates.append(update)
        if len(updates) == 3:
            break
    stream.cancel()
    times = [u.time.ToNanoseconds() / 1e9 for u in updates]
    assert times == sorted(times) and times[-1] - times[0] >= 0.15
    bad = pb.StreamAgentStatusRequest()
    bad.interval.FromMilliseconds(10)
    await expect_status(
        client.stub.StreamAgentStatus(bad, metadata=client.metadata).read(),
        StatusCode.INVALID_ARGUMENT,
        "interval must be between",
    )


async def test_stalled_subscriber_is_cut_off_without_delaying_a_healthy_one(make_hub: HubFactory) -> None:
    """A subscriber that never reads fills the transport and its queue, then keeps its
    place in the log until the events it needs are no longer retained (here 8 MB of
    them): then it gets RESOURCE_EXHAUSTED. A healthy subscriber receives every event."""
    _, client = await make_hub(event_retain_bytes=8 * 1024 * 1024)
    agent = unique("agent")
    stalled_client = Client.connect(client.target, client.token)  # its own connection, as a real peer
    try:
        stalled = await stalled_client.subscribe(agent_ids=[agent])  # reads its snapshot, then nothing
        healthy = await client.subscribe(agent_ids=[agent])
        count = 400  # about 24 MB: more than the transport buffers plus the retained 8 MB
        received: list[int] = []

        async def read_healthy() -> None:
            received.extend(m.event.seq for m in await take(healthy, count))

        reader = asyncio.create_task(read_healthy())
        blob = struct(blob="x" * 60_000)
        for _ in range(count):
            await client.record(agent, metadata=blob)
        await asyncio.wait_for(reader, 30)
        assert len(received) == count and received == sorted(received)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await drain(stalled)
        assert caught.value.code() == StatusCode.RESOURCE_EXHAUSTED
        assert "fell behind" in (caught.value.details() or "")
        assert "no longer retained" in (caught.value.details() or "")
    finally:
        await stalled_client.close()
