"""`LiveSpans`: a framework's start and end events as OTLP spans, for the integrations
whose framework does not emit OpenTelemetry itself (OpenAI Agents SDK, LangChain /
LangGraph, CrewAI).

An integration calls ``start`` when its framework reports that something began (an
agent, a tool call, a model call...), with the GenAI attributes the one mapping table
reads (collab_grpc/otlp.py: ``gen_ai.operation.name``, ``gen_ai.agent.name``,
``gen_ai.conversation.id``...), and ``end`` when it finished, with its error if it
failed. Each is sent through a `SpanSender`: the hub records the activity at the start
(running) and completes or fails it at the end, so an agent looks the same however it
reports.

A framework names its runs with its own ids (``span_…`` strings, UUIDs): those become
OTLP ids by hashing (a 32-digit hex trace id is kept as it is). A span whose parent is
an open span joins the parent's trace; a run the mapping has no row for is ``skip``-ped:
not sent, and what starts under it hangs from its nearest reported ancestor.

Bounded: at most ``max_open`` spans (reported or skipped) are tracked at once; a start
beyond that is dropped (counted in ``dropped``), and so is its end.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from collab import Client
from collab.integrations.spans import DEFAULT_MAX_BATCH, DEFAULT_MAX_BUFFER, DEFAULT_MAX_DELAY, SpanSender

__all__ = ["DEFAULT_MAX_OPEN", "LiveSpans", "ReportsLiveSpans", "usage_attributes"]

DEFAULT_MAX_OPEN = 10_000
# Longest string attribute value encoded (the hub keeps at most 256 characters anyway).
MAX_VALUE_CHARS = 1024
MAX_LIST_ITEMS = 16
STATUS_MESSAGE_CHARS = 1024

Attributes = Mapping[str, Any]


def trace_id_of(name: str) -> int:
    """A framework's trace name as a 128-bit OTLP trace id: 32 hex digits (after an
    optional ``trace_`` prefix, as the OpenAI Agents SDK writes them) are kept, anything
    else is hashed."""
    digits = name.removeprefix("trace_").replace("-", "")
    if len(digits) == 32:
        try:
            value = int(digits, 16)
        except ValueError:
            pass
        else:
            if value:
                return value
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=16).digest(), "big") or 1


def span_id_of(name: str) -> int:
    """A framework's run id as a 64-bit OTLP span id (hashed; never 0, OTLP's "no id")."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") or 1


# Token counts as frameworks name them (LangChain's usage_metadata and the OpenAI API's
# usage), and the GenAI attribute each is reported as.
_TOKEN_NAMES = (
    (("input_tokens", "prompt_tokens"), "gen_ai.usage.input_tokens"),
    (("output_tokens", "completion_tokens"), "gen_ai.usage.output_tokens"),
)


def usage_attributes(usage: Any) -> dict[str, int]:
    """Token counts of a usage mapping or object (``input_tokens`` / ``output_tokens``,
    or the OpenAI API's ``prompt_tokens`` / ``completion_tokens``) as GenAI attributes;
    only the counts it holds as integers."""
    found: dict[str, int] = {}
    if usage is None:
        return found
    for sources, attribute in _TOKEN_NAMES:
        for source in sources:
            value = usage.get(source) if isinstance(usage, Mapping) else getattr(usage, source, None)
            if isinstance(value, int) and not isinstance(value, bool):
                found[attribute] = value
                break
    return found


def _any_value(value: Any) -> common_pb2.AnyValue | None:
    if isinstance(value, bool):
        return common_pb2.AnyValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.AnyValue(int_value=value) if -(2**63) <= value < 2**63 else None
    if isinstance(value, float):
        return common_pb2.AnyValue(double_value=value)
    if isinstance(value, str):
        return common_pb2.AnyValue(string_value=value[:MAX_VALUE_CHARS])
    if isinstance(value, list | tuple):
        items = [item for item in (_any_value(v) for v in value[:MAX_LIST_ITEMS]) if item is not None]
        return common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=items))
    return None


@dataclass(slots=True)
class _Open:
    trace_id: int
    span_id: int
    parent_span_id: int  # the nearest reported ancestor (0: none)
    name: str
    start_ns: int
    attributes: dict[str, Any]
    reported: bool


