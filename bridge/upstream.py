"""The bridge's two upstream streams: every event, and the periodic agent status.

ONE of each per bridge process, whatever the number of browsers. When a stream breaks
(server restart, network) it reconnects with exponential backoff and jitter, resuming the
event stream from the last seq it saw, so connected browsers miss nothing. If the server
cannot fill the gap (its history restarted), a fresh snapshot arrives and is handed on.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import grpc

from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["Backoff", "Upstream"]

log = logging.getLogger("bridge.upstream")

# Events the server may send in one message when several wait: a burst (a bulk ingest)
# costs the bridge one read per batch instead of one per event, so it keeps up.
UPSTREAM_BATCH = 500


class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    def __init__(self, initial: float = 0.05, maximum: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def delay(self) -> float:
        delay = random.uniform(self.initial / 2, self._next)
        self._next = min(self.maximum, self._next * 2)
        return delay


class Upstream:
    """Holds the event and status streams and reports what arrives.

    ``on_snapshot(snapshot, reset)`` is called when a stream starts from a snapshot
    (``reset`` is True when it replaces a history the bridge had already followed);
    ``on_event`` for each event, in seq order; ``on_status`` for each status update.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        token: str | None,
        *,
        on_snapshot: Callable[[pb.Snapshot, bool], None],
        on_event: Callable[[pb.Event], None],
        on_status: Callable[[pb.StreamAgentStatusResponse], None],
    ) -> None:
        self.stub = pb_grpc.CollaborationServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.on_snapshot = on_snapshot
        self.on_event = on_event
        self.on_status = on_status
        self.epoch = ""
        self.last_seq = 0
        self.events_connected = False
        self.status_connected = False
        self.last_error = ""
        # Times each stream was lost (or not reached) and retried: for the metrics.
        self.reconnects = {"events": 0, "status": 0}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def connected(self) -> bool:
        return self.events_connected and self.status_connected

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(self._follow_events, "events")),
            asyncio.create_task(self._run(self._follow_status, "status")),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, follow: Callable[[Backoff], object], name: str) -> None:
        backoff = Backoff()
        while True:
            try:
                await follow(backoff)  # type: ignore[misc]
                self.last_error = f"{name} stream ended"
            except grpc.aio.AioRpcError as error:
                self.last_error = f"{name} stream: {error.code().name}: {error.details()}"
                if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    # Expired, revoked or read-less: nothing reaches the bridge's clients until it is replaced.
                    log.error(
                        "the server refused the bridge's own credential (COLLAB_UPSTREAM_TOKEN, else the key "
                        "in the data dir) on its %s stream: %s; replace it (retrying meanwhile)",
                        name,
                        error.details(),
                        extra={"code": error.code().name},
                    )
            except Exception as error:  # a bug must not end the stream for good
                log.exception("upstream %s stream failed", name)
                self.last_error = f"{name} stream: {error!r}"
            self.events_connected = self.events_connected and name != "events"
            self.status_connected = self.status_connected and name != "status"
            self.reconnects[name] += 1
            delay = backoff.delay()
            log.warning("upstream %s stream lost; retrying", name, extra={"error": self.last_error, "retry_in": delay})
            await asyncio.sleep(delay)

    async def _follow_events(self, backoff: Backoff) -> None:
        if self.epoch:
            request = pb.SubscribeEventsRequest(since_seq=self.last_seq, epoch=self.epoch, max_batch=UPSTREAM_BATCH)
        else:
            request = pb.SubscribeEventsRequest(include_snapshot=True, max_batch=UPSTREAM_BATCH)
        stream = self.stub.SubscribeEvents(request, metadata=self.metadata)
        async for message in stream:
            kind = message.WhichOneof("message")
            if kind == "event":
                self._take(message.event)
            elif kind == "events":
                for event in message.events.events:
                    self._take(event)
            elif kind == "resume":
                if message.resume.recovered:
                    self._connected(backoff)
                else:
                    log.warning("upstream history restarted", extra={"reason": message.resume.reason})
            elif kind == "snapshot":
                snapshot = message.snapshot
                reset = bool(self.epoch)
                self.epoch, self.last_seq = snapshot.epoch, snapshot.seq
                self._connected(backoff)
                self.on_snapshot(snapshot, reset)

    def _take(self, event: pb.Event) -> None:
        if event.seq <= self.last_seq:
            return  # already handed on before the stream broke
        self.last_seq = event.seq
        self.on_event(event)

    def _connected(self, backoff: Backoff) -> None:
        self.events_connected = True
        backoff.reset()
        log.info("upstream event stream connected", extra={"epoch": self.epoch, "seq": self.last_seq})

    async def _follow_status(self, backoff: Backoff) -> None:
        stream = self.stub.StreamAgentStatus(pb.StreamAgentStatusRequest(), metadata=self.metadata)
        async for update in stream:
            if not self.status_connected:
                self.status_connected = True
                backoff.reset()
            self.on_status(update)
