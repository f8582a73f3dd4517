"""Pydantic AI needs no module of collab's: its instrumentation emits OpenTelemetry GenAI
spans, and CollabSpanProcessor reports them live. Run for real on its TestModel (no
network) against a real `collab-server`: the tool call the test holds open is running in
the hub, then the run is a tree (agent -> model calls, tool) in one session."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from pydantic_ai import Agent
from pydantic_ai.capabilities import Instrumentation
from pydantic_ai.models.instrumented import InstrumentationSettings
from pydantic_ai.models.test import TestModel

from collab.integrations.otel import CollabSpanProcessor
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.clients.python.integrations.conftest import Hub, eventually, meta, one

pytestmark = pytest.mark.integration


def test_a_held_tool_call_live_then_the_run_as_a_tree(hub: Hub) -> None:
    processor = CollabSpanProcessor()
    provider = TracerProvider()
    provider.add_span_processor(processor)
    lookup_started, lookup_may_finish = threading.Event(), threading.Event()
    # The provider given here instead of the global one (Agent.instrument_all() uses that):
    # a process sets its global tracer provider once, and tests share the process.
    agent = Agent(
        TestModel(call_tools=["lookup"]),
        name="researcher",
        capabilities=[Instrumentation(settings=InstrumentationSettings(tracer_provider=provider))],
    )

    @agent.tool_plain
    def lookup(topic: str) -> str:
        """Look a topic up."""
        lookup_started.set()
        assert lookup_may_finish.wait(30)
        return f"{topic}: found"

    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(output=agent.run_sync("Find it").output))
    runner.start()
    try:
        assert lookup_started.wait(30)
        running_tool = eventually(lambda: one(hub.activities(), activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED))
        assert running_tool.status == pb.ACTIVITY_STATUS_ACTIVE
        assert (running_tool.agent_id, running_tool.metadata["gen_ai.tool.name"]) == ("researcher", "lookup")
        assert meta(running_tool, "otel.end_time") is None, "recorded at its start"
        run = one(hub.activities(), activity_type=pb.ACTIVITY_TYPE_AGENT_STARTED)
        assert run is not None and run.status == pb.ACTIVITY_STATUS_ACTIVE and run.agent_id == "researcher"
    finally:
        lookup_may_finish.set()
        runner.join(30)
    assert "lookup" in str(result["output"])
    provider.shutdown()  # flushes and stops the processor

    final = hub.activities()
    run = one(final, activity_type=pb.ACTIVITY_TYPE_AGENT_STARTED)
    tool_call = one(final, activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED)
    assert run and tool_call
    by_id = {a.activity_id: a for a in final}
    chats = [a for a in final if meta(a, "gen_ai.operation.name") == "chat"]
    assert len(chats) == 2  # the call that asks for the tool, the one that answers
    # The usage TestModel reports, set on each span when its call ended: merged at completion.
    for chat in chats:
        inputs, outputs = meta(chat, "gen_ai.usage.input_tokens"), meta(chat, "gen_ai.usage.output_tokens")
        assert isinstance(inputs, float) and inputs > 0 and isinstance(outputs, float) and outputs > 0, chat.metadata
        assert meta(chat, "gen_ai.response.model") == "test"
    assert all(meta(a, "otel.end_time") is not None for a in final)
    assert all(
        a.activity_type == pb.ACTIVITY_TYPE_MESSAGE_SENT and a.parent_activity_id == run.activity_id for a in chats
    )
    # Its conversation id (a run's) is the session; the run's span ended it.
    assert run.metadata["gen_ai.conversation.id"] and {a.session_id for a in final} == {run.session_id}
    assert hub.client.get_collaboration(run.session_id).session.HasField("ended_at")
    # The tool hangs from the run (through Pydantic AI's non-GenAI "running tools" span).
    assert by_id[tool_call.parent_activity_id].activity_id == run.activity_id
    assert {a.agent_id for a in final} == {"researcher"}
    assert all(a.status == pb.ACTIVITY_STATUS_COMPLETED for a in final), [(a.metadata, a.status) for a in final]
    assert processor.dropped == 0 and processor.rejected == 0
