"""CrewAI crews in the hub, live from the moment each step starts.

    from collab.integrations.crewai import CollabEventListener

    listener = CollabEventListener()   # COLLAB_* variables; keep it referenced while crews run

A CrewAI ``BaseEventListener`` on CrewAI's event bus. CrewAI pairs its events itself: a
``*_started`` event opens a scope (its ``event_id`` is the span, its ``parent_event_id``
the parent) and the matching ``*_completed`` / ``*_failed`` / ``*_error`` event closes it
(its ``started_event_id`` names the start). Each reported scope becomes an OTLP span with
the GenAI attributes and goes through the one mapping table (collab_grpc/otlp.py):

- a crew kickoff -> ``invoke_workflow``: an ``agent_started`` of an agent named after the
  crew (``Crew(name=...)``, "crew" by default); the kickoff is a collaboration session;
- an agent execution (of a crew's task, or ``Agent.kickoff``) -> ``invoke_agent``, agent =
  the agent's ``role``;
- an LLM call -> ``chat`` (``message_sent``, with the model; its token usage merged at
  completion where the CrewAI version reports it on ``LLMCallCompletedEvent``);
- a tool usage -> ``execute_tool`` (``task_assigned``, ``gen_ai.tool.name``); CrewAI's own
  delegation tools ("Delegate work to coworker", "Ask question to coworker") -> ``handoff``:
  a ``message_sent`` to the coworker, in ``related_agents``;
- an A2A delegation -> ``handoff``: a ``message_sent`` to the remote agent (the name on
  its agent card, else its endpoint); each A2A message sent in it -> ``send_message``: a
  ``message_sent`` to the same agent, reported once (it has no scope of its own);
- a memory query or retrieval -> ``search_memory`` / ``retrieval`` (``memory_read`` and a
  memory update ``read``); a memory save -> ``update_memory`` (``memory_write`` and a
  memory update ``write``); the memory's kind (``source_type``) is the memory item;
- tasks and every other scope are not reported: what runs under them hangs from their
  nearest reported ancestor.

A ``*_failed`` / ``*_error`` event fails the activity with its error as the reason. The
handlers are registered as coroutines: CrewAI runs those on its event loop one after the
other in the order the events were emitted (its thread handlers run in a pool, where an
end could overtake its start). Never in the crew's way: see `collab.integrations.live`.

Needs the ``crewai`` extra.
"""

from __future__ import annotations

from typing import Any

import crewai.events.types  # noqa: F401  (every event class defined: the scopes below are found among them)
from crewai.events import BaseEventListener
from crewai.events.base_events import BaseEvent
from crewai.events.event_bus import CrewAIEventsBus
from crewai.events.event_context import SCOPE_ENDING_EVENTS, SCOPE_STARTING_EVENTS
from crewai.events.types.a2a_events import (
    A2ADelegationCompletedEvent,
    A2ADelegationStartedEvent,
    A2AMessageSentEvent,
)
from crewai.events.types.agent_events import (
    AgentExecutionStartedEvent,
    LiteAgentExecutionStartedEvent,
)
from crewai.events.types.crew_events import CrewKickoffStartedEvent
from crewai.events.types.llm_events import LLMCallCompletedEvent, LLMCallStartedEvent
from crewai.events.types.memory_events import (
    MemoryQueryStartedEvent,
    MemoryRetrievalStartedEvent,
    MemorySaveStartedEvent,
)
from crewai.events.types.tool_usage_events import ToolUsageStartedEvent

from collab import Client
from collab.integrations.live import DEFAULT_MAX_OPEN, LiveSpans, ReportsLiveSpans, usage_attributes
from collab.integrations.spans import DEFAULT_MAX_BATCH, DEFAULT_MAX_BUFFER, DEFAULT_MAX_DELAY

__all__ = ["DELEGATION_TOOLS", "CollabEventListener"]

SERVICE = "crewai"
# CrewAI's delegation tools, and the argument naming the coworker.
DELEGATION_TOOLS = frozenset({"Delegate work to coworker", "Ask question to coworker"})


def _event_classes(scope_types: frozenset[str]) -> list[type[BaseEvent]]:
    """Every CrewAI event class whose ``type`` is one of ``scope_types``: every scope is
    followed, reported or not, so that what runs under one hangs from the right parent."""
    found: list[type[BaseEvent]] = []
    pending: list[type[BaseEvent]] = [BaseEvent]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        field = cls.model_fields.get("type")
        if field is not None and field.default in scope_types:
            found.append(cls)
    return found


MEMORY_OPERATIONS = {
    MemoryQueryStartedEvent: "search_memory",
    MemoryRetrievalStartedEvent: "retrieval",
    MemorySaveStartedEvent: "update_memory",
}


def _role(event: Any) -> str:
    agent = getattr(event, "agent", None)
    role = getattr(agent, "role", None) or getattr(event, "agent_role", None)
    if not role and isinstance(getattr(event, "agent_info", None), dict):
        role = event.agent_info.get("role")
    return str(role) if role else ""


def _with_agent(attributes: dict[str, Any], event: Any) -> dict[str, Any]:
    role = _role(event)
    if role:
        attributes["gen_ai.agent.name"] = role
    return attributes


def _coworker(arguments: Any) -> str:
    if isinstance(arguments, dict):
        coworker = arguments.get("coworker")
        return str(coworker) if coworker else ""
    return ""


