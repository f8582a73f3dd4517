"""Memory budgets of the domain core: open activities refused past a count or a byte
budget (changing nothing), history, ended sessions, the resume log and a lagging
subscriber bounded in bytes, each record measured once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from collab_grpc import events as events_module
from collab_grpc.config import parse_server_config
from collab_grpc.errors import BudgetExhausted
from collab_grpc.events import RECORD_OVERHEAD, EventFilter, EventLog, payload_size
from collab_grpc.model import ActivityType, EventKind, MemoryOperation, MemoryUpdate
from collab_grpc.state import CollaborationState, StateSettings
from collab_grpc.store import Retention, SQLiteStore

BLOB = 10_000  # characters of metadata per record in these tests
# What a record with BLOB characters of metadata counts: {"blob":"..."} plus the overhead.
RECORD = BLOB + len('{"blob":""}') + RECORD_OVERHEAD


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def blob(char: str = "x") -> dict[str, Any]:
    return {"blob": char * BLOB}


def make(clock: Clock | None = None, **settings: Any) -> CollaborationState:
    return CollaborationState(StateSettings(**settings), clock=clock or Clock())


def record(state: CollaborationState, agent: str, **kwargs: Any) -> str:
    return state.record_activity(agent_id=agent, activity_type=ActivityType.TASK_ASSIGNED, **kwargs).activity_id


def test_a_record_counts_its_serialised_metadata_and_overhead() -> None:
    state = make()
    record(state, "a", metadata=blob())
    assert state.open_activity_bytes == RECORD
    assert state.log.retained_bytes == RECORD


def test_open_activities_past_their_count_are_refused_and_nothing_changes() -> None:
    state = make(max_open_activities=2)
    first = record(state, "a")
    record(state, "b")
    seq, held = state.log.last_seq, state.open_activity_bytes
    with pytest.raises(BudgetExhausted) as refused:
        record(state, "newcomer")
    message = str(refused.value)
    assert "2 open activities" in message
    assert "COLLAB_MAX_OPEN_ACTIVITIES" in message and "--max-open-activities" in message
    assert "complete" in message and "3600 s to expire" in message
    assert refused.value.budget == "max-open-activities"
    assert state.log.last_seq == seq and state.open_activity_bytes == held
    assert state.find_agent("newcomer") is None  # not even the agent was made
    state.complete_activity(first)  # completing one frees a place
    record(state, "newcomer")


def test_open_activities_past_their_bytes_are_refused_until_one_completes_or_expires() -> None:
    clock = Clock()
    budget = 3 * RECORD + 600  # room for three large ones and a small one
    state = make(clock, max_open_activity_bytes=budget, activity_ttl=60.0)
    opened = [record(state, f"agent_{n}", metadata=blob()) for n in range(3)]
    seq = state.log.last_seq
    with pytest.raises(BudgetExhausted) as refused:
        record(state, "agent_3", metadata=blob())
    message = str(refused.value)
    assert f"open activities hold {3 * RECORD} bytes" in message
    assert f"this one ({RECORD} bytes)" in message
    assert f"budget of {budget} bytes" in message
    assert "COLLAB_MAX_OPEN_ACTIVITY_BYTES" in message and "60 s to expire" in message
    assert refused.value.budget == "max-open-activity-bytes"
    assert state.log.last_seq == seq and state.open_activity_bytes == 3 * RECORD
    record(state, "agent_3")  # a small one still fits
    state.complete_activity(opened[0])
    record(state, "agent_4", metadata=blob())
    clock.now += 61
    assert len(state.expire_stale_activities()) == 4
    assert state.open_activity_bytes == 0
    record(state, "agent_5", metadata=blob())


def test_the_refusal_is_checked_before_the_rate_limit_takes_a_token() -> None:
    from collab_grpc.ratelimit import RateLimiter

    state = CollaborationState(
        StateSettings(max_open_activities=1), clock=Clock(), rate_limiter=RateLimiter(1.0, burst=1)
    )
    first = record(state, "a")
    with pytest.raises(BudgetExhausted):
        record(state, "b")
    state.complete_activity(first)
    record(state, "b")  # b's one token was not spent on the refusal


def test_history_is_evicted_by_bytes_but_open_activities_stay() -> None:
    state = make(history_bytes=3 * RECORD)
    ids = [record(state, f"a{n}", metadata=blob()) for n in range(6)]
    for activity_id in ids[1:]:
        state.complete_activity(activity_id)
    feed = [a.activity_id for a in state.activity_feed(limit=100)]
    assert feed == ids[:2:-1]  # the newest three
    assert state.history_bytes == 3 * RECORD
    assert state.get_activity(ids[0]) is not None  # still open: kept although out of the feed
    assert state.get_activity(ids[1]) is None  # completed and evicted: only the store has it
    state.complete_activity(ids[0])
    assert state.open_activity_bytes == 0


def test_ended_sessions_with_their_decisions_are_evicted_by_bytes() -> None:
    state = make(ended_sessions_bytes=5 * RECORD)
    sessions = []
    for n in range(4):
        session = state.start_collaboration(participants=[f"p{n}"], metadata=blob())
        state.record_decision(session_id=session.session_id, agent_id=f"p{n}", decision="go", metadata=blob())
        state.end_collaboration(session.session_id)
        sessions.append(session.session_id)
    kept = [s.session_id for s in state.ended_collaborations(limit=100)]
    assert kept == sessions[:1:-1]  # two sessions of two records each fit in five records
    assert state.ended_sessions_bytes <= 5 * RECORD
    assert state.find_session(sessions[0]) is None


def test_the_resume_log_is_evicted_by_bytes_and_resume_says_so() -> None:
    log = EventLog("e", retain=1000, retain_bytes=3 * RECORD)
    update = MemoryUpdate(MemoryOperation.WRITE, "item", "a", 0.0, blob())
    for _ in range(5):
        log.append(EventKind.MEMORY_UPDATED, update, 0.0)
    assert log.first_retained_seq == 3
    assert log.retained_bytes == 3 * RECORD
    reason = log.can_resume("e", 1)
    assert reason is not None and "no longer retained" in reason
    assert log.can_resume("e", 2) is None


def test_the_newest_event_is_retained_whatever_its_size() -> None:
    log = EventLog("e", retain_bytes=10)
    log.append(EventKind.MEMORY_UPDATED, MemoryUpdate(MemoryOperation.WRITE, "i", "a", 0.0, blob()), 0.0)
    assert log.first_retained_seq == 1 and log.can_resume("e", 0) is None


def test_a_subscriber_lagging_by_more_bytes_than_its_queue_reads_on_until_the_log_lets_go() -> None:
    """Its queue takes half the retained bytes; past that it holds nothing more and reads
    on from the log, and is closed once the log no longer keeps its next event."""
    state = make(event_log_retain_bytes=6 * RECORD)
    subscription = state.subscribe(EventFilter(), capacity=1000)
    for n in range(3):
        record(state, f"a{n}", metadata=blob())
    assert not subscription.behind and subscription.queued_bytes == 3 * RECORD
    for n in range(3, 9):
        record(state, f"a{n}", metadata=blob())
    assert subscription.behind and not subscription.closed and subscription.queued_bytes == 3 * RECORD
    record(state, "a9", metadata=blob())  # the log lets go of seq 4, the next it needs
    assert subscription.closed_reason is not None and "no longer retained" in subscription.closed_reason


def test_the_write_path_measures_metadata_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation measures; the budgets and the log reuse that size."""

    def measured_again(metadata: dict[str, Any]) -> int:
        raise AssertionError("metadata serialised a second time")

    monkeypatch.setattr(events_module, "metadata_size", measured_again)
    state = make()
    activity_id = record(state, "a", metadata=blob())
    state.complete_activity(activity_id, success=False, failure_reason="broke")
    session = state.start_collaboration(participants=["a"], metadata=blob())
    state.record_decision(session_id=session.session_id, agent_id="a", decision="d", metadata=blob())
    state.end_collaboration(session.session_id)
    state.record_memory_update(operation="write", item_id="i", agent_id="a", metadata=blob())


