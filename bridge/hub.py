"""What the bridge knows of the event stream: position, recent frames, connected clients.

Each upstream event is serialised to JSON once, kept in a bounded buffer of recent frames
(to catch up joining clients and resume reconnecting ones) and broadcast. Everything here
can be rebuilt from the server: on restart the bridge starts again from a snapshot.

Broadcasts are coalesced (``coalesce_delay`` not None): an event is queued and a pass
over the clients takes every event queued since the last one (bridge/fanout.py writes
each client's share in one write). When the hub is idle, the pass starts at the next
turn of the event loop, so a lone event waits for nothing. When the hub is behind (an
event is read later after its publication than usual by at least the usual gap between
events, so at least one more is published and waiting to be read: on the server's
clock, against the least delay seen, so the two clocks need not agree) the pass starts
one pass's duration after the last, at most ``coalesce_delay`` later: what is read
meanwhile shares it. A hub that keeps up sends each event at once, however soon after a
pass it is read, since nothing would share a delayed pass; one that falls behind (a
pass lasts longer than the gap between events) is soon behind by a gap and coalesces
until it has caught up. Anything that reads the buffer or the clients' positions (a
client joining, resuming, a snapshot, a status update) first runs the pass due, so the
order is the same as without coalescing.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

from google.protobuf.unknown_fields import UnknownFieldSet

from bridge import mapping
from bridge.fanout import Fanout, Frame, Subscriber
from bridge.mapping import dumps
from collab_grpc.v1 import collaboration_pb2 as pb

__all__ = ["Join", "SkippedEvents", "SnapshotTooOld", "StreamHub"]

log = logging.getLogger("bridge.hub")


class SnapshotTooOld(Exception):
    """A client's snapshot predates every buffered frame: events between would be lost.
    Fetch a fresh snapshot and open again."""


def collaboration_state(snapshot: pb.Snapshot, **extra: object) -> mapping.JSON:
    return {
        "type": "collaboration_state",
        "agent_status": mapping.agent_status_json(snapshot.agent_status),
        "active_collaborations": [mapping.session_json(s) for s in snapshot.active_collaborations],
        # Capped like the agent map; GET active-collaborations pages through every one.
        "active_collaborations_omitted": snapshot.active_collaborations_omitted,
        "timestamp": mapping.iso_now(),
        "epoch": snapshot.epoch,
        "seq": snapshot.seq,
        **extra,
    }


@dataclass(frozen=True, slots=True)
class Join:
    """How a joining client starts: resumed (its missed events follow) or from a snapshot."""

    recovered: bool
    reason: str
    catch_up: list[Frame]


# Skipped events (a newer server's kinds) are logged at most once a kind this often
# (seconds), each line with how many were skipped since the last; the kinds tallied are
# bounded (the rest are tallied as "other").
SKIPPED_LOG_INTERVAL = 60.0
SKIPPED_KINDS = 32


class SkippedEvents:
    """The events this bridge cannot show (a newer server's payload or enum value, as
    while servers are upgraded before bridges): each counted by its kind (the metric
    ``collab_bridge_events_skipped_total{kind}``); the log says so once a kind per
    ``interval``, with the count since its last line, not once an event."""

    def __init__(self, interval: float = SKIPPED_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.counts: dict[str, int] = {}  # kind -> events skipped since the bridge started
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}  # kind -> skipped since its last log line

    @staticmethod
    def kind_of(event: pb.Event) -> str:
        """The event's payload: its name when this bridge knows it (a value in it is what
        it cannot read), else ``field_<number>`` of the payload this bridge's proto lacks."""
        payload = event.WhichOneof("payload")
        if payload is not None:
            return payload
        unknown = UnknownFieldSet(event)
        numbers = sorted({unknown[index].field_number for index in range(len(unknown))})
        return f"field_{numbers[0]}" if numbers else "none"

    def skipped(self, event: pb.Event, error: Exception) -> None:
        kind = self.kind_of(event)
        if kind not in self.counts and len(self.counts) >= SKIPPED_KINDS:
            kind = "other"
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
        now = self.clock()
        last = self._logged_at.get(kind)
        if last is not None and now - last < self.interval:
            return
        self._logged_at[kind] = now
        count = self._unlogged.pop(kind)
        log.error(
            "event %d skipped: not mappable to JSON: %r; %d event(s) of kind %s skipped since the last such line "
            "(at most one a minute per kind): is the server newer than this bridge? upgrade the bridge",
            event.seq,
            error,
            count,
            kind,
        )


DEFAULT_BUFFER_BYTES = 32 * 1024 * 1024
# The longest an event waits for others to share its pass while the hub is busy (seconds;
# COLLAB_FANOUT_COALESCE_DELAY), and the most events one pass takes (COLLAB_FANOUT_BATCH).
DEFAULT_COALESCE_DELAY = 0.005
DEFAULT_FANOUT_BATCH = 256
# Weight of the newest gap between events in their moving average, and how fast the
# least delay from publication to reading creeps up towards a larger one.
GAP_WEIGHT = 0.25
LEAST_DELAY_CREEP = 0.001


