"""Every CollaborationService RPC under hypothesis, through a real grpc.aio server in this
process: random field values (unicode and over-long ids, huge strings, unknown enum
numbers, metadata with NaN, infinities and nesting past every limit, long lists, random
votes, limits and intervals, and bytes that are not a protobuf message at all).

Each call ends OK or with INVALID_ARGUMENT, NOT_FOUND or FAILED_PRECONDITION and a
message, never UNKNOWN or INTERNAL; a refused call changes nothing (the snapshot with
its seq, the activity feed and the ended sessions are equal before and after), and an
accepted write adds exactly one event (none for a replayed idempotency key).

Hypothesis drives a blocking channel from a worker thread while the server runs on the
test's event loop.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
import pytest
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from hypothesis import strategies as st

from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc
from tests.conftest import HubFactory
from tests.support.fuzz import json_values, junk_text, run_property
from tests.support.rpc import WRITE_KEY, bearer

StatusCode = grpc.StatusCode
REFUSALS = {StatusCode.INVALID_ARGUMENT, StatusCode.NOT_FOUND, StatusCode.FAILED_PRECONDITION}
SERVICE = "/collab.v1.CollaborationService/"
EXAMPLES = 150
T = TypeVar("T")


def encodable(text: str) -> str:
    """What a protobuf string can carry (a Python client cannot even send the rest)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def structable(value: Any) -> Any:
    """``value`` as a Struct can hold it: integers beyond a double become strings."""
    if isinstance(value, dict):
        return {encodable(str(k)): structable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [structable(v) for v in value]
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return str(value)
    return value


def nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for level in range(depth):
        value = {"a": value} if level % 2 else [value]
    return value


def metadata(bad: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Good: small JSON objects, nesting up to the limit (32 levels), now and then one at
    the size limit (64 KiB serialised; rarely, since every accepted one makes the snapshot
    each example compares larger). Bad: NaN, infinities, nesting past the limit and past
    protobuf's decoder (near 33 levels), one byte over the size limit."""
    if bad:
        return st.one_of(
            st.dictionaries(junk_text(20), json_values()).map(structable),  # sometimes good after all
            st.builds(lambda depth: {"deep": nested(depth, 1)}, st.integers(32, 60)),
            st.sampled_from([{"n": math.nan}, {"n": [math.inf]}, {"n": {"m": -math.inf}}]),
            st.just({"blob": "x" * (65536 - 10)}),  # one byte over
        )
    usual = st.one_of(
        st.dictionaries(st.text(max_size=10), st.integers(-(2**53), 2**53) | st.text(max_size=20), max_size=4),
        st.builds(lambda depth: {"deep": nested(depth, 1)}, st.integers(0, 31)),
    )
    # {"blob":"..."} is 11 bytes besides the string: this is exactly at the limit.
    at_limit = st.just({"blob": "x" * (65536 - 11)})
    return st.integers(0, 19).flatmap(lambda n: at_limit if n == 0 else usual)


@dataclass
class Hub:
    """The server under test, its blocking stub, and what the tests know is in it."""

    stub: pb_grpc.CollaborationServiceStub
    channel: grpc.Channel
    activities: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    state: tuple[bytes, ...] = ()
    # (method, "OK" or the status name) -> calls: what the examples actually exercised.
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)

    def snapshot(self) -> tuple[bytes, ...]:
        """The hub's whole visible state, seq included, as comparable bytes."""
        md = bearer(WRITE_KEY)
        stream = self.stub.SubscribeEvents(pb.SubscribeEventsRequest(include_snapshot=True), metadata=md)
        first = next(iter(stream))
        cast("grpc.Future[pb.SubscribeEventsResponse]", stream).cancel()  # a blocking stream is one
        # Any change is an event (the seq moves); the newest history shows what it was.
        feed = self.stub.GetActivityFeed(pb.GetActivityFeedRequest(limit=20), metadata=md)
        ended = self.stub.ListEndedCollaborations(pb.ListEndedCollaborationsRequest(limit=20), metadata=md)
        return tuple(m.SerializeToString(deterministic=True) for m in (first.snapshot, feed, ended))

    @property
    def seq(self) -> int:
        return pb.Snapshot.FromString(self.state[0]).seq

    def ids(self, pool: list[str]) -> st.SearchStrategy[str]:
        return good_ids(pool) | BAD_ID

    def call(self, method: str, request: Message | bytes, *, write: bool | None) -> Any:
        """One call, checked: an allowed outcome; refused, nothing changed; accepted, one
        event per write (none when an idempotency key replays the first answer), none
        for a read (``write=None``: either, for raw bytes that may decode as anything)."""
        if isinstance(request, bytes):
            # No (de)serializer: the bytes go as they are.
            invoke = self.channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
        else:
            invoke = getattr(self.stub, method)
        try:
            response = invoke(request, metadata=bearer(WRITE_KEY), timeout=10)
        except grpc.RpcError as failure:
            code: StatusCode = failure.code()
            details = failure.details()
            assert code in REFUSALS, f"{method}: {code.name} {details}"
            assert details, f"{method}: {code.name} without a message"
            assert self.snapshot() == self.state, f"{method} was refused ({details}) but changed the hub"
            self.outcomes[method, code.name] += 1
            return None
        self.outcomes[method, "OK"] += 1
        before = self.seq
        self.state = self.snapshot()
        if write:
            replayed = bool(getattr(request, "idempotency_key", "")) and self.seq == before
            assert replayed or self.seq == before + 1, f"{method}: seq {before} -> {self.seq}"
        elif write is False:
            assert self.seq == before, f"the read {method} changed the hub"
        return response


# Ids the hub accepts (printable, no white space, at most 128 characters), and not.
GOOD_ID = st.one_of(
    st.text("abcxyz_0123456789", min_size=1, max_size=12),
    st.builds(lambda n: "ü" * n, st.integers(1, 128)),
    st.sampled_from(["i" * 128, "agent.1/x:y", "名前"]),
)
BAD_ID = st.one_of(
    junk_text(40).map(encodable),  # white space, control characters, now and then good
    st.builds(lambda n: "i" * n, st.integers(129, 300)),
    st.sampled_from(["", " ", "a b", "a\tb", "a\u200bb", "\u00a0"]),
)


def good_ids(pool: list[str]) -> st.SearchStrategy[str]:
    """Ids of things the hub has (and ones it has not: NOT_FOUND, FAILED_PRECONDITION)."""
    return st.sampled_from(pool) | GOOD_ID


def distinct(n: int) -> list[str]:
    return [f"agent_{i}" for i in range(n)]


GOOD_IDS = st.lists(GOOD_ID, max_size=5, unique=True) | st.just(distinct(100))
BAD_IDS = st.one_of(
    st.lists(GOOD_ID | BAD_ID, min_size=1, max_size=6),
    st.builds(lambda ids: ids + ids[:1], st.lists(GOOD_ID, min_size=1, max_size=4, unique=True)),  # a duplicate
    st.just(distinct(101)),
)
GOOD_TEXT = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "Zs"]), max_size=40)
BAD_TEXT = st.one_of(
    junk_text(60).map(encodable),  # control characters
    st.builds(lambda n: "t" * n, st.integers(129, 9000)),  # over 128 (department, vote) or 8 KiB
    st.just("t" * (8 * 1024 + 1)),
)
# A small pool, so keys are reused: with the same request (a replay) and with another.
GOOD_KEY = st.sampled_from(["", "", "", "k1", "k2"])
GOOD_METADATA = metadata(bad=False)
BAD_METADATA = metadata(bad=True)


