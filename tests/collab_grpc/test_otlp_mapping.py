"""The span -> hub mapping table (collab_grpc/otlp.py), row by row, and how the ingest
applies it (collab_grpc/otlp_servicer.py) to a CollaborationState."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from collab_grpc.errors import RateLimited
from collab_grpc.model import ActivityStatus, ActivityType, EventKind, MemoryOperation
from collab_grpc.otlp import (
    MAX_ATTRIBUTE_CHARS,
    OPERATIONS,
    SpanView,
    agent_id_from,
    completion_metadata,
    fit_metadata,
    plan_span,
)
from collab_grpc.otlp_servicer import OtlpTraceServicer, parents_first
from collab_grpc.ratelimit import RateLimiter
from collab_grpc.state import CollaborationState
from collab_grpc.store.base import MemoryStore

TRACE = "0af7651916cd43dd8448eb211c80319c"


def span(
    span_id: str, operation: str | None, parent: str = "", *, end: int = 2_000_000_000, **attributes: Any
) -> SpanView:
    if operation is not None:
        attributes["gen_ai.operation.name"] = operation
    return SpanView(
        trace_id=TRACE,
        span_id=span_id,
        parent_span_id=parent,
        name=f"{operation} span",
        start_ns=1_000_000_000,
        end_ns=end,
        attributes={key.replace("__", "."): value for key, value in attributes.items()},
        resource={"service.name": "billing service"},
    )


ROWS = [
    ("invoke_agent", ActivityType.AGENT_STARTED, None),
    ("create_agent", ActivityType.AGENT_STARTED, None),
    ("invoke_workflow", ActivityType.AGENT_STARTED, None),
    ("execute_tool", ActivityType.TASK_ASSIGNED, None),
    ("chat", ActivityType.MESSAGE_SENT, None),
    ("text_completion", ActivityType.MESSAGE_SENT, None),
    ("generate_content", ActivityType.MESSAGE_SENT, None),
    ("embeddings", ActivityType.MESSAGE_SENT, None),
    ("fetch_response", ActivityType.MESSAGE_SENT, None),
    ("plan", ActivityType.DECISION_MADE, None),
    ("handoff", ActivityType.MESSAGE_SENT, None),
    ("send_message", ActivityType.MESSAGE_SENT, None),
    ("search_memory", ActivityType.MEMORY_READ, MemoryOperation.READ),
    ("retrieval", ActivityType.MEMORY_READ, MemoryOperation.READ),
    ("create_memory", ActivityType.MEMORY_WRITE, MemoryOperation.WRITE),
    ("update_memory", ActivityType.MEMORY_WRITE, MemoryOperation.WRITE),
    ("upsert_memory", ActivityType.MEMORY_WRITE, MemoryOperation.WRITE),
    ("create_memory_store", ActivityType.MEMORY_WRITE, MemoryOperation.WRITE),
    ("delete_memory", ActivityType.MEMORY_WRITE, MemoryOperation.DELETE),
    ("delete_memory_store", ActivityType.MEMORY_WRITE, MemoryOperation.DELETE),
]


def test_every_operation_has_a_row() -> None:
    assert {row[0] for row in ROWS} == set(OPERATIONS)


@pytest.mark.parametrize(("operation", "activity_type", "memory"), ROWS)
def test_table_row(operation: str, activity_type: ActivityType, memory: MemoryOperation | None) -> None:
    plan = plan_span(span("b7ad6b7169203331", operation, gen_ai__agent__name="Researcher"))
    assert plan is not None
    assert plan.activity_type is activity_type
    assert plan.memory is memory
    assert plan.agent_id == "Researcher"
    assert plan.metadata["gen_ai.operation.name"] == operation
    assert plan.key == f"{TRACE}:b7ad6b7169203331"


@pytest.mark.parametrize("operation", [None, "http.request", "INVOKE_AGENT", ""])
def test_spans_that_are_not_genai_are_dropped(operation: str | None) -> None:
    assert plan_span(span("b7ad6b7169203331", operation)) is None


def test_agent_model_tool_usage_and_times_kept_in_metadata() -> None:
    plan = plan_span(
        span(
            "b7ad6b7169203331",
            "chat",
            parent="00f067aa0ba902b7",
            end=3_500_000_000,
            gen_ai__request__model="gpt-test",
            gen_ai__usage__input_tokens=12,
            gen_ai__usage__output_tokens=34,
            gen_ai__tool__name="search",
            gen_ai__response__finish_reasons=["stop"],
            http__url="https://not.kept/",
        )
    )
    assert plan is not None
    meta = plan.metadata
    assert meta["source"] == "otel"
    assert meta["otel.trace_id"] == TRACE
    assert meta["otel.span_id"] == "b7ad6b7169203331"
    assert meta["otel.parent_span_id"] == "00f067aa0ba902b7"
    assert meta["otel.start_time"] == 1.0
    assert meta["otel.end_time"] == 3.5
    assert meta["otel.duration_ms"] == 2500.0
    assert meta["gen_ai.request.model"] == "gpt-test"
    assert meta["gen_ai.usage.input_tokens"] == 12
    assert meta["gen_ai.usage.output_tokens"] == 34
    assert meta["gen_ai.tool.name"] == "search"
    assert meta["gen_ai.response.finish_reasons"] == ["stop"]
    assert meta["service.name"] == "billing service"
    assert "http.url" not in meta
    assert plan.parent_key == f"{TRACE}:00f067aa0ba902b7"
    # No agent on the span: its GenAI parent's, else the service's.
    assert plan.agent_id == ""
    assert plan.fallback_agent_id == "billing_service"


def test_long_values_are_cut() -> None:
    plan = plan_span(span("b7ad6b7169203331", "chat", gen_ai__request__model="m" * 10_000))
    assert plan is not None
    assert len(plan.metadata["gen_ai.request.model"]) == MAX_ATTRIBUTE_CHARS


def test_error_status_is_the_failure_reason() -> None:
    failed = SpanView(
        trace_id=TRACE,
        span_id="b7ad6b7169203331",
        name="execute_tool search",
        start_ns=1,
        end_ns=2,
        error=True,
        status_message="tool timed out",
        attributes={"gen_ai.operation.name": "execute_tool", "error.type": "TimeoutError"},
    )
    plan = plan_span(failed)
    assert plan is not None and plan.failure_reason == "tool timed out"
    without_message = plan_span(SpanView(**{**_fields(failed), "status_message": ""}))
    assert without_message is not None and without_message.failure_reason == "TimeoutError"
    traceback = plan_span(SpanView(**{**_fields(failed), "status_message": "Traceback:\n\tboom" + "x" * 5000}))
    assert traceback is not None
    assert traceback.failure_reason.startswith("Traceback:  boom") and len(traceback.failure_reason) == 1024
    running = plan_span(SpanView(**{**_fields(failed), "end_ns": 0}))
    assert running is not None and not running.ended and running.failure_reason == ""


def _fields(view: SpanView) -> dict[str, Any]:
    return {name: getattr(view, name) for name in SpanView.__slots__}


def test_handoff_is_a_message_to_the_agent_handed_to() -> None:
    plan = plan_span(
        span("b7ad6b7169203331", "handoff", gen_ai__handoff__from_agent="Triage", gen_ai__handoff__to_agent="Billing")
    )
    assert plan is not None
    assert plan.activity_type is ActivityType.MESSAGE_SENT
    assert plan.agent_id == "Triage"
    assert plan.related_agents == ["Billing"]


def test_a_message_between_agents_names_the_agent_written_to() -> None:
    plan = plan_span(
        span(
            "b7ad6b7169203331", "send_message", gen_ai__handoff__from_agent="Writer", gen_ai__handoff__to_agent="Critic"
        )
    )
    assert plan is not None
    assert (plan.activity_type, plan.agent_id, plan.related_agents) == (ActivityType.MESSAGE_SENT, "Writer", ["Critic"])


def test_memory_item_id() -> None:
    plan = plan_span(span("b7ad6b7169203331", "update_memory", gen_ai__memory__id="pref 42"))
    assert plan is not None and plan.memory_item_id == "pref_42"
    plan = plan_span(span("b7ad6b7169203331", "search_memory"))
    assert plan is not None and plan.memory_item_id == "b7ad6b7169203331"


def test_agent_ids_follow_the_hub_rules() -> None:
    assert agent_id_from("Research Agent\n") == "Research_Agent_"
    assert agent_id_from("a" * 500) == "a" * 128
    assert agent_id_from(42) == ""


def test_fit_metadata_gives_up_optional_keys_first() -> None:
    plan = plan_span(span("b7ad6b7169203331", "chat", gen_ai__request__model="m" * 200))
    assert plan is not None
    fitted = fit_metadata(plan.metadata, 200)
    assert fitted is not None
    assert len(json.dumps(fitted, separators=(",", ":"))) <= 200
    assert {"source", "otel.trace_id", "otel.span_id"} <= fitted.keys()
    assert fit_metadata(plan.metadata, 20) is None


def test_parents_first_and_cycles() -> None:
    child = span("0000000000000003", "chat", parent="0000000000000002")
    middle = span("0000000000000002", None, parent="0000000000000001")
    root = span("0000000000000001", "invoke_agent")
    assert [s.span_id for s in parents_first([child, middle, root])] == [root.span_id, middle.span_id, child.span_id]
    started = span("0000000000000001", "invoke_agent", end=0)
    assert parents_first([started, root]) == [root]  # a span sent twice: its last state, once
    loop_a = span("000000000000000a", "chat", parent="000000000000000b")
    loop_b = span("000000000000000b", "chat", parent="000000000000000a")
    assert len(parents_first([loop_a, loop_b])) == 2


# -- applied to a state -----------------------------------------------------------------


def _servicer() -> OtlpTraceServicer:
    return OtlpTraceServicer(CollaborationState(), MemoryStore())


def _apply(servicer: OtlpTraceServicer, spans: list[SpanView]) -> None:
    """What Export does with decoded spans (without the wire)."""
    ordered = parents_first(spans)
    skipped = {s.key: s.parent_key for s in ordered if plan_span(s) is None}
    plans = [p for p in map(plan_span, ordered) if p is not None]
    for plan in plans:
        servicer._record(plan, skipped)
    for plan in reversed(plans):
        if plan.ended:
            servicer._end(plan)


def test_a_tree_in_one_batch_through_a_span_that_is_not_genai() -> None:
    servicer = _servicer()
    state = servicer.state
    root = span("0000000000000001", "invoke_agent", gen_ai__agent__name="planner", gen_ai__conversation__id="conv-1")
    http = span("0000000000000002", None, parent=root.span_id)
    tool = span("0000000000000003", "execute_tool", parent=http.span_id, gen_ai__tool__name="search")
    llm = SpanView(**{**_fields(span("0000000000000004", "chat", parent=tool.span_id)), "error": True})
    _apply(servicer, [llm, tool, http, root])  # exporters send children first

    events = list(state.log.events_after(0))
    recorded = [e.payload for e in events if e.kind is EventKind.ACTIVITY_RECORDED]
    assert [a.activity_type for a in recorded] == [  # type: ignore[union-attr]
        ActivityType.AGENT_STARTED,
        ActivityType.TASK_ASSIGNED,
        ActivityType.MESSAGE_SENT,
    ]
    agent, tool_activity, llm_activity = recorded
    assert {a.agent_id for a in recorded} == {"planner"}  # type: ignore[union-attr]
    assert tool_activity.parent_activity_id == agent.activity_id  # type: ignore[union-attr]
    assert llm_activity.parent_activity_id == tool_activity.activity_id  # type: ignore[union-attr]
    session_id = agent.session_id  # type: ignore[union-attr]
    assert session_id and {a.session_id for a in recorded} == {session_id}  # type: ignore[union-attr]
    assert state.get_activity(llm_activity.activity_id).status is ActivityStatus.FAILED  # type: ignore[union-attr]
    assert state.get_activity(agent.activity_id).status is ActivityStatus.COMPLETED  # type: ignore[union-attr]
    # The session ended with the span that started it, after its activities completed.
    assert events[-1].kind is EventKind.COLLABORATION_ENDED
    # The same batch again records nothing.
    last = state.log.last_seq
    _apply(servicer, [llm, tool, http, root])
    assert state.log.last_seq == last


def test_start_then_end_records_once_and_memory_on_success() -> None:
    servicer = _servicer()
    state = servicer.state
    running = span("0000000000000001", "update_memory", end=0, gen_ai__agent__name="keeper", gen_ai__memory__id="m1")
    _apply(servicer, [running])
    (activity,) = state.activity_feed()
    assert activity.status is ActivityStatus.ACTIVE
    assert not [e for e in state.log.events_after(0) if e.kind is EventKind.MEMORY_UPDATED]
    _apply(servicer, [span("0000000000000001", "update_memory", gen_ai__agent__name="keeper", gen_ai__memory__id="m1")])
    (again,) = state.activity_feed()
    assert again.activity_id == activity.activity_id
    assert again.status is ActivityStatus.COMPLETED
    (update,) = [e.payload for e in state.log.events_after(0) if e.kind is EventKind.MEMORY_UPDATED]
    assert update.item_id == "m1" and update.operation is MemoryOperation.WRITE  # type: ignore[union-attr]


def test_a_later_turn_of_an_ended_conversation_starts_a_new_session() -> None:
    servicer = _servicer()
    state = servicer.state
    _apply(servicer, [span("0000000000000001", "invoke_agent", gen_ai__agent__name="a", gen_ai__conversation__id="c")])
    _apply(servicer, [span("0000000000000002", "invoke_agent", gen_ai__agent__name="a", gen_ai__conversation__id="c")])
    ended = state.ended_collaborations()
    assert len(ended) == 2 and ended[0].session_id != ended[1].session_id
    assert all(s.metadata["gen_ai.conversation.id"] == "c" for s in ended)


def test_fit_metadata_measures_what_orjson_refuses() -> None:
    metadata = {"source": "otel", "otel.trace_id": TRACE, "otel.span_id": "b7ad6b7169203331", "big": 2**70}
    assert fit_metadata(metadata, 1000) == metadata
    fitted = fit_metadata(metadata, 110)
    assert fitted is not None and "big" not in fitted


def test_what_a_span_learns_after_its_start_is_merged_at_completion() -> None:
    servicer = _servicer()
    state = servicer.state
    started = span("0000000000000001", "chat", end=0, gen_ai__agent__name="writer", gen_ai__request__model="m-1")
    _apply(servicer, [started])
    (running,) = state.activity_feed()
    assert "gen_ai.usage.input_tokens" not in running.metadata and "otel.end_time" not in running.metadata
    ended = span(
        "0000000000000001",
        "chat",
        gen_ai__agent__name="writer",
        gen_ai__request__model="m-1",
        gen_ai__response__model="m-1-0613",
        gen_ai__usage__input_tokens=1200,
        gen_ai__usage__output_tokens=34,
        gen_ai__response__finish_reasons=["stop"],
    )
    _apply(servicer, [ended])
    (done,) = state.activity_feed()
    assert done.status is ActivityStatus.COMPLETED
    assert done.metadata["gen_ai.usage.input_tokens"] == 1200 and done.metadata["gen_ai.usage.output_tokens"] == 34
    assert done.metadata["gen_ai.response.model"] == "m-1-0613"
    assert done.metadata["gen_ai.response.finish_reasons"] == ["stop"]
    assert done.metadata["otel.end_time"] == 2.0 and done.metadata["otel.duration_ms"] == 1000.0
    completion = [e.payload for e in state.log.events_after(0) if e.kind is EventKind.ACTIVITY_COMPLETED]
    assert set(completion[0].added_keys) == {  # type: ignore[union-attr]
        "otel.end_time",
        "otel.duration_ms",
        "gen_ai.response.model",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.response.finish_reasons",
    }
    # A retried export of the ended span changes nothing.
    last = state.log.last_seq
    _apply(servicer, [ended])
    assert state.log.last_seq == last


def test_a_store_over_its_budget_completes_the_span_without_what_it_gained(caplog: pytest.LogCaptureFixture) -> None:
    """Metadata at completion is refused while the store is full; the span's activity
    still completes (finishing is never refused for space), without the added keys."""
    servicer = _servicer()
    state = servicer.state
    _apply(servicer, [span("0000000000000001", "chat", end=0, gen_ai__agent__name="writer")])
    state.storage_refusal = lambda: "the database is over its budget"
    with caplog.at_level(logging.WARNING, logger="collab_grpc.otlp"):
        _apply(
            servicer, [span("0000000000000001", "chat", gen_ai__agent__name="writer", gen_ai__usage__input_tokens=9)]
        )
    (done,) = state.activity_feed()
    assert done.status is ActivityStatus.COMPLETED
    assert "gen_ai.usage.input_tokens" not in done.metadata and "otel.end_time" not in done.metadata
    (completion,) = [e.payload for e in state.log.events_after(0) if e.kind is EventKind.ACTIVITY_COMPLETED]
    assert completion.added_keys == []  # type: ignore[union-attr]
    (warning,) = caplog.records
    message = warning.getMessage()
    assert "gen_ai.usage.input_tokens" in message and "completed without the metadata" in message
    assert "the database is over its budget" in message


def test_a_memory_update_refused_after_the_completion_is_recorded_once_by_the_retry() -> None:
    """The activity completes first; a memory update over the rate limit after it is
    left pending in the span index and recorded by the exporter's retry, once."""
    now = [1000.0]
    state = CollaborationState(clock=lambda: now[0], rate_limiter=RateLimiter(1, burst=1))
    servicer = OtlpTraceServicer(state, MemoryStore())
    start = span("0000000000000001", "update_memory", end=0, gen_ai__agent__name="keeper", gen_ai__memory__id="m1")
    ended = span("0000000000000001", "update_memory", gen_ai__agent__name="keeper", gen_ai__memory__id="m1")
    _apply(servicer, [start])  # takes the agent's one token
    with pytest.raises(RateLimited):
        _apply(servicer, [ended])

    def memory_updates() -> list[Any]:
        return [e.payload for e in state.log.events_after(0) if e.kind is EventKind.MEMORY_UPDATED]

    (activity,) = state.activity_feed()
    assert activity.status is ActivityStatus.COMPLETED, "completed before the memory update was tried"
    assert memory_updates() == []
    now[0] += 60
    _apply(servicer, [ended])  # the exporter's retry
    (update,) = memory_updates()
    assert update.item_id == "m1" and update.operation is MemoryOperation.WRITE
    last = state.log.last_seq
    now[0] += 60
    _apply(servicer, [ended])  # and again: nothing more
    assert state.log.last_seq == last and len(memory_updates()) == 1


def test_completion_metadata_keeps_only_new_or_changed_keys_within_the_limit() -> None:
    recorded = {"source": "otel", "otel.trace_id": TRACE, "otel.span_id": "01", "gen_ai.request.model": "m"}
    ended = {**recorded, "otel.end_time": 2.0, "gen_ai.request.model": "m2", "gen_ai.usage.input_tokens": 7}
    assert completion_metadata(recorded, ended, 1000) == {
        "otel.end_time": 2.0,
        "gen_ai.request.model": "m2",
        "gen_ai.usage.input_tokens": 7,
    }
    assert completion_metadata(recorded, recorded, 1000) == {}
    # Too big to add everything: the newest keys (last in the span's order) go first, and
    # a changed key given up keeps its recorded value in the merge measured.
    size = len(json.dumps({**recorded, "otel.end_time": 2.0, "gen_ai.request.model": "m2"}, separators=(",", ":")))
    assert completion_metadata(recorded, ended, size) == {"otel.end_time": 2.0, "gen_ai.request.model": "m2"}
    assert completion_metadata(recorded, ended, len(json.dumps(recorded, separators=(",", ":")))) == {}