class LiveSpans:
    """Spans of one framework, reported to the hub as they start and end. ``service``
    is the OTLP ``service.name`` (the agent id of a span that names no agent and hangs
    from none). ``client`` and the sending budgets as for `SpanSender`."""

    def __init__(
        self,
        service: str,
        client: Client | None = None,
        *,
        max_open: int = DEFAULT_MAX_OPEN,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_delay: float = DEFAULT_MAX_DELAY,
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        if max_open < 1:
            raise ValueError("max_open must be at least 1")
        self.sender = SpanSender(client, max_batch=max_batch, max_delay=max_delay, max_buffer=max_buffer)
        self.max_open = max_open
        self.resource = [common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value=service))]
        self.scope = common_pb2.InstrumentationScope(name=f"collab.integrations.{service}")
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()
        # Starts not tracked because max_open spans were open.
        self.untracked = 0

    @property
    def dropped(self) -> int:
        """Span starts and ends not sent: the send queue or the open-span budget was full."""
        return self.sender.dropped + self.untracked

    @property
    def rejected(self) -> int:
        """Spans the hub refused."""
        return self.sender.rejected

    def is_open(self, run: str) -> bool:
        with self._lock:
            return run in self._open

    def trace_of(self, run: str) -> str | None:
        """The hex trace id of an open run (None when it is not open)."""
        with self._lock:
            found = self._open.get(run)
        return f"{found.trace_id:032x}" if found is not None else None

    def _track(
        self, run: str, parent: str | None, trace: str | None, name: str, attributes: dict[str, Any], *, reported: bool
    ) -> _Open | None:
        with self._lock:
            if run in self._open:
                return None  # started twice: the first start stands
            if len(self._open) >= self.max_open:
                self.untracked += 1
                return None
            above = self._open.get(parent) if parent else None
            if above is not None:
                trace_id = above.trace_id
                parent_span_id = above.span_id if above.reported else above.parent_span_id
            else:
                trace_id = trace_id_of(trace or run)
                parent_span_id = span_id_of(parent) if parent and trace else 0
            opened = _Open(trace_id, span_id_of(run), parent_span_id, name, time.time_ns(), attributes, reported)
            self._open[run] = opened
            return opened

    def start(
        self,
        run: str,
        name: str,
        attributes: Attributes,
        *,
        parent: str | None = None,
        trace: str | None = None,
        live: bool = True,
    ) -> None:
        """Report that ``run`` started: ``attributes`` carry its ``gen_ai.operation.name``.
        ``parent``: the run it started under; ``trace``: its trace's name, needed only when
        the parent is not a run reported here (else the parent's trace, or the run itself).
        ``live`` False: sent only when it ends (for a span whose attributes the mapping
        reads are known only then, as a handoff's target)."""
        if self.sender.stopped:
            return
        opened = self._track(run, parent, trace, name, dict(attributes), reported=True)
        if opened is not None and live:
            self._send(opened, 0, "", {})

    def skip(self, run: str, *, parent: str | None = None, trace: str | None = None) -> None:
        """A run that is not reported: runs under it hang from its nearest reported ancestor."""
        self._track(run, parent, trace, "", {}, reported=False)

    def end(self, run: str, *, error: str | None = None, attributes: Attributes | None = None) -> None:
        """Report that ``run`` ended, failed when ``error`` is given (its message: the
        activity's failure reason); ``attributes`` learnt at the end (token usage...) are
        added to the span."""
        with self._lock:
            opened = self._open.pop(run, None)
        if opened is None or not opened.reported or self.sender.stopped:
            return
        end_ns = max(time.time_ns(), opened.start_ns + 1)
        self._send(opened, end_ns, "error" if error == "" else (error or ""), attributes or {})

    def _send(self, span: _Open, end_ns: int, error: str, more: Attributes) -> None:
        key = (span.trace_id, span.span_id)
        if not self.sender.has_room(key):
            return
        request = otlp.ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        resource_spans.resource.attributes.extend(self.resource)
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.CopyFrom(self.scope)
        encoded = scope_spans.spans.add(
            trace_id=span.trace_id.to_bytes(16, "big"),
            span_id=span.span_id.to_bytes(8, "big"),
            name=span.name[:MAX_VALUE_CHARS],
            kind=trace_pb2.Span.SPAN_KIND_INTERNAL,
            start_time_unix_nano=span.start_ns,
            end_time_unix_nano=end_ns,
        )
        if span.parent_span_id:
            encoded.parent_span_id = span.parent_span_id.to_bytes(8, "big")
        for name, value in {**span.attributes, **more}.items():
            encoded_value = _any_value(value)
            if encoded_value is not None:
                encoded.attributes.add(key=name, value=encoded_value)
        if error:
            encoded.status.code = trace_pb2.Status.STATUS_CODE_ERROR
            encoded.status.message = error[:STATUS_MESSAGE_CHARS]
        elif end_ns:
            encoded.status.code = trace_pb2.Status.STATUS_CODE_OK
        self.sender.submit(key, request)

    def flush(self, timeout: float = 30.0) -> bool:
        """Send what is queued; False if it could not all be sent within ``timeout`` seconds."""
        return self.sender.flush(timeout)

    def shutdown(self) -> None:
        """Send what is queued (waiting up to the client's timeout), then stop."""
        self.sender.shutdown()


class ReportsLiveSpans:
    """What every framework hook built on `LiveSpans` (its ``spans``) offers its user: the
    counts of what was not sent or was refused, and its lifetime."""

    spans: LiveSpans

    @property
    def dropped(self) -> int:
        return self.spans.dropped

    @property
    def rejected(self) -> int:
        return self.spans.rejected

    def flush(self, timeout: float = 30.0) -> bool:
        """Send what is queued; False if it could not all be sent within ``timeout`` seconds."""
        return self.spans.flush(timeout)

    def shutdown(self) -> None:
        """Send what is queued (waiting up to the client's timeout), then stop."""
        self.spans.shutdown()
