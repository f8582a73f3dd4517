"""The event log: every change gets the next ``seq``; subscribers get what matches.

Sans-I/O: a Subscription is a bounded queue with a wake-up callback. The async layer
sets the callback and drains the queue; the log never waits for anyone. A subscriber
that lets its queue fill reads on from the log's retained events instead (a burst, a
bulk ingest, a reader slower for a while): it keeps its place, with nothing queued for
it, and is closed with a reason only once the events it still needs are no longer
retained, which a resume could not fill either.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import orjson

from collab_grpc.model import (
    Activity,
    ActivityCompletion,
    ActivityLink,
    ActivityType,
    AgentRetirement,
    Decision,
    Event,
    EventKind,
    EventPayload,
    Session,
)

__all__ = [
    "DEFAULT_RETAIN_BYTES",
    "RECORD_OVERHEAD",
    "EventFilter",
    "EventLog",
    "Subscription",
    "metadata_size",
    "payload_size",
    "record_size",
]

DEFAULT_RETAIN_BYTES = 64 * 1024 * 1024

# What a record counts against a byte budget beyond its metadata and text: its ids,
# timestamps and the Python objects around them (a round figure, so that records
# without metadata count too).
RECORD_OVERHEAD = 512


def metadata_size(metadata: dict[str, Any]) -> int:
    """The serialised size of metadata that validation did not measure (a restored or
    adopted record); on the write path the size comes from validation."""
    try:
        return len(orjson.dumps(metadata))
    except orjson.JSONEncodeError:  # what orjson refuses, the json module writes
        return len(json.dumps(metadata, separators=(",", ":"), default=str))


def record_size(payload: EventPayload, metadata_bytes: int) -> int:
    """What ``payload`` counts against the byte budgets, given its metadata's size (a
    completion: its activity's merged metadata, and the names of the keys it added)."""
    size = RECORD_OVERHEAD + metadata_bytes
    if isinstance(payload, ActivityCompletion):
        size += sum(len(key) for key in payload.added_keys)
    if isinstance(payload, ActivityCompletion | ActivityLink):
        payload = payload.activity
    if isinstance(payload, Activity):
        size += len(payload.failure_reason) + sum(len(agent) for agent in payload.related_agents)
    elif isinstance(payload, Session):
        size += sum(len(member) for member in payload.participants)
    elif isinstance(payload, Decision):
        size += len(payload.decision) + len(payload.rationale)
        size += sum(len(voter) + len(vote) for voter, vote in payload.votes.items())
    return size