class Fields:
    """Draws each field of a request good, except a few chosen to be bad: a request with
    every field random would be refused for its first field and reach no further."""

    def __init__(self, draw: st.DrawFn, names: list[str]) -> None:
        self.draw = draw
        self.broken = draw(st.sets(st.sampled_from(names), max_size=2))

    def __call__(self, name: str, good: st.SearchStrategy[T], bad: st.SearchStrategy[T]) -> T:
        return self.draw(bad if name in self.broken else good)


@st.composite
def record_activity(draw: st.DrawFn, hub: Hub) -> pb.RecordActivityRequest:
    names = ["agent", "department", "type", "related", "session", "parent", "key", "metadata"]
    field_ = Fields(draw, names)
    request = pb.RecordActivityRequest(
        agent_id=field_("agent", good_ids(["agent_1", "agent_2"]), BAD_ID),
        department=field_("department", st.sampled_from(["", "engineering"]) | GOOD_TEXT, BAD_TEXT),
        activity_type=pb.ActivityType.ValueType(
            field_("type", st.integers(1, 12), st.sampled_from([-1, 0, 13, 99, 2**31 - 1]))  # 12 are known
        ),
        related_agents=field_("related", GOOD_IDS, BAD_IDS),
        session_id=field_("session", st.just("") | good_ids(hub.sessions), BAD_ID),
        parent_activity_id=field_("parent", st.just("") | good_ids(hub.activities), BAD_ID),
        idempotency_key=field_("key", GOOD_KEY, BAD_ID),
    )
    request.metadata.update(field_("metadata", GOOD_METADATA, BAD_METADATA))  # in place: a copy would re-decode
    return request


