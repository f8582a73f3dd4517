"""The synchronous client: `Client` and its `BatchRecorder`, the shared core
(_core.py) driven with blocking grpc calls and a background thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from collab import _core as core
from collab import _requests as requests
from collab._errors import CollabError, error_from_rpc
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["BatchRecorder", "Client"]

T = TypeVar("T")


class Client(core.ClientBase[grpc.Channel]):
    """The hub over gRPC, blocking. Arguments default from COLLAB_* variables; see
    Settings.resolve. Use as ``with Client() as hub:``. Its calls are declared on
    `ClientBase`; `AsyncClient` has the same ones over asyncio."""

    _stub: pb_grpc.CollaborationServiceStub

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @contextlib.contextmanager
    def activity(self, agent_id: str, activity_type: str, **fields: Any) -> Iterator[core.ActivityHandle]:
        """Recorded on enter (as ``record_activity``); completed on exit, or failed with
        the exception's type name, with ``handle.metadata`` merged into its metadata.
        Metadata the hub refuses (over its limit once merged, or the hub's database over
        its byte budget) is left out with a warning: the activity is completed without
        it. A block that raised always raises its own exception."""
        handle = core.ActivityHandle(self.record_activity(agent_id, activity_type, **fields))
        try:
            yield handle
        except BaseException as error:
            try:
                self._complete_block(handle, success=False, failure_reason=type(error).__name__)
            except Exception as failure:  # the block's exception is the one the caller sees
                core.warn_not_completed(handle, error, failure)
            raise
        self._complete_block(handle)

    def _complete_block(self, handle: core.ActivityHandle, **outcome: Any) -> None:
        """Complete an ``activity()`` block's activity with its metadata, else without it."""
        if handle.metadata:
            try:
                self.complete_activity(handle.activity_id, metadata=handle.metadata, **outcome)
                return
            except CollabError as refusal:
                if not core.metadata_refused(refusal):
                    raise
                core.warn_metadata_dropped(handle, refusal)
        self.complete_activity(handle.activity_id, **outcome)

    def recorder(
        self, *, max_batch: int = core.MAX_BATCH, max_delay: float = core.MAX_DELAY, max_buffer: int = core.MAX_BUFFER
    ) -> BatchRecorder:
        """A batching recorder over the client-streaming RPC, for high-volume agents."""
        return BatchRecorder(self, max_batch=max_batch, max_delay=max_delay, max_buffer=max_buffer)

    # -- the I/O the core asks for ----------------------------------------------------------

    def _connect(self) -> grpc.Channel:
        return self.settings.channel()

    def _call(self, method: str, request: Any) -> Any:
        """``method`` called with ``request``, tried again as `core.Retries` says."""
        rpc = getattr(self._stub, method)
        retries = core.Retries(self.settings)
        while True:
            # A client-streaming call's messages (a list) go as a fresh iterator each attempt.
            sent = iter(request) if isinstance(request, list) else request
            try:
                return rpc(sent, metadata=self.settings.metadata, timeout=self.settings.timeout)
            except grpc.RpcError as error:
                time.sleep(retries.delay_after(error))

    def _unary(self, call: core.UnaryCall[T]) -> T:
        return call.result(self._call(call.method, call.request))

    def _search(self, first: Callable[[], pb.QueryActivitiesRequest]) -> Iterator[pb.Activity]:
        pages = core.Pages(first())
        while not pages.done:
            yield from pages.take(self._call(pages.method, pages.request))

    def _follow(self, start: Callable[[], core.EventCursor]) -> Iterator[pb.Event]:
        cursor = start()
        if cursor.needs_epoch:
            cursor.start_in(self._first_message(core.epoch_probe()))
        while True:
            stream = self._stub.SubscribeEvents(cursor.request(), metadata=self.settings.metadata)
            broken: grpc.RpcError | None = None
            try:
                for message in stream:
                    if (event := cursor.take(message)) is not None:
                        yield event
            except grpc.RpcError as error:
                broken = error
            finally:
                stream.cancel()  # type: ignore[no-untyped-call]
            time.sleep(cursor.delay_after(broken, self.settings))

    def _first_message(self, request: pb.SubscribeEventsRequest) -> pb.SubscribeEventsResponse:
        stream = self._stub.SubscribeEvents(request, metadata=self.settings.metadata)
        try:
            return next(iter(stream))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]

    def _record_batch(self, batch: list[pb.RecordActivityRequest]) -> list[pb.BulkRecordResult]:
        """``batch`` over as many bulk streams as the hub's answers take."""
        progress = core.BulkProgress(batch)
        while not progress.take(self._call(progress.method, progress.messages)):
            pass
        return progress.results


class BatchRecorder(core.Batching[Client]):
    """Buffers activities and sends them in batches over BulkRecordActivities, at the
    thresholds of `core.Batching` (the same as `AsyncBatchRecorder`'s); its ticker is a
    background thread, started by ``with``. Safe to share between threads."""

    def __init__(self, client: Client, *, max_batch: int, max_delay: float, max_buffer: int) -> None:
        super().__init__(client, max_batch=max_batch, max_delay=max_delay, max_buffer=max_buffer)
        self._lock = threading.RLock()  # record() holds it across the flushes it makes
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="collab-recorder", daemon=True)

    def __enter__(self) -> BatchRecorder:
        self._ticker.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def record(self, agent_id: str, activity_type: str, **fields: Any) -> None:
        """Buffer an activity (the arguments of ``Client.record_activity``)."""
        request = requests.record_activity(agent_id, activity_type, **fields)
        with self._lock:
            if self._full():
                self.flush()
            if self._add(request):
                self.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.max_delay):
            if self.pending:
                try:
                    self.flush()
                except CollabError as error:
                    self._tick_failed(error)

    def flush(self) -> None:
        """Send what is buffered; retried while UNAVAILABLE (the keys make that safe)."""
        with self._lock, self._flushing() as batch:
            if batch:
                self._settle(batch, self.client._record_batch(batch))

    def close(self) -> None:
        """Stop the ticker and send the rest."""
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join()
        self.flush()
