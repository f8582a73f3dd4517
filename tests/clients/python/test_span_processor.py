"""CollabSpanProcessor with the real OpenTelemetry SDK against `collab-server` as a real
process: each GenAI span is visible in the hub while it runs, the final tree is the
span tree, and a hub that is down costs the agent a bounded buffer only."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode, Tracer

from collab import Client
from collab.integrations.otel import CollabSpanProcessor
from collab.integrations.spans import SpanSender
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.processes import ServerProcess
from tests.support.rpc import WRITE_KEY
from tests.support.services import free_port

pytestmark = pytest.mark.integration
ENV = {"COLLAB_API_KEYS": WRITE_KEY, "COLLAB_RATE_LIMIT": "0"}
T = TypeVar("T")


def eventually(probe: Callable[[], T | None], within: float = 15.0) -> T:
    """What ``probe`` returns once it returns something (the hub takes spans a batch at a time)."""
    deadline = time.monotonic() + within
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("never happened")
        time.sleep(0.02)


def feed(hub: Client, agent: str) -> list[pb.Activity]:
    return list(reversed(hub.activity_feed(agent_id=agent, limit=50)))  # oldest first


@contextmanager
def traced(processor: CollabSpanProcessor) -> Iterator[Tracer]:
    provider = TracerProvider()
    provider.add_span_processor(processor)
    try:
        yield provider.get_tracer("test")
    finally:
        provider.shutdown()


def test_live_start_and_final_tree(tmp_path: Path) -> None:
    agent = f"live-{uuid.uuid4().hex[:8]}"
    with ServerProcess(tmp_path, env=ENV) as server, Client(server.target, WRITE_KEY) as hub:
        processor = CollabSpanProcessor(Client(server.target, WRITE_KEY))
        with traced(processor) as tracer:
            root_attributes = {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": agent,
                "gen_ai.conversation.id": f"conversation-{agent}",
            }
            with tracer.start_as_current_span(f"invoke_agent {agent}", attributes=root_attributes):
                # The agent is in the hub, running, before its span ends.
                (root,) = eventually(lambda: feed(hub, agent) or None)
                assert root.activity_type == pb.ACTIVITY_TYPE_AGENT_STARTED
                assert root.status == pb.ACTIVITY_STATUS_ACTIVE
                assert root.session_id
                assert hub.agent_status().agents[0].status == pb.AGENT_STATE_ACTIVE
                with tracer.start_as_current_span(
                    "execute_tool lookup",
                    attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup"},
                ):
                    tool = eventually(lambda: feed(hub, agent)[1:2] or None)[0]
                    assert tool.status == pb.ACTIVITY_STATUS_ACTIVE
                    with (
                        tracer.start_as_current_span("http call"),  # not GenAI: skipped, the tree goes through it
                        tracer.start_as_current_span(
                            "chat test-model",
                            attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": "test-model"},
                        ) as llm,
                    ):
                        model = eventually(lambda: feed(hub, agent)[2:3] or None)[0]
                        assert model.status == pb.ACTIVITY_STATUS_ACTIVE
                        llm.set_status(Status(StatusCode.ERROR, "rate limited by the model"))
            assert processor.force_flush(10_000)
        final = {a.activity_id: a for a in feed(hub, agent)}
        assert len(final) == 3
        root, tool, model = final[root.activity_id], final[tool.activity_id], final[model.activity_id]
        assert tool.parent_activity_id == root.activity_id
        assert model.parent_activity_id == tool.activity_id
        assert model.activity_type == pb.ACTIVITY_TYPE_MESSAGE_SENT
        assert model.metadata["gen_ai.request.model"] == "test-model"
        assert (root.status, tool.status, model.status) == (
            pb.ACTIVITY_STATUS_COMPLETED,
            pb.ACTIVITY_STATUS_COMPLETED,
            pb.ACTIVITY_STATUS_FAILED,
        )
        assert model.failure_reason == "rate limited by the model"
        assert {a.session_id for a in final.values()} == {root.session_id}
        session = hub.get_collaboration(root.session_id).session
        assert session.HasField("ended_at")  # ended with the span that started it
        assert processor.dropped == 0 and processor.rejected == 0


def test_a_hub_that_is_down_costs_a_bounded_buffer_then_gets_what_was_kept(tmp_path: Path) -> None:
    agent = f"offline-{uuid.uuid4().hex[:8]}"
    port = free_port()
    target = f"127.0.0.1:{port}"
    processor = CollabSpanProcessor(Client(target, WRITE_KEY, timeout=2), max_buffer=4, max_delay=0.05)
    with traced(processor) as tracer:
        for index in range(10):
            with tracer.start_as_current_span(
                f"chat {index}", attributes={"gen_ai.operation.name": "chat", "gen_ai.agent.name": agent}
            ):
                pass
        # Ten spans, four kept (ended); the other six lost at least their ends. The agent never waited.
        assert processor.dropped >= 6
        server = ServerProcess(tmp_path, env=ENV).start(port)
        try:
            with Client(server.target, WRITE_KEY) as hub:
                assert processor.force_flush(30_000)
                kept = feed(hub, agent)
                assert len(kept) == 4
                assert all(a.status == pb.ACTIVITY_STATUS_COMPLETED for a in kept)
        finally:
            assert server.stop() == 0


def _span(trace: int, span: int, parent: int, end: bool, **attributes: str) -> otlp.ExportTraceServiceRequest:
    now = time.time_ns()
    request = otlp.ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    scope.spans.add(
        trace_id=trace.to_bytes(16, "big"),
        span_id=span.to_bytes(8, "big"),
        parent_span_id=parent.to_bytes(8, "big") if parent else b"",
        name=attributes["gen_ai.operation.name"],
        start_time_unix_nano=now,
        end_time_unix_nano=now + 1000 if end else 0,
        attributes=[
            common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))
            for key, value in attributes.items()
        ],
    )
    return request


def test_span_sender_without_the_sdk_handoff_and_memory(tmp_path: Path) -> None:
    """What a framework integration does: OTLP spans built from its own events."""
    triage, billing = f"triage-{uuid.uuid4().hex[:6]}", f"billing-{uuid.uuid4().hex[:6]}"
    trace = int(uuid.uuid4().hex, 16)
    with ServerProcess(tmp_path, env=ENV) as server, Client(server.target, WRITE_KEY) as hub:
        sender = SpanSender(Client(server.target, WRITE_KEY))
        run = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": triage}
        sender.submit((trace, 1), _span(trace, 1, 0, False, **run))
        handoff = {
            "gen_ai.operation.name": "handoff",
            "gen_ai.handoff.from_agent": triage,
            "gen_ai.handoff.to_agent": billing,
        }
        sender.submit((trace, 2), _span(trace, 2, 1, True, **handoff))
        memory = {"gen_ai.operation.name": "update_memory", "gen_ai.memory.id": "invoice-7"}
        sender.submit((trace, 3), _span(trace, 3, 1, True, **memory))
        sender.submit((trace, 1), _span(trace, 1, 0, True, **run))
        sender.shutdown()
        assert (sender.dropped, sender.rejected) == (0, 0)
        root, message, write = feed(hub, triage)
        assert root.activity_type == pb.ACTIVITY_TYPE_AGENT_STARTED
        assert message.activity_type == pb.ACTIVITY_TYPE_MESSAGE_SENT
        assert list(message.related_agents) == [billing]
        assert write.activity_type == pb.ACTIVITY_TYPE_MEMORY_WRITE
        assert {message.parent_activity_id, write.parent_activity_id} == {root.activity_id}
        assert all(a.status == pb.ACTIVITY_STATUS_COMPLETED for a in (root, message, write))
        # The memory operation's update, recorded when its span ended well.
        update = next(iter(hub.events(types=["memory_updated"], agent_ids=[triage], since=0))).memory_updated
        assert (update.item_id, update.operation) == ("invoice-7", pb.MEMORY_OPERATION_WRITE)