@st.composite
def record_decision(draw: st.DrawFn, hub: Hub) -> pb.RecordDecisionRequest:
    field_ = Fields(draw, ["session", "agent", "decision", "rationale", "votes", "key", "metadata"])
    votes = st.dictionaries(GOOD_ID, st.sampled_from(["yes", "no", "abstain"]), max_size=4) | st.just(
        dict.fromkeys(distinct(100), "yes")
    )
    bad_votes = st.one_of(
        st.dictionaries(BAD_ID, st.just("yes"), min_size=1, max_size=3),
        st.dictionaries(GOOD_ID, BAD_TEXT | st.just(""), min_size=1, max_size=3),
        st.just(dict.fromkeys(distinct(101), "yes")),
    )
    request = pb.RecordDecisionRequest(
        session_id=field_("session", good_ids(hub.sessions), BAD_ID),
        agent_id=field_("agent", good_ids(["agent_1"]), BAD_ID),
        decision=field_("decision", GOOD_TEXT.filter(bool) | st.just("d" * 8192), BAD_TEXT | st.just("")),
        rationale=field_("rationale", GOOD_TEXT, BAD_TEXT),
        votes=field_("votes", votes, bad_votes),
        idempotency_key=field_("key", GOOD_KEY, BAD_ID),
    )
    request.metadata.update(field_("metadata", GOOD_METADATA, BAD_METADATA))
    return request


@st.composite
def complete_activity(draw: st.DrawFn, hub: Hub) -> pb.CompleteActivityRequest:
    field_ = Fields(draw, ["activity", "reason", "key"])
    success = draw(st.booleans())
    # A failure reason only with success=false, at most 1,024 characters.
    reasons = (st.just("") | GOOD_TEXT) if not success else st.just("")
    return pb.CompleteActivityRequest(
        activity_id=field_("activity", good_ids(hub.activities), BAD_ID),
        success=success,
        failure_reason=field_("reason", reasons, BAD_TEXT.filter(bool) | st.just("r" * 1025)),
        idempotency_key=field_("key", GOOD_KEY, BAD_ID),
    )


@st.composite
def end_collaboration(draw: st.DrawFn, hub: Hub) -> pb.EndCollaborationRequest:
    field_ = Fields(draw, ["session", "key"])
    return pb.EndCollaborationRequest(
        session_id=field_("session", good_ids(hub.sessions), BAD_ID),
        idempotency_key=field_("key", GOOD_KEY, BAD_ID),
    )


@st.composite
def start_collaboration(draw: st.DrawFn, hub: Hub) -> pb.StartCollaborationRequest:
    field_ = Fields(draw, ["participants", "type", "key", "metadata"])
    request = pb.StartCollaborationRequest(
        participants=field_("participants", GOOD_IDS.filter(bool), BAD_IDS | st.just([])),
        session_type=field_("type", st.sampled_from(["", "general", "debate"]) | GOOD_ID, BAD_ID.filter(bool)),
        idempotency_key=field_("key", GOOD_KEY, BAD_ID),
    )
    request.metadata.update(field_("metadata", GOOD_METADATA, BAD_METADATA))
    return request


