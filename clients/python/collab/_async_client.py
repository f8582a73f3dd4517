"""The asyncio client: `AsyncClient`, its `activity()` context manager, `events()` and
the batching recorder."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from collab import _requests as requests
from collab._errors import CollabError, ResumeFailed, Unavailable, error_from_rpc
from collab._settings import Settings
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["ActivityHandle", "AsyncBatchRecorder", "AsyncClient"]

Reply = TypeVar("Reply", bound=Message)
log = logging.getLogger("collab")

# Stream failures after which following the log simply reconnects and resumes.
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)


@dataclass
class ActivityHandle:
    """An activity recorded by ``activity()``; completed when the block ends."""

    activity_id: str


class AsyncClient:
    """The hub over gRPC (grpc.aio). Arguments default from COLLAB_* variables; see
    Settings.resolve. Use as ``async with AsyncClient() as hub:``."""

    def __init__(
        self,
        target: str | None = None,
        token: str | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        channel: grpc.aio.Channel | None = None,
        tls_ca: str | Path | None = None,
    ) -> None:
        """``channel``: one to use instead of connecting to ``target`` (interceptors, tests).
        ``tls_ca``: PEM CA file to trust; set (or COLLAB_GRPC_TLS_CA), the channel uses TLS."""
        self.settings = Settings.resolve(target, token, timeout=timeout, retries=retries, tls_ca=tls_ca)
        self._channel = channel if channel is not None else self.settings.aio_channel()
        self._stub = pb_grpc.CollaborationServiceStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _call(self, method: str, request: Message) -> Any:
        """One unary call, retried with backoff while UNAVAILABLE (every write carries an
        idempotency key, so a retry never records twice)."""
        rpc = getattr(self._stub, method)
        attempt = 0
        while True:
            try:
                return await rpc(request, metadata=self.settings.metadata, timeout=self.settings.timeout)
            except grpc.RpcError as error:
                failure = error_from_rpc(error)
                attempt += 1
                if not isinstance(failure, Unavailable) or attempt > self.settings.retries:
                    raise failure from None
                await asyncio.sleep(self.settings.backoff(attempt))

    # -- writes ---------------------------------------------------------------------

    async def record_activity(
        self,
        agent_id: str,
        activity_type: str,
        *,
        department: str = "",
        metadata: Mapping[str, Any] | None = None,
        related_agents: Iterable[str] = (),
        session_id: str | None = None,
        parent_activity_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Record an activity; its id. ``activity_type`` is a guide name (`memory_write`...)."""
        request = requests.record_activity(
            agent_id,
            activity_type,
            department=department,
            metadata=metadata,
            related_agents=related_agents,
            session_id=session_id,
            parent_activity_id=parent_activity_id,
            idempotency_key=idempotency_key,
        )
        reply = await self._call("RecordActivity", request)
        return str(reply.activity_id)

    async def complete_activity(
        self, activity_id: str, *, success: bool = True, failure_reason: str = "", idempotency_key: str | None = None
    ) -> pb.Activity:
        request = requests.complete_activity(activity_id, success, failure_reason, idempotency_key)
        reply = await self._call("CompleteActivity", request)
        activity: pb.Activity = reply.activity
        return activity

    async def start_collaboration(
        self, participants: Iterable[str], *, session_type: str = "general", metadata: Mapping[str, Any] | None = None
    ) -> str:
        request = requests.start_collaboration(participants, session_type, metadata)
        return str((await self._call("StartCollaboration", request)).session_id)

    async def end_collaboration(self, session_id: str) -> pb.CollaborationSession:
        request = requests.end_collaboration(session_id)
        session: pb.CollaborationSession = (await self._call("EndCollaboration", request)).session
        return session

    async def record_decision(
        self,
        session_id: str,
        agent_id: str,
        decision: str,
        *,
        rationale: str = "",
        votes: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        request = requests.record_decision(session_id, agent_id, decision, rationale, votes, metadata)
        return str((await self._call("RecordDecision", request)).decision_id)

    async def record_memory_update(
        self, operation: str, item_id: str, agent_id: str, *, metadata: Mapping[str, Any] | None = None
    ) -> pb.MemoryUpdate:
        request = requests.record_memory_update(operation, item_id, agent_id, metadata)
        update: pb.MemoryUpdate = (await self._call("RecordMemoryUpdate", request)).update
        return update

    @contextlib.asynccontextmanager
    async def activity(self, agent_id: str, activity_type: str, **fields: Any) -> AsyncIterator[ActivityHandle]:
        """Recorded on enter; completed on exit, or failed with the exception's type name."""
        handle = ActivityHandle(await self.record_activity(agent_id, activity_type, **fields))
        try:
            yield handle
        except BaseException as error:
            await self.complete_activity(handle.activity_id, success=False, failure_reason=type(error).__name__)
            raise
        await self.complete_activity(handle.activity_id)

    def recorder(self, *, max_batch: int = 500, max_delay: float = 0.2, max_buffer: int = 10_000) -> AsyncBatchRecorder:
        """A batching recorder over the client-streaming RPC, for high-volume agents."""
        return AsyncBatchRecorder(self, max_batch=max_batch, max_delay=max_delay, max_buffer=max_buffer)

    # -- reads ----------------------------------------------------------------------

    async def agent_status(self) -> pb.AgentStatusSummary:
        status: pb.AgentStatusSummary = (await self._call("GetAgentStatus", pb.GetAgentStatusRequest())).agent_status
        return status

    async def activity_feed(
        self, *, agent_id: str | None = None, limit: int = 50, session_id: str | None = None
    ) -> list[pb.Activity]:
        request = requests.activity_feed(agent_id, limit, session_id)
        return list((await self._call("GetActivityFeed", request)).activities)

    async def get_activity(self, activity_id: str) -> pb.Activity:
        activity: pb.Activity = (
            await self._call("GetActivity", pb.GetActivityRequest(activity_id=activity_id))
        ).activity
        return activity

    async def active_collaborations(self) -> list[pb.CollaborationSession]:
        reply = await self._call("ListActiveCollaborations", pb.ListActiveCollaborationsRequest())
        return list(reply.collaborations)

    async def get_collaboration(self, session_id: str) -> pb.GetCollaborationResponse:
        reply: pb.GetCollaborationResponse = await self._call(
            "GetCollaboration", pb.GetCollaborationRequest(session_id=session_id)
        )
        return reply

    async def ended_collaborations(self, limit: int = 50) -> list[pb.CollaborationSession]:
        reply = await self._call("ListEndedCollaborations", pb.ListEndedCollaborationsRequest(limit=limit))
        return list(reply.collaborations)

    async def query_activities(
        self,
        *,
        agent_ids: Iterable[str] = (),
        departments: Iterable[str] = (),
        activity_types: Iterable[str] = (),
        statuses: Iterable[str] = (),
        session_ids: Iterable[str] = (),
        parent_activity_ids: Iterable[str] = (),
        since: float | datetime | None = None,
        until: float | datetime | None = None,
        metadata: Mapping[str, requests.MetadataScalar] | None = None,
        order: str = "desc",
        page_size: int = 50,
    ) -> AsyncIterator[pb.Activity]:
        """Search the history the hub retains, every page in turn (one call a page of
        ``page_size``, 1 to 500, as the reply budget allows), following the cursor: the
        activities of any of ``agent_ids``, and of any of ``departments``, ... recorded at
        or after ``since`` and before ``until`` (epoch seconds or datetimes, naive ones
        UTC), whose metadata has each key of ``metadata`` with that scalar value; newest
        first, or oldest first with ``order="asc"``. Break off at any time."""
        request = requests.query_activities(
            agent_ids=agent_ids,
            departments=departments,
            activity_types=activity_types,
            statuses=statuses,
            session_ids=session_ids,
            parent_activity_ids=parent_activity_ids,
            since=since,
            until=until,
            metadata=metadata,
            order=order,
            page_size=page_size,
        )
        while True:
            reply = await self._call("QueryActivities", request)
            for activity in reply.activities:
                yield activity
            if not reply.next_cursor:
                return
            request.cursor = reply.next_cursor

    # -- the event stream -------------------------------------------------------------

    async def events(
        self,
        *,
        types: Iterable[str] | None = None,
        agent_ids: Iterable[str] | None = None,
        activity_types: Iterable[str] | None = None,
        since: int | None = None,
        epoch: str | None = None,
    ) -> AsyncIterator[pb.Event]:
        """Every event from ``since`` (default: now) on, following the log for as long as
        it is iterated. A broken stream (server restart, network, falling behind) is
        reconnected with backoff and resumed after the last event yielded: no gap, no
        duplicate. ResumeFailed if the hub can no longer fill the gap."""
        kinds, agents, narrowed = list(types or ()), list(agent_ids or ()), list(activity_types or ())
        position: tuple[str, int] | None = None
        if since is not None:
            position = (epoch or await self._current_epoch(), since)
        attempt = 0
        while True:
            request = requests.subscribe(kinds, agents, narrowed, position)
            request.include_snapshot = position is None
            stream = self._stub.SubscribeEvents(request, metadata=self.settings.metadata)
            try:
                async for message in stream:
                    attempt = 0
                    kind = message.WhichOneof("message")
                    if kind == "snapshot":
                        position = (message.snapshot.epoch, message.snapshot.seq)
                    elif kind == "resume" and not message.resume.recovered:
                        raise ResumeFailed(message.resume.reason)
                    elif kind == "event":
                        position = (message.event.epoch, message.event.seq)
                        yield message.event
            except grpc.RpcError as error:
                failure = error_from_rpc(error)
                if error.code() not in RESUMABLE:
                    raise failure from None
            finally:
                stream.cancel()
            attempt += 1
            await asyncio.sleep(self.settings.backoff(attempt))

    async def _current_epoch(self) -> str:
        stream = self._stub.SubscribeEvents(
            pb.SubscribeEventsRequest(include_snapshot=True), metadata=self.settings.metadata
        )
        try:
            first = await stream.read()
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        finally:
            stream.cancel()
        assert isinstance(first, pb.SubscribeEventsResponse)
        return first.snapshot.epoch


@dataclass
class RecordFailure:
    """An activity the hub refused in a batch."""

    request: pb.RecordActivityRequest
    code: str
    message: str


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


class AsyncBatchRecorder:
    """Buffers activities and sends them in batches over BulkRecordActivities: when
    ``max_batch`` are waiting, every ``max_delay`` seconds, and on close. At most
    ``max_buffer`` wait; ``record`` then waits for a flush (backpressure, never loss).
    Refused activities are kept in ``failures``; ``recorded`` holds the ids."""

    def __init__(self, client: AsyncClient, *, max_batch: int, max_delay: float, max_buffer: int) -> None:
        self.client = client
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_buffer = max_buffer
        self.recorded: list[str] = []
        self.failures: list[RecordFailure] = []
        self._buffer: list[pb.RecordActivityRequest] = []
        self._lock = asyncio.Lock()
        self._ticker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncBatchRecorder:
        self._ticker = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def record(self, agent_id: str, activity_type: str, **fields: Any) -> None:
        if len(self._buffer) >= self.max_buffer:
            await self.flush()
        self._buffer.append(requests.record_activity(agent_id, activity_type, **fields))
        if len(self._buffer) >= self.max_batch:
            await self.flush()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.max_delay)
            if self._buffer:
                try:
                    await self.flush()
                except CollabError as error:  # kept buffered; the next tick or close() tries again
                    log.warning("batch flush failed: %s", error)

    async def flush(self) -> None:
        """Send what is buffered; retried while UNAVAILABLE (the keys make that safe)."""
        async with self._lock:
            batch, self._buffer = self._buffer, []
            if not batch:
                return
            settings = self.client.settings
            progress = requests.BulkProgress(batch)
            attempt = 0
            try:
                while True:
                    try:
                        reply = await self.client._stub.BulkRecordActivities(
                            iter(progress.messages),
                            metadata=settings.metadata,
                            timeout=settings.timeout,
                        )
                    except grpc.RpcError as error:
                        failure = error_from_rpc(error)
                        attempt += 1
                        if not isinstance(failure, Unavailable) or attempt > settings.retries:
                            raise failure from None
                        await asyncio.sleep(settings.backoff(attempt))
                        continue
                    if progress.take(reply):
                        break
            except CollabError:
                self._buffer[:0] = batch  # kept for the next flush, not lost
                raise
            recorded, failures = sort_results(batch, progress.results)
            self.recorded += recorded
            self.failures += failures

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(BaseException):
                await self._ticker
        await self.flush()
