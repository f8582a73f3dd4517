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

Never in the agent's way: ``on_start`` and ``on_end`` encode the span and hand it to a
SpanSender (collab/integrations/spans.py): a background thread sends batches; at most
``max_buffer`` spans wait, and while the hub is down or slow spans beyond that are
dropped (counted in ``dropped``), never waited for. Spans that are not GenAI (no
``gen_ai.operation.name`` the table knows) are not sent; a GenAI span under one is sent
with its nearest GenAI ancestor as its parent.

Attributes a span gains after it started (token usage, the response model and id,
finish reasons) and its end time and duration reach the activity when the span ends:
the hub merges what the ended span adds to the metadata recorded at the start into the
activity as it completes (within the hub's metadata limit).

Requires the ``otel`` extra (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-common).
"""

from __future__ import annotations

import threading

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from collab import Client
from collab.integrations.spans import DEFAULT_MAX_BATCH, DEFAULT_MAX_BUFFER, DEFAULT_MAX_DELAY, SpanSender
from collab_grpc.otlp import OPERATION, OPERATIONS

__all__ = ["CollabSpanProcessor"]


def _is_genai(span: ReadableSpan) -> bool:
    operation = (span.attributes or {}).get(OPERATION)
    return isinstance(operation, str) and operation in OPERATIONS


class CollabSpanProcessor(SpanProcessor):
    """``client``: the hub to report to (default: a Client from COLLAB_* variables, closed
    on shutdown). ``max_batch`` spans per call, sent at least every ``max_delay`` seconds;
    at most ``max_buffer`` spans queued (and as many open non-GenAI spans tracked)."""

    def __init__(
        self,
        client: Client | None = None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_delay: float = DEFAULT_MAX_DELAY,
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        self.sender = SpanSender(client, max_batch=max_batch, max_delay=max_delay, max_buffer=max_buffer)
        self.max_buffer = max_buffer
        # Open spans that are not GenAI: span id -> their nearest GenAI ancestor's (0: none).
        self._skipped: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def dropped(self) -> int:
        """Span starts and ends dropped because the queue was full."""
        return self.sender.dropped

    @property
    def rejected(self) -> int:
        """Spans the hub refused."""
        return self.sender.rejected

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._submit(span, ended=False)

    def on_end(self, span: ReadableSpan) -> None:
        self._submit(span, ended=True)

    def _submit(self, span: ReadableSpan, *, ended: bool) -> None:
        context = span.context
        if context is None or self.sender.stopped:
            return
        with self._lock:
            parent = span.parent.span_id if span.parent is not None else 0
            parent = self._skipped.get(parent, parent)
            if not _is_genai(span):
                if ended:
                    self._skipped.pop(context.span_id, None)
                elif len(self._skipped) < self.max_buffer:
                    self._skipped[context.span_id] = parent
                return
        key = (context.trace_id, context.span_id)
        if not self.sender.has_room(key):
            return
        request = encode_spans([span])
        encoded = request.resource_spans[0].scope_spans[0].spans[0]
        if parent:
            encoded.parent_span_id = parent.to_bytes(8, "big")
        else:
            encoded.ClearField("parent_span_id")
        self.sender.submit(key, request)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Send what is queued; False if it could not all be sent within the timeout."""
        return self.sender.flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        """Send what is queued (waiting up to the client's timeout), then stop."""
        self.sender.shutdown()