@st.composite
def record_memory_update(draw: st.DrawFn, hub: Hub) -> pb.RecordMemoryUpdateRequest:
    field_ = Fields(draw, ["operation", "item", "agent", "key", "metadata"])
    request = pb.RecordMemoryUpdateRequest(
        operation=pb.MemoryOperation.ValueType(
            field_("operation", st.integers(1, 3), st.sampled_from([-1, 0, 4, 2**31 - 1]))  # write, read, delete
        ),
        item_id=field_("item", good_ids(["item_1"]), BAD_ID),
        agent_id=field_("agent", good_ids(["agent_1"]), BAD_ID),
        idempotency_key=field_("key", GOOD_KEY, BAD_ID),
    )
    request.metadata.update(field_("metadata", GOOD_METADATA, BAD_METADATA))
    return request


async def fuzz(
    make_hub: HubFactory, prop: Callable[[Hub], None], *, activities: int = 4, both_outcomes: bool = True
) -> None:
    """Start a hub (in memory: what is fuzzed is the checking, not the disk), seed it with
    ``activities`` activities and three sessions (one completed, one ended), then run
    ``prop`` with a blocking channel on a worker thread. ``both_outcomes``: every method
    called must have been accepted and refused at least once each."""
    running, client = await make_hub(store="memory")
    recorded = [await client.record(f"agent_{n % 2 + 1}") for n in range(activities)]
    md = client.metadata
    await client.stub.CompleteActivity(pb.CompleteActivityRequest(activity_id=recorded[0]), metadata=md)
    sessions = []
    for _ in range(3):
        started = await client.stub.StartCollaboration(
            pb.StartCollaborationRequest(participants=["agent_1", "agent_2"]), metadata=md
        )
        sessions.append(started.session_id)
    await client.stub.EndCollaboration(pb.EndCollaborationRequest(session_id=sessions[0]), metadata=md)

    def run() -> Hub:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            hub = Hub(pb_grpc.CollaborationServiceStub(channel), channel, recorded, sessions)
            hub.state = hub.snapshot()
            prop(hub)
            return hub

    hub = await asyncio.to_thread(run)
    for (method, outcome), count in sorted(hub.outcomes.items()):
        print(f"  {method} {outcome}: {count}")
    # Each method was both accepted and refused: the examples reached past the checks.
    methods = {method for method, _ in hub.outcomes} if both_outcomes else set()
    for method in methods:
        assert hub.outcomes[method, "OK"], f"{method} never succeeded: {hub.outcomes}"
        assert sum(n for (m, o), n in hub.outcomes.items() if m == method and o != "OK"), f"{method} never refused"


async def test_record_activity(make_hub: HubFactory) -> None:
    def prop(h: Hub) -> None:
        run_property(
            "gRPC RecordActivity",
            record_activity(h),
            lambda request: h.call("RecordActivity", request, write=True),
            EXAMPLES,
        )

    await fuzz(make_hub, prop)


async def test_complete_activity_and_end_collaboration(make_hub: HubFactory) -> None:
    def prop(h: Hub) -> None:
        run_property(
            "gRPC CompleteActivity",
            complete_activity(h),
            lambda request: h.call("CompleteActivity", request, write=True),
            EXAMPLES,
        )
        run_property(
            "gRPC EndCollaboration",
            end_collaboration(h),
            lambda request: h.call("EndCollaboration", request, write=True),
            EXAMPLES,
        )

    await fuzz(make_hub, prop, activities=40)


async def test_start_collaboration_and_record_decision(make_hub: HubFactory) -> None:
    def prop(h: Hub) -> None:
        def start(request: pb.StartCollaborationRequest) -> None:
            response = h.call("StartCollaboration", request, write=True)
            if response is not None and response.session_id not in h.sessions:
                h.sessions.append(response.session_id)

        run_property("gRPC StartCollaboration", start_collaboration(h), start, EXAMPLES)
        run_property(
            "gRPC RecordDecision",
            record_decision(h),
            lambda request: h.call("RecordDecision", request, write=True),
            EXAMPLES,
        )

    await fuzz(make_hub, prop)


async def test_record_memory_update(make_hub: HubFactory) -> None:
    def prop(h: Hub) -> None:
        run_property(
            "gRPC RecordMemoryUpdate",
            record_memory_update(h),
            lambda request: h.call("RecordMemoryUpdate", request, write=True),
            EXAMPLES,
        )

    await fuzz(make_hub, prop)


