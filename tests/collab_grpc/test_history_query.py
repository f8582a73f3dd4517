"""QueryActivities on a real in-process server, with the memory store and with SQLite:
every filter alone and combined, both orders, cursors that stay valid while writes
continue, refused filters, the page-size bound and the reply budget."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import struct_pb2, timestamp_pb2

from collab_grpc.config import ServerConfig, parse_server_config
from collab_grpc.convert import seconds_from_timestamp
from collab_grpc.history import ActivityQuery
from collab_grpc.servicer import DEFAULT_MAX_REPLY_BYTES
from collab_grpc.state import CollaborationState
from collab_grpc.store.sqlite import SCHEMA_VERSION, SEARCH_INDEXES, SQLiteStore
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.validation import Limits
from tests.conftest import HubFactory
from tests.support.rpc import READ_KEY, Client


@dataclasses.dataclass
class Team:
    """What was recorded, as GetActivity answers it after the writes."""

    client: Client
    activities: list[pb.Activity]
    session_id: str
    root_id: str

    def expected(self, keep: Callable[[pb.Activity], bool], newest_first: bool = True) -> list[str]:
        chosen = [a for a in self.activities if keep(a)]
        chosen.sort(key=lambda a: (seconds_from_timestamp(a.timestamp), a.activity_id), reverse=newest_first)
        return [a.activity_id for a in chosen]


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(data)
    return value


def stamp(seconds: float) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


async def query_all(client: Client, cursor: str = "", **fields: Any) -> list[str]:
    """Every page of a query from ``cursor`` on, following next_cursor."""
    ids: list[str] = []
    for _ in range(1_000):
        reply = await client.stub.QueryActivities(
            pb.QueryActivitiesRequest(cursor=cursor, **fields), metadata=client.metadata
        )
        ids.extend(a.activity_id for a in reply.activities)
        if not reply.next_cursor:
            return ids
        cursor = reply.next_cursor
    raise AssertionError("the cursor never ended")


TYPES = [pb.ACTIVITY_TYPE_COUNCIL_DEBATE, pb.ACTIVITY_TYPE_MESSAGE_SENT, pb.ACTIVITY_TYPE_MEMORY_WRITE]


async def record_team(client: Client, count: int = 36) -> Team:
    started = await client.stub.StartCollaboration(
        pb.StartCollaborationRequest(participants=["ada", "bob"], session_type="council"), metadata=client.metadata
    )
    session_id = started.session_id
    root = await client.stub.RecordActivity(
        pb.RecordActivityRequest(agent_id="ada", department="eng", activity_type=pb.ACTIVITY_TYPE_AGENT_STARTED),
        metadata=client.metadata,
    )
    ids = [root.activity_id]
    for n in range(count):
        agent = ("ada", "bob", "cyd")[n % 3]
        request = pb.RecordActivityRequest(
            agent_id=agent,
            department="eng" if agent != "cyd" else "ops",
            activity_type=TYPES[n % len(TYPES)],
            metadata=struct({"topic": "budget" if n % 4 == 0 else "hiring", "n": n, "urgent": n % 5 == 0}),
            session_id=session_id if n % 2 == 0 else "",
            parent_activity_id=root.activity_id if n % 6 == 0 else "",
        )
        recorded = await client.stub.RecordActivity(request, metadata=client.metadata)
        ids.append(recorded.activity_id)
        if n % 3 == 1:
            await client.stub.CompleteActivity(
                pb.CompleteActivityRequest(activity_id=recorded.activity_id, success=n % 9 != 1, failure_reason=""),
                metadata=client.metadata,
            )
        elif n % 7 == 2:
            await client.stub.CompleteActivity(
                pb.CompleteActivityRequest(activity_id=recorded.activity_id, success=False, failure_reason="timeout"),
                metadata=client.metadata,
            )
    activities = []
    for activity_id in ids:
        reply = await client.stub.GetActivity(pb.GetActivityRequest(activity_id=activity_id), metadata=client.metadata)
        activities.append(reply.activity)
    return Team(client, activities, session_id, root.activity_id)


@pytest_asyncio.fixture(params=["memory", "sqlite"])
async def team(request: pytest.FixtureRequest, make_hub: HubFactory) -> Team:
    _, client = await make_hub(store=request.param)
    return await record_team(client)


def meta(activity: pb.Activity, key: str) -> Any:
    return dict(activity.metadata.items()).get(key)


async def test_everything_recorded_is_listed_newest_first_then_oldest_first(team: Team) -> None:
    assert len(team.activities) == 37
    assert await query_all(team.client, limit=7) == team.expected(lambda a: True)
    assert await query_all(team.client, limit=7, oldest_first=True) == team.expected(lambda a: True, False)


FILTERS: list[tuple[str, dict[str, Any], Callable[[pb.Activity], bool]]] = [
    ("agent", {"agent_ids": ["bob"]}, lambda a: a.agent_id == "bob"),
    ("agents", {"agent_ids": ["bob", "cyd"]}, lambda a: a.agent_id in ("bob", "cyd")),
    ("department", {"departments": ["ops"]}, lambda a: a.department == "ops"),
    (
        "types",
        {"activity_types": [pb.ACTIVITY_TYPE_COUNCIL_DEBATE, pb.ACTIVITY_TYPE_AGENT_STARTED]},
        lambda a: a.activity_type in (pb.ACTIVITY_TYPE_COUNCIL_DEBATE, pb.ACTIVITY_TYPE_AGENT_STARTED),
    ),
    ("failed", {"statuses": [pb.ACTIVITY_STATUS_FAILED]}, lambda a: a.status == pb.ACTIVITY_STATUS_FAILED),
    ("active", {"statuses": [pb.ACTIVITY_STATUS_ACTIVE]}, lambda a: a.status == pb.ACTIVITY_STATUS_ACTIVE),
    (
        "completed or failed",
        {"statuses": [pb.ACTIVITY_STATUS_COMPLETED, pb.ACTIVITY_STATUS_FAILED]},
        lambda a: a.status != pb.ACTIVITY_STATUS_ACTIVE,
    ),
    (
        "metadata text",
        {"metadata": [pb.MetadataMatch(key="topic", value="budget")]},
        lambda a: meta(a, "topic") == "budget",
    ),
    ("metadata number", {"metadata": [pb.MetadataMatch(key="n", value="12")]}, lambda a: meta(a, "n") == 12),
    (
        "metadata bool",
        {"metadata": [pb.MetadataMatch(key="urgent", value="true")]},
        lambda a: meta(a, "urgent") is True,
    ),
    ("metadata missing", {"metadata": [pb.MetadataMatch(key="nope", value="x")]}, lambda a: False),
]


@pytest.mark.parametrize(("name", "fields", "keep"), FILTERS, ids=[f[0] for f in FILTERS])
async def test_each_filter(team: Team, name: str, fields: dict[str, Any], keep: Callable[[pb.Activity], bool]) -> None:
    expected = team.expected(keep)
    assert await query_all(team.client, limit=4, **fields) == expected
    assert await query_all(team.client, limit=500, oldest_first=True, **fields) == expected[::-1]


async def test_session_and_children(team: Team) -> None:
    in_session = team.expected(lambda a: a.session_id == team.session_id)
    assert in_session and await query_all(team.client, limit=3, session_ids=[team.session_id]) == in_session
    children = team.expected(lambda a: a.parent_activity_id == team.root_id)
    assert children and await query_all(team.client, parent_activity_ids=[team.root_id]) == children
    # An ended session's activities are found as before.
    await team.client.stub.EndCollaboration(
        pb.EndCollaborationRequest(session_id=team.session_id), metadata=team.client.metadata
    )
    assert await query_all(team.client, limit=3, session_ids=[team.session_id], oldest_first=True) == in_session[::-1]
    assert await query_all(team.client, session_ids=["no_such_session"]) == []


async def test_time_range_is_since_inclusive_until_exclusive(team: Team) -> None:
    ordered = sorted(team.activities, key=lambda a: (seconds_from_timestamp(a.timestamp), a.activity_id))
    since = seconds_from_timestamp(ordered[10].timestamp)
    until = seconds_from_timestamp(ordered[20].timestamp)
    expected = team.expected(lambda a: since <= seconds_from_timestamp(a.timestamp) < until)
    assert 0 < len(expected) <= 10
    assert await query_all(team.client, limit=3, since=stamp(since), until=stamp(until)) == expected


async def test_filters_combine(team: Team) -> None:
    ordered = sorted(team.activities, key=lambda a: seconds_from_timestamp(a.timestamp))
    since = seconds_from_timestamp(ordered[3].timestamp)

    def keep(a: pb.Activity) -> bool:
        return (
            a.agent_id in ("ada", "bob")
            and a.department == "eng"
            and a.activity_type in (pb.ACTIVITY_TYPE_COUNCIL_DEBATE, pb.ACTIVITY_TYPE_MEMORY_WRITE)
            and a.status in (pb.ACTIVITY_STATUS_ACTIVE, pb.ACTIVITY_STATUS_FAILED)
            and a.session_id == team.session_id
            and meta(a, "topic") == "hiring"
            and seconds_from_timestamp(a.timestamp) >= since
        )

    expected = team.expected(keep)
    assert expected
    found = await query_all(
        team.client,
        limit=2,
        agent_ids=["ada", "bob"],
        departments=["eng"],
        activity_types=[pb.ACTIVITY_TYPE_COUNCIL_DEBATE, pb.ACTIVITY_TYPE_MEMORY_WRITE],
        statuses=[pb.ACTIVITY_STATUS_ACTIVE, pb.ACTIVITY_STATUS_FAILED],
        session_ids=[team.session_id],
        metadata=[pb.MetadataMatch(key="topic", value="hiring")],
        since=stamp(since),
    )
    assert found == expected


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_the_cursor_holds_while_writes_continue(make_hub: HubFactory, store: str) -> None:
    _, client = await make_hub(store=store)
    for n in range(20):
        await client.record(f"agent_{n % 4}")
    before = await query_all(client, limit=500)
    newest = await client.stub.QueryActivities(pb.QueryActivitiesRequest(limit=5), metadata=client.metadata)
    oldest = await client.stub.QueryActivities(
        pb.QueryActivitiesRequest(limit=5, oldest_first=True), metadata=client.metadata
    )
    added = [await client.record(f"agent_{n % 4}") for n in range(10)]
    rest = await query_all(client, limit=5, cursor=newest.next_cursor)
    assert [a.activity_id for a in newest.activities] + rest == before
    rest_oldest = await query_all(client, limit=5, oldest_first=True, cursor=oldest.next_cursor)
    assert [a.activity_id for a in oldest.activities] + rest_oldest == before[::-1] + added


async def test_sqlite_searches_beyond_the_history_held_in_memory(make_hub: HubFactory) -> None:
    _, on_disk = await make_hub(store="sqlite", history_limit=10)
    _, in_memory = await make_hub(store="memory", history_limit=10)
    for client in (on_disk, in_memory):
        for _ in range(25):
            activity_id = await client.record("agent_1")
            await client.stub.CompleteActivity(
                pb.CompleteActivityRequest(activity_id=activity_id, success=True), metadata=client.metadata
            )
    assert len(await query_all(on_disk, agent_ids=["agent_1"])) == 25
    assert len(await query_all(in_memory, agent_ids=["agent_1"])) == 10


BAD: list[tuple[dict[str, Any], str]] = [
    ({"limit": 501}, "limit must be between 1 and 500"),
    ({"limit": -1}, "limit must be between 1 and 500"),
    ({"agent_ids": ["has space"]}, "agent_ids"),
    ({"agent_ids": [""]}, "agent_ids is required"),
    ({"agent_ids": [f"a{n}" for n in range(101)]}, "agent_ids: at most 100 values"),
    ({"departments": [""]}, "departments"),
    ({"session_ids": ["x" * 129]}, "session_ids"),
    ({"parent_activity_ids": ["bad id"]}, "parent_activity_ids"),
    ({"activity_types": [0]}, "activity_types: 0 is not a known activity type"),
    ({"activity_types": [99]}, "activity_types: 99"),
    ({"statuses": [0]}, "statuses: 0 is not a known activity status"),
    ({"since": stamp(200.0), "until": stamp(100.0)}, "must not be after until"),
    ({"metadata": [pb.MetadataMatch(key="", value="x")]}, "metadata: a key must be"),
    ({"metadata": [pb.MetadataMatch(key="k", value="x" * 1025)]}, "longer than 1024"),
    ({"cursor": "not-a-cursor"}, "cursor is not a cursor this listing gave out"),
]


@pytest.mark.parametrize(("fields", "message"), BAD, ids=[b[1][:30] for b in BAD])
async def test_bad_filters_are_refused(make_hub: HubFactory, fields: dict[str, Any], message: str) -> None:
    _, client = await make_hub(store="memory")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.QueryActivities(pb.QueryActivitiesRequest(**fields), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")


async def test_a_cursor_of_the_other_order_is_refused(make_hub: HubFactory) -> None:
    _, client = await make_hub(store="memory")
    for _ in range(3):
        await client.record()
    page = await client.stub.QueryActivities(pb.QueryActivitiesRequest(limit=1), metadata=client.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.QueryActivities(
            pb.QueryActivitiesRequest(oldest_first=True, cursor=page.next_cursor), metadata=client.metadata
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_page_size_default_and_bound(make_hub: HubFactory, store: str) -> None:
    _, client = await make_hub(store=store)
    for n in range(60):
        await client.record(f"agent_{n % 5}")
    default = await client.stub.QueryActivities(pb.QueryActivitiesRequest(), metadata=client.metadata)
    assert len(default.activities) == 50 and default.next_cursor
    one = await client.stub.QueryActivities(pb.QueryActivitiesRequest(limit=1), metadata=client.metadata)
    assert len(one.activities) == 1
    most = await client.stub.QueryActivities(pb.QueryActivitiesRequest(limit=500), metadata=client.metadata)
    assert len(most.activities) == 60 and not most.next_cursor


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_every_reply_stays_within_the_budget(make_hub: HubFactory, store: str) -> None:
    _, client = await make_hub(store=store)
    bulky = struct({"text": "x" * 60_000})
    recorded = [await client.record(f"agent_{n % 3}", metadata=bulky) for n in range(40)]
    pages = 0
    cursor = ""
    listed: list[str] = []
    while True:
        reply = await client.stub.QueryActivities(
            pb.QueryActivitiesRequest(limit=500, cursor=cursor), metadata=client.metadata
        )
        assert reply.ByteSize() <= DEFAULT_MAX_REPLY_BYTES
        listed.extend(a.activity_id for a in reply.activities)
        pages += 1
        if not reply.next_cursor:
            break
        cursor = reply.next_cursor
    assert pages > 1
    assert listed == recorded[::-1]


async def test_a_read_only_credential_may_search(make_hub: HubFactory) -> None:
    running, client = await make_hub(store="memory")
    await client.record()
    reader = Client.connect(client.target, READ_KEY)
    try:
        reply = await reader.stub.QueryActivities(pb.QueryActivitiesRequest(), metadata=reader.metadata)
        assert len(reply.activities) == 1
    finally:
        await reader.close()
    assert running


async def test_a_version_2_file_is_upgraded_with_its_activities_searchable(tmp_path: Path) -> None:
    """A file written before the search (schema version 2: no search columns or indexes)
    is upgraded at open, its activities' columns filled from their JSON."""
    state = CollaborationState()
    store = SQLiteStore(tmp_path)
    store.open(state)
    store.start()
    session = state.start_collaboration(participants=["ada"])
    root = state.record_activity(agent_id="ada", activity_type="agent_started")
    child = state.record_activity(
        agent_id="ada",
        activity_type="council_debate",
        session_id=session.session_id,
        parent_activity_id=root.activity_id,
    )
    await store.durable(state.log.last_seq)
    await store.close()
    with sqlite3.connect(tmp_path / "collab.db") as connection:  # back to what version 2 wrote
        connection.execute("DROP INDEX idempotency_by_age")  # version 4's
        for name in SEARCH_INDEXES:
            connection.execute(f"DROP INDEX {name}")
        for column in ("agent_id", "session_id", "parent_activity_id", "recorded_at"):
            connection.execute(f"ALTER TABLE activities DROP COLUMN {column}")
        connection.execute("PRAGMA user_version = 2")
    reopened = SQLiteStore(tmp_path)
    reopened.open(CollaborationState())
    try:
        with sqlite3.connect(tmp_path / "collab.db") as connection:
            names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert set(SEARCH_INDEXES) <= names
        limits = Limits()
        for query, expected in [
            (ActivityQuery.build(limits, agent_ids=["ada"]), [child, root]),
            (ActivityQuery.build(limits, session_ids=[session.session_id]), [child]),
            (ActivityQuery.build(limits, parent_activity_ids=[root.activity_id]), [child]),
            (ActivityQuery.build(limits, since=root.timestamp, until=child.timestamp), [root]),
        ]:
            found = await reopened.query_activities(query, 10)
            assert [a.activity_id for a in found.activities] == [a.activity_id for a in expected]
    finally:
        await reopened.close()


