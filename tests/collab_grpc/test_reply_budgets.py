"""Reply budgets, unit by unit: the largest items the input limits let in, the start-up
check of the budget, capped summaries and snapshots, cursors, and the RPCs that page."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from collab_grpc import convert
from collab_grpc.config import MAX_REPLY_BYTES_CEILING, ServerConfig, parse_server_config
from collab_grpc.errors import InvalidArgument
from collab_grpc.model import ActivityType, MemoryOperation
from collab_grpc.servicer import DEFAULT_MAX_REPLY_BYTES, LOST_ITEM, CollaborationServicer
from collab_grpc.state import CollaborationState, StateSettings
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.validation import Limits, decode_cursor, encode_cursor, largest_item_bytes
from tests.conftest import HubFactory

LIMITS = Limits()
# Printable, 4 bytes in UTF-8: the most bytes a character of an id or a text can take.
WIDE = "\U0001d538"


def worst_metadata(limits: Limits = LIMITS) -> dict[str, Any]:
    """Metadata at the size limit that grows most as a protobuf Struct: small numbers
    (2 bytes each in JSON, 11 as a Value)."""
    count = (limits.max_metadata_bytes - len('{"n":[]}') + 1) // 2
    return {"n": [0] * count}


def wide_id(length: int = LIMITS.max_id_length, tag: int = 0) -> str:
    return f"{tag:04d}" + WIDE * (length - 4)


def test_config_default_budget_matches_the_servicer_and_holds_the_largest_item() -> None:
    assert ServerConfig().max_reply_bytes == DEFAULT_MAX_REPLY_BYTES
    assert largest_item_bytes(LIMITS) < DEFAULT_MAX_REPLY_BYTES < MAX_REPLY_BYTES_CEILING < 4 * 1024 * 1024


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--max-reply-bytes", "100000"], "--max-reply-bytes / COLLAB_MAX_REPLY_BYTES: invalid value 100000"),
        (["--max-reply-bytes", str(4 * 1024 * 1024)], "what a gRPC receiver accepts"),
        (["--max-metadata-bytes", str(1024 * 1024)], "the largest item --max-metadata-bytes 1048576 lets in"),
        (["--max-status-agents", "0"], "--max-status-agents / COLLAB_MAX_STATUS_AGENTS: invalid value '0': must be"),
        (["--max-snapshot-sessions", "0"], "COLLAB_MAX_SNAPSHOT_SESSIONS: invalid value '0': must be at least 1"),
    ],
)
def test_budgets_the_limits_cannot_fit_are_refused_at_start(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_server_config(argv, env={})
    assert fragment in capsys.readouterr().err


def test_budget_settings_from_the_environment() -> None:
    config = parse_server_config(
        [],
        env={"COLLAB_MAX_REPLY_BYTES": "2000000", "COLLAB_MAX_STATUS_AGENTS": "7", "COLLAB_MAX_SNAPSHOT_SESSIONS": "3"},
    )
    assert (config.max_reply_bytes, config.max_status_agents, config.max_snapshot_sessions) == (2_000_000, 7, 3)


def test_the_largest_events_the_input_limits_allow_fit_the_bound() -> None:
    """A stream sends one event a message: each must fit the budget at every input limit
    (64 KiB of metadata, 100 related agents or votes of 128 characters, 8 KiB texts)."""
    state = CollaborationState()
    related = [wide_id(tag=n) for n in range(LIMITS.max_list_length)]
    session = state.start_collaboration(participants=related, metadata=worst_metadata())
    agent_id = wide_id(tag=9999)
    activity = state.record_activity(
        agent_id=agent_id,
        activity_type=ActivityType.COUNCIL_DEBATE,
        department=WIDE * LIMITS.max_id_length,
        metadata=worst_metadata(),
        related_agents=related,
        session_id=session.session_id,
    )
    state.record_activity(
        agent_id=agent_id,
        activity_type=ActivityType.MESSAGE_SENT,
        metadata=worst_metadata(),
        related_agents=related,
        session_id=session.session_id,
        parent_activity_id=activity.activity_id,
    )
    # The completion's event carries the merged metadata (at the limit) and the names of the keys it replaced.
    replaced = {"n": [1] * len(worst_metadata()["n"])}
    state.complete_activity(activity.activity_id, success=False, failure_reason=WIDE * 1024, metadata=replaced)
    state.record_decision(
        session_id=session.session_id,
        agent_id=agent_id,
        decision=WIDE * LIMITS.max_text_length,
        rationale=WIDE * LIMITS.max_text_length,
        votes={voter: WIDE * LIMITS.max_id_length for voter in related},
        metadata=worst_metadata(),
    )
    state.record_memory_update(
        operation=MemoryOperation.WRITE, item_id=wide_id(), agent_id=agent_id, metadata=worst_metadata()
    )
    state.end_collaboration(session.session_id)
    bound = largest_item_bytes(LIMITS)
    sizes = [
        pb.SubscribeEventsResponse(event=convert.event_to_proto(event)).ByteSize()
        for event in state.log.events_after(0)
    ]
    assert len(sizes) == 7
    assert max(sizes) <= bound < DEFAULT_MAX_REPLY_BYTES
    assert max(sizes) > bound // 2, "the bound is of the right order, not a guess far off"


def many_keys(limits: Limits = LIMITS) -> dict[str, Any]:
    """Metadata at the size limit made of as many keys as fit (short names, small
    numbers): the most ``added_keys`` a completion's event can list beside the Struct."""
    metadata: dict[str, Any] = {}
    size = len("{}")
    for number in range(limits.max_metadata_bytes):
        key = format(number, "x")
        size += len(f'"{key}":0') + (1 if metadata else 0)  # and a comma after the first
        if size > limits.max_metadata_bytes:
            break
        metadata[key] = 0
    assert len(json.dumps(metadata, separators=(",", ":"))) <= limits.max_metadata_bytes
    return metadata