def test_a_restored_state_counts_what_it_holds_as_the_original_did() -> None:
    original = make()
    kept = record(original, "a", metadata=blob())
    done = record(original, "b", metadata=blob("y"))
    original.complete_activity(done)
    restored = make()
    restored.restore(
        epoch=original.epoch,
        last_seq=original.log.last_seq,
        agents=[],
        activities=[a for a in (original.get_activity(kept), original.get_activity(done)) if a is not None],
        sessions=[],
        decisions=[],
        events=list(original.log.events_after(0)),
    )
    assert restored.open_activity_bytes == original.open_activity_bytes == RECORD
    assert restored.history_bytes == original.history_bytes
    assert restored.log.retained_bytes == sum(payload_size(e.payload) for e in original.log.events_after(0))


def test_the_budgets_are_settings_with_flags_and_environment_variables() -> None:
    defaults = parse_server_config([], env={})
    assert defaults.max_open_activities == 100_000
    assert defaults.max_open_activity_bytes == defaults.max_active_session_bytes == 64 * 1024 * 1024
    assert defaults.history_bytes == defaults.ended_sessions_bytes == 32 * 1024 * 1024
    assert defaults.event_retain_bytes == defaults.idempotency_bytes == 64 * 1024 * 1024
    config = parse_server_config(
        ["--max-open-activity-bytes", "1000", "--event-retain-bytes", "2000"],
        env={"COLLAB_MAX_OPEN_ACTIVITIES": "5", "COLLAB_HISTORY_BYTES": "3000", "COLLAB_IDEMPOTENCY_BYTES": "4000"},
    )
    assert (config.max_open_activity_bytes, config.event_retain_bytes) == (1000, 2000)
    assert (config.max_open_activities, config.history_bytes, config.idempotency_bytes) == (5, 3000, 4000)
    with pytest.raises(SystemExit):
        parse_server_config(["--ended-sessions-bytes", "0"], env={})


