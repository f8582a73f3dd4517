"""LiveSpans in-process: how a framework's runs become OTLP spans (ids, parents through
skipped runs, the open-run budget), with the sender's queue read instead of a hub."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.trace.v1 import trace_pb2

from collab import Client
from collab.integrations.live import LiveSpans, span_id_of, trace_id_of
from collab.integrations.spans import SpanKey


@pytest.fixture
def spans() -> Iterator[LiveSpans]:
    # Nothing listens there; a long max_delay keeps everything in the queue to be read.
    live = LiveSpans("test", Client("127.0.0.1:9", "key", timeout=1), max_open=3, max_delay=3600)
    try:
        yield live
    finally:
        live.sender._queue.clear()  # nothing to send to a hub that is not there
        live.sender.stopped = True
        live.sender._wake.set()
        live.sender._thread.join(5)
        live.sender.client.close()


def queued(live: LiveSpans) -> dict[SpanKey, trace_pb2.Span]:
    requests: dict[SpanKey, otlp.ExportTraceServiceRequest] = dict(live.sender._queue)
    return {key: request.resource_spans[0].scope_spans[0].spans[0] for key, request in requests.items()}


def test_ids_parents_through_skipped_runs_and_the_end_state(spans: LiveSpans) -> None:
    spans.start("root", "graph", {"gen_ai.operation.name": "invoke_workflow"})
    spans.skip("sequence", parent="root")
    spans.start("tool", "lookup", {"gen_ai.operation.name": "execute_tool"}, parent="sequence")
    spans.end("tool", error="boom", attributes={"gen_ai.usage.input_tokens": 3})
    spans.end("sequence")
    sent = queued(spans)
    trace = trace_id_of("root")
    root, tool = sent[(trace, span_id_of("root"))], sent[(trace, span_id_of("tool"))]
    assert root.end_time_unix_nano == 0 and not root.parent_span_id  # running
    assert tool.parent_span_id == span_id_of("root").to_bytes(8, "big")  # the skipped run is stepped over
    assert tool.end_time_unix_nano > tool.start_time_unix_nano
    assert (tool.status.code, tool.status.message) == (trace_pb2.Status.STATUS_CODE_ERROR, "boom")
    assert {kv.key: kv.value for kv in tool.attributes}["gen_ai.usage.input_tokens"].int_value == 3
    assert len(sent) == 2  # the skipped run is never sent


def test_hex_trace_ids_are_kept_and_other_names_hashed() -> None:
    assert trace_id_of("trace_" + "ab" * 16) == int("ab" * 16, 16)
    assert trace_id_of("0f2c1e9e-8a44-4b5e-9f3e-1c2d3e4f5a6b") == int("0f2c1e9e8a444b5e9f3e1c2d3e4f5a6b", 16)
    assert trace_id_of("conversation") == trace_id_of("conversation") != trace_id_of("other")
    assert span_id_of("span_1") != span_id_of("span_2") and 0 < span_id_of("x") < 2**64


def test_runs_beyond_max_open_are_dropped_and_counted(spans: LiveSpans) -> None:
    for run in ("a", "b", "c", "d"):
        spans.start(run, run, {"gen_ai.operation.name": "chat"})
    assert spans.dropped == 1 and not spans.is_open("d")
    spans.end("d")  # the end of a run never tracked is ignored
    spans.end("a")
    spans.start("e", "e", {"gen_ai.operation.name": "chat"})  # room again
    assert spans.is_open("e") and len(queued(spans)) == 4


def test_a_span_not_live_is_sent_once_at_its_end(spans: LiveSpans) -> None:
    spans.start("handoff", "handoff", {"gen_ai.operation.name": "handoff"}, live=False)
    assert queued(spans) == {}
    spans.end("handoff", attributes={"gen_ai.handoff.to_agent": "billing"})
    (sent,) = queued(spans).values()
    assert sent.end_time_unix_nano and {kv.key for kv in sent.attributes} >= {"gen_ai.handoff.to_agent"}