async def test_a_search_sqlite_cannot_serve_by_index_stops_at_the_scan_budget_and_goes_on(
    make_hub: HubFactory,
) -> None:
    """Filtering on department, type or metadata, SQLite looks at `history_scan_rows` rows
    a call: a page may be short, or empty, with a cursor; following it finds them all."""
    _, client = await make_hub(store="sqlite", history_scan_rows=5)
    recorded = []
    for n in range(30):
        request = pb.RecordActivityRequest(
            agent_id="ada", department="ops" if n % 7 == 0 else "eng", activity_type=pb.ACTIVITY_TYPE_MESSAGE_SENT
        )
        recorded.append((await client.stub.RecordActivity(request, metadata=client.metadata)).activity_id)
    expected = [activity_id for n, activity_id in enumerate(recorded) if n % 7 == 0][::-1]
    pages = []
    cursor = ""
    while True:
        reply = await client.stub.QueryActivities(
            pb.QueryActivitiesRequest(departments=["ops"], limit=50, cursor=cursor), metadata=client.metadata
        )
        pages.append([a.activity_id for a in reply.activities])
        if not reply.next_cursor:
            break
        cursor = reply.next_cursor
    assert [activity_id for page in pages for activity_id in page] == expected
    # 30 rows, 5 a call: six full windows, then one that finds the end.
    assert len(pages) == 7
    assert all(len(page) <= 1 for page in pages)
    # Served by the indexes alone, the same budget does not cut a page short.
    agent_page = await client.stub.QueryActivities(
        pb.QueryActivitiesRequest(agent_ids=["ada"], limit=50), metadata=client.metadata
    )
    assert len(agent_page.activities) == 30 and not agent_page.next_cursor


