"""Searching the retained activity history: the query, its checks, its cursor, and how an
activity is matched (what the memory store answers with; the SQLite store answers the
same query in SQL).

Order is (timestamp, activity_id), newest or oldest first. A cursor holds the key of the
last activity a page gave, so it stays valid while writes continue: a new activity has a
timestamp no older than the ones already recorded, so it never lands inside a listing
being read newest first (and, oldest first, it comes at the end).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from collab_grpc.errors import InvalidArgument
from collab_grpc.model import Activity, ActivityStatus, ActivityType
from collab_grpc.validation import Limits, check_hub_id, check_id, check_limit, decode_cursor, encode_cursor

__all__ = [
    "MAX_META_KEY_LENGTH",
    "MAX_META_VALUE_LENGTH",
    "ActivityQuery",
    "Found",
    "MetadataMatch",
    "query_held",
]

MAX_META_KEY_LENGTH = 256
MAX_META_VALUE_LENGTH = 1024
ORDERS = ("desc", "asc")
Listed = TypeVar("Listed")
Member = TypeVar("Member", ActivityType, ActivityStatus)


@dataclass(frozen=True, slots=True)
class MetadataMatch:
    """A top-level metadata key whose scalar value is ``value``: a string equal to it, a
    number equal to it read as a number, ``true``/``false`` or ``null``."""

    key: str
    value: str

    @property
    def number(self) -> float | None:
        """``value`` read as a finite number, when it is one."""
        try:
            number = float(self.value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None

    def matches(self, metadata: dict[str, object]) -> bool:
        if self.key not in metadata:
            return False
        held = metadata[self.key]
        if held is None:
            return self.value == "null"
        if isinstance(held, bool):
            return self.value == ("true" if held else "false")
        if isinstance(held, int | float):
            return self.number is not None and held == self.number
        if isinstance(held, str):
            return held == self.value
        return False  # an object or a list: not a scalar


@dataclass(frozen=True, slots=True)
class ActivityQuery:
    """A checked query: every list empty means no filter on that field."""

    agent_ids: tuple[str, ...] = ()
    departments: tuple[str, ...] = ()
    activity_types: tuple[ActivityType, ...] = ()
    statuses: tuple[ActivityStatus, ...] = ()
    session_ids: tuple[str, ...] = ()
    parent_activity_ids: tuple[str, ...] = ()
    since: float | None = None  # timestamp >= since
    until: float | None = None  # timestamp < until
    metadata: tuple[MetadataMatch, ...] = ()
    newest_first: bool = True
    # The (timestamp, activity_id) of the last activity of the previous page.
    after: tuple[float, str] | None = None
    limit: int = 50

    @classmethod
    def build(
        cls,
        limits: Limits,
        *,
        agent_ids: Iterable[str] = (),
        departments: Iterable[str] = (),
        activity_types: Iterable[str] = (),
        statuses: Iterable[str] = (),
        session_ids: Iterable[str] = (),
        parent_activity_ids: Iterable[str] = (),
        since: float | None = None,
        until: float | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        order: str = "",
        cursor: str = "",
        limit: int = 0,
    ) -> ActivityQuery:
        """Check every filter; InvalidArgument naming the first bad one."""
        order = order or "desc"
        if order not in ORDERS:
            raise InvalidArgument(f"order must be 'desc' or 'asc', got {order!r}")
        agents = _ids("agent_ids", agent_ids, limits)
        sessions = _ids("session_ids", session_ids, limits)
        parents = _listed("parent_activity_ids", parent_activity_ids, limits)
        for parent in parents:
            check_hub_id("parent_activity_ids", parent, limits)
        depts = _listed("departments", departments, limits)
        for department in depts:
            if not department or len(department) > limits.max_id_length:
                raise InvalidArgument(
                    f"departments: each must be 1 to {limits.max_id_length} characters, got {department!r:.80}"
                )
        types = tuple(
            _enum("activity_types", ActivityType, value) for value in _listed("activity_types", activity_types, limits)
        )
        states = tuple(_enum("statuses", ActivityStatus, value) for value in _listed("statuses", statuses, limits))
        for name, bound in (("since", since), ("until", until)):
            if bound is not None and not math.isfinite(bound):
                raise InvalidArgument(f"{name} must be a finite time in epoch seconds, got {bound}")
        if since is not None and until is not None and since > until:
            raise InvalidArgument(f"since ({since}) must not be after until ({until})")
        matches = tuple(_metadata_match(key, value) for key, value in _listed("metadata", metadata, limits))
        after = None
        if cursor:
            timestamp, activity_id = decode_cursor("cursor", cursor, f"history-{order}", float, str)
            after = (float(timestamp), activity_id)
        return cls(
            agent_ids=agents,
            departments=depts,
            activity_types=types,
            statuses=states,
            session_ids=sessions,
            parent_activity_ids=parents,
            since=since,
            until=until,
            metadata=matches,
            newest_first=order == "desc",
            after=after,
            limit=check_limit("limit", limit, limits),
        )

    @property
    def order(self) -> str:
        return "desc" if self.newest_first else "asc"

    def cursor_after(self, activity: Activity) -> str:
        """The cursor that continues after ``activity``."""
        return self.cursor_at((activity.timestamp, activity.activity_id))

    def cursor_at(self, key: tuple[float, str]) -> str:
        """The cursor that continues after the (timestamp, activity_id) ``key``."""
        return encode_cursor(f"history-{self.order}", *key)

    def matches(self, activity: Activity) -> bool:
        """Every filter, the cursor included."""
        if self.agent_ids and activity.agent_id not in self.agent_ids:
            return False
        if self.departments and activity.department not in self.departments:
            return False
        if self.activity_types and activity.activity_type not in self.activity_types:
            return False
        if self.statuses and activity.status not in self.statuses:
            return False
        if self.session_ids and activity.session_id not in self.session_ids:
            return False
        if self.parent_activity_ids and activity.parent_activity_id not in self.parent_activity_ids:
            return False
        if self.since is not None and activity.timestamp < self.since:
            return False
        if self.until is not None and activity.timestamp >= self.until:
            return False
        if self.after is not None:
            key = (activity.timestamp, activity.activity_id)
            if (key >= self.after) if self.newest_first else (key <= self.after):
                return False
        return all(match.matches(activity.metadata) for match in self.metadata)


@dataclass(frozen=True, slots=True)
class Found:
    """What a store found: up to the count asked for, in the query's order; and, when it
    stopped looking before it found that many (its scan budget), the key of the last
    activity it looked at, which the next page continues after."""

    activities: list[Activity]
    scanned_to: tuple[float, str] | None = None


def query_held(activities: Iterable[Activity], query: ActivityQuery, count: int) -> Found:
    """The first ``count`` of ``activities`` that match, in the query's order (what a store
    that keeps its history in memory answers: all of it is looked at)."""
    matched = [activity for activity in activities if query.matches(activity)]
    matched.sort(key=lambda a: (a.timestamp, a.activity_id), reverse=query.newest_first)
    return Found(matched[:count])


def _listed(field: str, values: Iterable[Listed], limits: Limits) -> tuple[Listed, ...]:
    listed = tuple(values)
    if len(listed) > limits.max_list_length:
        raise InvalidArgument(f"{field}: at most {limits.max_list_length} values, got {len(listed)}")
    return listed


def _ids(field: str, values: Iterable[str], limits: Limits) -> tuple[str, ...]:
    listed = _listed(field, values, limits)
    for value in listed:
        check_id(field, value, limits)
    return listed


def _enum(field: str, kind: type[Member], value: str) -> Member:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise InvalidArgument(f"{field}: {value!r:.80} is not one of {allowed}") from None


def _metadata_match(key: str, value: str) -> MetadataMatch:
    if not key or len(key) > MAX_META_KEY_LENGTH:
        raise InvalidArgument(f"metadata: a key must be 1 to {MAX_META_KEY_LENGTH} characters, got {key!r:.80}")
    if len(value) > MAX_META_VALUE_LENGTH:
        raise InvalidArgument(f"metadata: the value of {key!r:.80} is longer than {MAX_META_VALUE_LENGTH} characters")
    return MetadataMatch(key, value)