def payload_size(payload: EventPayload) -> int:
    """``record_size``, measuring the metadata."""
    record = payload.activity if isinstance(payload, ActivityCompletion | ActivityLink) else payload
    if isinstance(record, AgentRetirement):  # ids and a time: no metadata
        return record_size(payload, 0)
    return record_size(payload, metadata_size(record.metadata))


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Empty sets mean "all". Activity types narrow only the events about one activity
    (recorded, completed, linked)."""

    kinds: frozenset[EventKind] = frozenset()
    activity_types: frozenset[ActivityType] = frozenset()
    agent_ids: frozenset[str] = frozenset()

    def matches(self, event: Event) -> bool:
        if self.kinds and event.kind not in self.kinds:
            return False
        if self.activity_types:
            activity_type = event.activity_type
            if activity_type is not None and activity_type not in self.activity_types:
                return False
        return not (self.agent_ids and self.agent_ids.isdisjoint(event.agent_ids))


class Subscription:
    """A subscriber's bounded queue of events not yet taken."""

    def __init__(
        self,
        event_filter: EventFilter,
        capacity: int,
        after_seq: int = 0,
        max_bytes: int | None = None,
        log: EventLog | None = None,
    ) -> None:
        self.filter = event_filter
        self.capacity = capacity
        # Where it reads on from once its queue is full (None: it is closed instead).
        self._log = log
        # Set while it reads on from the log: the seq after which it goes on.
        self._behind_after: int | None = None
        # The events queued share their payloads with the log, but one that lags holds
        # them after the log let them go: bounded in bytes too (None: by count only).
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        # Events up to this seq reached the subscriber another way (snapshot, replay).
        self.after_seq = after_seq
        self.closed_reason: str | None = None
        self.on_ready: Callable[[], None] | None = None
        self._queue: deque[Event] = deque()
        self._sizes: deque[int] = deque()

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def behind(self) -> bool:
        """Reading on from the log: its queue filled up."""
        return self._behind_after is not None

    def offer(self, event: Event, size: int = 0) -> None:
        if self.closed_reason is not None or event.seq <= self.after_seq:
            return
        if self._behind_after is not None:
            self._check_retained()  # the log may just have let go of what it still needs
            return
        if not self.filter.matches(event):
            return
        full = len(self._queue) >= self.capacity
        if full or (self.max_bytes is not None and self._queue and self.queued_bytes + size > self.max_bytes):
            if self._log is not None:
                # Everything from here on is in the log: it reads on from there.
                self._behind_after = self._queue[-1].seq if self._queue else event.seq - 1
                return
            what = f"{self.capacity} events" if full else f"{self.max_bytes} bytes of events"
            self.close(
                f"subscriber fell behind: more than {what} were waiting; "
                "resubscribe with since_seq set to the last seq received"
            )
            return
        self._queue.append(event)
        self._sizes.append(size)
        self.queued_bytes += size
        if self.on_ready is not None:
            self.on_ready()

    def take(self) -> list[Event]:
        """Every queued event, oldest first, leaving the queue empty; once that is
        empty, for a subscriber behind, the next ones from the log (as many as its queue
        takes), until it has caught up and is queued for again."""
        if not self._queue and self._behind_after is not None:
            return self._read_on() if self.closed_reason is None else []
        events = list(self._queue)
        self._queue.clear()
        self._sizes.clear()
        self.queued_bytes = 0
        return events

    def _check_retained(self) -> bool:
        """Close a subscriber behind whose next events the log no longer retains."""
        assert self._log is not None and self._behind_after is not None
        first = self._log.first_retained_seq
        if self._behind_after + 1 >= first:
            return True
        self.close(
            f"subscriber fell behind: events after seq {self._behind_after} are no longer retained "
            f"(oldest is {first}); resubscribe with a snapshot"
        )
        return False

    def _read_on(self) -> list[Event]:
        assert self._log is not None and self._behind_after is not None
        if not self._check_retained():
            return []
        events: list[Event] = []
        taken_bytes = 0
        scanned = self._behind_after
        for event, size in self._log.sized_events_after(self._behind_after):
            scanned = event.seq
            if not self.filter.matches(event):
                continue
            events.append(event)
            taken_bytes += size
            if len(events) >= self.capacity or (self.max_bytes is not None and taken_bytes >= self.max_bytes):
                break
        # Through the newest published event: caught up, queued for from the next one on.
        self._behind_after = None if scanned >= self._log.published_seq else scanned
        return events

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            self._queue.clear()
            self._sizes.clear()
            self.queued_bytes = 0
            if self.on_ready is not None:
                self.on_ready()


