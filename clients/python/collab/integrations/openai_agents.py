"""OpenAI Agents SDK runs in the hub, live from the moment each step starts.

    from agents import add_trace_processor
    from collab.integrations.openai_agents import CollabTracingProcessor

    add_trace_processor(CollabTracingProcessor())   # COLLAB_GRPC_TARGET / COLLAB_TOKEN

``add_trace_processor`` keeps the SDK's own export (to OpenAI) as it is; collab is one
more processor. Each trace and span of the SDK becomes an OTLP span with the GenAI
attributes and goes through the one mapping table (collab_grpc/otlp.py):

- the trace (one ``Runner.run``, its ``workflow_name``) -> ``invoke_workflow``: an
  ``agent_started`` of an agent named after the workflow; its ``group_id`` (else the
  trace id) is ``gen_ai.conversation.id``: the run's collaboration session;
- an agent span -> ``invoke_agent`` (``agent_started``, agent = the agent's name);
- a function span -> ``execute_tool`` (``task_assigned``, ``gen_ai.tool.name``);
- a generation or response span -> ``chat`` (``message_sent``; the model at the start,
  token usage and the response's model and id merged into its metadata at the end);
- a handoff span -> ``handoff`` (``message_sent`` from the agent handing off, with the
  agent handed to in ``related_agents``). The SDK learns the target only while the
  handoff runs, so a handoff is reported once, when it ends;
- guardrail, custom, task, turn, speech and MCP spans are not reported: what runs under
  them hangs from their nearest reported ancestor.

Every other span is reported at ``on_span_start`` (the activity is running in the hub
while the step runs) and again at ``on_span_end`` (completed, or failed with the
span's error message). Never in the agent's way: see `collab.integrations.live`.

Needs ``openai-agents``; see docs/INTEGRATIONS.md for installing it beside collab.
"""

from __future__ import annotations

from typing import Any

from agents.tracing import Span, Trace, TracingProcessor
from agents.tracing.span_data import (
    AgentSpanData,
    FunctionSpanData,
    GenerationSpanData,
    HandoffSpanData,
    ResponseSpanData,
)

from collab import Client
from collab.integrations.live import DEFAULT_MAX_OPEN, LiveSpans, ReportsLiveSpans
from collab.integrations.spans import DEFAULT_MAX_BATCH, DEFAULT_MAX_BUFFER, DEFAULT_MAX_DELAY

__all__ = ["CollabTracingProcessor"]

SERVICE = "openai-agents"


def _usage(usage: Any) -> dict[str, Any]:
    """Token counts of a usage mapping or object, as GenAI attributes."""
    found: dict[str, Any] = {}
    for source, attribute in (
        ("input_tokens", "gen_ai.usage.input_tokens"),
        ("output_tokens", "gen_ai.usage.output_tokens"),
    ):
        value = usage.get(source) if isinstance(usage, dict) else getattr(usage, source, None)
        if isinstance(value, int):
            found[attribute] = value
    return found


def _started(data: Any) -> tuple[dict[str, Any], bool] | None:
    """A span's GenAI attributes at its start, and whether it is reported then (None:
    a span the mapping has no row for)."""
    if isinstance(data, AgentSpanData):
        return {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": data.name}, True
    if isinstance(data, FunctionSpanData):
        return {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": data.name,
            "gen_ai.tool.type": "function",
        }, True
    if isinstance(data, GenerationSpanData):
        attributes: dict[str, Any] = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai"}
        if data.model:
            attributes["gen_ai.request.model"] = str(data.model)
        return attributes, True
    if isinstance(data, ResponseSpanData):
        return {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai"}, True
    if isinstance(data, HandoffSpanData):
        return {"gen_ai.operation.name": "handoff"}, False
    return None


def _ended(data: Any) -> dict[str, Any]:
    """What a span learnt while it ran: token usage, the response, a handoff's agents."""
    if isinstance(data, GenerationSpanData):
        return _usage(data.usage) if data.usage else {}
    if isinstance(data, ResponseSpanData):
        attributes = _usage(data.usage) if data.usage else {}
        if data.response is not None:
            attributes["gen_ai.response.id"] = data.response.id
            attributes["gen_ai.response.model"] = str(data.response.model)
            if not attributes.keys() & {"gen_ai.usage.input_tokens"} and data.response.usage is not None:
                attributes.update(_usage(data.response.usage))
        return attributes
    if isinstance(data, HandoffSpanData):
        return {
            name: value
            for name, value in (
                ("gen_ai.handoff.from_agent", data.from_agent),
                ("gen_ai.handoff.to_agent", data.to_agent),
            )
            if value
        }
    return {}


def _failure(error: Any) -> str | None:
    """A span error as a failure reason: its message, and the error it wraps (a tool's
    exception is in ``data.error``: the message alone says only that a tool failed)."""
    if not error:
        return None
    message = str(error.get("message") or "error")
    data = error.get("data")
    cause = data.get("error") if isinstance(data, dict) else None
    return f"{message}: {cause}" if cause else message


class CollabTracingProcessor(ReportsLiveSpans, TracingProcessor):
    """``client``: the hub to report to (default: a Client from COLLAB_* variables, closed
    on shutdown). ``max_open`` spans tracked at once; ``max_batch``, ``max_delay``,
    ``max_buffer`` as for `collab.integrations.spans.SpanSender`."""

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

    def on_trace_start(self, trace: Trace) -> None:
        group = getattr(trace, "group_id", None)
        attributes = {
            "gen_ai.operation.name": "invoke_workflow",
            "gen_ai.agent.name": trace.name,
            "gen_ai.conversation.id": group if isinstance(group, str) and group else trace.trace_id,
        }
        self.spans.start(trace.trace_id, trace.name, attributes)

    def on_trace_end(self, trace: Trace) -> None:
        self.spans.end(trace.trace_id)

    def on_span_start(self, span: Span[Any]) -> None:
        parent = span.parent_id or span.trace_id
        started = _started(span.span_data)
        if started is None:
            self.spans.skip(span.span_id, parent=parent, trace=span.trace_id)
            return
        attributes, live = started
        self.spans.start(span.span_id, span.span_data.type, attributes, parent=parent, trace=span.trace_id, live=live)

    def on_span_end(self, span: Span[Any]) -> None:
        self.spans.end(span.span_id, error=_failure(span.error), attributes=_ended(span.span_data))

    def shutdown(self) -> None:
        self.spans.shutdown()

    def force_flush(self) -> None:
        self.spans.flush()
