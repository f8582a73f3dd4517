"""The hub's state and the rules that change it: the domain core.

Every method either raises a CollabError and changes nothing, or applies one change
and appends its event to the log. Methods are synchronous and never yield, so on an
asyncio server each one is atomic with respect to every other caller.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from collab_grpc.errors import BudgetExhausted, FailedPrecondition, InvalidArgument, NotFound
from collab_grpc.events import (
    DEFAULT_RETAIN_BYTES,
    EventFilter,
    EventLog,
    Subscription,
    payload_size,
    record_size,
)
from collab_grpc.idempotency import IdempotencyCache
from collab_grpc.model import (
    Activity,
    ActivityCompletion,
    ActivityLink,
    ActivityStatus,
    ActivityType,
    Agent,
    AgentRetirement,
    AgentStatusSummary,
    AgentView,
    Decision,
    Event,
    EventKind,
    MemoryOperation,
    MemoryUpdate,
    Session,
    Snapshot,
    copied,
)
from collab_grpc.ratelimit import RateLimiter
from collab_grpc.validation import (
    Limits,
    check_hub_id,
    check_id,
    check_id_list,
    check_limit,
    check_text,
    measured_metadata,
)

__all__ = ["MAX_LINK_DEPTH", "CollaborationState", "Resume", "RosterEntry", "StateSettings", "new_epoch"]

EXPIRED = "expired"
# Levels of a parent's ancestry a link follows looking for a cycle (each one not held in
# memory is a read of the store); a deeper tree is not linked.
MAX_LINK_DEPTH = 256

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class StateSettings:
    history_limit: int = 1000  # newest activities kept for the feed
    ended_sessions_limit: int = 1000  # ended sessions kept as history
    event_log_retain: int = 10_000  # newest events kept for resume
    activity_ttl: float = 3600.0  # an activity open longer than this expires
    # An agent idle, in no active session and not in the roster for this long leaves the
    # live status (an AGENT_RETIRED event); at most agent_retire_batch agents are looked
    # at per sweep, so one sweep never holds the event loop for long.
    agent_idle_ttl: float = 3600.0
    agent_retire_batch: int = 256
    max_decisions_per_session: int = 10_000
    # The most agents a status summary lists, and active sessions a snapshot lists (the
    # counts stay exact; the rest is read a page at a time).
    status_agents_limit: int = 1000
    snapshot_sessions_limit: int = 1000
    # Byte budgets, counted as events.record_size (serialised metadata and text plus a
    # fixed overhead per record). History and ended sessions are caches the store keeps
    # in full: beyond their budget the oldest leave memory. Open activities are live
    # state: beyond their budgets a new one is refused.
    history_bytes: int = 32 * MiB
    ended_sessions_bytes: int = 32 * MiB
    event_log_retain_bytes: int = DEFAULT_RETAIN_BYTES
    max_open_activities: int = 100_000
    max_open_activity_bytes: int = 64 * MiB
    # Active sessions with their decisions are live state too: beyond it, new ones refused.
    max_active_session_bytes: int = 64 * MiB
    idempotency_bytes: int = 64 * MiB  # answers kept for retried writes
    idempotency_ttl: float = 24 * 3600.0  # seconds an answer is kept (stores prune older ones)
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True, slots=True)
class RosterEntry:
    agent_id: str
    department: str = ""


@dataclass(frozen=True, slots=True)
class Resume:
    """The start of a resumed subscription: replayed events, or why there are none.
    Events after the resume point through ``archived_through`` come from the store's
    archive first (none when it is not past the resume point), then ``replay``."""

    recovered: bool
    reason: str
    replay: list[Event]
    snapshot: Snapshot | None
    archived_through: int = 0


def _session_key(session: Session) -> tuple[float, str]:
    return (session.started_at, session.session_id)


def new_epoch() -> str:
    return secrets.token_hex(8)


def _random_suffix() -> str:
    """What makes a new id unique: 32 random bits in hex (``secrets.token_hex(4)``
    without its wrapper; one is made for every record)."""
    return os.urandom(4).hex()


class CollaborationState:
    """Activities, agents, sessions and decisions, with their event log."""

    def __init__(
        self,
        settings: StateSettings | None = None,
        *,
        roster: Iterable[RosterEntry] = (),
        clock: Callable[[], float] = time.time,
        epoch: str | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.settings = settings or StateSettings()
        self.limits = self.settings.limits
        self.clock = clock
        self.log = EventLog(
            epoch or new_epoch(),
            retain=self.settings.event_log_retain,
            retain_bytes=self.settings.event_log_retain_bytes,
        )
        self.idempotency = IdempotencyCache(
            max_bytes=self.settings.idempotency_bytes, ttl=self.settings.idempotency_ttl
        )
        # Set by a store with a byte budget: why a new record cannot be stored now, or None.
        self.storage_refusal: Callable[[], str | None] | None = None
        # Per-agent allowance for records; checked after validation, so bad input costs none.
        self.rate_limiter = rate_limiter or RateLimiter(0)
        # The live agents, least recently seen first (every event about an agent moves
        # it to the end): the idle sweep reads from the front and stops at the first
        # agent seen within the TTL.
        self._agents: OrderedDict[str, Agent] = OrderedDict()
        # Newest last. Open activities stay in _open even once evicted from history.
        self._history: OrderedDict[str, Activity] = OrderedDict()
        self._open: dict[str, Activity] = {}
        self._active_sessions: dict[str, Session] = {}
        self._ended_sessions: OrderedDict[str, Session] = OrderedDict()
        self._decisions: dict[str, list[Decision]] = {}
        # What records held in memory count against the byte budgets (events.record_size):
        # each activity in _open or _history, each session kept with its decisions.
        self._activity_sizes: dict[str, int] = {}
        self._open_bytes = 0
        self._history_bytes = 0
        self._session_sizes: dict[str, int] = {}
        self._decision_bytes: dict[str, int] = {}
        self._ended_bytes = 0
        self._active_bytes = 0  # active sessions and their decisions
        # Agents known before they record anything: id -> department.
        self._roster: dict[str, str] = {}
        self._restores = 0  # part of `version`: a restore may go back to an earlier seq
        # Called at the end of every restore (a store reloading what it holds after a
        # failure), when the state is exactly what is stored: nothing pending.
        self.restore_listeners: set[Callable[[], None]] = set()
        for entry in roster:
            check_id("roster agent_id", entry.agent_id, self.limits)
            check_text("roster department", entry.department, self.limits, max_length=self.limits.max_id_length)
            self._roster[entry.agent_id] = entry.department
            self._agents[entry.agent_id] = Agent(entry.agent_id, entry.department, last_seen=clock())

    @property
    def epoch(self) -> str:
        return self.log.epoch

    @property
    def version(self) -> tuple[str, int, int]:
        """Changes whenever the state does: every change appends an event (the seq), and
        a restore replaces the state (it may continue from an earlier seq)."""
        return self.log.epoch, self.log.last_seq, self._restores

    # -- writes ---------------------------------------------------------------------

    def record_activity(
        self,
        *,
        agent_id: str,
        activity_type: ActivityType | str,
        department: str = "",
        metadata: Mapping[str, Any] | None = None,
        related_agents: Iterable[str] = (),
        session_id: str = "",
        parent_activity_id: str = "",
    ) -> Activity:
        limits = self.limits
        check_id("agent_id", agent_id, limits)
        kind = self._activity_type(activity_type)
        check_text("department", department, limits, max_length=limits.max_id_length)
        meta, meta_size = measured_metadata("metadata", metadata or {}, limits)
        related = check_id_list("related_agents", related_agents, limits)
        check_id("session_id", session_id, limits, required=False)
        check_hub_id("parent_activity_id", parent_activity_id, limits, required=False)
        if session_id:
            self._active_session(session_id)  # it must exist and be active
        if parent_activity_id and self.get_activity(parent_activity_id) is None:
            raise NotFound(f"parent activity {parent_activity_id!r} not found")

        now = self.clock()
        activity = Activity(
            activity_id=self._new_activity_id(agent_id, now),
            agent_id=agent_id,
            department=department or self._known_department(agent_id),
            activity_type=kind,
            timestamp=now,
            metadata=meta,
            related_agents=related,
            session_id=session_id,
            parent_activity_id=parent_activity_id,
        )
        size = record_size(activity, meta_size)
        self._check_storage()
        self._check_open_budget(size)
        self.rate_limiter.acquire(agent_id, now)
        self._apply_recorded(activity, size)
        self.log.append(EventKind.ACTIVITY_RECORDED, copied(activity), now, size)
        return activity

    def complete_activity(
        self,
        activity_id: str,
        *,
        success: bool = True,
        failure_reason: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> Activity:
        """Complete an open activity. ``metadata``: keys merged into its metadata (what
        is learnt only at the end, as token usage): a key given replaces the recorded
        value. The merged metadata must fit ``max_metadata_bytes``, and metadata is
        refused (BudgetExhausted) while the store is over its byte budget, as a new
        record is; a completion without metadata is never refused for space."""
        limits = self.limits
        check_hub_id("activity_id", activity_id, limits)
        check_text("failure_reason", failure_reason, limits, max_length=1024)
        if success and failure_reason:
            raise InvalidArgument("failure_reason is only allowed when success is false")
        added = measured_metadata("metadata", metadata, limits)[0] if metadata else {}
        activity = self._open.get(activity_id)
        if activity is None:
            if activity_id in self._history:
                raise FailedPrecondition(f"activity {activity_id!r} is already {self._history[activity_id].status}")
            raise NotFound(f"activity {activity_id!r} not found")
        merged = None
        if added:
            merged = self._merged_metadata(activity, added)
            # The merge grows what the store holds: refused as a new record is, but
            # finishing the work itself (no metadata) is always taken.
            self._check_storage("; a completion without metadata is still accepted")
        return self._complete(activity, success, failure_reason, self.clock(), list(added), merged)

    def link_activity(
        self, activity_id: str, parent_activity_id: str, stored: Mapping[str, Activity] | None = None
    ) -> Activity:
        """Make ``activity_id``, recorded without a parent, a child of ``parent_activity_id``
        (its parent arrived after it: an OpenTelemetry span exported before its parent).
        Open or completed, both must be held (in history, or open) or given in ``stored``:
        copies read from the store of activities that left the history (``unheld_for_link``
        says which are needed); a held activity is always taken over a stored copy. The
        activity must have no parent yet, and the parent must not be the activity or one
        of its descendants, which would make a cycle: the parent's ancestry is followed to
        its root, at most MAX_LINK_DEPTH levels; an ancestor neither held nor stored, or a
        deeper ancestry, means a cycle cannot be ruled out, and the link is refused."""
        limits = self.limits
        check_hub_id("activity_id", activity_id, limits)
        check_hub_id("parent_activity_id", parent_activity_id, limits)
        known = stored or {}
        held = self.get_activity(activity_id)
        activity = held if held is not None else known.get(activity_id)
        if activity is None:
            raise NotFound(f"activity {activity_id!r} not found")
        parent = self._lookup(parent_activity_id, known)
        if parent is None:
            raise NotFound(f"parent activity {parent_activity_id!r} not found")
        if activity.parent_activity_id:
            raise FailedPrecondition(
                f"activity {activity_id!r} already has a parent ({activity.parent_activity_id!r}); "
                "only an activity without one is linked"
            )
        # The activity has no parent, so a cycle needs it among the parent's ancestors
        # (or to be the parent).
        ancestry = self._ancestry(parent, known)
        for ancestor in ancestry:
            if ancestor.activity_id == activity_id:
                raise FailedPrecondition(
                    f"activity {parent_activity_id!r} is {activity_id!r} or one of its descendants; "
                    "linking them would make a cycle"
                )
        if ancestry[-1].parent_activity_id:  # not the root of the parent's tree
            missing = ancestry[-1].parent_activity_id
            if len(ancestry) >= MAX_LINK_DEPTH:
                raise FailedPrecondition(
                    f"the ancestry of {parent_activity_id!r} is deeper than {MAX_LINK_DEPTH} levels, so a cycle "
                    "through it cannot be ruled out"
                )
            raise FailedPrecondition(
                f"the ancestry of {parent_activity_id!r} reaches {missing!r}, neither held nor stored, so a "
                "cycle through it cannot be ruled out"
            )
        if held is not None:
            # Not an agent's own act (its activity gained a parent): no agent is marked seen.
            held.parent_activity_id = parent_activity_id
            linked = held
        else:
            # Left the history: the state holds nothing to change; the event carries the
            # stored copy, linked, for the store and the subscribers.
            linked = copied(activity)
            linked.parent_activity_id = parent_activity_id
        link = ActivityLink(copied(linked))
        self.log.append(EventKind.ACTIVITY_LINKED, link, self.clock(), self._activity_sizes.get(activity_id))
        return linked

    def unheld_for_link(self, parent_activity_id: str, stored: Mapping[str, Activity]) -> str:
        """The first activity of ``parent_activity_id`` and its ancestry (MAX_LINK_DEPTH
        levels) that ``link_activity`` needs and neither the state holds nor ``stored``
        has: to read from the store; empty when none is missing."""
        parent = self._lookup(parent_activity_id, stored)
        if parent is None:
            return parent_activity_id
        above = self._ancestry(parent, stored)[-1].parent_activity_id
        return above if above and self._lookup(above, stored) is None else ""

    def _lookup(self, activity_id: str, stored: Mapping[str, Activity]) -> Activity | None:
        """The activity as held, else its copy in ``stored`` (read from the store)."""
        return self.get_activity(activity_id) or stored.get(activity_id)

    def _ancestry(self, parent: Activity, stored: Mapping[str, Activity]) -> list[Activity]:
        """``parent`` and its ancestors, held or in ``stored``, nearest first: up to the
        root, the first one missing, or MAX_LINK_DEPTH activities."""
        ancestry = [parent]
        while len(ancestry) < MAX_LINK_DEPTH and ancestry[-1].parent_activity_id:
            above = self._lookup(ancestry[-1].parent_activity_id, stored)
            if above is None:
                break
            ancestry.append(above)
        return ancestry

    def start_collaboration(
        self,
        *,
        participants: Iterable[str],
        session_type: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> Session:
        limits = self.limits
        members = check_id_list("participants", participants, limits, min_length=1)
        check_id("session_type", session_type, limits, required=False)
        meta, meta_size = measured_metadata("metadata", metadata or {}, limits)
        self._check_storage()
        now = self.clock()
        session = Session(
            session_id=self._new_id("collab", now, self._session_id_taken),
            participants=members,
            session_type=session_type or "general",
            started_at=now,
            metadata=meta,
        )
        size = record_size(session, meta_size)
        self._check_session_budget(size, "session")
        self._apply_started(session, size)
        self.log.append(EventKind.COLLABORATION_STARTED, copied(session), now, size)
        return session

    def end_collaboration(self, session_id: str) -> Session:
        session = self._active_session(session_id)
        now = self.clock()
        session.ended_at = now
        size = self._session_sizes.get(session_id)
        self._apply_ended(session)
        self.log.append(EventKind.COLLABORATION_ENDED, copied(session), now, size)
        return session

    def record_decision(
        self,
        *,
        session_id: str,
        agent_id: str,
        decision: str,
        rationale: str = "",
        votes: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Decision:
        limits = self.limits
        check_id("session_id", session_id, limits)
        check_id("agent_id", agent_id, limits)
        check_text("decision", decision, limits, required=True)
        check_text("rationale", rationale, limits)
        ballot = dict(votes or {})
        if len(ballot) > limits.max_list_length:
            raise InvalidArgument(f"votes has more than {limits.max_list_length} entries")
        for voter, vote in ballot.items():
            check_id("votes key", voter, limits)
            check_text(f"votes[{voter}]", vote, limits, max_length=limits.max_id_length, required=True)
        meta, meta_size = measured_metadata("metadata", metadata or {}, limits)
        self._active_session(session_id)  # it must exist and be active
        decisions = self._decisions[session_id]
        if len(decisions) >= self.settings.max_decisions_per_session:
            raise FailedPrecondition(
                f"session {session_id!r} already has {len(decisions)} decisions, the most one session may hold"
            )
        self._check_storage()
        now = self.clock()
        record = Decision(
            decision_id=self._new_id("dec", now, lambda candidate: any(d.decision_id == candidate for d in decisions)),
            session_id=session_id,
            agent_id=agent_id,
            decision=decision,
            rationale=rationale,
            votes=ballot,
            metadata=meta,
            timestamp=now,
        )
        size = record_size(record, meta_size)
        self._check_session_budget(size, "decision")
        self.rate_limiter.acquire(agent_id, now)
        self._apply_decision(record, size)
        self.log.append(EventKind.DECISION_RECORDED, record, now, size)
        return record

    def record_memory_update(
        self,
        *,
        operation: MemoryOperation | str,
        item_id: str,
        agent_id: str,
        metadata: Mapping[str, Any] | None = None,
    ) -> MemoryUpdate:
        limits = self.limits
        try:
            op = MemoryOperation(operation)
        except ValueError:
            raise InvalidArgument(
                f"operation must be one of {', '.join(o.value for o in MemoryOperation)}, got {operation!r}"
            ) from None
        check_id("item_id", item_id, limits)
        check_id("agent_id", agent_id, limits)
        meta, meta_size = measured_metadata("metadata", metadata or {}, limits)
        self._check_storage()
        now = self.clock()
        self.rate_limiter.acquire(agent_id, now)
        update = MemoryUpdate(op, item_id, agent_id, now, meta)
        self._seen(update.agent_id, now)
        self.log.append(EventKind.MEMORY_UPDATED, update, now, record_size(update, meta_size))
        return update

    def expire_stale_activities(self, limit: int | None = None) -> list[Activity]:
        """Fail every activity open for longer than ``activity_ttl``, reason ``expired``;
        with ``limit``, the oldest that many at most (the rest wait for the next pass)."""
        now = self.clock()
        deadline = now - self.settings.activity_ttl
        stale: list[Activity] = []
        for activity in self._open.values():  # insertion order is recording order
            if activity.timestamp >= deadline or len(stale) == limit:
                break
            stale.append(activity)
        return [self._complete(activity, False, EXPIRED, now) for activity in stale]

    def retire_idle_agents(self) -> list[AgentRetirement]:
        """Take out of the live status every agent idle, in no active session and not in
        the roster whose last event is older than ``agent_idle_ttl``, each with an
        AGENT_RETIRED event; its activities stay in history. Looks at no more than
        ``agent_retire_batch`` agents: what is left waits for the next sweep."""
        now = self.clock()
        cutoff = now - self.settings.agent_idle_ttl
        agents = self._agents
        retired: list[AgentRetirement] = []
        for _ in range(self.settings.agent_retire_batch):
            if not agents:
                break
            agent = agents[next(iter(agents))]  # the least recently seen (O(1) on an OrderedDict)
            if agent.last_seen >= cutoff:
                break  # every agent after it was seen later still
            if self._is_live(agent):
                # Live whatever its age: looked at again a TTL from now. Becoming idle (a
                # completion, a session's end) is an event about it, which marks it seen.
                agent.last_seen = now
                agents.move_to_end(agent.agent_id)
                continue
            del agents[agent.agent_id]
            retirement = AgentRetirement(agent.agent_id, agent.department, agent.last_activity_id, agent.last_seen)
            self.log.append(EventKind.AGENT_RETIRED, retirement, now)
            retired.append(retirement)
        return retired

    # -- reads ----------------------------------------------------------------------

    def agent_status(self, max_agents: int | None = None) -> AgentStatusSummary:
        """Exact counts, and the agents: every one in agent_id order, or when there are
        more than ``max_agents`` (default: the setting), that many, the ones a person
        watching wants first: active agents, then idle ones, each in agent_id order (a
        stable choice)."""
        if max_agents is None:
            max_agents = self.settings.status_agents_limit
        agents = self._agents
        active_ids = sorted(agent_id for agent_id, agent in agents.items() if agent.active)
        total = len(agents)
        if max_agents >= total:
            chosen = sorted(agents)
        else:
            chosen = active_ids[:max_agents]
            room = max_agents - len(chosen)
            if room > 0:
                chosen += heapq.nsmallest(room, (agent_id for agent_id, agent in agents.items() if not agent.active))
        return AgentStatusSummary(
            total_agents=total,
            active_agents=len(active_ids),
            idle_agents=total - len(active_ids),
            active_activities=len(self._open),
            active_collaborations=len(self._active_sessions),
            agents=[self._agent_view(agents[agent_id]) for agent_id in chosen],
        )

    @staticmethod
    def _agent_view(agent: Agent) -> AgentView:
        return AgentView(
            agent_id=agent.agent_id,
            department=agent.department,
            active=agent.active,
            current_activity_id=agent.current_activity_id,
            last_activity_id=agent.last_activity_id,
            collaboration_count=len(agent.sessions),
        )

    def agents_after(self, after: str = "") -> tuple[int, Iterator[AgentView]]:
        """How many agents there are, and every one whose agent_id sorts after ``after``,
        in agent_id order (a cursor that stays valid whatever is added meanwhile)."""
        agents = self._agents
        ids = sorted(agent_id for agent_id in agents if agent_id > after) if after else sorted(agents)
        return len(agents), (self._agent_view(agents[agent_id]) for agent_id in ids)

    def activity_feed(self, *, agent_id: str = "", limit: int = 0, session_id: str = "") -> list[Activity]:
        """The newest activities, newest first, optionally of one agent or session."""
        count = check_limit("limit", limit, self.limits)
        feed: list[Activity] = []
        for activity in self.feed_after(agent_id=agent_id, session_id=session_id):
            feed.append(activity)
            if len(feed) == count:
                break
        return feed

    def feed_after(self, *, agent_id: str = "", session_id: str = "", after: str = "") -> Iterator[Activity]:
        """The activities in history, newest first, optionally of one agent or session,
        from the one after activity ``after`` on. History is evicted oldest first, so
        when ``after`` is no longer in it, neither is anything older: nothing follows."""
        check_id("agent_id", agent_id, self.limits, required=False)
        check_id("session_id", session_id, self.limits, required=False)
        check_hub_id("cursor activity_id", after, self.limits, required=False)
        return self._feed_after(agent_id, session_id, after)

    def _feed_after(self, agent_id: str, session_id: str, after: str) -> Iterator[Activity]:
        history = reversed(self._history.values())
        if after:
            if after not in self._history:
                return
            for activity in history:
                if activity.activity_id == after:
                    break
        for activity in history:
            if agent_id and activity.agent_id != agent_id:
                continue
            if session_id and activity.session_id != session_id:
                continue
            yield activity

    def held_activities(self) -> Iterator[Activity]:
        """Every activity this state holds: the history, then the open ones evicted from it."""
        yield from self._history.values()
        for activity_id, activity in self._open.items():
            if activity_id not in self._history:
                yield activity

    @property
    def live_agent_count(self) -> int:
        return len(self._agents)

    @property
    def idle_backlog(self) -> bool:
        """Whether the idle sweep stopped at its batch with agents still to look at."""
        if not self._agents:
            return False
        front = self._agents[next(iter(self._agents))]
        return front.last_seen < self.clock() - self.settings.agent_idle_ttl

    @property
    def roster_ids(self) -> Iterable[str]:
        """The roster's agent ids (live whatever their idle time)."""
        return self._roster.keys()

    def find_agent(self, agent_id: str) -> Agent | None:
        return self._agents.get(agent_id)

    def find_session(self, session_id: str) -> Session | None:
        """An active or kept ended session, or None."""
        return self._active_sessions.get(session_id) or self._ended_sessions.get(session_id)

    def get_activity(self, activity_id: str) -> Activity | None:
        return self._open.get(activity_id) or self._history.get(activity_id)

    def require_activity(self, activity_id: str) -> Activity:
        check_hub_id("activity_id", activity_id, self.limits)
        activity = self.get_activity(activity_id)
        if activity is None:
            raise NotFound(f"activity {activity_id!r} not found")
        return activity

    def active_collaborations(self) -> list[Session]:
        return list(self._active_sessions.values())

    def active_collaborations_after(self, after: tuple[float, str] | None = None) -> Iterator[Session]:
        """Active sessions oldest first, by (started_at, session_id): a key that stays
        valid as sessions start and end, unlike a position. From the one after ``after``."""
        sessions = sorted(self._active_sessions.values(), key=_session_key)
        if after is None:
            return iter(sessions)
        return (session for session in sessions if _session_key(session) > after)

    def ended_collaborations(self, limit: int = 0) -> list[Session]:
        count = check_limit("limit", limit, self.limits)
        ended: list[Session] = []
        for session in self.ended_collaborations_after():
            ended.append(session)
            if len(ended) == count:
                break
        return ended

    def ended_collaborations_after(self, after: str = "") -> Iterator[Session]:
        """Ended sessions kept, most recently ended first, from the one after session
        ``after`` on (evicted oldest first: when it is gone, nothing older is kept)."""
        check_id("cursor session_id", after, self.limits, required=False)
        return self._ended_after(after)

    def _ended_after(self, after: str) -> Iterator[Session]:
        ended = reversed(self._ended_sessions.values())
        if after:
            if after not in self._ended_sessions:
                return
            for session in ended:
                if session.session_id == after:
                    break
        yield from ended

    def decisions_of(self, session_id: str) -> list[Decision]:
        """A kept session's decisions, oldest first (append-only: an offset is a cursor)."""
        check_id("session_id", session_id, self.limits)
        if self.find_session(session_id) is None:
            raise NotFound(f"collaboration session {session_id!r} not found")
        return self._decisions.get(session_id, [])

    def get_collaboration(self, session_id: str) -> tuple[Session, list[Activity], list[Decision]]:
        """A session with its activities still in history and its decisions, oldest first."""
        check_id("session_id", session_id, self.limits)
        session = self._active_sessions.get(session_id) or self._ended_sessions.get(session_id)
        if session is None:
            raise NotFound(f"collaboration session {session_id!r} not found")
        activities = [a for a in self._history.values() if a.session_id == session_id]
        return session, activities, list(self._decisions.get(session_id, ()))

    def snapshot(self) -> Snapshot:
        """The state now, its lists capped by the settings: the agents as agent_status
        gives them, the oldest active sessions (the counts stay exact)."""
        sessions: Iterable[Session] = self._active_sessions.values()
        cap = self.settings.snapshot_sessions_limit
        if cap < len(self._active_sessions):
            sessions = heapq.nsmallest(cap, sessions, key=_session_key)
        return Snapshot(
            epoch=self.epoch,
            seq=self.log.last_seq,
            agent_status=self.agent_status(),
            active_collaborations=[copied(s) for s in sessions],
        )

    # -- persistence ----------------------------------------------------------------

    def restore(
        self,
        *,
        epoch: str,
        last_seq: int,
        agents: Iterable[tuple[str, str, str | None, float]],
        activities: Iterable[Activity],
        sessions: Iterable[Session],
        decisions: Iterable[Decision],
        events: Iterable[Event],
    ) -> None:
        """Continue a history a store kept, replacing whatever this state holds.

        ``agents`` are (agent_id, department, last_activity_id, last_seen): at least the
        agents that are still live (seen within the idle TTL, or with an open activity, in
        an active session or in the roster); any others given are left out. ``activities``
        the newest history plus every open one, oldest first; ``sessions`` the active ones
        and the ended ones kept, ended ones in the order they ended; ``decisions`` oldest
        first; ``events`` the newest of the log, oldest first, ending at ``last_seq``.
        """
        roster = self._roster
        now = self.clock()
        self._restores += 1
        self._agents = OrderedDict()
        for agent_id, department, last_activity_id, last_seen in sorted(agents, key=lambda row: row[3]):
            self._agents[agent_id] = Agent(
                agent_id, department or roster.get(agent_id, ""), last_activity_id=last_activity_id, last_seen=last_seen
            )
        for agent_id, department in roster.items():  # roster agents the store has not seen
            agent = self._agent(agent_id)
            agent.department = agent.department or department
        self._history = OrderedDict()
        self._open = {}
        self._activity_sizes = {}
        self._open_bytes = self._history_bytes = 0
        for activity in activities:
            size = self._activity_sizes[activity.activity_id] = payload_size(activity)
            self._history[activity.activity_id] = activity
            self._history_bytes += size
            if activity.status is ActivityStatus.ACTIVE:
                self._open[activity.activity_id] = activity
                self._open_bytes += size
                self._agent(activity.agent_id).open_activities[activity.activity_id] = None
        self._trim_history()  # open ones may be older than the history
        self._active_sessions = {}
        self._ended_sessions = OrderedDict()
        self._decisions = {}
        self._session_sizes = {}
        self._decision_bytes = {}
        self._ended_bytes = self._active_bytes = 0
        for session in sessions:
            self._decisions[session.session_id] = []
            self._session_sizes[session.session_id] = payload_size(session)
            self._decision_bytes[session.session_id] = 0
            if session.ended_at is None:
                self._active_sessions[session.session_id] = session
                for member in session.participants:
                    self._agent(member).sessions.add(session.session_id)
            else:
                self._ended_sessions[session.session_id] = session
        for decision in decisions:
            self._decisions.setdefault(decision.session_id, []).append(decision)
            size = payload_size(decision)
            self._decision_bytes[decision.session_id] = self._decision_bytes.get(decision.session_id, 0) + size
        for session_id in self._ended_sessions:
            self._ended_bytes += self._session_sizes[session_id] + self._decision_bytes.get(session_id, 0)
        for session_id in self._active_sessions:
            self._active_bytes += self._session_sizes[session_id] + self._decision_bytes.get(session_id, 0)
        self._trim_ended()
        # Agents that went idle past the TTL while the server was down: out of the live
        # status without an event (no subscriber followed this state before the restart;
        # the next status says it). Live ones found old start their idle time now.
        cutoff = now - self.settings.agent_idle_ttl
        for agent in list(self._agents.values()):
            if agent.last_seen >= cutoff:
                continue
            if self._is_live(agent):
                agent.last_seen = now
                self._agents.move_to_end(agent.agent_id)
            else:
                del self._agents[agent.agent_id]
        self.log.epoch = epoch
        self.log.restore(events, last_seq)
        for listener in list(self.restore_listeners):
            listener()

    # -- subscriptions --------------------------------------------------------------

    def subscribe(self, event_filter: EventFilter, capacity: int) -> Subscription:
        """Live events from the next seq on."""
        return self.log.subscribe(event_filter, capacity)

    def subscribe_with_snapshot(self, event_filter: EventFilter, capacity: int) -> tuple[Snapshot, Subscription]:
        """A snapshot and the live events after it, with nothing missed in between.

        The snapshot is of the state at ``log.last_seq``, events not yet durable
        included; callers wait for the store to publish through that seq before
        handing the snapshot on."""
        return self.snapshot(), self.log.subscribe(event_filter, capacity, after_seq=self.log.last_seq)

    def resume(
        self, event_filter: EventFilter, capacity: int, epoch: str, since_seq: int, archive_from: int | None = None
    ) -> tuple[Resume, Subscription]:
        """Every matching event after ``(epoch, since_seq)`` then live ones; or, when
        that gap cannot be filled, the reason and a fresh snapshot to start from.
        ``archive_from``: the oldest seq of this epoch the store can replay beyond the
        events in memory (None: it keeps none), which fills a gap older than they are."""
        reason = self.log.can_resume(epoch, since_seq)
        if reason is None:
            replay = [e for e in self.log.events_after(since_seq) if event_filter.matches(e)]
            return Resume(True, "", replay, None), self.log.subscribe(event_filter, capacity)
        first = self.log.first_retained_seq
        if (
            archive_from is not None
            and epoch == self.log.epoch
            and archive_from <= since_seq + 1 < first
            and since_seq <= self.log.published_seq
        ):
            replay = [e for e in self.log.events_after(first - 1) if event_filter.matches(e)]
            resume = Resume(True, "", replay, None, archived_through=first - 1)
            return resume, self.log.subscribe(event_filter, capacity)
        snapshot = self.snapshot()
        return Resume(False, reason, [], snapshot), self.log.subscribe(event_filter, capacity, after_seq=snapshot.seq)

    # -- helpers --------------------------------------------------------------------

    def _activity_type(self, value: ActivityType | str) -> ActivityType:
        if type(value) is ActivityType:
            return value
        try:
            return ActivityType(value)
        except ValueError:
            raise InvalidArgument(
                f"activity_type must be one of {', '.join(t.value for t in ActivityType)}, got {value!r}"
            ) from None

    def _agent(self, agent_id: str) -> Agent:
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = self._agents[agent_id] = Agent(agent_id)
        return agent

    def _seen(self, agent_id: str, when: float) -> Agent:
        """The agent (live again if it had left), marked seen at ``when``."""
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = self._agents[agent_id] = Agent(agent_id, last_seen=when)
        else:
            if when > agent.last_seen:  # max: replicas' clocks may differ a little
                agent.last_seen = when
            self._agents.move_to_end(agent_id)
        return agent

    def _is_live(self, agent: Agent) -> bool:
        """Live whatever its idle time: active, in an active session, or in the roster."""
        return bool(agent.open_activities or agent.sessions) or agent.agent_id in self._roster

    def _known_department(self, agent_id: str) -> str:
        agent = self._agents.get(agent_id)
        return agent.department if agent is not None else ""

    def _active_session(self, session_id: str) -> Session:
        check_id("session_id", session_id, self.limits)
        session = self._active_sessions.get(session_id)
        if session is None:
            if session_id in self._ended_sessions:
                raise FailedPrecondition(f"collaboration session {session_id!r} has already ended")
            raise NotFound(f"collaboration session {session_id!r} not found")
        return session

    def _merged_metadata(self, activity: Activity, added: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """The activity's metadata with ``added`` merged in, and its serialised size;
        InvalidArgument naming the sizes when the result is over the limit."""
        merged = {**activity.metadata, **added}
        try:
            return measured_metadata("metadata", merged, self.limits)
        except InvalidArgument:
            # Both parts passed validation, so only the size can be wrong: measured
            # again, as validation measures, without the limit, for the message.
            limit = self.limits.max_metadata_bytes
            unbounded = dataclasses.replace(self.limits, max_metadata_bytes=sys.maxsize)
            recorded = measured_metadata("metadata", activity.metadata, unbounded)[1]
            total = measured_metadata("metadata", merged, unbounded)[1]
            raise InvalidArgument(
                f"metadata merged at completion would be {total} bytes serialised (the activity's {recorded} "
                f"bytes with this completion's keys); the limit is {limit}"
            ) from None

    def _complete(
        self,
        activity: Activity,
        success: bool,
        failure_reason: str,
        now: float,
        added_keys: list[str] | None = None,
        merged: tuple[dict[str, Any], int] | None = None,
    ) -> Activity:
        activity.status = ActivityStatus.COMPLETED if success else ActivityStatus.FAILED
        activity.completed_at = now
        activity.failure_reason = failure_reason
        size = self._activity_sizes.get(activity.activity_id)
        if size is not None:
            size += len(failure_reason)
        grown: int | None = None
        if merged is not None:
            # A new dict: the recorded event's copy of the activity shares the old one.
            activity.metadata, merged_size = merged
            grown = record_size(activity, merged_size)
        self._apply_completed(activity)
        completion = ActivityCompletion(copied(activity), success, added_keys or [])
        if grown is not None:
            self._resize_in_history(activity.activity_id, grown)
            # The event: the activity with its merged metadata, and the added keys' names.
            size = grown + sum(len(key) for key in completion.added_keys)
        self.log.append(EventKind.ACTIVITY_COMPLETED, completion, now, size)
        return activity

    def _resize_in_history(self, activity_id: str, size: int) -> None:
        """A completed activity in the feed's cache grew or shrank (metadata merged at
        completion): its count against the history budget follows."""
        if activity_id in self._history:
            self._history_bytes += size - self._activity_sizes[activity_id]
            self._activity_sizes[activity_id] = size
            self._trim_history()

    def _check_storage(self, remedy: str = "") -> None:
        """Refuse a new record (or metadata added at completion) while the store is over
        its byte budget; ``remedy``: what is still accepted, added to the message."""
        if self.storage_refusal is not None and (reason := self.storage_refusal()) is not None:
            raise BudgetExhausted(reason + remedy, "max-db-bytes")

    def _check_session_budget(self, size: int, what: str) -> None:
        """Refuse (changing nothing) a session or decision that would take the active
        sessions with their decisions past their budget."""
        budget = self.settings.max_active_session_bytes
        if self._active_bytes + size > budget:
            raise BudgetExhausted(
                f"active sessions and their decisions hold {self._active_bytes} bytes; this {what} ({size} bytes) "
                f"would take them past their budget of {budget} bytes "
                "(--max-active-session-bytes / COLLAB_MAX_ACTIVE_SESSION_BYTES); end finished sessions "
                "(EndCollaboration; POST /api/v1/collaboration/end-collaboration)",
                "max-active-session-bytes",
            )

    @property
    def active_session_bytes(self) -> int:
        """What active sessions and their decisions count against ``max_active_session_bytes``."""
        return self._active_bytes

    def _check_open_budget(self, size: int) -> None:
        """Refuse (changing nothing) an activity that would take the open ones past a budget."""
        settings = self.settings
        how_to_free = (
            "complete open activities (CompleteActivity; POST /api/v1/collaboration/complete-activity) or wait "
            f"for those open longer than {settings.activity_ttl:g} s to expire"
        )
        if len(self._open) >= settings.max_open_activities:
            raise BudgetExhausted(
                f"the hub holds {len(self._open)} open activities, its most "
                f"(--max-open-activities / COLLAB_MAX_OPEN_ACTIVITIES); {how_to_free}",
                "max-open-activities",
            )
        if self._open_bytes + size > settings.max_open_activity_bytes:
            raise BudgetExhausted(
                f"open activities hold {self._open_bytes} bytes; this one ({size} bytes) would take them "
                f"past their budget of {settings.max_open_activity_bytes} bytes "
                f"(--max-open-activity-bytes / COLLAB_MAX_OPEN_ACTIVITY_BYTES); {how_to_free}",
                "max-open-activity-bytes",
            )

    @property
    def open_activity_bytes(self) -> int:
        """What the open activities count against ``max_open_activity_bytes``."""
        return self._open_bytes

    @property
    def history_bytes(self) -> int:
        return self._history_bytes

    @property
    def ended_sessions_bytes(self) -> int:
        return self._ended_bytes

    def _trim_history(self) -> None:
        """Let the oldest activities leave the feed's cache beyond its count or bytes
        (the store keeps them; open ones stay in _open)."""
        history, sizes = self._history, self._activity_sizes
        limit, budget = self.settings.history_limit, self.settings.history_bytes
        while len(history) > limit or (self._history_bytes > budget and len(history) > 1):
            evicted, _ = history.popitem(last=False)
            self._history_bytes -= sizes[evicted]
            if evicted not in self._open:
                del sizes[evicted]

    def _trim_ended(self) -> None:
        """Let the oldest ended sessions, with their decisions, leave memory beyond the
        count or bytes kept (the store keeps them)."""
        ended = self._ended_sessions
        limit, budget = self.settings.ended_sessions_limit, self.settings.ended_sessions_bytes
        while len(ended) > limit or (self._ended_bytes > budget and len(ended) > 1):
            evicted, _ = ended.popitem(last=False)
            self._decisions.pop(evicted, None)
            self._ended_bytes -= self._session_sizes.pop(evicted, 0) + self._decision_bytes.pop(evicted, 0)

    # -- applying changes (here, or decided by another replica) -----------------------

    def _apply_recorded(self, activity: Activity, size: int | None = None) -> None:
        agent = self._seen(activity.agent_id, activity.timestamp)
        if activity.department:
            agent.department = activity.department
        if size is None:
            size = payload_size(activity)
        self._activity_sizes[activity.activity_id] = size
        self._open[activity.activity_id] = activity
        self._open_bytes += size
        self._history[activity.activity_id] = activity
        self._history_bytes += size
        self._trim_history()
        agent.open_activities[activity.activity_id] = None
        agent.last_activity_id = activity.activity_id
        session = self._active_sessions.get(activity.session_id)
        if session is not None:
            session.activity_count += 1

    def _apply_completed(self, activity: Activity) -> None:
        """``activity`` is in its final state; it stops being open."""
        if self._open.pop(activity.activity_id, None) is not None:
            self._open_bytes -= self._activity_sizes[activity.activity_id]
            if activity.activity_id not in self._history:
                del self._activity_sizes[activity.activity_id]
        when = activity.completed_at if activity.completed_at is not None else activity.timestamp
        self._seen(activity.agent_id, when).open_activities.pop(activity.activity_id, None)

    def _apply_started(self, session: Session, size: int | None = None) -> None:
        self._active_sessions[session.session_id] = session
        self._decisions[session.session_id] = []
        size = self._session_sizes[session.session_id] = payload_size(session) if size is None else size
        self._decision_bytes[session.session_id] = 0
        self._active_bytes += size
        for member in session.participants:
            self._seen(member, session.started_at).sessions.add(session.session_id)

    def _apply_ended(self, session: Session) -> None:
        was_active = self._active_sessions.pop(session.session_id, None) is not None
        self._ended_sessions[session.session_id] = session
        if session.session_id not in self._session_sizes:  # ended by a replica before this one knew it
            self._session_sizes[session.session_id] = payload_size(session)
        held = self._session_sizes[session.session_id] + self._decision_bytes.get(session.session_id, 0)
        self._ended_bytes += held
        if was_active:
            self._active_bytes -= held
        self._trim_ended()
        ended_at = session.ended_at if session.ended_at is not None else session.started_at
        for member in session.participants:
            # Each was live (in the session) until now: its idle time starts here.
            self._seen(member, ended_at).sessions.discard(session.session_id)

    def _apply_decision(self, decision: Decision, size: int | None = None) -> None:
        self._decisions.setdefault(decision.session_id, []).append(decision)
        size = payload_size(decision) if size is None else size
        self._decision_bytes[decision.session_id] = self._decision_bytes.get(decision.session_id, 0) + size
        if decision.session_id in self._ended_sessions:
            self._ended_bytes += size
        elif decision.session_id in self._active_sessions:
            self._active_bytes += size
        session = self._active_sessions.get(decision.session_id)
        if session is not None:
            session.decision_count += 1
        self._seen(decision.agent_id, decision.timestamp)

    def apply(self, event: Event) -> None:
        """Take in a change decided elsewhere (another replica sharing the store): the
        state changes as if it had been decided here, and the event is published."""
        payload = event.payload
        if isinstance(payload, Activity):
            self._apply_recorded(copied(payload))
        elif isinstance(payload, ActivityCompletion):
            done = copied(payload.activity)
            known = self._open.get(done.activity_id) or self._history.get(done.activity_id)
            if known is not None:
                known.status, known.completed_at = done.status, done.completed_at
                known.failure_reason = done.failure_reason
                known.metadata = done.metadata
                done = known
            self._apply_completed(done)
            if payload.added_keys:
                self._resize_in_history(done.activity_id, payload_size(done))
        elif isinstance(payload, Session) and event.kind is EventKind.COLLABORATION_STARTED:
            self._apply_started(copied(payload))
        elif isinstance(payload, Session):
            ended = self._active_sessions.get(payload.session_id) or copied(payload)
            ended.ended_at = payload.ended_at
            ended.activity_count, ended.decision_count = payload.activity_count, payload.decision_count
            self._apply_ended(ended)
        elif isinstance(payload, Decision):
            self._apply_decision(payload)
        elif isinstance(payload, ActivityLink):
            known = self.get_activity(payload.activity_id)
            if known is not None:
                known.parent_activity_id = payload.parent_activity_id
        elif isinstance(payload, AgentRetirement):
            # Decided on this same state (the replica that swept was caught up to here).
            self._agents.pop(payload.agent_id, None)
        else:
            self._seen(payload.agent_id, payload.timestamp)
        self.log.adopt(event)

    def _new_activity_id(self, agent_id: str, now: float) -> str:
        # The guide's `act_<seconds>_<agent_id>` shape, made unique by a random suffix.
        return self._new_id(f"act_{int(now)}_{agent_id}", None, self._activity_id_taken)

    def _session_id_taken(self, session_id: str) -> bool:
        return session_id in self._active_sessions or session_id in self._ended_sessions

    def _activity_id_taken(self, activity_id: str) -> bool:
        return activity_id in self._open or activity_id in self._history

    @staticmethod
    def _new_id(prefix: str, now: float | None, taken: Callable[[str], bool]) -> str:
        stem = prefix if now is None else f"{prefix}_{int(now)}"
        while True:
            candidate = f"{stem}_{_random_suffix()}"
            if not taken(candidate):
                return candidate