@pytest.mark.parametrize("metadata_bytes", [LIMITS.max_metadata_bytes, 131072])
@pytest.mark.parametrize("added", [worst_metadata, many_keys], ids=["small-numbers", "many-keys"])
def test_the_largest_completion_event_fits_the_bound_and_the_default_budget(metadata_bytes: int, added: Any) -> None:
    """A completion's event carries each added value once (in the activity's metadata)
    and only the added keys' names beside it: every key added at completion, or the
    one key whose Struct grows most, stays within the bound, which stays within the
    default reply budget at 131072 bytes of metadata (it started before completions
    took metadata, and must still)."""
    limits = Limits(max_metadata_bytes=metadata_bytes)
    state = CollaborationState(StateSettings(limits=limits))
    metadata = added(limits)
    activity = state.record_activity(agent_id="agent", activity_type=ActivityType.MESSAGE_SENT)
    state.complete_activity(activity.activity_id, success=False, failure_reason=WIDE * 1024, metadata=metadata)
    event = convert.event_to_proto(list(state.log.events_after(0))[-1])
    assert sorted(event.activity_completed.added_keys) == sorted(metadata)
    size = pb.SubscribeEventsResponse(event=event).ByteSize()
    assert size <= largest_item_bytes(limits) <= DEFAULT_MAX_REPLY_BYTES


def test_metadata_of_131072_bytes_starts_with_the_default_reply_budget() -> None:
    config = parse_server_config([], env={"COLLAB_MAX_METADATA_BYTES": "131072"})
    assert (config.max_metadata_bytes, config.max_reply_bytes) == (131072, DEFAULT_MAX_REPLY_BYTES)


def many_agents(count: int, active_every: int = 0, settings: StateSettings | None = None) -> CollaborationState:
    state = CollaborationState(settings)
    for n in range(count):
        state.start_collaboration(participants=[f"agent_{n:05d}"])
    if active_every:
        for n in range(0, count, active_every):
            state.record_activity(agent_id=f"agent_{n:05d}", activity_type=ActivityType.TASK_ASSIGNED)
    return state


def test_status_keeps_active_agents_first_and_counts_exactly() -> None:
    state = many_agents(3000, active_every=7)
    summary = state.agent_status()  # the default cap: 1,000
    active = [f"agent_{n:05d}" for n in range(0, 3000, 7)]
    assert (summary.total_agents, summary.active_agents) == (3000, len(active))
    chosen = [view.agent_id for view in summary.agents]
    assert len(chosen) == 1000
    assert chosen[: len(active)] == active, "active agents first, in agent_id order"
    idle = [view.agent_id for view in summary.agents[len(active) :]]
    assert idle == sorted(set(f"agent_{n:05d}" for n in range(3000)) - set(active))[: 1000 - len(active)]

    message = convert.agent_status_to_proto(summary, 40_000)
    assert message.ByteSize() <= 40_000
    assert 0 < len(message.agents) < 1000
    assert message.agents_omitted == 3000 - len(message.agents)
    listed = [agent.agent_id for agent in message.agents]
    assert listed == sorted(listed)
    assert set(active) <= set(listed)

    few = many_agents(5)
    assert [v.agent_id for v in few.agent_status().agents] == [f"agent_{n:05d}" for n in range(5)]
    assert convert.agent_status_to_proto(few.agent_status(), 40_000).agents_omitted == 0


