"""`CollabSpanProcessor`: every OpenTelemetry GenAI span of this process in the hub,
live from the moment it starts.

    from opentelemetry.sdk.trace import TracerProvider
    from collab.integrations.otel import CollabSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(CollabSpanProcessor())   # COLLAB_GRPC_TARGET / COLLAB_TOKEN

An OTLP exporter sends a span when it ends, so a running agent stays invisible until it
is done. This processor sends each GenAI span twice: when it starts (the hub records the
activity, ``active``) and when it ends (the hub completes it, or fails it with the span's
error). Both go to the hub's OTLP ``TraceService/Export``, where the one mapping table
(collab_grpc/otlp.py) and the span index live: the hub links the tree (a span's start
always reaches it before its children's), keeps sessions, and, with ``(trace id, span
id)`` as the key, records nothing twice, even when an OTLP exporter to the same hub sends
the same spans again.

Never in the agent's way: ``on_start`` and ``on_end`` encode the span and queue it; a
background thread sends batches. A span whose start is still queued when it ends is sent
once, ended. At most ``max_buffer`` spans wait: while the hub is down or slow the queue
fills, and spans beyond it are dropped (counted in ``dropped``), never waited for.
Spans that are not GenAI (no ``gen_ai.operation.name`` the table knows) are not sent; a
GenAI span under one is sent with its nearest GenAI ancestor as its parent.

Requires the ``otel`` extra (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-common).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import cast

import grpc
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from collab._client import Client
from collab._errors import RateLimited, Unavailable, error_from_rpc
from collab_grpc.otlp import OPERATION, OPERATIONS

__all__ = ["CollabSpanProcessor"]

log = logging.getLogger("collab.integrations.otel")

# Spans per Export call: the hub takes up to 10,000 by default (COLLAB_OTLP_MAX_SPANS).
DEFAULT_MAX_BATCH = 512
# Longest wait before a queued span is sent: a started agent shows up within it.
DEFAULT_MAX_DELAY = 0.1
DEFAULT_MAX_BUFFER = 10_000
# Longest pause between attempts while the hub is unreachable.
MAX_BACKOFF = 5.0


# Queued spans by (trace id, span id), each as its own one-span export request.
Queued = list[tuple[tuple[int, int], otlp.ExportTraceServiceRequest]]


def _is_genai(span: ReadableSpan) -> bool:
    operation = (span.attributes or {}).get(OPERATION)
    return isinstance(operation, str) and operation in OPERATIONS


class CollabSpanProcessor(SpanProcessor):
    """``client``: the hub to report to (default: a Client from COLLAB_* variables, closed
    on shutdown). ``max_batch`` spans per call, sent at least every ``max_delay`` seconds;
    at most ``max_buffer`` spans queued (and as many non-GenAI spans tracked)."""

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
        self._stub = otlp_grpc.TraceServiceStub(self.client._channel)  # type: ignore[no-untyped-call]
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_buffer = max_buffer
        # Span starts and ends dropped because the queue was full; spans the hub refused.
        self.dropped = 0
        self.rejected = 0
        self._queue: OrderedDict[tuple[int, int], otlp.ExportTraceServiceRequest] = OrderedDict()
        # Open spans that are not GenAI: span id -> their nearest GenAI ancestor's (0: none).
        self._skipped: dict[int, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._sending = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="collab-span-processor", daemon=True)
        self._thread.start()

    # -- the agent's thread: encode and queue, nothing more ----------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._enqueue(span, ended=False)

    def on_end(self, span: ReadableSpan) -> None:
        self._enqueue(span, ended=True)

    def _genai_parent(self, span: ReadableSpan) -> int:
        parent = span.parent.span_id if span.parent is not None else 0
        return self._skipped.get(parent, parent)

    def _enqueue(self, span: ReadableSpan, *, ended: bool) -> None:
        context = span.context
        if context is None or self._stopped:
            return
        with self._lock:
            if not _is_genai(span):
                if ended:
                    self._skipped.pop(context.span_id, None)
                elif len(self._skipped) < self.max_buffer:
                    self._skipped[context.span_id] = self._genai_parent(span)
                return
            key = (context.trace_id, context.span_id)
            if key not in self._queue and len(self._queue) >= self.max_buffer:
                self.dropped += 1
                return
            parent = self._genai_parent(span)
        request = encode_spans([span])
        encoded = request.resource_spans[0].scope_spans[0].spans[0]
        if parent:
            encoded.parent_span_id = parent.to_bytes(8, "big")
        else:
            encoded.ClearField("parent_span_id")
        with self._lock:
            self._queue[key] = request  # an end replaces a start still queued, in its place
        if len(self._queue) >= self.max_batch:
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
                    if self._stopped:
                        return
                    time.sleep(min(MAX_BACKOFF, pause * failures))
                    break
                failures = 0
                self._done_sending()
            if self._stopped and not self._queue:
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

    # -- SpanProcessor -------------------------------------------------------------------

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Send what is queued; False if it could not all be sent within the timeout."""
        deadline = time.monotonic() + timeout_millis / 1000
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
        self.force_flush(int(self.client.settings.timeout * 1000))
        self._stopped = True
        self._wake.set()
        self._thread.join(self.client.settings.timeout)
        if self._owns_client:
            self.client.close()
