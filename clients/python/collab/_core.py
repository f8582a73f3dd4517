"""The SDK's shared core, which does no I/O: every method of the two clients, declared
once on `ClientBase` (its signature, docstring and request from _requests, its result
here); the rule for retrying a call; the paging of a search; the cursor that resumes an
event stream where it broke; and the recorders' buffer, with the thresholds it is sent at
and what became of each activity. `Client` (_client.py: blocking grpc, a thread) and
`AsyncClient` (_async_client.py: grpc.aio, a task) each drive it with their own I/O, as
the sync and asyncio halves of httpx and websockets drive theirs; neither imports the
other."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, NamedTuple, ParamSpec, TypeVar, overload

import grpc
from google.protobuf.message import Message

from collab import _requests as requests
from collab._errors import CollabError, InvalidArgument, RateLimited, ResumeFailed, Unavailable, error_from_rpc
from collab._settings import Settings
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = [
    "MAX_BATCH",
    "MAX_BUFFER",
    "MAX_DELAY",
    "RESUMABLE",
    "ActivityHandle",
    "Batching",
    "BulkProgress",
    "ClientBase",
    "EventCursor",
    "Pages",
    "RecordFailure",
    "Retries",
    "UnaryCall",
    "sort_results",
]

P = ParamSpec("P")
T = TypeVar("T")
ChannelT = TypeVar("ChannelT", grpc.Channel, grpc.aio.Channel)
ClientT = TypeVar("ClientT")
ItemT = TypeVar("ItemT")

log = logging.getLogger("collab")

# Stream failures after which following the log simply reconnects and resumes.
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)

# A recorder's defaults: activities a batch, seconds between flushes, activities waiting.
MAX_BATCH = 500
MAX_DELAY = 0.2
MAX_BUFFER = 10_000


def metadata_refused(error: CollabError) -> bool:
    """Whether a completion with metadata was refused for its metadata: INVALID_ARGUMENT
    (over the metadata limit once merged), or a full budget (the hub's database over
    its byte budget takes a completion only without metadata)."""
    return isinstance(error, InvalidArgument) or (isinstance(error, RateLimited) and error.budget is not None)


def warn_metadata_dropped(handle: ActivityHandle, refusal: CollabError) -> None:
    log.warning(
        "activity %s is completed without the metadata its block added (%s, not kept): the hub refused it: %s",
        handle.activity_id,
        ", ".join(sorted(handle.metadata)),
        refusal,
    )


def warn_not_completed(handle: ActivityHandle, error: BaseException, failure: Exception) -> None:
    log.warning(
        "activity %s could not be completed as failed (%s); the block's own %s is raised",
        handle.activity_id,
        failure,
        type(error).__name__,
    )


@dataclass
class ActivityHandle:
    """An activity recorded by ``activity()``; completed when the block ends, with
    ``metadata`` (what the block put there: token usage...) merged into its metadata."""

    activity_id: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecordFailure:
    """An activity the hub refused in a batch."""

    request: pb.RecordActivityRequest
    code: str
    message: str


# -- calls ------------------------------------------------------------------------------


class Retries:
    """The rule for a call that failed: tried again with backoff while UNAVAILABLE, at most
    ``settings.retries`` times (every write carries an idempotency key, so a retry never
    records twice); any other error is the caller's at once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.attempts = 0

    def delay_after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before trying again after ``error``; raises the SDK's exception
        for ``error`` when it is not to be tried again."""
        failure = error_from_rpc(error)
        self.attempts += 1
        if not isinstance(failure, Unavailable) or self.attempts > self.settings.retries:
            raise failure from None
        return self.settings.backoff(self.attempts)


class UnaryCall(NamedTuple, Generic[T]):
    """One unary call as data: the RPC's name, its request, and what the caller gets
    from the reply."""

    method: str
    request: Message
    result: Callable[[Any], T]


class _Method:
    """A method of both clients made from a builder in _requests: it has the builder's
    parameters and docstring (so ``help()`` and ``inspect.signature`` show the real ones)
    and hands what the builder makes to the client's own I/O. ``blocking`` is the
    method on a blocking client, ``asynchronous`` on an asyncio one: an ``async def``
    (or async generator) there, so that frameworks that check for a coroutine function
    before awaiting a callback (Starlette's background tasks...) await it."""

    def __init__(
        self,
        build: Callable[..., Any],
        blocking: tuple[Callable[..., Any], str],
        asynchronous: tuple[Callable[..., Any], str],
    ) -> None:
        """``blocking`` and ``asynchronous``: each function with the return annotation it shows."""
        signature = inspect.signature(build)
        parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *signature.parameters.values()]
        self._functions = {False: blocking[0], True: asynchronous[0]}
        for function, returns in (blocking, asynchronous):
            function.__signature__ = signature.replace(parameters=parameters, return_annotation=returns)  # type: ignore[attr-defined]
            function.__doc__ = build.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        for function in self._functions.values():
            function.__name__ = name
            function.__qualname__ = f"{owner.__qualname__}.{name}"
            function.__module__ = owner.__module__

    def _bind(self, client: object, owner: type[ClientBase[Any]]) -> Any:
        function = self._functions[owner.asynchronous]
        return function if client is None else types.MethodType(function, client)