class StreamHub:
    """``buffer_size`` recent frames are kept, taking at most ``buffer_bytes`` characters
    of text (the newest one whatever its size); the oldest go first."""

    def __init__(
        self,
        buffer_size: int,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        *,
        coalesce_delay: float | None = None,
        batch_size: int = DEFAULT_FANOUT_BATCH,
    ) -> None:
        """``coalesce_delay`` None: every event is broadcast as it arrives (no coalescing)."""
        self.fanout = Fanout()
        self.coalesce_delay = coalesce_delay
        self.batch_size = batch_size
        # Events buffered but not yet broadcast (at most batch_size), and the pass due.
        self._pending: list[Frame] = []
        self._pass_due: asyncio.Handle | None = None
        self._last_pass_end = 0.0
        self._last_pass_seconds = 0.0
        # The newest event's publication time (the server's clock), the moving average of
        # the gaps between events' times, and the least delay from publication to being
        # read (creeping up, so that a clock that moves is learnt again).
        self._last_published = float("-inf")
        self._mean_gap = float("inf")
        self._least_delay = float("inf")
        self.epoch = ""
        self.last_seq = 0
        self.buffer_size = buffer_size
        self.buffer_bytes = buffer_bytes
        self._recent: deque[Frame] = deque()
        self.buffered_bytes = 0
        self.status_frame: Frame | None = None
        self.skipped = SkippedEvents()

    # -- from upstream --------------------------------------------------------------

    def on_snapshot(self, snapshot: pb.Snapshot, reset: bool) -> None:
        """The upstream (re)started from a snapshot: the server's history restarted
        (``reset``), or the bridge just started. Every client whose position the events
        from here on cannot continue (another epoch, or a gap before this snapshot) gets
        this fresh state, marked ``reset``, and continues from it."""
        self.flush()
        if (snapshot.epoch, snapshot.seq) != (self.epoch, self.last_seq):
            self._recent.clear()  # buffered frames are of another history or leave a gap
            self.buffered_bytes = 0
        self.epoch, self.last_seq = snapshot.epoch, snapshot.seq
        frame: Frame | None = None
        for subscriber in tuple(self.fanout.subscribers):
            if subscriber.epoch == snapshot.epoch and subscriber.last_seq >= snapshot.seq:
                continue
            if frame is None:
                frame = Frame(dumps(collaboration_state(snapshot, reset=True)), "collaboration_state")
            subscriber.epoch = snapshot.epoch
            subscriber.min_seq = subscriber.last_seq = snapshot.seq
            subscriber.send_frame(frame)

    def frame(self, event: pb.Event) -> Frame | None:
        """``event`` serialised as its WebSocket message; None if this bridge cannot show
        it (a newer server's payload or enum value), which is counted and logged (see
        SkippedEvents)."""
        try:
            message = mapping.event_json(event)
        except (KeyError, ValueError) as error:
            self.skipped.skipped(event, error)
            return None
        activity_type = message.get("activity", {}).get("activity_type") or message.get("activity_type")
        return Frame(dumps(message), message["type"], activity_type, event.seq)

    def on_event(self, event: pb.Event) -> None:
        self.last_seq = event.seq
        frame = self.frame(event)
        if frame is None:
            return  # skipping it keeps every other client served
        self._buffer(frame)
        if self.coalesce_delay is None:
            self.fanout.broadcast(frame)
            frame.release_wire()  # the buffer of recent frames would hold every event twice
            return
        self._pending.append(frame)
        published = event.time.seconds + event.time.nanos / 1e9
        gap = max(0.0, published - self._last_published)  # a clock stepped back: no gap
        self._last_published = published
        mean = self._mean_gap
        self._mean_gap = gap if mean == float("inf") else mean + GAP_WEIGHT * (gap - mean)
        delay = time.time() - published
        least = self._least_delay
        self._least_delay = delay if delay < least else least + LEAST_DELAY_CREEP * (delay - least)
        if len(self._pending) >= self.batch_size:
            self.flush()
        elif self._pass_due is None:
            loop = asyncio.get_running_loop()
            behind = delay - self._least_delay >= self._mean_gap
            start = self._last_pass_end + min(self._last_pass_seconds, self.coalesce_delay)
            if not behind or loop.time() >= start:
                self._pass_due = loop.call_soon(self.flush)
            else:
                self._pass_due = loop.call_at(start, self.flush)

    @property
    def pass_due(self) -> bool:
        """Whether events wait for a broadcast pass."""
        return bool(self._pending)

    def flush(self) -> None:
        """Broadcast every event queued since the last pass, in one pass."""
        if self._pass_due is not None:
            self._pass_due.cancel()
            self._pass_due = None
        if not self._pending:
            return
        frames, self._pending = self._pending, []
        loop = asyncio.get_running_loop()
        began = loop.time()
        self.fanout.broadcast_batch(frames)
        self._last_pass_end = loop.time()
        self._last_pass_seconds = self._last_pass_end - began
        for frame in frames:
            frame.release_wire()  # the buffer of recent frames would hold every event twice

    def _buffer(self, frame: Frame) -> None:
        recent = self._recent
        recent.append(frame)
        self.buffered_bytes += len(frame.text)
        while len(recent) > self.buffer_size or (self.buffered_bytes > self.buffer_bytes and len(recent) > 1):
            self.buffered_bytes -= len(recent.popleft().text)

    @property
    def first_buffered_seq(self) -> int:
        """The oldest seq a resuming client can be given from the buffer."""
        return (self._recent[0].seq or 0) if self._recent else self.last_seq + 1

    def on_status(self, update: pb.StreamAgentStatusResponse) -> None:
        frame = Frame(dumps(mapping.status_update_json(update)), "agent_status_update")
        self.status_frame = frame
        self.flush()
        self.fanout.broadcast(frame)

    # -- clients ----------------------------------------------------------------------

    def _frames_after(self, seq: int) -> Iterator[Frame]:
        # By seq, not by position: an event this bridge could not show leaves a gap.
        start = bisect.bisect_right(self._recent, seq, key=lambda frame: frame.seq or 0)
        return islice(self._recent, start, None)

    def plan_resume(self, epoch: str, since: int) -> Join:
        """Can a client that saw everything up to ``(epoch, since)`` be caught up from
        the buffer? (Events older than the buffer are streamed from the server first:
        BridgeRuntime.open_client.)"""
        self.flush()
        if epoch != self.epoch:
            return Join(False, f"epoch {epoch!r} is not the current epoch {self.epoch!r}", [])
        first = self.first_buffered_seq
        if since + 1 < first:
            return Join(False, f"events after seq {since} are no longer buffered (oldest is {first})", [])
        if since > self.last_seq:
            return Join(False, f"seq {since} is ahead of the newest event {self.last_seq}", [])
        return Join(True, "", list(self._frames_after(since)))

    def open(
        self,
        subscriber: Subscriber,
        snapshot: pb.Snapshot,
        established: mapping.JSON,
        since: int | None,
        epoch: str,
        strict: bool = True,
    ) -> None:
        """Start a client: ``connection_established``, then either the events it missed
        (resume from ``(epoch, since)``) or ``collaboration_state`` from ``snapshot``, then
        live events. Synchronous, so no event can slip in between.

        SnapshotTooOld when events between ``snapshot`` and what the bridge can still give
        would be missed, or (``strict``) when the snapshot is of another epoch than the
        bridge follows; the caller fetches a fresh snapshot."""
        self.flush()
        if since is not None:
            plan = self.plan_resume(epoch, since)
            established["recovered"] = plan.recovered
            if plan.recovered:
                established["seq"] = since
                subscriber.send_frame(Frame(dumps(established), "connection_established"))
                subscriber.epoch = epoch
                self.join(subscriber, since, plan.catch_up)
                return
            established["reason"] = plan.reason
        same_epoch = snapshot.epoch == self.epoch
        if same_epoch and snapshot.seq + 1 < self.first_buffered_seq:
            raise SnapshotTooOld(f"snapshot at seq {snapshot.seq} is older than the buffered events")
        if strict and self.epoch and not same_epoch:
            raise SnapshotTooOld(f"snapshot of epoch {snapshot.epoch!r}; the bridge follows {self.epoch!r}")
        subscriber.send_frame(Frame(dumps(established), "connection_established"))
        subscriber.send_frame(Frame(dumps(collaboration_state(snapshot)), "collaboration_state"))
        subscriber.epoch = snapshot.epoch
        # If the bridge follows another epoch (it is starting, or the server just
        # restarted), none of its buffered frames apply; on_snapshot resets the client.
        self.join(subscriber, snapshot.seq, None if same_epoch else [])

    def join(self, subscriber: Subscriber, after_seq: int, catch_up: list[Frame] | None = None) -> None:
        """Start ``subscriber`` after ``after_seq``: buffered frames beyond it now, then
        live ones. Synchronous, so no event can slip in between."""
        self.flush()
        frames = catch_up if catch_up is not None else list(self._frames_after(after_seq))
        subscriber.min_seq = subscriber.last_seq = subscriber.written_seq = after_seq
        if not subscriber.epoch:
            subscriber.epoch = self.epoch
        for frame in frames:
            subscriber.deliver(frame)
        self.fanout.add(subscriber)

    def continue_after(self, subscriber: Subscriber, seq: int) -> None:
        """Go on with a client that was sent every event up to ``seq`` (streamed from the
        server): the buffered frames after it, then live ones. Unlike ``join`` it keeps
        the client's written position, since some of what it was sent may still be
        waiting to be written. Synchronous, so no event can slip in between."""
        self.flush()
        subscriber.min_seq = max(subscriber.min_seq, seq)
        subscriber.last_seq = max(subscriber.last_seq, seq)
        for frame in self._frames_after(seq):
            subscriber.deliver(frame)
        self.fanout.add(subscriber)

    def leave(self, subscriber: Subscriber) -> None:
        self.fanout.remove(subscriber)
