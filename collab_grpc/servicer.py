"""The CollaborationService servicer: maps RPCs onto the domain core.

Unary handlers call the core synchronously (atomic on the event loop) and turn its
errors into gRPC status codes. Stream handlers drain a bounded Subscription; a
subscriber that falls behind is cut off with RESOURCE_EXHAUSTED instead of holding
back the log or anyone else.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.descriptor_pb2 import MethodOptions
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from collab_grpc import convert, metrics, names
from collab_grpc.auth import TOKEN_EXPIRED, Access, Grant
from collab_grpc.decoding import Undecodable
from collab_grpc.errors import (
    BUDGET_TRAILER,
    BudgetExhausted,
    CollabError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
)
from collab_grpc.events import EventFilter, Subscription
from collab_grpc.history import ActivityQuery
from collab_grpc.model import Activity, Event, EventKind, MemoryUpdate
from collab_grpc.readahead import ReadAhead
from collab_grpc.state import CollaborationState, Resume
from collab_grpc.store.base import EventArchive, MemoryStore, Store, StoreUnavailable
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc
from collab_grpc.validation import check_id, check_limit, decode_cursor, encode_cursor

__all__ = [
    "CALLER",
    "READ_METHODS",
    "STATUS_FOR_ERROR",
    "WRITE_METHODS",
    "Caller",
    "CollaborationServicer",
    "Context",
    "SharedStatus",
    "abort_with",
    "read_methods",
]

# How long a write may stay pending after its subscription closed before it is cancelled
# (a client that does not read holds it forever; any other finishes within milliseconds).
BLOCKED_WRITE_GRACE = 0.5

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Request = TypeVar("Request", bound=Message)
Response = TypeVar("Response", bound=Message)

STATUS_FOR_ERROR: dict[type[CollabError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BudgetExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
}

SERVICE = pb.DESCRIPTOR.services_by_name["CollaborationService"]


def read_methods(service: ServiceDescriptor) -> frozenset[str]:
    """The methods of ``service`` its contract marks as reads (``idempotency_level =
    NO_SIDE_EFFECTS``), as the paths grpc calls them by (``/package.Service/Method``).
    Every other method needs write access: one nobody marked is a write (deny by default)."""
    return frozenset(
        f"/{service.full_name}/{method.name}"
        for method in service.methods
        if method.GetOptions().idempotency_level == MethodOptions.NO_SIDE_EFFECTS
    )


# Read at start from the contract; the auth interceptor requires write access for every
# other method. WRITE_METHODS: this service's others, by name.
READ_METHODS = read_methods(SERVICE)
WRITE_METHODS = frozenset(
    method.name for method in SERVICE.methods if f"/{SERVICE.full_name}/{method.name}" not in READ_METHODS
)

MAX_BULK_ITEMS = 100_000
# The most events one SubscribeEvents message may carry (SubscribeEventsRequest.max_batch).
MAX_EVENT_BATCH = 1000
# The default byte budget of every message the server sends (gRPC receivers refuse more
# than 4 MiB by default); see collab_grpc.config for the setting and its bounds.
DEFAULT_MAX_REPLY_BYTES = 1024 * 1024
# Room kept in a reply for what is added after its list is filled: a next_cursor (a key
# of ids at most MAX_CURSOR_LENGTH long), counts, and the wrapper of a stream message.
REPLY_RESERVE = 8 * 1024
# A bulk item's error message is cut to this many characters, so every result is bounded.
MAX_BULK_ERROR_CHARS = 1024
LOST_ITEM = "the store failed before this activity was stored; it was not recorded"
# The shortest StreamAgentStatus interval a read+write credential may ask for (a read-only
# one: the servicer's status_read_min_interval); also how stale a shared status may be.
MIN_STATUS_INTERVAL = 0.1
MAX_STATUS_INTERVAL = 3600.0
DEFAULT_STATUS_READ_MIN_INTERVAL = 1.0
# At most this share of the event loop's time goes to building the shared status: a
# build that took 50 ms is not followed by another for 500 ms.
STATUS_LOOP_SHARE = 0.1
SHUTTING_DOWN = "server is shutting down; reconnect and resume from the last seq received"
# Events a resume reads from the store's archive per page (older than those in memory).
ARCHIVE_PAGE = 256


@dataclass(frozen=True, slots=True)
class Caller:
    """What the interceptor tells a handler about its call."""

    access: Access
    # The call's response serializer passes ``bytes`` through as a message already
    # serialised, so a handler may write one serialisation to many calls.
    writes_bytes: bool = False
    # The credential's grant: until when (a stream ends then) and whose (idempotency
    # keys are scoped to it); None with auth off or without the interceptor.
    grant: Grant | None = None


# Set by the interceptor for every call it admits; without one (a bare servicer) the
# call is taken as read-only. (Caller is frozen: a shared default is safe.)
_READ_ONLY_CALLER = Caller(Access.READ)
CALLER: ContextVar[Caller] = ContextVar("collab_caller", default=_READ_ONLY_CALLER)


class SharedStatus:
    """The agent status every StreamAgentStatus stream sends, built and serialised once
    and shared: it is rebuilt only when the state changed since and the last build is old
    enough: ``min_age`` seconds, or longer when building takes long, so that building
    takes no more than ``loop_share`` of the event loop's time. However many streams there
    are and whatever their intervals, the status is built at most once per that gap, and
    not at all while nothing changes."""

    def __init__(
        self,
        build: Callable[[], pb.AgentStatusSummary],
        version: Callable[[], object],
        clock: Callable[[], float],
        *,
        min_age: float = MIN_STATUS_INTERVAL,
        loop_share: float = STATUS_LOOP_SHARE,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._build = build
        self._version = version
        self._clock = clock
        self._monotonic = monotonic
        self.min_age = min_age
        self.loop_share = loop_share
        self.builds = 0  # how many times the status was built (tests, metrics)
        self._built_version: object = None
        self._built_at = -math.inf
        self._gap = min_age  # the least time between two builds
        self._taken_at = 0.0
        # `agent_status` (field 2 of StreamAgentStatusResponse) serialised: a response is
        # its `time` serialised followed by these bytes (protobuf fields concatenate).
        self._summary = b""

    def response(self) -> bytes:
        """A StreamAgentStatusResponse, serialised. Its ``time`` is when the status it
        carries was true: now if nothing changed since it was built, else when built."""
        version = self._version()
        now = self._monotonic()
        if version != self._built_version and now - self._built_at >= self._gap:
            self._taken_at = self._clock()
            self._summary = pb.StreamAgentStatusResponse(agent_status=self._build()).SerializeToString()
            self._built_version, self._built_at = version, now
            self._gap = max(self.min_age, (self._monotonic() - now) / self.loop_share)
            self.builds += 1
        taken_at = self._clock() if version == self._built_version else self._taken_at
        return pb.StreamAgentStatusResponse(time=convert.timestamp_from_seconds(taken_at)).SerializeToString() + (
            self._summary
        )


def retry_trailers(code: grpc.StatusCode, message: str, retry_after: float) -> tuple[tuple[str, str | bytes], ...]:
    """The trailers that tell a client when to retry, in each form clients read: whole
    seconds in ``retry-after`` (collab's SDKs), and google.rpc.RetryInfo both alone in
    ``google.rpc.retryinfo-bin`` (OpenTelemetry's Python exporter) and inside the rich
    status ``grpc-status-details-bin`` (gRPC's error model: the Go and Java exporters)."""
    delay = Duration()
    delay.FromNanoseconds(max(1, math.ceil(retry_after * 1e9)))
    retry_info = error_details_pb2.RetryInfo(retry_delay=delay)
    detail = AnyMessage()
    detail.Pack(retry_info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return (
        ("retry-after", str(max(1, math.ceil(retry_after)))),
        ("google.rpc.retryinfo-bin", retry_info.SerializeToString()),
        ("grpc-status-details-bin", status.SerializeToString()),
    )


async def abort_with(context: Context, error: CollabError) -> None:
    """End the call with the status code for ``error``; RateLimited adds when to retry."""
    metrics.refused(error)
    code = STATUS_FOR_ERROR[type(error)]
    trailers: tuple[tuple[str, str | bytes], ...] = ()
    if isinstance(error, RateLimited):
        trailers = retry_trailers(code, str(error), error.retry_after)
    elif isinstance(error, BudgetExhausted):  # full until something is freed: no retry-after
        trailers = ((BUDGET_TRAILER, error.budget),)
    await context.abort(code, str(error), trailing_metadata=trailers)


def _unary(
    handler: Callable[[CollaborationServicer, Request], Response],
) -> Callable[[CollaborationServicer, Request, Context], Awaitable[Response]]:
    @functools.wraps(handler)
    async def call(self: CollaborationServicer, request: Request, context: Context) -> Response:
        try:
            await self.store.fresh()
            return handler(self, request)
        except CollabError as error:
            await abort_with(context, error)
            raise AssertionError("unreachable: abort raises") from error

    return call


def _write(
    handler: Callable[[CollaborationServicer, Request], Response],
) -> Callable[[CollaborationServicer, Request, Context], Awaitable[Response]]:
    """A write: applied to the state at once, answered only once the store has it."""

    @functools.wraps(handler)
    async def call(self: CollaborationServicer, request: Request, context: Context) -> Response:
        try:
            async with self.store.writing():
                response = handler(self, request)
                seq = self.state.log.last_seq
            await self.store.durable(seq)
            return response
        except CollabError as error:
            await abort_with(context, error)
            raise AssertionError("unreachable: abort raises") from error

    return call


# How a closed subscription's reason ends its stream (any other: it fell behind).
_CODE_FOR_CLOSE = {SHUTTING_DOWN: grpc.StatusCode.UNAVAILABLE, TOKEN_EXPIRED: grpc.StatusCode.UNAUTHENTICATED}


def _at_expiry(end: Callable[[str], None], reason: str) -> asyncio.TimerHandle | None:
    """Call ``end(reason)`` when the caller's credential expires (None: it does not).
    Expiry is wall-clock time (a JWT's ``exp``), as PyJWT checked it."""
    grant = CALLER.get().grant
    if grant is None or grant.expires_at is None:
        return None
    return asyncio.get_running_loop().call_later(max(0.0, grant.expires_at - time.time()), end, reason)


def _too_many_bulk_items() -> str:
    return (
        f"a bulk stream carries at most {MAX_BULK_ITEMS} activities; the first {MAX_BULK_ITEMS} were processed, "
        "send the rest on a new stream (idempotency keys make resending safe)"
    )


def _bulk_items(
    message: pb.BulkRecordActivitiesRequest | Undecodable,
) -> Sequence[pb.RecordActivityRequest | Undecodable]:
    """The activities one message of a bulk stream carries: ``activity`` then
    ``activities`` (a message with neither is one empty, and so refused, activity)."""
    if isinstance(message, Undecodable):
        return (message,)
    if not message.activities:
        return (message.activity,)
    if message.HasField("activity"):
        return [message.activity, *message.activities]
    return message.activities


class CollaborationServicer(pb_grpc.CollaborationServiceServicer):
    def __init__(
        self,
        state: CollaborationState,
        *,
        store: Store | None = None,
        status_interval: float = 2.0,
        status_read_min_interval: float = DEFAULT_STATUS_READ_MIN_INTERVAL,
        subscriber_queue: int = 5_000,  # at most half of the events retained (config.py)
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
    ) -> None:
        self.state = state
        self.store: Store = store or MemoryStore(state)
        self.status_interval = status_interval
        self.status_read_min_interval = status_read_min_interval
        self.subscriber_queue = subscriber_queue
        self.max_reply_bytes = max_reply_bytes
        # What a list in a reply may take: the budget less room for the rest of the reply.
        self.list_budget = max_reply_bytes - REPLY_RESERVE
        # A snapshot becomes the bridge's `collaboration_state`, one WebSocket message whose
        # JSON adds field names and ISO times to what the protobuf carries; WebSocket client
        # libraries refuse a message over 1 MiB by default, so it gets half the budget.
        self.snapshot_budget = self.list_budget // 2
        # The most one bulk result can take (an activity id, or an error code and message).
        longest_id = 4 * state.limits.max_hub_id_length
        self._bulk_result_bound = convert.entry_size(max(longest_id, 4 * MAX_BULK_ERROR_CHARS + 64) + 8)
        self.status = SharedStatus(self.agent_status_summary, lambda: state.version, state.clock)
        self._stopping = asyncio.Event()

    def agent_status_summary(self) -> pb.AgentStatusSummary:
        """The agent status as every RPC sends it, within the reply budget: the one place it is built."""
        return convert.agent_status_to_proto(self.state.agent_status(), self.list_budget)

    def begin_shutdown(self) -> None:
        """Tell every stream to end: event subscribers and status streams alike."""
        self._stopping.set()
        self.state.log.close_all(SHUTTING_DOWN)

    # -- idempotent writes ----------------------------------------------------------

    def _idempotent(
        self, method: str, request: Message, response_type: type[Response], run: Callable[[], Response]
    ) -> Response:
        """Run ``run`` once per idempotency key of the caller; a retry gets the first answer back."""
        key: str = getattr(request, "idempotency_key")  # noqa: B009 - every write request has one
        if not key:
            return run()
        check_id("idempotency_key", key, self.state.limits)
        unkeyed = type(request)()
        unkeyed.CopyFrom(request)
        unkeyed.ClearField("idempotency_key")
        # A digest, not the request: a cached answer then costs its answer's size only.
        fingerprint = hashlib.sha256(unkeyed.SerializeToString(deterministic=True)).digest()
        cache = self.state.idempotency
        now = self.state.clock()
        grant = CALLER.get().grant
        scope = grant.idempotency_scope() if grant is not None else ""
        answer = cache.lookup(method, key, fingerprint, now, scope)
        if answer is not None:
            return response_type.FromString(answer)
        response = run()
        cache.store(method, key, fingerprint, response.SerializeToString(), now, scope)
        return response

    def _record(self, request: pb.RecordActivityRequest) -> Activity:
        return self.state.record_activity(
            agent_id=request.agent_id,
            activity_type=convert.activity_type_from_proto(request.activity_type),
            department=request.department,
            metadata=convert.struct_to_dict(request.metadata),
            related_agents=request.related_agents,
            session_id=request.session_id,
            parent_activity_id=request.parent_activity_id,
        )

    def _record_activity(self, request: pb.RecordActivityRequest) -> pb.RecordActivityResponse:
        def run() -> pb.RecordActivityResponse:
            activity = self._record(request)
            response = pb.RecordActivityResponse(activity_id=activity.activity_id)
            convert.fill_activity(response.activity, activity)
            return response

        return self._idempotent("RecordActivity", request, pb.RecordActivityResponse, run)

    def _record_bulk_item(self, request: pb.RecordActivityRequest) -> str:
        """One activity of a bulk stream, which reports its id only; with an idempotency
        key, the whole answer is made (and kept, for a retry of RecordActivity too)."""
        if request.idempotency_key:
            return self._record_activity(request).activity_id
        return self._record(request).activity_id

    # -- writes ---------------------------------------------------------------------

    @_write
    def RecordActivity(self, request: pb.RecordActivityRequest) -> pb.RecordActivityResponse:  # noqa: N802
        return self._record_activity(request)

    async def BulkRecordActivities(  # noqa: N802
        self,
        request_iterator: AsyncIterator[pb.BulkRecordActivitiesRequest],
        context: Context,
    ) -> pb.BulkRecordActivitiesResponse:
        response = pb.BulkRecordActivitiesResponse()
        results = response.results
        # (result index, seq of its event, store failures seen when it was recorded): a
        # store failure after an item was decided may have refused it (see below).
        recorded_items: list[tuple[int, int, int]] = []
        failure_marks = self.store.failure_marks
        # The answer stays within the reply budget: before each item, room for its result
        # at its largest. Where there is none, the server stops reading and says so
        # (`incomplete`): the items after the last result are not recorded, to be sent again.
        answer_bytes, answer_room, result_bound = 0, self.list_budget, self._bulk_result_bound
        # The next message is read while this one is recorded (collab_grpc/readahead.py).
        async with ReadAhead(request_iterator) as messages:
            async for message in messages:
                for item in _bulk_items(message):
                    index = len(results)
                    if index >= MAX_BULK_ITEMS:
                        await abort_with(context, InvalidArgument(_too_many_bulk_items()))
                    if answer_bytes + result_bound > answer_room:
                        response.incomplete = True
                        break
                    try:
                        if isinstance(item, Undecodable):  # one bad message fails alone, like any other item
                            raise InvalidArgument(item.details)
                        async with self.store.writing():
                            activity_id = self._record_bulk_item(item)
                    except CollabError as error:
                        metrics.refused(error)
                        result = results.add(
                            error_code=STATUS_FOR_ERROR[type(error)].name,
                            error_message=str(error)[:MAX_BULK_ERROR_CHARS],
                        )
                    else:
                        result = results.add(activity_id=activity_id)
                        recorded_items.append((index, self.state.log.last_seq, len(failure_marks)))
                    answer_bytes += convert.entry_size(result.ByteSize())
                if response.incomplete:
                    break
        response.recorded = len(recorded_items)
        response.failed = len(results) - len(recorded_items)
        try:
            await self.store.durable(self.state.log.last_seq)
        except StoreUnavailable as error:
            await abort_with(context, error)
        self._refuse_lost_items(response, recorded_items, failure_marks, answer_room - answer_bytes)
        return response

    @staticmethod
    def _refuse_lost_items(
        response: pb.BulkRecordActivitiesResponse,
        recorded_items: list[tuple[int, int, int]],
        failure_marks: Sequence[int],
        room: int,
    ) -> None:
        """Turn into UNAVAILABLE the items a store failure refused after they were decided:
        an item is lost when the first failure after it came before its seq was durable.

        Refused, a result carries the code, and the message while the answer has ``room``
        for it: the code alone is smaller than any activity id, so the answer never grows
        past its budget."""
        if not recorded_items or recorded_items[0][2] == len(failure_marks):
            return  # no failure since the first item was recorded
        for index, seq, failures_before in recorded_items:
            if failures_before < len(failure_marks) and seq > failure_marks[failures_before]:
                result = response.results[index]
                before = convert.entry_size(result.ByteSize())
                result.activity_id = ""
                result.error_code = grpc.StatusCode.UNAVAILABLE.name
                result.error_message = LOST_ITEM
                after = convert.entry_size(result.ByteSize())
                if after - before > room:
                    result.error_message = ""
                    after = convert.entry_size(result.ByteSize())
                room -= after - before
                response.recorded -= 1
                response.failed += 1

    @_write
    def CompleteActivity(self, request: pb.CompleteActivityRequest) -> pb.CompleteActivityResponse:  # noqa: N802
        def run() -> pb.CompleteActivityResponse:
            activity = self.state.complete_activity(
                request.activity_id,
                success=request.success,
                failure_reason=request.failure_reason,
                metadata=convert.struct_to_dict(request.metadata),
            )
            response = pb.CompleteActivityResponse(activity_id=activity.activity_id)
            convert.fill_activity(response.activity, activity)
            return response

        return self._idempotent("CompleteActivity", request, pb.CompleteActivityResponse, run)

    @_write
    def StartCollaboration(  # noqa: N802
        self, request: pb.StartCollaborationRequest
    ) -> pb.StartCollaborationResponse:
        def run() -> pb.StartCollaborationResponse:
            session = self.state.start_collaboration(
                participants=request.participants,
                session_type=request.session_type,
                metadata=convert.struct_to_dict(request.metadata),
            )
            return pb.StartCollaborationResponse(
                session_id=session.session_id, session=convert.session_to_proto(session)
            )

        return self._idempotent("StartCollaboration", request, pb.StartCollaborationResponse, run)

    @_write
    def EndCollaboration(self, request: pb.EndCollaborationRequest) -> pb.EndCollaborationResponse:  # noqa: N802
        def run() -> pb.EndCollaborationResponse:
            session = self.state.end_collaboration(request.session_id)
            return pb.EndCollaborationResponse(session_id=session.session_id, session=convert.session_to_proto(session))

        return self._idempotent("EndCollaboration", request, pb.EndCollaborationResponse, run)

    @_write
    def RecordDecision(self, request: pb.RecordDecisionRequest) -> pb.RecordDecisionResponse:  # noqa: N802
        def run() -> pb.RecordDecisionResponse:
            decision = self.state.record_decision(
                session_id=request.session_id,
                agent_id=request.agent_id,
                decision=request.decision,
                rationale=request.rationale,
                votes=dict(request.votes),
                metadata=convert.struct_to_dict(request.metadata),
            )
            return pb.RecordDecisionResponse(
                decision_id=decision.decision_id, decision=convert.decision_to_proto(decision)
            )

        return self._idempotent("RecordDecision", request, pb.RecordDecisionResponse, run)

    @_write
    def RecordMemoryUpdate(  # noqa: N802
        self, request: pb.RecordMemoryUpdateRequest
    ) -> pb.RecordMemoryUpdateResponse:
        def run() -> pb.RecordMemoryUpdateResponse:
            update = self.state.record_memory_update(
                operation=convert.memory_operation_from_proto(request.operation),
                item_id=request.item_id,
                agent_id=request.agent_id,
                metadata=convert.struct_to_dict(request.metadata),
            )
            return pb.RecordMemoryUpdateResponse(update=convert.memory_update_to_proto(update))

        return self._idempotent("RecordMemoryUpdate", request, pb.RecordMemoryUpdateResponse, run)

    # -- reads ----------------------------------------------------------------------

    # Every list in a reply is filled while its real serialised size fits the reply budget
    # (convert.fill_within); what is left out is counted or continued with a cursor.

    @_unary
    def GetAgentStatus(self, request: pb.GetAgentStatusRequest) -> pb.GetAgentStatusResponse:  # noqa: N802
        return pb.GetAgentStatusResponse(agent_status=self.agent_status_summary())

    @_unary
    def ListAgents(self, request: pb.ListAgentsRequest) -> pb.ListAgentsResponse:  # noqa: N802
        count = check_limit("limit", request.limit, self.state.limits)
        after = decode_cursor("cursor", request.cursor, "agents", str)[0] if request.cursor else ""
        total, views = self.state.agents_after(after)
        response = pb.ListAgentsResponse(total=total)
        added, _, left = convert.fill_within(
            response.agents, (convert.agent_to_proto(v) for v in views), self.list_budget, count
        )
        if left is not None and added:
            response.next_cursor = encode_cursor("agents", response.agents[-1].agent_id)
        return response

    @_unary
    def GetActivityFeed(self, request: pb.GetActivityFeedRequest) -> pb.GetActivityFeedResponse:  # noqa: N802
        count = check_limit("limit", request.limit, self.state.limits)
        after = decode_cursor("cursor", request.cursor, "feed", str)[0] if request.cursor else ""
        feed = self.state.feed_after(agent_id=request.agent_id, session_id=request.session_id, after=after)
        response = pb.GetActivityFeedResponse(agent_id=request.agent_id)
        added, _, left = convert.fill_within(
            response.activities, (convert.activity_to_proto(a) for a in feed), self.list_budget, count
        )
        response.total = added
        if left is not None and added:
            response.next_cursor = encode_cursor("feed", response.activities[-1].activity_id)
        return response

    @_unary
    def ListDecisions(self, request: pb.ListDecisionsRequest) -> pb.ListDecisionsResponse:  # noqa: N802
        decisions = self.state.decisions_of(request.session_id)
        count = check_limit("limit", request.limit, self.state.limits)
        offset = decode_cursor("cursor", request.cursor, "decisions", int)[0] if request.cursor else 0
        if offset < 0:
            raise InvalidArgument("cursor is not a cursor this listing gave out; start again without one")
        response = pb.ListDecisionsResponse(total=len(decisions))
        added, _, left = convert.fill_within(
            response.decisions,
            (convert.decision_to_proto(d) for d in itertools.islice(decisions, offset, None)),
            self.list_budget,
            count,
        )
        if left is not None and added:
            response.next_cursor = encode_cursor("decisions", offset + added)
        return response

    @_unary
    def ListMemoryUpdates(self, request: pb.ListMemoryUpdatesRequest) -> pb.ListMemoryUpdatesResponse:  # noqa: N802
        count = check_limit("limit", request.limit, self.state.limits)
        agent_id = check_id("agent_id", request.agent_id, self.state.limits, required=False)
        log = self.state.log
        before = None
        if request.cursor:
            before, epoch = decode_cursor("cursor", request.cursor, "memory", int, str)
            if epoch != log.epoch:
                raise InvalidArgument("cursor is from an earlier history (the epoch changed); start again without one")
        updates = (
            pb.RecordedMemoryUpdate(seq=event.seq, update=convert.memory_update_to_proto(event.payload))
            for event in log.newest(EventKind.MEMORY_UPDATED, before)
            if isinstance(event.payload, MemoryUpdate) and (not agent_id or event.payload.agent_id == agent_id)
        )
        response = pb.ListMemoryUpdatesResponse(oldest_retained_seq=log.first_retained_seq, epoch=log.epoch)
        added, _, left = convert.fill_within(response.updates, updates, self.list_budget, count)
        if left is not None and added:
            response.next_cursor = encode_cursor("memory", response.updates[-1].seq, log.epoch)
        return response

    @_unary
    def GetActivity(self, request: pb.GetActivityRequest) -> pb.GetActivityResponse:  # noqa: N802
        activity = self.state.require_activity(request.activity_id)
        return pb.GetActivityResponse(activity=convert.activity_to_proto(activity))

    @_unary
    def ListActiveCollaborations(  # noqa: N802
        self, request: pb.ListActiveCollaborationsRequest
    ) -> pb.ListActiveCollaborationsResponse:
        # No limit: as many as fit (what this answered before it had pages).
        count = check_limit("limit", request.limit, self.state.limits) if request.limit else None
        after = None
        if request.cursor:
            started_at, session_id = decode_cursor("cursor", request.cursor, "active", float, str)
            after = (float(started_at), session_id)
        response = pb.ListActiveCollaborationsResponse(total=len(self.state.active_collaborations()))
        sessions = list(self.state.active_collaborations_after(after))
        added, _, left = convert.fill_within(
            response.collaborations, (convert.session_to_proto(s) for s in sessions), self.list_budget, count
        )
        if left is not None and added:
            # The key as the state holds it: a start time read back from the message's
            # Timestamp may differ from it in its last digit.
            last = sessions[added - 1]
            response.next_cursor = encode_cursor("active", last.started_at, last.session_id)
        return response

    @_unary
    def GetCollaboration(self, request: pb.GetCollaborationRequest) -> pb.GetCollaborationResponse:  # noqa: N802
        session, activities, decisions = self.state.get_collaboration(request.session_id)
        response = pb.GetCollaborationResponse(session=convert.session_to_proto(session))
        # Decisions may take half of what the session leaves, activities the rest; each
        # list keeps its oldest entries, and says how many newer ones it left out.
        room = self.list_budget - response.ByteSize()
        decided, used, _ = convert.fill_within(
            response.decisions, (convert.decision_to_proto(d) for d in decisions), room // 2
        )
        listed, _, _ = convert.fill_within(
            response.activities, (convert.activity_to_proto(a) for a in activities), room - used
        )
        response.decisions_omitted = len(decisions) - decided
        response.activities_omitted = len(activities) - listed
        return response

    @_unary
    def ListEndedCollaborations(  # noqa: N802
        self, request: pb.ListEndedCollaborationsRequest
    ) -> pb.ListEndedCollaborationsResponse:
        count = check_limit("limit", request.limit, self.state.limits)
        after = decode_cursor("cursor", request.cursor, "ended", str)[0] if request.cursor else ""
        response = pb.ListEndedCollaborationsResponse()
        added, _, left = convert.fill_within(
            response.collaborations,
            (convert.session_to_proto(s) for s in self.state.ended_collaborations_after(after)),
            self.list_budget,
            count,
        )
        response.total = added
        if left is not None and added:
            response.next_cursor = encode_cursor("ended", response.collaborations[-1].session_id)
        return response

    # -- history search ---------------------------------------------------------------

    async def QueryActivities(  # noqa: N802
        self, request: pb.QueryActivitiesRequest, context: Context
    ) -> pb.QueryActivitiesResponse:
        try:
            query = query_from_proto(request, self.state)
            await self.store.fresh()
            # One more than the page: whether another follows is known without a second read.
            found = await self.store.query_activities(query, query.limit + 1)
        except CollabError as error:
            await abort_with(context, error)
            raise AssertionError("unreachable: abort raises") from error
        response = pb.QueryActivitiesResponse()
        added, _, left = convert.fill_within(
            response.activities, (convert.activity_to_proto(a) for a in found.activities), self.list_budget, query.limit
        )
        if left is not None and added:
            # The key as the store holds it (a Timestamp read back may differ in its last digit).
            response.next_cursor = query.cursor_after(found.activities[added - 1])
        elif left is None and found.scanned_to is not None:
            # The store stopped at its scan budget before the page was full: go on from there.
            response.next_cursor = query.cursor_at(found.scanned_to)
        return response

    async def CheckCredential(  # noqa: N802
        self, request: pb.CheckCredentialRequest, context: Context
    ) -> pb.CheckCredentialResponse:
        # The interceptor refused the call if the credential is not valid.
        caller = CALLER.get()
        response = pb.CheckCredentialResponse(read=Access.READ in caller.access, write=Access.WRITE in caller.access)
        if caller.grant is not None and caller.grant.expires_at is not None:
            response.expires_at.CopyFrom(convert.timestamp_from_seconds(caller.grant.expires_at))
        return response

    # -- streams --------------------------------------------------------------------

    # Stream handlers write with context.write rather than yield, so that a write blocked
    # on a client that stopped reading can be cancelled (see _pump).
    async def SubscribeEvents(  # type: ignore[override]  # noqa: N802
        self, request: pb.SubscribeEventsRequest, context: Context
    ) -> None:
        subscription: Subscription | None = None
        try:
            try:
                subscription, initial = await self._subscribe(request, context)
            except CollabError as error:
                await abort_with(context, error)
                return
            # A credential that expires ends the stream then (one timer, nothing per event).
            expiry = _at_expiry(subscription.close, TOKEN_EXPIRED)
            try:
                await self._pump(subscription, initial, max(1, request.max_batch), context)
            finally:
                if expiry is not None:
                    expiry.cancel()
        finally:  # whatever ended the stream (the client, an error, cancellation)
            if subscription is not None:
                self.state.log.unsubscribe(subscription)

    async def _subscribe(
        self, request: pb.SubscribeEventsRequest, context: Context
    ) -> tuple[Subscription, AsyncIterator[pb.SubscribeEventsResponse]]:
        """The subscription a SubscribeEvents request asks for, and its first messages."""
        if request.max_batch > MAX_EVENT_BATCH:
            raise InvalidArgument(f"max_batch must be between 0 and {MAX_EVENT_BATCH}, got {request.max_batch}")
        await self.store.fresh()
        event_filter = convert.event_filter_from_proto(request)
        for agent_id in request.agent_ids:
            check_id("agent_ids entry", agent_id, self.state.limits)
        if self._stopping.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        if request.HasField("since_seq") and not request.epoch:
            raise InvalidArgument("epoch is required with since_seq")
        initial, resume, subscription = self._start_subscription(request, event_filter)
        if not any(message.HasField("snapshot") for message in initial):
            # Replayed and live events are published ones: nothing to wait for.
            return subscription, self._messages(initial, resume, subscription, request)
        # A snapshot includes the changes still being stored: it is handed on once they
        # are. A failed commit takes them back and the store reloads the state; at that
        # moment (nothing pending) the snapshot is taken again, so a read is never refused
        # for a write's failure.
        retaken: list[tuple[list[pb.SubscribeEventsResponse], Resume | None, Subscription]] = []

        def retake() -> None:
            retaken.append(self._start_subscription(request, event_filter))

        self.state.restore_listeners.add(retake)
        try:
            await self.store.durable(self.state.log.last_seq)
        except StoreUnavailable:
            self.state.log.unsubscribe(subscription)
            if not retaken:  # the store failed and could not reload: nothing to hand on
                raise
            initial, resume, subscription = retaken.pop()
        except BaseException:
            self.state.log.unsubscribe(subscription)
            raise
        finally:
            self.state.restore_listeners.discard(retake)
            for _, _, earlier in retaken:  # from an earlier reload than the one used
                self.state.log.unsubscribe(earlier)
        return subscription, self._messages(initial, resume, subscription, request)

    def _start_subscription(
        self, request: pb.SubscribeEventsRequest, event_filter: EventFilter
    ) -> tuple[list[pb.SubscribeEventsResponse], Resume | None, Subscription]:
        """The subscription, its first messages, and the resume (None: not a resume)."""
        initial: list[pb.SubscribeEventsResponse] = []
        if request.HasField("since_seq"):
            archive = self.store.archived_from(request.epoch) if isinstance(self.store, EventArchive) else None
            resume, subscription = self.state.resume(
                event_filter, self.subscriber_queue, request.epoch, request.since_seq, archive
            )
            initial.append(
                pb.SubscribeEventsResponse(
                    resume=pb.ResumeResult(
                        recovered=resume.recovered,
                        epoch=self.state.epoch,
                        since_seq=request.since_seq,
                        reason=resume.reason,
                    )
                )
            )
            if resume.snapshot is not None:
                initial.append(
                    pb.SubscribeEventsResponse(
                        snapshot=convert.snapshot_to_proto(resume.snapshot, self.snapshot_budget)
                    )
                )
            return initial, resume, subscription
        if request.include_snapshot:
            snapshot, subscription = self.state.subscribe_with_snapshot(event_filter, self.subscriber_queue)
            initial.append(
                pb.SubscribeEventsResponse(snapshot=convert.snapshot_to_proto(snapshot, self.snapshot_budget))
            )
            return initial, None, subscription
        return initial, None, self.state.subscribe(event_filter, self.subscriber_queue)

    async def _messages(
        self,
        initial: list[pb.SubscribeEventsResponse],
        resume: Resume | None,
        subscription: Subscription,
        request: pb.SubscribeEventsRequest,
    ) -> AsyncIterator[pb.SubscribeEventsResponse]:
        """The first messages, then a resume's replay: from the store's archive (a page at
        a time, while the subscription is open) what is older than the events in memory,
        then those; each converted as it is written (a replay can be long), in batches
        of up to ``max_batch`` when the reader asked for them."""
        for message in initial:
            yield message
        if resume is None:
            return
        max_batch = max(1, request.max_batch)
        after = request.since_seq
        if resume.archived_through > after and isinstance(self.store, EventArchive):
            while after < resume.archived_through and not subscription.closed:
                try:
                    events = await self.store.read_events(after, resume.archived_through, ARCHIVE_PAGE)
                except StoreUnavailable as error:
                    subscription.close(f"{error}; resubscribe with since_seq set to the last seq received")
                    return
                if not events or events[0].seq != after + 1:
                    subscription.close(
                        f"events after seq {after} are no longer retained (retention deleted them during the "
                        "resume); resubscribe with since_seq set to the last seq received"
                    )
                    return
                for message in self._event_messages([e for e in events if subscription.filter.matches(e)], max_batch):
                    yield message
                after = events[-1].seq
        for message in self._event_messages(resume.replay, max_batch):
            if subscription.closed:
                return
            yield message

    async def _pump(
        self,
        subscription: Subscription,
        initial: AsyncIterable[pb.SubscribeEventsResponse],
        max_batch: int,
        context: Context,
    ) -> None:
        """Write the initial messages, then every event the subscription takes in: up
        to ``max_batch`` of those waiting in one message.

        A write blocks while the client does not read (HTTP/2 flow control). If the
        subscription closes meanwhile (overflow, shutdown), the blocked write is
        cancelled so the call ends with a status now rather than never.
        """
        ready = asyncio.Event()
        handler = asyncio.current_task()
        loop = asyncio.get_running_loop()
        # Which write is in flight (0: none). Cancelling a write grpc has already started
        # but would finish at once leaves its operation pending, and the call then never
        # gets its status; so only a write still pending after a grace period (one the
        # client's flow control holds) is cancelled.
        in_flight = [0]
        writes = itertools.count(1)

        def cancel_if_blocked(write: int) -> None:
            if in_flight[0] == write and handler is not None:
                in_flight[0] = 0  # once
                handler.cancel()

        def wake() -> None:
            ready.set()
            if subscription.closed and in_flight[0]:
                loop.call_later(BLOCKED_WRITE_GRACE, cancel_if_blocked, in_flight[0])

        async def write(message: pb.SubscribeEventsResponse) -> None:
            in_flight[0] = next(writes)
            await context.write(message)
            in_flight[0] = 0

        subscription.on_ready = wake
        try:
            async for message in initial:
                await write(message)
            while True:
                ready.clear()
                events = subscription.take()
                if not events:
                    if subscription.closed:
                        break
                    await ready.wait()
                    continue
                for message in self._event_messages(events, max_batch):
                    await write(message)
        except asyncio.CancelledError:
            if not subscription.closed:
                raise  # the client went away
        reason = subscription.closed_reason or ""
        code = _CODE_FOR_CLOSE.get(reason, grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_code(code)
        context.set_details(reason)

    def _event_messages(self, events: list[Event], max_batch: int) -> Iterator[pb.SubscribeEventsResponse]:
        """``events`` as messages, made as they are written: one Event each, or (the
        reader asked for ``max_batch`` above 1) EventBatches of up to ``max_batch``,
        each within the reply budget; a lone event goes as an Event."""
        if max_batch == 1 or len(events) == 1:
            for event in events:
                yield pb.SubscribeEventsResponse(event=convert.event_to_proto(event))
            return
        budget = self.list_budget
        batch: list[pb.Event] = []
        size = 0
        for event in events:
            converted = convert.event_to_proto(event)
            entry = convert.entry_size(converted.ByteSize())
            if batch and (len(batch) >= max_batch or size + entry > budget):
                yield pb.SubscribeEventsResponse(events=pb.EventBatch(events=batch))
                batch, size = [], 0
            batch.append(converted)
            size += entry
        if batch:
            yield pb.SubscribeEventsResponse(events=pb.EventBatch(events=batch))

    async def StreamAgentStatus(  # type: ignore[override]  # noqa: N802
        self, request: pb.StreamAgentStatusRequest, context: Context
    ) -> None:
        caller = CALLER.get()
        interval = self.status_interval  # the server's own choice: no floor applies
        if request.HasField("interval"):
            interval = request.interval.ToNanoseconds() / 1e9
            read_only = Access.WRITE not in caller.access
            floor = max(MIN_STATUS_INTERVAL, self.status_read_min_interval) if read_only else MIN_STATUS_INTERVAL
            if not floor <= interval <= MAX_STATUS_INTERVAL:
                whose = (
                    f" for a read-only credential (a read+write one may ask for {MIN_STATUS_INTERVAL:g} s)"
                    if read_only and floor > MIN_STATUS_INTERVAL
                    else ""
                )
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"interval must be between {floor:g} s and {MAX_STATUS_INTERVAL:.0f} s{whose}, got {interval:g} s",
                )
        expires_at = caller.grant.expires_at if caller.grant is not None else None
        while not self._stopping.is_set():
            response = self.status.response()
            # One serialisation shared by every stream; without the interceptor's
            # pass-through serializer (a bare servicer) it is parsed back into a message.
            await context.write(response if caller.writes_bytes else pb.StreamAgentStatusResponse.FromString(response))
            wait = interval
            if expires_at is not None:
                # Woken at the credential's expiry if that comes before the next update.
                wait = min(interval, max(0.0, expires_at - time.time()))
            try:
                await asyncio.wait_for(self._stopping.wait(), wait)
            except TimeoutError:
                if expires_at is not None and time.time() >= expires_at:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, TOKEN_EXPIRED)
                continue
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(SHUTTING_DOWN)


def query_from_proto(request: pb.QueryActivitiesRequest, state: CollaborationState) -> ActivityQuery:
    """The checked query a request asks for (InvalidArgument naming a bad filter)."""
    types = []
    for value in request.activity_types:
        if value not in convert.ACTIVITY_TYPE_FROM_PROTO:
            raise InvalidArgument(f"activity_types: {value} is not a known activity type")
        types.append(convert.ACTIVITY_TYPE_FROM_PROTO[value].value)
    statuses = []
    for status in request.statuses:
        if status not in names.ACTIVITY_STATUS_NAMES:
            raise InvalidArgument(f"statuses: {status} is not a known activity status")
        statuses.append(names.ACTIVITY_STATUS_NAMES[status])
    return ActivityQuery.build(
        state.limits,
        agent_ids=request.agent_ids,
        departments=request.departments,
        activity_types=types,
        statuses=statuses,
        session_ids=request.session_ids,
        parent_activity_ids=request.parent_activity_ids,
        since=convert.seconds_from_timestamp(request.since) if request.HasField("since") else None,
        until=convert.seconds_from_timestamp(request.until) if request.HasField("until") else None,
        metadata=[(match.key, match.value) for match in request.metadata],
        order="asc" if request.oldest_first else "desc",
        cursor=request.cursor,
        limit=request.limit,
    )