async def test_reads_refuse_bad_input_and_change_nothing(make_hub: HubFactory) -> None:
    def prop(h: Hub) -> None:
        limits = st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 502)
        reads = st.one_of(
            st.builds(
                pb.GetActivityFeedRequest,
                agent_id=st.just("") | h.ids(["agent_1"]),
                limit=limits,
                session_id=st.just("") | h.ids(h.sessions),
            ),
            st.builds(pb.GetActivityRequest, activity_id=h.ids(h.activities)),
            st.builds(pb.GetCollaborationRequest, session_id=h.ids(h.sessions)),
            st.builds(pb.ListEndedCollaborationsRequest, limit=limits),
        )

        def read(request: Message) -> None:
            h.call(type(request).__name__.removesuffix("Request"), request, write=False)

        run_property("gRPC reads (feed, activity, collaboration, ended)", reads, read, EXAMPLES)

    await fuzz(make_hub, prop)


async def test_stream_requests_start_or_are_refused(make_hub: HubFactory) -> None:
    def prop(h: Hub) -> None:
        def first_message(method: str, request: Message) -> None:
            stream = getattr(h.stub, method)(request, metadata=bearer(WRITE_KEY), timeout=10)
            try:
                next(iter(stream))
                h.outcomes[method, "OK"] += 1
            except grpc.RpcError as failure:
                assert failure.code() in REFUSALS, (method, failure.code(), failure.details())
                assert failure.details()
                h.outcomes[method, failure.code().name] += 1
            finally:
                stream.cancel()
            assert h.snapshot() == h.state

        run_property(
            "gRPC SubscribeEvents",
            subscribe_events(h),
            lambda request: first_message("SubscribeEvents", request),
            EXAMPLES,
        )
        intervals = st.builds(
            lambda seconds, nanos: pb.StreamAgentStatusRequest(
                interval=duration_pb2.Duration(seconds=seconds, nanos=nanos)
            ),
            st.integers(-(10**6), 10**6) | st.integers(0, 2),
            st.integers(-999_999_999, 999_999_999),
        ) | st.just(pb.StreamAgentStatusRequest())
        run_property(
            "gRPC StreamAgentStatus",
            intervals,
            lambda request: first_message("StreamAgentStatus", request),
            EXAMPLES // 3,
        )

    await fuzz(make_hub, prop)


@st.composite
def subscribe_events(draw: st.DrawFn, hub: Hub) -> pb.SubscribeEventsRequest:
    """Filters of unknown kinds and types, odd agent ids, and resumes from any seq
    (negative, far ahead) in this epoch, another or none."""
    request = pb.SubscribeEventsRequest(
        kinds=draw(st.lists(st.integers(-1, 9).map(pb.EventKind.ValueType), max_size=5)),
        activity_types=draw(st.lists(st.integers(-1, 15).map(pb.ActivityType.ValueType), max_size=5)),
        agent_ids=draw(st.lists(hub.ids(["agent_1"]), max_size=5)),
        # Live only, it would send nothing until the next event: ask for the snapshot.
        include_snapshot=True,
    )
    if draw(st.booleans()):
        request.since_seq = draw(st.integers(0, 2**64 - 1) | st.integers(0, hub.seq + 2))
        epochs = st.sampled_from(["", pb.Snapshot.FromString(hub.state[0]).epoch]) | junk_text(20).map(encodable)
        request.epoch = draw(epochs)
    return request