# -- the SQLite file's byte budget ------------------------------------------------------------


async def test_sqlite_over_its_byte_budget_refuses_new_records_until_retention_frees_room(tmp_path: Path) -> None:
    """Open activities are never pruned: once they fill the file's budget, new records
    are refused with the budget named; completing them lets retention (here: the
    newest 3) free the room, and records are accepted again."""
    budget = 600_000
    state = CollaborationState(StateSettings(), clock=time.time)
    store = SQLiteStore(tmp_path, retention=Retention(count=3, max_bytes=budget))
    await store.attach(state)
    store.start()
    try:
        opened: list[str] = []
        refused: BudgetExhausted | None = None
        for n in range(200):
            try:
                opened.append(record(state, f"agent_{n}", metadata=blob()))
            except BudgetExhausted as error:
                refused = error
                break
            await store.durable(state.log.last_seq)
        assert refused is not None and refused.budget == "max-db-bytes"
        assert store.used_bytes > budget and 20 < len(opened) < 200
        message = str(refused)
        assert f"over its budget of {budget} bytes" in message and "COLLAB_MAX_DB_BYTES" in message
        assert "--retain-count" in message and "complete open activities" in message
        seq = state.log.last_seq
        with pytest.raises(BudgetExhausted):
            state.start_collaboration(participants=["a"])
        with pytest.raises(BudgetExhausted):
            state.record_memory_update(operation="write", item_id="i", agent_id="a")
        assert state.log.last_seq == seq  # nothing was recorded

        for activity_id in opened:  # completions still pass, and free room as retention runs
            state.complete_activity(activity_id)
            await store.durable(state.log.last_seq)
        assert store.used_bytes <= budget
        record(state, "after", metadata=blob())
        await store.durable(state.log.last_seq)
    finally:
        await store.close()


def test_the_database_budget_is_a_setting() -> None:
    assert parse_server_config([], env={}).max_db_bytes == 4 * 1024 * 1024 * 1024
    assert parse_server_config([], env={"COLLAB_MAX_DB_BYTES": "0"}).max_db_bytes == 0
    with pytest.raises(SystemExit):
        parse_server_config(["--max-db-bytes", "-1"], env={})


def test_active_sessions_with_their_decisions_past_their_bytes_are_refused_until_one_ends() -> None:
    state = make(max_active_session_bytes=3 * RECORD + 600)
    first = state.start_collaboration(participants=["a"], metadata=blob())
    state.record_decision(session_id=first.session_id, agent_id="a", decision="d", metadata=blob())
    second = state.start_collaboration(participants=["b"], metadata=blob())
    seq, held = state.log.last_seq, state.active_session_bytes
    with pytest.raises(BudgetExhausted) as refused:
        state.record_decision(session_id=second.session_id, agent_id="b", decision="d", metadata=blob())
    assert refused.value.budget == "max-active-session-bytes"
    assert "COLLAB_MAX_ACTIVE_SESSION_BYTES" in str(refused.value) and "end-collaboration" in str(refused.value)
    with pytest.raises(BudgetExhausted):
        state.start_collaboration(participants=["c"], metadata=blob())
    assert (state.log.last_seq, state.active_session_bytes) == (seq, held)
    assert len(state.active_collaborations()) == 2
    state.end_collaboration(first.session_id)  # frees its own bytes and its decision's
    assert state.active_session_bytes == held - 2 * (RECORD + 1)  # "a" and "d": one character each
    state.record_decision(session_id=second.session_id, agent_id="b", decision="d", metadata=blob())
