"""The asyncio client: `AsyncClient` and its `AsyncBatchRecorder`, the shared core
(_core.py) driven with grpc.aio calls and an asyncio task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from collab import _core as core
from collab import _requests as requests
from collab._errors import CollabError, error_from_rpc
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["AsyncBatchRecorder", "AsyncClient"]

T = TypeVar("T")


class AsyncClient(core.ClientBase[grpc.aio.Channel]):
    """The hub over gRPC (grpc.aio): `Client`'s calls, each awaited, and its iterators
    async. Arguments default from COLLAB_* variables; see Settings.resolve. Use as
    ``async with AsyncClient() as hub:``."""

    _stub: pb_grpc.CollaborationServiceAsyncStub
    asynchronous = True

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    @contextlib.asynccontextmanager
    async def activity(self, agent_id: str, activity_type: str, **fields: Any) -> AsyncIterator[core.ActivityHandle]:
        """As `Client.activity`: recorded on enter, completed on exit or failed with the
        exception's type name, with ``handle.metadata`` (left out with a warning when the
        hub refuses it); a block that raised always raises its own exception."""
        handle = core.ActivityHandle(await self.record_activity(agent_id, activity_type, **fields))
        try:
            yield handle
        except BaseException as error:
            try:
                await self._complete_block(handle, success=False, failure_reason=type(error).__name__)
            except Exception as failure:  # the block's exception is the one the caller sees
                core.warn_not_completed(handle, error, failure)
            raise
        await self._complete_block(handle)

    async def _complete_block(self, handle: core.ActivityHandle, **outcome: Any) -> None:
        """As `Client._complete_block`."""
        if handle.metadata:
            try:
                await self.complete_activity(handle.activity_id, metadata=handle.metadata, **outcome)
                return
            except CollabError as refusal:
                if not core.metadata_refused(refusal):
                    raise
                core.warn_metadata_dropped(handle, refusal)
        await self.complete_activity(handle.activity_id, **outcome)

    def recorder(
        self, *, max_batch: int = core.MAX_BATCH, max_delay: float = core.MAX_DELAY, max_buffer: int = core.MAX_BUFFER
    ) -> AsyncBatchRecorder:
        """A batching recorder over the client-streaming RPC, for high-volume agents."""
        return AsyncBatchRecorder(self, max_batch=max_batch, max_delay=max_delay, max_buffer=max_buffer)

    # -- the I/O the core asks for ----------------------------------------------------------

    def _connect(self) -> grpc.aio.Channel:
        return self.settings.aio_channel()

    async def _call(self, method: str, request: Any) -> Any:
        """Await ``method`` with ``request``, tried again as `core.Retries` says."""
        rpc = getattr(self._stub, method)
        retries = core.Retries(self.settings)
        while True:
            try:
                return await rpc(request, metadata=self.settings.metadata, timeout=self.settings.timeout)
            except grpc.RpcError as error:
                await asyncio.sleep(retries.delay_after(error))

    async def _unary(self, call: core.UnaryCall[T]) -> T:
        return call.result(await self._call(call.method, call.request))

    async def _search(self, first: Callable[[], pb.QueryActivitiesRequest]) -> AsyncIterator[pb.Activity]:
        pages = core.Pages(first())
        while not pages.done:
            for activity in pages.take(await self._call(pages.method, pages.request)):
                yield activity

    async def _follow(self, start: Callable[[], core.EventCursor]) -> AsyncIterator[pb.Event]:
        cursor = start()
        if cursor.needs_epoch:
            cursor.start_in(await self._first_message(core.epoch_probe()))
        while True:
            stream = self._stub.SubscribeEvents(cursor.request(), metadata=self.settings.metadata)
            broken: grpc.RpcError | None = None
            try:
                async for message in stream:
                    if (event := cursor.take(message)) is not None:
                        yield event
            except grpc.RpcError as error:
                broken = error
            finally:
                stream.cancel()
            await asyncio.sleep(cursor.delay_after(broken, self.settings))

    async def _first_message(self, request: pb.SubscribeEventsRequest) -> pb.SubscribeEventsResponse:
        stream = self._stub.SubscribeEvents(request, metadata=self.settings.metadata)
        try:
            first = await stream.read()
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        finally:
            stream.cancel()
        assert isinstance(first, pb.SubscribeEventsResponse), "the stream ended before its snapshot"
        return first

    async def _record_batch(self, batch: list[pb.RecordActivityRequest]) -> list[pb.BulkRecordResult]:
        """``batch`` over as many bulk streams as the hub's answers take."""
        progress = core.BulkProgress(batch)
        while not progress.take(await self._call(progress.method, progress.messages)):
            pass
        return progress.results


class AsyncBatchRecorder(core.Batching[AsyncClient]):
    """Buffers activities and sends them in batches over BulkRecordActivities, at the
    thresholds of `core.Batching` (the same as `BatchRecorder`'s); its ticker is an
    asyncio task, started by ``async with``."""

    def __init__(self, client: AsyncClient, *, max_batch: int, max_delay: float, max_buffer: int) -> None:
        super().__init__(client, max_batch=max_batch, max_delay=max_delay, max_buffer=max_buffer)
        self._lock = asyncio.Lock()
        self._ticker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncBatchRecorder:
        self._ticker = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def record(self, agent_id: str, activity_type: str, **fields: Any) -> None:
        """Buffer an activity (the arguments of ``AsyncClient.record_activity``)."""
        request = requests.record_activity(agent_id, activity_type, **fields)
        if self._full():
            await self.flush()
        if self._add(request):
            await self.flush()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.max_delay)
            if self.pending:
                try:
                    await self.flush()
                except CollabError as error:
                    self._tick_failed(error)

    async def flush(self) -> None:
        """Send what is buffered; retried while UNAVAILABLE (the keys make that safe)."""
        async with self._lock:
            with self._flushing() as batch:
                if batch:
                    self._settle(batch, await self.client._record_batch(batch))

    async def close(self) -> None:
        """Stop the ticker and send the rest."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(BaseException):
                await self._ticker
        await self.flush()