def span_of(event: Any) -> tuple[str, dict[str, Any]] | None:
    """A start event's span name and GenAI attributes; None for a scope not reported."""
    if isinstance(event, CrewKickoffStartedEvent):
        crew = event.crew_name or "crew"
        return crew, {
            "gen_ai.operation.name": "invoke_workflow",
            "gen_ai.agent.name": crew,
            "gen_ai.conversation.id": event.event_id,
        }
    if isinstance(event, AgentExecutionStartedEvent | LiteAgentExecutionStartedEvent):
        return f"invoke_agent {_role(event)}".strip(), _with_agent({"gen_ai.operation.name": "invoke_agent"}, event)
    if isinstance(event, LLMCallStartedEvent):
        attributes = _with_agent({"gen_ai.operation.name": "chat"}, event)
        if event.model:
            attributes["gen_ai.request.model"] = str(event.model)
        return f"chat {event.model or ''}".strip(), attributes
    if isinstance(event, ToolUsageStartedEvent):
        coworker = _coworker(event.tool_args) if event.tool_name in DELEGATION_TOOLS else ""
        if coworker:
            attributes = {"gen_ai.operation.name": "handoff", "gen_ai.handoff.to_agent": coworker}
            role = _role(event)
            if role:
                attributes["gen_ai.handoff.from_agent"] = role
            return event.tool_name, _with_agent(attributes, event)
        attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": event.tool_name}
        return f"execute_tool {event.tool_name}", _with_agent(attributes, event)
    if isinstance(event, A2ADelegationStartedEvent | A2AMessageSentEvent):
        # The remote agent: the name on its agent card, else its endpoint. (An A2A event's
        # agent_id is the local agent's when CrewAI passes the agent that delegates.)
        remote = event.a2a_agent_name or event.endpoint or getattr(event, "agent_id", None) or "a2a-agent"
        kind = "handoff" if isinstance(event, A2ADelegationStartedEvent) else "send_message"
        attributes = {"gen_ai.operation.name": kind, "gen_ai.handoff.to_agent": str(remote)}
        role = _role(event)
        if role:
            attributes["gen_ai.handoff.from_agent"] = role
        return f"{kind} {remote}", _with_agent(attributes, event)
    operation = MEMORY_OPERATIONS.get(type(event))
    if operation is not None:
        attributes = _with_agent({"gen_ai.operation.name": operation}, event)
        if event.source_type:
            attributes["gen_ai.memory.store.name"] = str(event.source_type)
        return operation, attributes
    return None


def _learnt(event: Any) -> dict[str, Any]:
    """What an end event tells that its start did not: an LLM call's token usage, where
    the CrewAI version reports it on the event (``usage``, a mapping or object of
    ``prompt_tokens`` / ``completion_tokens`` or ``input_tokens`` / ``output_tokens``)."""
    if isinstance(event, LLMCallCompletedEvent):
        return usage_attributes(getattr(event, "usage", None))
    return {}


def _failure(event: Any) -> str | None:
    """The error of an end event that says its scope failed (None when it did not)."""
    if isinstance(event, A2ADelegationCompletedEvent):
        return None if event.status == "completed" else (event.error or event.status or "failed")
    if event.type.endswith(("_failed", "_error")):
        error = getattr(event, "error", None)
        return str(error) if error else ""
    return None


class CollabEventListener(ReportsLiveSpans, BaseEventListener):  # type: ignore[misc]  # crewai untyped in the dev venv
    """``client``: the hub to report to (default: a Client from COLLAB_* variables, closed
    on ``shutdown``). ``max_open`` scopes tracked at once; ``max_batch``, ``max_delay``,
    ``max_buffer`` as for `collab.integrations.spans.SpanSender`. Registers itself on
    CrewAI's event bus when made."""

    def __init__(
        self,
        client: Client | None = None,
        *,
        max_open: int = DEFAULT_MAX_OPEN,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_delay: float = DEFAULT_MAX_DELAY,
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        self.spans = LiveSpans(
            SERVICE, client, max_open=max_open, max_batch=max_batch, max_delay=max_delay, max_buffer=max_buffer
        )
        super().__init__()

    def started(self, event: Any) -> None:
        parent = event.parent_event_id if event.parent_event_id and self.spans.is_open(event.parent_event_id) else None
        found = span_of(event)
        if found is None:
            self.spans.skip(event.event_id, parent=parent)
            return
        name, attributes = found
        self.spans.start(event.event_id, name, attributes, parent=parent)

    def sent(self, event: Any) -> None:
        """A message without a scope of its own: reported once, started and ended."""
        parent = event.parent_event_id if event.parent_event_id and self.spans.is_open(event.parent_event_id) else None
        found = span_of(event)
        if found is not None:
            name, attributes = found
            self.spans.start(event.event_id, name, attributes, parent=parent, live=False)
            self.spans.end(event.event_id)

    def ended(self, event: Any) -> None:
        if event.started_event_id:
            self.spans.end(event.started_event_id, error=_failure(event), attributes=_learnt(event))

    def setup_listeners(self, crewai_event_bus: CrewAIEventsBus) -> None:
        async def on_start(source: Any, event: Any) -> None:
            self.started(event)

        async def on_end(source: Any, event: Any) -> None:
            self.ended(event)

        async def on_message(source: Any, event: Any) -> None:
            self.sent(event)

        for start in _event_classes(SCOPE_STARTING_EVENTS):
            crewai_event_bus.on(start)(on_start)
        for end in _event_classes(SCOPE_ENDING_EVENTS):
            crewai_event_bus.on(end)(on_end)
        crewai_event_bus.on(A2AMessageSentEvent)(on_message)
