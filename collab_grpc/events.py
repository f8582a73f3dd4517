"""The event log: every change gets the next ``seq``; subscribers get what matches.

Sans-I/O: a Subscription is a bounded queue with a wake-up callback. The async layer
sets the callback and drains the queue; the log never waits for anyone, so a slow
subscriber can only overflow its own queue, after which it is closed with a reason.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from collab_grpc.model import ActivityType, Event, EventKind, EventPayload

__all__ = ["EventFilter", "EventLog", "Subscription"]


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Empty sets mean "all". Activity types narrow only the two activity event kinds."""

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

    def __init__(self, event_filter: EventFilter, capacity: int, after_seq: int = 0) -> None:
        self.filter = event_filter
        self.capacity = capacity
        # Events up to this seq reached the subscriber another way (snapshot, replay).
        self.after_seq = after_seq
        self.closed_reason: str | None = None
        self.on_ready: Callable[[], None] | None = None
        self._queue: deque[Event] = deque()

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, event: Event) -> None:
        if self.closed_reason is not None or event.seq <= self.after_seq or not self.filter.matches(event):
            return
        if len(self._queue) >= self.capacity:
            self.close(
                f"subscriber fell behind: more than {self.capacity} events were waiting; "
                "resubscribe with since_seq set to the last seq received"
            )
            return
        self._queue.append(event)
        if self.on_ready is not None:
            self.on_ready()

    def take(self) -> list[Event]:
        """Every queued event, oldest first, leaving the queue empty."""
        events = list(self._queue)
        self._queue.clear()
        return events

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            self._queue.clear()
            if self.on_ready is not None:
                self.on_ready()


class EventLog:
    """Assigns ``seq`` within ``epoch``, retains the newest ``retain`` events for resume.

    Without a ``sink`` an event is published (retained, offered to subscribers) as it is
    appended. With one, appended events go to the sink (a store that makes them durable)
    and wait until the store calls ``publish_through``: subscribers only ever see events
    that are durable, so none can see an event that a crash would then take back.
    """

    def __init__(self, epoch: str, retain: int = 10_000, last_seq: int = 0) -> None:
        self.epoch = epoch
        self.last_seq = last_seq  # the newest seq assigned
        self.published_seq = last_seq  # the newest seq published
        self.sink: Callable[[Event], None] | None = None
        # Told of every event this log numbered, once published (durable): not of events
        # adopted from a replica, which that replica reports. How the server counts what
        # it records without the log knowing of metrics.
        self.on_recorded: Callable[[Event], None] | None = None
        self._pending: deque[Event] = deque()
        self._retained: deque[Event] = deque(maxlen=retain)
        self._subscriptions: set[Subscription] = set()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    @property
    def first_retained_seq(self) -> int:
        """The oldest seq still replayable; ``published_seq + 1`` when nothing is retained."""
        return self._retained[0].seq if self._retained else self.published_seq + 1

    def append(self, kind: EventKind, payload: EventPayload, time: float) -> Event:
        self.last_seq += 1
        event = Event(self.last_seq, self.epoch, time, kind, payload)
        if self.sink is None:
            self._publish(event)
        else:
            self._pending.append(event)
            self.sink(event)
        return event

    def adopt(self, event: Event) -> None:
        """Publish an event numbered elsewhere (a replica sharing the store); it must be
        the next one."""
        if event.seq != self.last_seq + 1 or event.epoch != self.epoch:
            raise ValueError(f"event {event.epoch}/{event.seq} does not follow {self.epoch}/{self.last_seq}")
        self.last_seq = event.seq
        self._publish(event, recorded_here=False)

    def _publish(self, event: Event, recorded_here: bool = True) -> None:
        self.published_seq = event.seq
        self._retained.append(event)
        for subscription in self._subscriptions:
            subscription.offer(event)
        if recorded_here and self.on_recorded is not None:
            self.on_recorded(event)

    def publish_through(self, seq: int) -> None:
        """The store made every event up to ``seq`` durable: publish them."""
        while self._pending and self._pending[0].seq <= seq:
            self._publish(self._pending.popleft())

    def restore(self, events: Iterable[Event], last_seq: int) -> None:
        """Continue a history: ``events`` are its newest (oldest first), ``last_seq`` its end."""
        self._pending.clear()  # never durable: they are not part of the history
        self._retained.clear()
        self._retained.extend(events)
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

    def subscribe(self, event_filter: EventFilter, capacity: int, after_seq: int | None = None) -> Subscription:
        """Events published from now on with a seq above ``after_seq`` (default: the
        newest published, so events still pending reach the subscriber once durable)."""
        subscription = Subscription(event_filter, capacity, self.published_seq if after_seq is None else after_seq)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    def close_all(self, reason: str) -> None:
        for subscription in list(self._subscriptions):
            subscription.close(reason)