class EventLog:
    """Assigns ``seq`` within ``epoch``, retains the newest events for resume: at most
    ``retain`` of them, taking at most ``retain_bytes`` (``record_size``; the newest one
    is kept whatever its size). A subscriber queues at most half of ``retain_bytes``
    (and, as the server sets it, half of ``retain`` events); past that it reads on from
    the retained events, and is closed only once they no longer reach back to it.

    Without a ``sink`` an event is published (retained, offered to subscribers) as it is
    appended. With one, appended events go to the sink (a store) and wait until the store
    calls ``publish_through``: subscribers only ever see events the store committed, so
    none can see an event that a failed write then takes back (a store that publishes
    before its fsync starts a new epoch when a crash may have lost what it published).
    """

    def __init__(
        self, epoch: str, retain: int = 10_000, last_seq: int = 0, retain_bytes: int = DEFAULT_RETAIN_BYTES
    ) -> None:
        self.epoch = epoch
        self.retain = retain
        self.retain_bytes = retain_bytes
        self.last_seq = last_seq  # the newest seq assigned
        self.published_seq = last_seq  # the newest seq published
        self.sink: Callable[[Event], None] | None = None
        # Told of every event this log numbered, once published (durable): not of events
        # adopted from a replica, which that replica reports. How the server counts what
        # it records without the log knowing of metrics.
        self.on_recorded: Callable[[Event], None] | None = None
        self._pending: deque[tuple[Event, int]] = deque()  # with their sizes
        self._retained: deque[Event] = deque()
        self._retained_sizes: deque[int] = deque()
        self.retained_bytes = 0
        self._subscriptions: set[Subscription] = set()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    @property
    def subscribers_behind(self) -> int:
        """Subscribers reading on from the retained events (their queue filled). Read by
        the metrics thread too: list() copies the set in one step under the GIL."""
        return sum(1 for subscription in list(self._subscriptions) if subscription.behind)

    @property
    def first_retained_seq(self) -> int:
        """The oldest seq still replayable; ``published_seq + 1`` when nothing is retained."""
        return self._retained[0].seq if self._retained else self.published_seq + 1

    def append(self, kind: EventKind, payload: EventPayload, time: float, size: int | None = None) -> Event:
        """Number and publish (or hand to the sink) a change; ``size`` is what it counts
        against the byte budgets (``record_size``), measured here when not given."""
        self.last_seq += 1
        event = Event(self.last_seq, self.epoch, time, kind, payload)
        if size is None:
            size = payload_size(payload)
        if self.sink is None:
            self._publish(event, size)
        else:
            self._pending.append((event, size))
            self.sink(event)
        return event

    def adopt(self, event: Event) -> None:
        """Publish an event numbered elsewhere (a replica sharing the store); it must be
        the next one."""
        if event.seq != self.last_seq + 1 or event.epoch != self.epoch:
            raise ValueError(f"event {event.epoch}/{event.seq} does not follow {self.epoch}/{self.last_seq}")
        self.last_seq = event.seq
        self._publish(event, payload_size(event.payload), recorded_here=False)

    def _publish(self, event: Event, size: int, recorded_here: bool = True) -> None:
        self.published_seq = event.seq
        self._retain(event, size)
        for subscription in self._subscriptions:
            subscription.offer(event, size)
        if recorded_here and self.on_recorded is not None:
            self.on_recorded(event)

    def _retain(self, event: Event, size: int) -> None:
        retained, sizes = self._retained, self._retained_sizes
        retained.append(event)
        sizes.append(size)
        self.retained_bytes += size
        # The oldest go first; resuming from before them is then "no longer retained".
        while len(retained) > self.retain or (self.retained_bytes > self.retain_bytes and len(retained) > 1):
            retained.popleft()
            self.retained_bytes -= sizes.popleft()

    def newest(self, kind: EventKind, before_seq: int | None = None) -> Iterator[Event]:
        """The retained events of ``kind``, newest first; with ``before_seq``, only older ones."""
        for event in reversed(self._retained):
            if event.kind is kind and (before_seq is None or event.seq < before_seq):
                yield event

    def publish_through(self, seq: int) -> None:
        """The store made every event up to ``seq`` durable: publish them."""
        while self._pending and self._pending[0][0].seq <= seq:
            self._publish(*self._pending.popleft())

    def restore(self, events: Iterable[Event], last_seq: int) -> None:
        """Continue a history: ``events`` are its newest (oldest first), ``last_seq`` its end."""
        self._pending.clear()  # never durable: they are not part of the history
        self._retained.clear()
        self._retained_sizes.clear()
        self.retained_bytes = 0
        for event in events:
            self._retain(event, payload_size(event.payload))
        self.last_seq = self.published_seq = last_seq

    def can_resume(self, epoch: str, since_seq: int) -> str | None:
        """None when every event after ``since_seq`` can be replayed, else why not."""
        if epoch != self.epoch:
            return f"epoch {epoch!r} is not the current epoch {self.epoch!r}; history restarted"
        if since_seq > self.published_seq:
            return f"seq {since_seq} is ahead of the newest event {self.published_seq}"
        if since_seq + 1 < self.first_retained_seq:
            return f"events after seq {since_seq} are no longer retained (oldest is {self.first_retained_seq})"
        return None

    def events_after(self, since_seq: int) -> Iterator[Event]:
        """Retained events with a seq greater than ``since_seq``, oldest first."""
        return islice(self._retained, max(0, since_seq + 1 - self.first_retained_seq), None)

    def sized_events_after(self, since_seq: int) -> Iterator[tuple[Event, int]]:
        """``events_after``, each with what it counts against the byte budgets."""
        start = max(0, since_seq + 1 - self.first_retained_seq)
        return zip(islice(self._retained, start, None), islice(self._retained_sizes, start, None), strict=True)

    def subscribe(self, event_filter: EventFilter, capacity: int, after_seq: int | None = None) -> Subscription:
        """Events published from now on with a seq above ``after_seq`` (default: the
        newest published, so events still pending reach the subscriber once durable)."""
        subscription = Subscription(
            event_filter,
            capacity,
            self.published_seq if after_seq is None else after_seq,
            self.retain_bytes // 2,
            log=self,
        )
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    def close_all(self, reason: str) -> None:
        for subscription in list(self._subscriptions):
            subscription.close(reason)
