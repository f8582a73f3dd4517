"""The OpenAI Agents SDK, run for real on a model of the test's own (no OpenAI call),
reporting through CollabTracingProcessor to a real `collab-server`: a triage agent hands
off to a billing agent whose tool call the test holds open; the hub shows it running,
then the whole run as a tree in one session, the handoff as a message to the billing
agent."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from agents import (
    Agent,
    Handoff,
    Model,
    ModelResponse,
    RunConfig,
    Runner,
    Usage,
    add_trace_processor,
    function_tool,
    generation_span,
    set_trace_processors,
)
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

from collab.integrations.openai_agents import CollabTracingProcessor
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.clients.python.integrations.conftest import Hub, eventually, meta, one

pytestmark = pytest.mark.integration


class ScriptedModel(Model):
    """Answers each call with the next of its replies: a tool call (name, arguments) or text."""

    def __init__(self, name: str, replies: list[tuple[str, str] | str]) -> None:
        self.name = name
        self.replies = list(replies)

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        # As the SDK's own models do: a generation span around the call, its usage set
        # once the model answered (after the span started: the hub learns it at the end).
        with generation_span(model=self.name) as span:
            reply = self.replies.pop(0)
            span.span_data.usage = {"input_tokens": 12, "output_tokens": 3}
        if isinstance(reply, tuple):
            name, arguments = reply
            item: Any = ResponseFunctionToolCall(
                type="function_call", id=f"fc_{name}", call_id=f"call_{name}", name=name, arguments=arguments
            )
        else:
            item = ResponseOutputMessage(
                id="msg_1",
                type="message",
                role="assistant",
                status="completed",
                content=[ResponseOutputText(type="output_text", text=reply, annotations=[])],
            )
        return ModelResponse(output=[item], usage=Usage(requests=1, input_tokens=12, output_tokens=3), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError("the test runs without streaming")


@pytest.fixture
def processor(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> Iterator[CollabTracingProcessor]:
    # No key: the SDK's own OpenAI exporter (kept by add_trace_processor) sends nothing.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    processor = CollabTracingProcessor()
    add_trace_processor(processor)
    try:
        yield processor
    finally:
        set_trace_processors([])  # the SDK's processors are global: none outlives the test
        processor.shutdown()


def test_a_handoff_and_a_held_tool_call_live_then_as_a_tree(hub: Hub, processor: CollabTracingProcessor) -> None:
    tool_started = threading.Event()
    tool_may_finish = threading.Event()

    @function_tool
    def lookup_invoice(invoice: str) -> str:
        """Look an invoice up."""
        tool_started.set()
        assert tool_may_finish.wait(30)
        return f"{invoice}: paid"

    billing = Agent(
        name="billing",
        instructions="Answer billing questions.",
        tools=[lookup_invoice],
        model=ScriptedModel("billing-model", [("lookup_invoice", '{"invoice": "INV-7"}'), "INV-7 is paid."]),
    )
    transfer = Handoff.default_tool_name(billing)
    triage = Agent(
        name="triage",
        instructions="Route the question.",
        handoffs=[billing],
        model=ScriptedModel("triage-model", [(transfer, "{}")]),
    )
    result: dict[str, Any] = {}

    def run() -> None:
        result["output"] = Runner.run_sync(
            triage, "Is INV-7 paid?", run_config=RunConfig(workflow_name="support", group_id="conversation-42")
        ).final_output

    runner = threading.Thread(target=run)
    runner.start()
    try:
        assert tool_started.wait(30)
        # The running_tool is still running: the hub shows it, and the billing agent, active.
        running_tool = eventually(lambda: one(hub.activities(), activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED))
        assert running_tool.status == pb.ACTIVITY_STATUS_ACTIVE
        assert running_tool.agent_id == "billing"
        assert running_tool.metadata["gen_ai.tool.name"] == "lookup_invoice"
        assert meta(running_tool, "otel.end_time") is None, "recorded at its start"
        live_billing = one(hub.activities(), agent_id="billing", activity_type=pb.ACTIVITY_TYPE_AGENT_STARTED)
        assert live_billing is not None and live_billing.status == pb.ACTIVITY_STATUS_ACTIVE
        assert hub.client.get_activity(running_tool.parent_activity_id).activity_id == live_billing.activity_id
    finally:
        tool_may_finish.set()
        runner.join(30)
    assert result["output"] == "INV-7 is paid."
    processor.force_flush()

    final = hub.activities()
    workflow = one(final, agent_id="support")
    triage_run = one(final, agent_id="triage", activity_type=pb.ACTIVITY_TYPE_AGENT_STARTED)
    billing_run = one(final, agent_id="billing", activity_type=pb.ACTIVITY_TYPE_AGENT_STARTED)
    handoff = one(final, meta_gen_ai__operation__name="handoff")
    tool = one(final, activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED)
    assert workflow and triage_run and billing_run and handoff and tool
    assert workflow.activity_type == pb.ACTIVITY_TYPE_AGENT_STARTED
    assert workflow.metadata["gen_ai.conversation.id"] == "conversation-42"
    assert triage_run.parent_activity_id == billing_run.parent_activity_id == workflow.activity_id
    # The handoff: a message from triage to billing, under the triage agent.
    assert handoff.activity_type == pb.ACTIVITY_TYPE_MESSAGE_SENT
    assert (handoff.agent_id, list(handoff.related_agents)) == ("triage", ["billing"])
    assert handoff.parent_activity_id == triage_run.activity_id
    assert tool.parent_activity_id == billing_run.activity_id
    # Three model calls (triage once, billing twice), each under its agent, with its model.
    model_calls = [a for a in final if meta(a, "gen_ai.operation.name") == "chat"]
    assert sorted((a.agent_id, a.metadata["gen_ai.request.model"]) for a in model_calls) == [
        ("billing", "billing-model"),
        ("billing", "billing-model"),
        ("triage", "triage-model"),
    ]
    # Their token usage, learnt when each call ended, merged into the activity at completion.
    assert [(meta(a, "gen_ai.usage.input_tokens"), meta(a, "gen_ai.usage.output_tokens")) for a in model_calls] == [
        (12, 3)
    ] * 3
    # Every span's end time and duration too (each was recorded at its start).
    assert all(meta(a, "otel.end_time") is not None and meta(a, "otel.duration_ms") is not None for a in final)
    by_id = {a.activity_id: a for a in final}
    assert all(by_id[a.parent_activity_id].agent_id == a.agent_id for a in model_calls)
    assert {a.session_id for a in final} == {workflow.session_id} and workflow.session_id
    assert all(a.status == pb.ACTIVITY_STATUS_COMPLETED for a in final), [(a.agent_id, a.status) for a in final]
    assert hub.client.get_collaboration(workflow.session_id).session.HasField("ended_at")
    assert processor.dropped == 0 and processor.rejected == 0


def test_a_failing_tool_fails_its_activity(hub: Hub, processor: CollabTracingProcessor) -> None:
    @function_tool
    def charge(amount: int) -> str:
        """Charge an amount."""
        raise RuntimeError("card declined")

    agent = Agent(
        name="cashier",
        tools=[charge],
        model=ScriptedModel("cashier-model", [("charge", '{"amount": 5}'), "Could not charge."]),
    )
    assert Runner.run_sync(agent, "charge 5").final_output == "Could not charge."
    processor.force_flush()
    tool = eventually(lambda: one(hub.activities(), activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED))
    assert tool.status == pb.ACTIVITY_STATUS_FAILED
    # The SDK's span error, with the tool's error as the SDK traces it (redacted by default).
    assert tool.failure_reason.startswith("Error running tool (non-fatal): "), tool.failure_reason