def test_history_scan_rows_setting() -> None:
    assert ServerConfig().history_scan_rows == 10_000
    assert parse_server_config(["--history-scan-rows", "500"], env={}).history_scan_rows == 500
    assert parse_server_config([], env={"COLLAB_HISTORY_SCAN_ROWS": "42"}).history_scan_rows == 42
    with pytest.raises(SystemExit):
        parse_server_config(["--history-scan-rows", "0"], env={})


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_metadata_matches_scalars_alike_on_both_stores(make_hub: HubFactory, store: str) -> None:
    _, client = await make_hub(store=store)
    samples: dict[str, dict[str, Any]] = {
        "none": {"x": None},
        "object": {"x": {"a": 1}},
        "list": {"x": [1]},
        "float": {"x": 1.5},
        "text": {"x": "1.5"},
        "int": {"x": 2},
        "false": {"x": False},
        "word": {"x": "false"},
        "other key": {"y": "1.5"},
    }
    ids = {}
    for name, metadata in samples.items():
        ids[(await client.record("ada", metadata=struct(metadata)))] = name

    async def named(value: str) -> set[str]:
        found = await query_all(client, metadata=[pb.MetadataMatch(key="x", value=value)])
        return {ids[activity_id] for activity_id in found}

    assert await named("null") == {"none"}
    assert await named("1.5") == {"float", "text"}
    assert await named("1.50") == {"float"}
    assert await named("2") == {"int"}
    assert await named("2.0") == {"int"}
    assert await named("false") == {"false", "word"}
    assert await named('{"a": 1}') == set()
    assert await named("[1]") == set()