class Call(_Method, Generic[P, T]):
    """A unary method: ``build``'s request sent as ``method``, ``result`` of the reply
    returned (by ``Client``) or awaited (on ``AsyncClient``)."""

    def __init__(self, method: str, build: Callable[P, Message], result: Callable[[Any], T]) -> None:
        def call(client: Any, /, *args: Any, **kwargs: Any) -> Any:
            return client._unary(UnaryCall(method, build(*args, **kwargs), result))

        async def call_async(client: Any, /, *args: Any, **kwargs: Any) -> Any:
            return await call(client, *args, **kwargs)

        returns = str(inspect.signature(result).return_annotation)
        super().__init__(build, (call, returns), (call_async, returns))

    @overload
    def __get__(self, client: None, owner: type) -> Callable[..., Any]: ...
    @overload
    def __get__(self, client: ClientBase[grpc.Channel], owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, client: ClientBase[grpc.aio.Channel], owner: type) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, client: object, owner: type[ClientBase[Any]]) -> Any:
        return self._bind(client, owner)


class Iteration(_Method, Generic[P, ItemT]):
    """A method that returns an iterator of ``item``s (an async iterator on
    ``AsyncClient``): what ``build`` makes (`Pages`' first request, an `EventCursor`)
    driven by the client's ``driver`` (``_search``, ``_follow``). The arguments are
    checked, and anything sent, when the first item is asked for."""

    def __init__(self, build: Callable[P, object], driver: str, item: type[ItemT]) -> None:
        def iterate(client: Any, /, *args: Any, **kwargs: Any) -> Any:
            return getattr(client, driver)(functools.partial(build, *args, **kwargs))

        async def iterate_async(client: Any, /, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            async with contextlib.aclosing(iterate(client, *args, **kwargs)) as items:
                async for each in items:
                    yield each

        name = item.__name__
        super().__init__(build, (iterate, f"Iterator[{name}]"), (iterate_async, f"AsyncIterator[{name}]"))

    @overload
    def __get__(self, client: None, owner: type) -> Callable[..., Any]: ...
    @overload
    def __get__(self, client: ClientBase[grpc.Channel], owner: type) -> Callable[P, Iterator[ItemT]]: ...
    @overload
    def __get__(self, client: ClientBase[grpc.aio.Channel], owner: type) -> Callable[P, AsyncIterator[ItemT]]: ...
    def __get__(self, client: object, owner: type[ClientBase[Any]]) -> Any:
        return self._bind(client, owner)


# What the caller gets from each reply.


def _activity_id(reply: pb.RecordActivityResponse) -> str:
    return reply.activity_id


def _activity(reply: pb.CompleteActivityResponse | pb.GetActivityResponse) -> pb.Activity:
    return reply.activity


def _session_id(reply: pb.StartCollaborationResponse) -> str:
    return reply.session_id


def _session(reply: pb.EndCollaborationResponse) -> pb.CollaborationSession:
    return reply.session


def _decision_id(reply: pb.RecordDecisionResponse) -> str:
    return reply.decision_id


def _update(reply: pb.RecordMemoryUpdateResponse) -> pb.MemoryUpdate:
    return reply.update


def _agent_status(reply: pb.GetAgentStatusResponse) -> pb.AgentStatusSummary:
    return reply.agent_status


def _activities(reply: pb.GetActivityFeedResponse) -> list[pb.Activity]:
    return list(reply.activities)


def _collaborations(
    reply: pb.ListActiveCollaborationsResponse | pb.ListEndedCollaborationsResponse,
) -> list[pb.CollaborationSession]:
    return list(reply.collaborations)


def _whole(reply: pb.GetCollaborationResponse) -> pb.GetCollaborationResponse:
    return reply


def _memory_updates(reply: pb.ListMemoryUpdatesResponse) -> list[pb.RecordedMemoryUpdate]:
    return list(reply.updates)


# -- the history search ---------------------------------------------------------------------


class Pages:
    """A history search, page by page: the request for the next page, which follows the
    cursor the hub answered the last one with."""

    method = "QueryActivities"

    def __init__(self, first: pb.QueryActivitiesRequest) -> None:
        self.request = first
        self.done = False

    def take(self, reply: pb.QueryActivitiesResponse) -> Sequence[pb.Activity]:
        """A page's activities; done once the hub answers without a cursor."""
        if reply.next_cursor:
            self.request.cursor = reply.next_cursor
        else:
            self.done = True
        return reply.activities


# -- the event stream ---------------------------------------------------------------------


def events(
    *,
    types: Iterable[str] | None = None,
    agent_ids: Iterable[str] | None = None,
    activity_types: Iterable[str] | None = None,
    since: int | None = None,
    epoch: str | None = None,
) -> EventCursor:
    """Every event from ``since`` (default: now) on, following the log for as long as
    it is iterated. A broken stream (server restart, network, falling behind) is
    reconnected with backoff and resumed after the last event yielded: no gap, no
    duplicate. ResumeFailed if the hub can no longer fill the gap."""
    return EventCursor(types, agent_ids, activity_types, since, epoch)


class EventCursor:
    """Where a followed event stream stands: the request that subscribes (again) after
    the last event yielded, what each message of the stream means, and how long to wait
    before resubscribing when the stream ends or breaks."""

    def __init__(
        self,
        types: Iterable[str] | None,
        agent_ids: Iterable[str] | None,
        activity_types: Iterable[str] | None,
        since: int | None,
        epoch: str | None,
    ) -> None:
        self._filters = (list(types or ()), list(agent_ids or ()), list(activity_types or ()))
        requests.subscribe(*self._filters, None)  # an unknown name: ValueError before any call
        self._since = since
        self.position: tuple[str, int] | None = (epoch, since) if since is not None and epoch else None
        self._breaks = 0

    @property
    def needs_epoch(self) -> bool:
        """Whether ``since`` came without an epoch: the hub's current one is asked first
        (the first message of `epoch_probe`, given to ``start_in``)."""
        return self.position is None and self._since is not None

    def start_in(self, first: pb.SubscribeEventsResponse) -> None:
        """Start after ``since`` in the epoch of ``first``, a stream's snapshot."""
        assert self._since is not None
        self.position = (first.snapshot.epoch, self._since)

    def request(self) -> pb.SubscribeEventsRequest:
        """The subscription from the position (with a snapshot when there is none yet)."""
        request = requests.subscribe(*self._filters, self.position)
        request.include_snapshot = self.position is None
        return request

    def take(self, message: pb.SubscribeEventsResponse) -> pb.Event | None:
        """The event ``message`` carries, if any, with the position moved past it;
        ResumeFailed when the hub says it could not resume from the position."""
        self._breaks = 0
        kind = message.WhichOneof("message")
        if kind == "snapshot":
            self.position = (message.snapshot.epoch, message.snapshot.seq)
        elif kind == "resume" and not message.resume.recovered:
            raise ResumeFailed(message.resume.reason)
        elif kind == "event":
            self.position = (message.event.epoch, message.event.seq)
            return message.event
        return None

    def delay_after(self, error: grpc.RpcError | None, settings: Settings) -> float:
        """Seconds to wait before subscribing again after the stream ended (``error``
        None) or broke with ``error``; raises the SDK's exception for an error that is a
        refusal rather than a break (a bad token, a bad filter)."""
        if error is not None and error.code() not in RESUMABLE:
            raise error_from_rpc(error) from None
        self._breaks += 1
        return settings.backoff(self._breaks)


def epoch_probe() -> pb.SubscribeEventsRequest:
    """A subscription whose first message (a snapshot) tells the hub's current epoch."""
    return pb.SubscribeEventsRequest(include_snapshot=True)


# -- the clients ----------------------------------------------------------------------------


class ClientBase(Generic[ChannelT]):
    """What both clients are: their settings and channel, and every call of the hub,
    declared once below. A subclass supplies the I/O: ``_connect`` (the channel),
    ``_unary`` (a UnaryCall), ``_search`` (Pages) and ``_follow`` (an EventCursor)."""

    _stub: Any
    # Whether the I/O is asyncio's: the methods are then coroutine functions.
    asynchronous: ClassVar[bool] = False

    def __init__(
        self,
        target: str | None = None,
        token: str | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        channel: ChannelT | None = None,
        tls_ca: str | Path | None = None,
    ) -> None:
        """Arguments default from COLLAB_* variables; see Settings.resolve. ``channel``:
        one to use instead of connecting to ``target`` (interceptors, tests). ``tls_ca``:
        PEM CA file to trust; set (or COLLAB_GRPC_TLS_CA), the channel uses TLS."""
        self.settings = Settings.resolve(target, token, timeout=timeout, retries=retries, tls_ca=tls_ca)
        self._channel: ChannelT = channel if channel is not None else self._connect()
        self._stub = pb_grpc.CollaborationServiceStub(self._channel)

    def _connect(self) -> ChannelT:
        raise NotImplementedError

    @property
    def channel(self) -> ChannelT:
        """The gRPC channel to the hub, for the other services it serves (OTLP's
        TraceService); closed with the client."""
        return self._channel

    # -- writes --------------------------------------------------------------------------
    record_activity = Call("RecordActivity", requests.record_activity, _activity_id)
    complete_activity = Call("CompleteActivity", requests.complete_activity, _activity)
    start_collaboration = Call("StartCollaboration", requests.start_collaboration, _session_id)
    end_collaboration = Call("EndCollaboration", requests.end_collaboration, _session)
    record_decision = Call("RecordDecision", requests.record_decision, _decision_id)
    record_memory_update = Call("RecordMemoryUpdate", requests.record_memory_update, _update)
    # -- reads ---------------------------------------------------------------------------
    agent_status = Call("GetAgentStatus", requests.agent_status, _agent_status)
    activity_feed = Call("GetActivityFeed", requests.activity_feed, _activities)
    get_activity = Call("GetActivity", requests.get_activity, _activity)
    active_collaborations = Call("ListActiveCollaborations", requests.active_collaborations, _collaborations)
    get_collaboration = Call("GetCollaboration", requests.get_collaboration, _whole)
    ended_collaborations = Call("ListEndedCollaborations", requests.ended_collaborations, _collaborations)
    memory_updates = Call("ListMemoryUpdates", requests.memory_updates, _memory_updates)
    query_activities = Iteration(requests.query_activities, "_search", pb.Activity)
    events = Iteration(events, "_follow", pb.Event)


# -- the recorders ---------------------------------------------------------------------------


def sort_results(
    batch: list[pb.RecordActivityRequest], results: Sequence[pb.BulkRecordResult]
) -> tuple[list[str], list[RecordFailure]]:
    """A batch's bulk results, item by item in its order: the recorded ids, the refusals."""
    recorded: list[str] = []
    failures: list[RecordFailure] = []
    for item, result in zip(batch, results, strict=True):
        if result.activity_id:
            recorded.append(result.activity_id)
        else:
            failures.append(RecordFailure(item, result.error_code, result.error_message))
    return recorded, failures


class BulkProgress:
    """A batch sent over one or more bulk streams: the results so far, the messages to
    send next. The hub answers within its reply budget: an answer that reached it says
    ``incomplete`` and covers the first items only; the rest goes on a new stream."""

    method = "BulkRecordActivities"

    def __init__(self, batch: list[pb.RecordActivityRequest]) -> None:
        self.batch = batch
        self.results: list[pb.BulkRecordResult] = []
        self.messages = requests.bulk_messages(batch)

    def take(self, reply: pb.BulkRecordActivitiesResponse) -> bool:
        """Take in one stream's answer; True once every item of the batch is answered."""
        pending = self.batch[len(self.results) :]
        answered = len(reply.results)
        if answered == len(pending):
            self.results += reply.results
            return True
        if reply.incomplete and 0 < answered < len(pending):
            self.results += reply.results
            self.messages = requests.bulk_messages(pending[answered:])
            return False
        self.messages = requests.messages_to_resend(pending, self.messages, answered)
        return False


class Batching(Generic[ClientT]):
    """What both recorders are: the activities waiting, the thresholds they are sent at,
    and what became of those sent. ``record`` flushes first when ``max_buffer`` wait
    (backpressure: if that flush fails, its error is raised and the activity is not
    kept), and once ``max_batch`` wait (if that flush fails, its error is raised and the
    batch, this activity with it, stays for the next flush); a ticker flushes every
    ``max_delay`` seconds, ``close`` flushes the rest. A batch that could not be sent is
    kept, never lost. Refused activities are in ``failures``; ``recorded`` holds the
    ids."""

    def __init__(self, client: ClientT, *, max_batch: int, max_delay: float, max_buffer: int) -> None:
        if max_batch < 1 or max_buffer < 1 or not max_delay > 0:
            raise ValueError(
                "max_batch and max_buffer must be at least 1 and max_delay positive, "
                f"got max_batch={max_batch}, max_buffer={max_buffer}, max_delay={max_delay}"
            )
        self.client = client
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_buffer = max_buffer
        self.recorded: list[str] = []
        self.failures: list[RecordFailure] = []
        self._waiting: list[pb.RecordActivityRequest] = []

    @property
    def pending(self) -> int:
        """Activities waiting to be sent."""
        return len(self._waiting)

    def _full(self) -> bool:
        """Whether a flush must come before the next activity is added."""
        return len(self._waiting) >= self.max_buffer

    def _add(self, request: pb.RecordActivityRequest) -> bool:
        """Add ``request``; whether a batch is due."""
        self._waiting.append(request)
        return len(self._waiting) >= self.max_batch

    @contextlib.contextmanager
    def _flushing(self) -> Iterator[list[pb.RecordActivityRequest]]:
        """The waiting activities as one batch, to send and ``_settle``; put back in front
        if sending it raised (a failure, a cancelled flush): its keys make sending it again
        safe."""
        batch, self._waiting = self._waiting, []
        try:
            yield batch
        except BaseException:
            self._waiting[:0] = batch
            raise

    def _settle(self, batch: list[pb.RecordActivityRequest], results: Sequence[pb.BulkRecordResult]) -> None:
        recorded, failures = sort_results(batch, results)
        self.recorded += recorded
        self.failures += failures

    def _tick_failed(self, error: CollabError) -> None:
        """A flush of the ticker failed: the batch is kept, the next tick or close() tries again."""
        log.warning("batch flush failed, %d activities kept: %s", len(self._waiting), error)