def test_snapshot_halves_its_budget_between_sessions_and_agents() -> None:
    state = many_agents(50, settings=StateSettings(snapshot_sessions_limit=30))
    big = {"blob": "x" * 20_000}
    for n in range(10):
        state.start_collaboration(participants=[f"agent_{n:05d}"], metadata=big)
    snapshot = state.snapshot()
    assert len(snapshot.active_collaborations) == 30  # the count cap: the oldest
    message = convert.snapshot_to_proto(snapshot, 100_000)
    assert message.ByteSize() <= 100_000
    assert len(message.active_collaborations) == 30  # small sessions, all fit in half
    assert message.active_collaborations_omitted == 30
    assert len(message.agent_status.agents) == 50

    crowded = many_agents(0)
    for n in range(10):
        crowded.start_collaboration(participants=[f"peer_{n}"], metadata=big)
    message = convert.snapshot_to_proto(crowded.snapshot(), 100_000)
    assert message.ByteSize() <= 100_000
    assert 0 < len(message.active_collaborations) < 10
    assert message.active_collaborations_omitted == 10 - len(message.active_collaborations)
    assert len(message.agent_status.agents) == 10, "the agents have the half the sessions could not take"


@pytest.mark.parametrize(
    "cursor",
    [
        "not-base64!",
        encode_cursor("feed", 7),  # the right listing, a key of the wrong type
        encode_cursor("agents", "a"),  # another listing's cursor
        encode_cursor("feed", "a", "b"),
        "x" * 5000,
        "",
    ],
)
def test_a_cursor_not_given_out_is_refused(cursor: str) -> None:
    with pytest.raises(InvalidArgument, match="cursor is not a cursor this listing gave out"):
        decode_cursor("cursor", cursor, "feed", str)


def test_cursor_round_trip() -> None:
    assert decode_cursor("cursor", encode_cursor("active", 1.5, "collab/ü"), "active", float, str) == [1.5, "collab/ü"]
    assert decode_cursor("cursor", encode_cursor("decisions", 3), "decisions", int) == [3]


def test_hub_built_ids_pass_the_hubs_checks() -> None:
    state = CollaborationState()
    agent_id = "a" * LIMITS.max_id_length
    activity = state.record_activity(agent_id=agent_id, activity_type=ActivityType.TASK_ASSIGNED)
    assert LIMITS.max_id_length < len(activity.activity_id) <= LIMITS.max_hub_id_length
    assert state.require_activity(activity.activity_id) is activity
    child = state.record_activity(
        agent_id=agent_id, activity_type=ActivityType.TASK_COMPLETED, parent_activity_id=activity.activity_id
    )
    assert state.complete_activity(activity.activity_id).status.value == "completed"
    assert [a.activity_id for a in state.activity_feed(agent_id=agent_id)] == [child.activity_id, activity.activity_id]
    with pytest.raises(InvalidArgument, match=f"longer than {LIMITS.max_hub_id_length}"):
        state.require_activity("a" * (LIMITS.max_hub_id_length + 1))


