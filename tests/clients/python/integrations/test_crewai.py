"""CrewAI, run for real on an LLM of the test's own (no network), reporting through
CollabEventListener to a real `collab-server`: the tool call the test holds open is
running in the hub; then the crew is a tree (crew -> agent -> LLM calls, tool, memory)
in one session.

CrewAI's install is heavy (about 1 GB) and pins pydantic<2.13 and openai<3, which the
other frameworks of the dev venv do not allow: `make test-crewai` runs this file in a
venv of its own (COLLAB_REQUIRE_CREWAI=1 there: it fails instead of skipping). CrewAI's
memory needs an embedder (a model or a network call), so the memory events are emitted
on CrewAI's real event bus from inside the agent's tool, as CrewAI's memory emits them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

if not os.environ.get("COLLAB_REQUIRE_CREWAI"):
    pytest.importorskip("crewai")
os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CREWAI_DISABLE_TRACKING", "true")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")

from crewai import Agent, Crew, Task
from crewai.events import crewai_event_bus
from crewai.events.types.a2a_events import (
    A2ADelegationCompletedEvent,
    A2ADelegationStartedEvent,
    A2AMessageSentEvent,
)
from crewai.events.types.llm_events import LLMCallType
from crewai.events.types.memory_events import MemorySaveCompletedEvent, MemorySaveStartedEvent
from crewai.llms.base_llm import BaseLLM
from crewai.tools import tool

from collab.integrations.crewai import CollabEventListener
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.clients.python.integrations.conftest import Hub, eventually, meta, one

pytestmark = pytest.mark.integration


class ScriptedLLM(BaseLLM):  # type: ignore[misc]
    """Answers each call with the next of its replies, emitting CrewAI's LLM events as
    CrewAI's own LLM classes do."""

    replies: list[str]

    def call(
        self,
        messages: Any,
        tools: Any = None,
        callbacks: Any = None,
        available_functions: Any = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> str:
        self._emit_call_started_event(messages=messages, from_task=from_task, from_agent=from_agent)
        reply = self.replies.pop(0)
        self._emit_call_completed_event(
            response=reply,
            call_type=LLMCallType.LLM_CALL,
            from_task=from_task,
            from_agent=from_agent,
            messages=messages,
            # As CrewAI's own LLM classes report it (LiteLLM's names), known only at the end.
            usage={"prompt_tokens": 120 + len(self.replies), "completion_tokens": 30},
        )
        return reply

    def supports_function_calling(self) -> bool:
        return False


@pytest.fixture
def listener(hub: Hub) -> Iterator[CollabEventListener]:
    with crewai_event_bus.scoped_handlers():  # CrewAI's bus is global: no handler outlives the test
        listener = CollabEventListener()
        try:
            yield listener
        finally:
            crewai_event_bus.flush()
            listener.shutdown()


def test_a_held_tool_call_live_then_the_crew_as_a_tree(hub: Hub, listener: CollabEventListener) -> None:
    tool_started, tool_may_finish = threading.Event(), threading.Event()

    @tool("lookup")  # type: ignore[untyped-decorator]
    def lookup(topic: str) -> str:
        """Look a topic up."""
        crewai_event_bus.emit(
            None, MemorySaveStartedEvent(value=topic, source_type="short_term_memory", agent_role="Researcher")
        )
        crewai_event_bus.emit(
            None,
            MemorySaveCompletedEvent(
                value=topic, save_time_ms=1.0, source_type="short_term_memory", agent_role="Researcher"
            ),
        )
        remote = {"a2a_agent_name": "Fact checker", "agent_role": "Researcher"}
        crewai_event_bus.emit(
            None,
            A2ADelegationStartedEvent(
                endpoint="http://127.0.0.1:9/", task_description="check", agent_id="fc", **remote
            ),
        )
        crewai_event_bus.emit(None, A2AMessageSentEvent(message="Is it so?", turn_number=1, **remote))
        crewai_event_bus.emit(None, A2ADelegationCompletedEvent(status="completed", result="yes", **remote))
        tool_started.set()
        assert tool_may_finish.wait(30)
        return f"{topic}: found"

    llm = ScriptedLLM(
        model="scripted",
        replies=[
            'Thought: I should look it up.\nAction: lookup\nAction Input: {"topic": "tides"}',
            "Thought: I know it now.\nFinal Answer: tides: found",
        ],
    )
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=llm, tools=[lookup])
    task = Task(description="Find out about tides.", expected_output="A fact.", agent=researcher)
    crew = Crew(name="research", agents=[researcher], tasks=[task])
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(output=str(crew.kickoff())))
    runner.start()
    try:
        assert tool_started.wait(60)
        running_tool = eventually(lambda: one(hub.activities(), activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED))
        assert running_tool.status == pb.ACTIVITY_STATUS_ACTIVE
        assert (running_tool.agent_id, running_tool.metadata["gen_ai.tool.name"]) == ("Researcher", "lookup")
        agent_run = one(hub.activities(), agent_id="Researcher", activity_type=pb.ACTIVITY_TYPE_AGENT_STARTED)
        assert agent_run is not None and agent_run.status == pb.ACTIVITY_STATUS_ACTIVE
    finally:
        tool_may_finish.set()
        runner.join(60)
    assert "tides: found" in result["output"]
    crewai_event_bus.flush()
    assert listener.flush(10)

    final = hub.activities()
    crew_run = one(final, agent_id="research")
    agent_run = one(final, agent_id="Researcher", activity_type=pb.ACTIVITY_TYPE_AGENT_STARTED)
    tool_call = one(final, activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED)
    memory = one(final, activity_type=pb.ACTIVITY_TYPE_MEMORY_WRITE)
    assert crew_run and agent_run and tool_call and memory
    assert crew_run.activity_type == pb.ACTIVITY_TYPE_AGENT_STARTED
    assert agent_run.parent_activity_id == crew_run.activity_id  # through the task, not reported
    assert tool_call.parent_activity_id == agent_run.activity_id
    assert (memory.agent_id, memory.parent_activity_id) == ("Researcher", tool_call.activity_id)
    assert memory.metadata["gen_ai.memory.store.name"] == "short_term_memory"
    # The A2A delegation: a message to the remote agent, and the message sent in it.
    delegation = one(final, meta_gen_ai__operation__name="handoff")
    message = one(final, meta_gen_ai__operation__name="send_message")
    assert delegation and message
    assert (delegation.agent_id, list(delegation.related_agents)) == ("Researcher", ["Fact_checker"])
    assert (message.agent_id, list(message.related_agents)) == ("Researcher", ["Fact_checker"])
    assert delegation.parent_activity_id == tool_call.activity_id
    assert message.parent_activity_id == delegation.activity_id
    assert delegation.activity_type == message.activity_type == pb.ACTIVITY_TYPE_MESSAGE_SENT
    chats = [a for a in final if meta(a, "gen_ai.operation.name") == "chat"]
    assert len(chats) == 2
    assert all(
        a.parent_activity_id == agent_run.activity_id and a.metadata["gen_ai.request.model"] == "scripted"
        for a in chats
    )
    # The token usage the call's end reported, merged into its activity at completion.
    assert {meta(a, "gen_ai.usage.input_tokens") for a in chats} == {120, 121}  # one each (two chats)
    assert {meta(a, "gen_ai.usage.output_tokens") for a in chats} == {30}
    assert {a.session_id for a in final} == {crew_run.session_id} and crew_run.session_id
    assert all(a.status == pb.ACTIVITY_STATUS_COMPLETED for a in final), [(a.agent_id, a.status) for a in final]
    assert listener.dropped == 0 and listener.rejected == 0
