"""`SpanSender`: OTLP spans to the hub's ``TraceService/Export``, from a background
thread, through a bounded queue. What every integration reports through.

The hub maps spans to its model in one place (collab_grpc/otlp.py): an integration turns
its framework's events into OTLP spans carrying the GenAI semantic conventions
(``gen_ai.operation.name``, ``gen_ai.agent.name``, ``gen_ai.conversation.id``...) and
submits each span when it starts (``end_time_unix_nano`` 0: the hub records the activity,
running) and again when it ends (the hub completes it, or fails it when the span's status
is an error). ``(trace id, span id)`` is the key: the hub records a span once however often
it is sent, and links a span to its parent's activity.

Never in the caller's way: ``submit`` queues and returns. A span whose start is still
queued when it ends is sent once, ended, in the start's place (so parents still go
before their children). At most ``max_buffer`` spans wait; while the hub is down or slow
the queue fills and spans beyond it are dropped (counted in ``dropped``), never waited
for. Needs only opentelemetry-proto (installed with collab).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import cast

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc

from collab import Client
from collab._errors import RateLimited, Unavailable, error_from_rpc

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_BUFFER", "DEFAULT_MAX_DELAY", "SpanKey", "SpanSender"]

log = logging.getLogger("collab.integrations")

# Spans per Export call: the hub takes up to 10,000 by default (COLLAB_OTLP_MAX_SPANS).
DEFAULT_MAX_BATCH = 512
# Longest wait before a queued span is sent: a started agent shows up within it.
DEFAULT_MAX_DELAY = 0.1
DEFAULT_MAX_BUFFER = 10_000
# Longest pause between attempts while the hub is unreachable.
MAX_BACKOFF = 5.0

# (trace id, span id), as OpenTelemetry's SpanContext holds them.
SpanKey = tuple[int, int]
# Queued spans, each as its own one-span export request (its resource and scope with it).
Queued = list[tuple[SpanKey, otlp.ExportTraceServiceRequest]]


class SpanSender:
    """``client``: the hub to report to (default: a Client from COLLAB_* variables, closed
    by ``shutdown``). ``max_batch`` spans per call, sent at least every ``max_delay``
    seconds; at most ``max_buffer`` spans queued."""

    def __init__(
        self,
        client: Client | None = None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_delay: float = DEFAULT_MAX_DELAY,
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        if max_batch < 1 or max_buffer < 1 or not max_delay > 0:
            raise ValueError("max_batch and max_buffer must be at least 1, max_delay positive")
        self._owns_client = client is None
        self.client = client if client is not None else Client()
        self._stub = otlp_grpc.TraceServiceStub(self.client.channel)  # type: ignore[no-untyped-call]
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_buffer = max_buffer
        # Span starts and ends dropped because the queue was full; spans the hub refused.
        self.dropped = 0
        self.rejected = 0
        self._queue: OrderedDict[SpanKey, otlp.ExportTraceServiceRequest] = OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._sending = False
        self.stopped = False
        self._thread = threading.Thread(target=self._run, name="collab-span-sender", daemon=True)
        self._thread.start()

    def has_room(self, key: SpanKey) -> bool:
        """Whether a state of span ``key`` would be queued now (counts a drop if not), so a
        caller can skip encoding a span that would be dropped."""
        with self._lock:
            if key in self._queue or len(self._queue) < self.max_buffer:
                return True
            self.dropped += 1
            return False

    def submit(self, key: SpanKey, request: otlp.ExportTraceServiceRequest) -> None:
        """Queue one span (``request`` holds it alone, with its resource and scope); its
        newer state replaces an older one still queued, in the older one's place."""
        if self.stopped:
            return
        with self._lock:
            if key not in self._queue and len(self._queue) >= self.max_buffer:
                self.dropped += 1
                return
            self._queue[key] = request
            full = len(self._queue) >= self.max_batch
        if full:
            self._wake.set()

    # -- the background thread ---------------------------------------------------------

    def _take(self) -> Queued:
        with self._lock:
            batch: Queued = []
            while self._queue and len(batch) < self.max_batch:
                batch.append(self._queue.popitem(last=False))
            self._sending = bool(batch)
            return batch

    def _put_back(self, batch: Queued) -> None:
        """A batch not sent goes back in front, unless a newer state of a span was queued."""
        with self._lock:
            for key, request in reversed(batch):
                if key not in self._queue:
                    self._queue[key] = request
                    self._queue.move_to_end(key, last=False)
            while len(self._queue) > self.max_buffer:
                self._queue.popitem(last=True)
                self.dropped += 1

    def _done_sending(self) -> None:
        with self._lock:
            self._sending = False
            self._idle.notify_all()

    def _run(self) -> None:
        failures = 0
        while True:
            self._wake.wait(self.max_delay)
            self._wake.clear()
            while batch := self._take():
                pause = self._send(batch)
                if pause:
                    failures += 1
                    self._put_back(batch)
                    self._done_sending()
                    if self.stopped:
                        return
                    time.sleep(min(MAX_BACKOFF, pause * failures))
                    break
                failures = 0
                self._done_sending()
            if self.stopped and not self._queue:
                return

    def _send(self, batch: Queued) -> float:
        """Send ``batch``; the seconds to wait before trying again, 0 when done with it."""
        request = otlp.ExportTraceServiceRequest()
        for _, one in batch:
            request.resource_spans.extend(one.resource_spans)
        settings = self.client.settings
        try:
            reply = self._stub.Export(request, metadata=settings.metadata, timeout=settings.timeout)
        except grpc.RpcError as error:
            failure = error_from_rpc(error)
            if isinstance(failure, RateLimited):
                return failure.retry_after or 1.0
            if isinstance(failure, Unavailable) or cast(grpc.Call, error).code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                log.warning("the hub is unreachable, %d spans kept to send again: %s", len(batch), failure)
                return 0.2
            self.rejected += len(batch)
            log.warning("the hub refused %d spans: %s", len(batch), failure)
            return 0.0
        if reply.partial_success.rejected_spans:
            self.rejected += reply.partial_success.rejected_spans
            log.warning(
                "the hub refused %d spans: %s",
                reply.partial_success.rejected_spans,
                reply.partial_success.error_message,
            )
        return 0.0

    # -- flushing and stopping -------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> bool:
        """Send what is queued; False if it could not all be sent within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        with self._lock:
            while self._queue or self._sending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, self.max_delay))
                self._wake.set()
        return True

    def shutdown(self) -> None:
        """Send what is queued (waiting up to the client's timeout), then stop."""
        self.flush(self.client.settings.timeout)
        self.stopped = True
        self._wake.set()
        self._thread.join(self.client.settings.timeout)
        if self._owns_client:
            self.client.close()