async def test_rpcs_page_through_every_entry(make_hub: HubFactory) -> None:
    """The paginating RPCs on a real grpc.aio server, within a small budget."""
    budget = largest_item_bytes(LIMITS) + 16 * 1024
    _, client = await make_hub(max_reply_bytes=budget, max_status_agents=10)
    meta = client.metadata
    stub = client.stub
    sessions = []
    for n in range(25):
        started = await stub.StartCollaboration(
            pb.StartCollaborationRequest(participants=[f"p{n:02d}", "shared"]), metadata=meta
        )
        sessions.append(started.session_id)
    status = (await stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=meta)).agent_status
    assert (status.total_agents, len(status.agents), status.agents_omitted) == (26, 10, 16)

    agents: list[str] = []
    cursor = ""
    while True:
        page = await stub.ListAgents(pb.ListAgentsRequest(limit=4, cursor=cursor), metadata=meta)
        assert page.total == 26 and len(page.agents) <= 4
        agents += [a.agent_id for a in page.agents]
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert agents == sorted([f"p{n:02d}" for n in range(25)] + ["shared"])

    listed: list[str] = []
    cursor = ""
    while True:
        active = await stub.ListActiveCollaborations(
            pb.ListActiveCollaborationsRequest(limit=6, cursor=cursor), metadata=meta
        )
        assert active.total == 25
        listed += [s.session_id for s in active.collaborations]
        if not active.next_cursor:
            break
        cursor = active.next_cursor
    assert listed == sessions
    everything = await stub.ListActiveCollaborations(pb.ListActiveCollaborationsRequest(), metadata=meta)
    assert [s.session_id for s in everything.collaborations] == sessions and not everything.next_cursor

    for session_id in sessions[:12]:
        await stub.EndCollaboration(pb.EndCollaborationRequest(session_id=session_id), metadata=meta)
    ended: list[str] = []
    cursor = ""
    while True:
        page_ended = await stub.ListEndedCollaborations(
            pb.ListEndedCollaborationsRequest(limit=5, cursor=cursor), metadata=meta
        )
        assert page_ended.total == len(page_ended.collaborations)
        ended += [s.session_id for s in page_ended.collaborations]
        if not page_ended.next_cursor:
            break
        cursor = page_ended.next_cursor
    assert ended == sessions[:12][::-1]

    session_id = sessions[20]
    decisions = []
    for n in range(7):
        made = await stub.RecordDecision(
            pb.RecordDecisionRequest(session_id=session_id, agent_id="shared", decision=f"d{n}"), metadata=meta
        )
        decisions.append(made.decision_id)
    read: list[str] = []
    cursor = ""
    while True:
        page_decisions = await stub.ListDecisions(
            pb.ListDecisionsRequest(session_id=session_id, limit=3, cursor=cursor), metadata=meta
        )
        assert page_decisions.total == 7
        read += [d.decision_id for d in page_decisions.decisions]
        if not page_decisions.next_cursor:
            break
        cursor = page_decisions.next_cursor
    assert read == decisions

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListDecisions(pb.ListDecisionsRequest(session_id="collab_nope"), metadata=meta)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListAgents(pb.ListAgentsRequest(cursor=encode_cursor("feed", "x")), metadata=meta)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_bulk_answer_that_reaches_the_budget_stops_and_says_so(make_hub: HubFactory) -> None:
    budget = largest_item_bytes(LIMITS) + 16 * 1024
    _, client = await make_hub(max_reply_bytes=budget)
    agent_id = "c" * LIMITS.max_id_length
    items = [pb.RecordActivityRequest(agent_id=agent_id, activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED)] * 10_000
    bad = pb.RecordActivityRequest(agent_id="bad id", activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED)
    messages = [pb.BulkRecordActivitiesRequest(activities=[bad, *items[:999]])] + [
        pb.BulkRecordActivitiesRequest(activities=items[:1000]) for _ in range(9)
    ]
    reply = await client.stub.BulkRecordActivities(iter(messages), metadata=client.metadata)
    assert reply.incomplete and reply.ByteSize() <= budget
    assert reply.failed == 1 and reply.results[0].error_code == "INVALID_ARGUMENT"
    assert reply.recorded == len(reply.results) - 1 < 10_000
    status = (await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=client.metadata)).agent_status
    assert status.active_activities == reply.recorded

    small = await client.stub.BulkRecordActivities(iter(messages[1:2]), metadata=client.metadata)
    assert not small.incomplete and small.recorded == 1000


def test_struct_of_the_worst_metadata_is_within_six_times_its_json() -> None:
    metadata = worst_metadata()
    struct = struct_pb2.Struct()
    struct.update(metadata)
    assert struct.ByteSize() <= 6 * LIMITS.max_metadata_bytes


def test_items_a_store_failure_refused_never_grow_the_answer_past_its_room() -> None:
    """A recorded item later lost (the store failed before it was durable) is answered
    UNAVAILABLE: with the message while there is room, with the code alone after."""
    response = pb.BulkRecordActivitiesResponse()
    for n in range(100):
        response.results.add(activity_id=f"act_1_a_{n:08x}")
    response.recorded = 100
    before = response.ByteSize()
    room = 500
    recorded_items = [(index, index + 1, 0) for index in range(100)]
    CollaborationServicer._refuse_lost_items(response, recorded_items, [0], room)
    assert (response.recorded, response.failed) == (0, 100)
    assert all(result.error_code == "UNAVAILABLE" and not result.activity_id for result in response.results)
    assert response.results[0].error_message == LOST_ITEM and not response.results[-1].error_message
    assert response.ByteSize() <= before + room
