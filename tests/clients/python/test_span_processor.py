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
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode, Tracer

from collab import Client
from collab.integrations.otel import CollabSpanProcessor
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
