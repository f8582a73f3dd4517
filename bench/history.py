"""`python -m bench.history`: the history search (QueryActivities) on the SQLite store
holding 100,000 activities: p50 and p99 per filter shape, and what its indexes cost the
writes (the same load recorded with and without them).

The load goes through the real write path (the domain core and the store's group commit,
synchronous=normal): 48 agents in 4 departments, every activity type, a session for a
tenth of them, a child of an earlier activity for one in ten, metadata with a few keys;
all but the newest 200 completed, one in fifty failed. Each shape is then asked
``--runs`` times through ``SQLiteStore.query_activities`` (its reader thread, decoding
included), cursors from real pages.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collab_grpc.eventloop import run
from collab_grpc.history import ActivityQuery
from collab_grpc.model import ActivityType
from collab_grpc.state import CollaborationState, StateSettings
from collab_grpc.store.sqlite import SEARCH_INDEXES, Retention, SQLiteStore
from collab_grpc.validation import Limits

__all__ = ["HistoryResult", "ShapeResult", "build", "main", "measure", "table"]

AGENTS = 48
DEPARTMENTS = ("engineering", "research", "operations", "support")
TOPICS = ("budget", "hiring", "roadmap", "pricing", "security", "latency", "billing", "docs")
TYPES = list(ActivityType)
OPEN_AT_END = 200
STEP = 0.01  # seconds between two recorded activities (the bench's clock)


@dataclass
class ShapeResult:
    shape: str
    rows: int  # rows the first run returned
    runs: list[float] = field(default_factory=list)  # seconds

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.runs) * 1000

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.runs)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000


@dataclass
class HistoryResult:
    activities: int
    indexed: bool
    write_seconds: float  # recording and completing every activity, to durable
    shapes: list[ShapeResult]

    @property
    def events_per_second(self) -> float:
        events = 2 * self.activities - OPEN_AT_END  # a record, and a completion for most
        return events / self.write_seconds if self.write_seconds else 0.0


class _Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


async def build(
    data_dir: Path, activities: int, *, indexed: bool = True
) -> tuple[SQLiteStore, CollaborationState, float]:
    """A store holding ``activities`` (recorded through the write path); the seconds the writes took."""
    clock = _Clock(time.time() - activities * STEP - 60)
    state = CollaborationState(StateSettings(event_log_retain=1000), clock=clock)
    store = SQLiteStore(
        data_dir, synchronous="normal", retention=Retention(count=4 * activities, seconds=30 * 86400.0, every=3600.0)
    )
    store.open(state)
    if not indexed:  # the comparison: the same writes without the search's indexes
        with sqlite3.connect(store.path) as connection:
            for name in SEARCH_INDEXES:
                connection.execute(f"DROP INDEX {name}")
    store.start()
    started = time.perf_counter()
    opened: list[str] = []
    roots: list[str] = []
    session = ""
    for n in range(activities):
        clock.now += STEP
        agent = f"agent_{n % AGENTS:02d}"
        if n % 1000 == 0:
            if session:
                state.end_collaboration(session)
            session = state.start_collaboration(participants=[f"agent_{k:02d}" for k in range(4)]).session_id
        activity = state.record_activity(
            agent_id=agent,
            activity_type=TYPES[n % len(TYPES)],
            department=DEPARTMENTS[(n % AGENTS) % len(DEPARTMENTS)],
            metadata={"round": n % 10, "topic": TOPICS[(n // 7) % len(TOPICS)], "tokens": n % 1000},
            session_id=session if n % 10 == 3 else "",
            parent_activity_id=roots[-1] if n % 10 == 5 and roots else "",
        )
        if n % 100 == 0:
            roots.append(activity.activity_id)
        opened.append(activity.activity_id)
        if len(opened) > OPEN_AT_END:
            done = opened.pop(0)
            failed = n % 50 == 0
            state.complete_activity(done, success=not failed, failure_reason="timeout" if failed else "")
        if n % 500 == 499:
            await store.durable(state.log.last_seq)
    await store.durable(state.log.last_seq)
    return store, state, time.perf_counter() - started


def shapes(state: CollaborationState, activities: int) -> list[tuple[str, dict[str, Any]]]:
    """The filter shapes measured: (name, ActivityQuery.build arguments)."""
    end = state.clock()
    middle = end - activities * STEP / 2
    some_root = next(a.parent_activity_id for a in state.held_activities() if a.parent_activity_id)
    some_session = next(a.session_id for a in state.held_activities() if a.session_id)
    return [
        ("newest 50, no filter", {}),
        ("oldest 50, no filter", {"order": "asc"}),
        ("one agent", {"agent_ids": ["agent_07"]}),
        ("three agents", {"agent_ids": ["agent_01", "agent_02", "agent_03"]}),
        (
            "failed council_debate of one agent, last 5 min",
            {
                "agent_ids": ["agent_04"],
                "statuses": ["failed"],
                "activity_types": ["council_debate"],
                "since": end - 300,
            },
        ),
        ("failed (any agent)", {"statuses": ["failed"]}),
        ("department + type", {"departments": ["research"], "activity_types": ["message_sent"]}),
        ("one session", {"session_ids": [some_session]}),
        ("children of an activity", {"parent_activity_ids": [some_root]}),
        ("metadata topic=pricing", {"metadata": [("topic", "pricing")]}),
        ("metadata round=3 and tokens=503", {"metadata": [("round", "3"), ("tokens", "503")]}),
        ("metadata matching nothing (a call reads its scan budget)", {"metadata": [("topic", "absent")]}),
        ("one minute in the middle", {"since": middle, "until": middle + 60}),
        ("open (active)", {"statuses": ["active"]}),
    ]


async def measure(store: SQLiteStore, state: CollaborationState, activities: int, runs: int) -> list[ShapeResult]:
    limits = Limits()
    results = []
    for name, arguments in shapes(state, activities):
        query = ActivityQuery.build(limits, **arguments)
        result = ShapeResult(name, len((await store.query_activities(query, query.limit + 1)).activities))
        for _ in range(runs):
            started = time.perf_counter()
            await store.query_activities(query, query.limit + 1)
            result.runs.append(time.perf_counter() - started)
        results.append(result)
    # A page deep in the history: the cursor of the activity halfway down.
    newest = ActivityQuery.build(limits, limit=500)
    page = (await store.query_activities(newest, 500)).activities
    cursor = newest.cursor_after(page[-1])
    deep = ActivityQuery.build(limits, cursor=cursor)
    result = ShapeResult(
        "the page after a cursor", len((await store.query_activities(deep, deep.limit + 1)).activities)
    )
    for _ in range(runs):
        started = time.perf_counter()
        await store.query_activities(deep, deep.limit + 1)
        result.runs.append(time.perf_counter() - started)
    results.append(result)
    return results


async def _run(workdir: Path, activities: int, runs: int, compare: int) -> list[HistoryResult]:
    results = []
    store, state, seconds = await build(workdir / "search", activities)
    try:
        results.append(HistoryResult(activities, True, seconds, await measure(store, state, activities, runs)))
    finally:
        await store.close()
    # What the indexes cost the writes: rounds with and without them, alternated so that
    # whatever else the machine runs weighs on both alike; the median of each is reported.
    if compare:
        timed: dict[bool, list[float]] = {True: [], False: []}
        for round_ in range(compare):
            for indexed in (True, False):
                store, _, seconds = await build(workdir / f"write-{round_}-{indexed}", activities, indexed=indexed)
                await store.close()
                timed[indexed].append(seconds)
        for indexed, times in timed.items():
            results.append(HistoryResult(activities, indexed, statistics.median(times), []))
    return results


def run_history(workdir: Path, activities: int, runs: int, compare: int = 3) -> list[HistoryResult]:
    outcome: list[HistoryResult] = []

    async def go() -> None:
        outcome.extend(await _run(workdir, activities, runs, compare))

    run(go())
    return outcome


def table(results: list[HistoryResult]) -> str:
    lines = ["| query (page of 50 unless it says) | rows | p50 ms | p99 ms |", "|---|---|---|---|"]
    for shape in results[0].shapes:
        lines.append(f"| {shape.shape} | {shape.rows} | {shape.p50_ms:.2f} | {shape.p99_ms:.2f} |")
    lines.append("")
    lines.append("| store (median of the alternated write rounds) | activities | write seconds | events/s |")
    lines.append("|---|---|---|---|")
    for result in results[1:]:
        what = "with the search indexes" if result.indexed else "without them"
        lines.append(
            f"| SQLite {what} | {result.activities:,} | {result.write_seconds:.1f} | {result.events_per_second:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.split("\n\n")[0])
    parser.add_argument("--activities", type=int, default=100_000, help="activities in the store (default 100,000)")
    parser.add_argument("--runs", type=int, default=100, help="runs of each query shape (default 100)")
    parser.add_argument(
        "--write-rounds", type=int, default=3, help="alternated write rounds with and without the indexes (0: none)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="collab-bench-history-") as workdir:
        results = run_history(Path(workdir), args.activities, args.runs, args.write_rounds)
    out(f"History search, SQLite store, {args.activities:,} activities, {args.runs} runs a shape")
    out(table(results))


if __name__ == "__main__":
    main()