async def test_bulk_record_answers_each_item(make_hub: HubFactory) -> None:
    def prop(h: Hub) -> None:
        def bulk(items: list[pb.RecordActivityRequest]) -> None:
            before = h.seq

            def requests() -> Iterator[pb.BulkRecordActivitiesRequest]:
                for item in items:
                    request = pb.BulkRecordActivitiesRequest()
                    request.activity.CopyFrom(item)  # a deep copy; the constructor would re-decode
                    yield request

            response = h.stub.BulkRecordActivities(requests(), metadata=bearer(WRITE_KEY), timeout=10)
            assert len(response.results) == len(items)
            for result in response.results:
                assert bool(result.activity_id) != bool(result.error_code), result
                if result.error_code:
                    assert result.error_code in {code.name for code in REFUSALS} and result.error_message, result
                h.outcomes[("BulkRecordActivities item", result.error_code or "OK")] += 1
            h.state = h.snapshot()
            fresh = sum(1 for result in response.results if result.activity_id)
            replays = sum(1 for item in items if item.idempotency_key)
            assert fresh - replays <= h.seq - before <= fresh, (before, h.seq, fresh)

        run_property("gRPC BulkRecordActivities", st.lists(record_activity(h), max_size=6), bulk, EXAMPLES // 3)

    await fuzz(make_hub, prop)


async def test_bytes_that_are_not_a_request_are_invalid_argument(make_hub: HubFactory) -> None:
    """Other languages' clients can send what a Python one cannot: strings that are not
    UTF-8, truncated fields, garbage. Decoding fails before any handler runs."""

    def prop(h: Hub) -> None:
        def send(case: tuple[str, bytes]) -> None:
            h.call(*case, write=None)

        # Field 1 (an id) as a length-delimited string of bytes that are not UTF-8.
        not_utf8 = st.builds(lambda junk: b"\x0a" + bytes([len(junk)]) + junk, st.binary(min_size=1, max_size=100))
        cases = st.tuples(
            st.sampled_from(["RecordActivity", "CompleteActivity", "StartCollaboration", "GetActivity"]),
            not_utf8.filter(_not_utf8) | st.binary(max_size=200),
        )
        run_property("gRPC undecodable request bytes", cases, send, EXAMPLES)

    # Random bytes are nearly never a request that can succeed.
    await fuzz(make_hub, prop, both_outcomes=False)


def _not_utf8(data: bytes) -> bool:
    try:
        data[2:].decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


async def test_regressions_found_by_fuzzing(make_hub: HubFactory) -> None:
    """Each of these ended the call with UNKNOWN ("Unexpected <class ...>") before."""
    running, client = await make_hub(store="memory")
    md = client.metadata

    async def refused(call: Any, fragment: str) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
        assert failure.value.code() == StatusCode.INVALID_ARGUMENT, failure.value.details()
        assert fragment in (failure.value.details() or ""), failure.value.details()

    # A metadata number JSON cannot hold.
    not_json = pb.RecordMemoryUpdateRequest(operation=pb.MEMORY_OPERATION_WRITE, item_id="i", agent_id="a")
    not_json.metadata.update({"size": math.nan})
    await refused(client.stub.RecordMemoryUpdate(not_json, metadata=md), "numbers must be finite")
    # Metadata nested past what protobuf's decoder takes (100 nested messages).
    too_deep = pb.RecordActivityRequest(agent_id="a", activity_type=pb.ACTIVITY_TYPE_MEMORY_WRITE)
    too_deep.metadata.update({"deep": nested(60, 1)})
    await refused(client.stub.RecordActivity(too_deep, metadata=md), "nest too deeply")
    # Not even protobuf: an id that is not UTF-8.
    raw = client.channel.unary_unary(SERVICE + "GetActivity", request_serializer=None, response_deserializer=None)
    await refused(raw(b"\x0a\x02\xff\xfe", metadata=md), "could not be decoded")
    # Without a credential the answer is still UNAUTHENTICATED, whatever the body.
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await client.stub.RecordActivity(too_deep)
    assert anonymous.value.code() == StatusCode.UNAUTHENTICATED
    # In a bulk stream an item that cannot be decoded fails alone; the others count.
    good = pb.BulkRecordActivitiesRequest()
    good.activity.CopyFrom(pb.RecordActivityRequest(agent_id="bulk", activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED))
    bad = pb.BulkRecordActivitiesRequest()
    bad.activity.CopyFrom(too_deep)
    bulk = client.channel.stream_unary(
        SERVICE + "BulkRecordActivities",
        request_serializer=None,
        response_deserializer=pb.BulkRecordActivitiesResponse.FromString,
    )
    items = [good.SerializeToString(), bad.SerializeToString(), good.SerializeToString()]
    response = await bulk(iter(items), metadata=md)
    assert (response.recorded, response.failed) == (2, 1)
    assert response.results[1].error_code == "INVALID_ARGUMENT"
    assert "nest too deeply" in response.results[1].error_message
    assert running.servicer.state.log.last_seq == 2
