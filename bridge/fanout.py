"""Fan-out: one serialised message written to every WebSocket client that wants it.

While a client keeps up, a write completes synchronously (the ASGI server puts the frame
in the socket's buffer without suspending), so a broadcast is one loop over the clients
with no task and no queue. Only when a client's write would block (its socket buffer is
full: it is not reading) does that client get a writer task and a bounded backlog; if
the backlog overflows, the client is disconnected with CLOSE_TOO_SLOW and can reconnect
and resume. Nobody else ever waits for it.

Coalescing: a broadcast pass takes a batch of frames (what the upstream delivered since
the last pass, bridge/hub.py), and each client gets what it wants of them in ONE write:
for a WebSocket client the frames' bytes concatenated (each still its own WebSocket
message), for an SSE client its events concatenated. The socket write per client is
most of a pass's cost, so a pass of k frames costs little more than a pass of one. A
client that is behind has its whole backlog flushed in one write the same way. Which
frames a client wants, and their joined bytes, are worked out once per distinct filter
per pass, not per client.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.wire import DirectWrite, text_frame

__all__ = ["CLOSE_TOO_SLOW", "DEFAULT_BACKLOG_BYTES", "Batch", "ClientFilter", "Fanout", "Frame", "Subscriber"]

log = logging.getLogger("bridge.fanout")

# Close code for a client that fell too far behind: reconnect, resuming with since/epoch.
CLOSE_TOO_SLOW = 4008

# The characters of text a client that is behind may have waiting (COLLAB_CLIENT_BACKLOG_BYTES).
DEFAULT_BACKLOG_BYTES = 4 * 1024 * 1024


# Selections (and their joined bytes) one pass keeps to share between clients of the same
# filter; beyond it (clients with many distinct filters) each client's share is built for
# it and dropped once written, so a pass holds at most this many joined copies.
MAX_SHARED_SELECTIONS = 64


@dataclass(frozen=True, slots=True)
class Frame:
    """A message serialised once for every recipient."""

    text: str
    type: str
    activity_type: str | None = None
    seq: int | None = None
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def wire(self) -> bytes:
        """The text as an encoded WebSocket frame: built once, on first use."""
        if self._wire is None:
            object.__setattr__(self, "_wire", text_frame(self.text))
        assert self._wire is not None
        return self._wire

    def release_wire(self) -> None:
        """Forget the encoded frame (a frame kept for resuming clients keeps its text only)."""
        object.__setattr__(self, "_wire", None)


@dataclass(frozen=True, slots=True)
class ClientFilter:
    """What a client subscribed to. ``None`` means everything.

    ``activity_types`` narrows ``agent_activity`` and ``activity_completed`` messages.
    """

    message_types: frozenset[str] | None = None
    activity_types: frozenset[str] | None = None

    def wants(self, frame: Frame) -> bool:
        if self.message_types is not None and frame.type not in self.message_types:
            return False
        return self.activity_types is None or frame.activity_type is None or frame.activity_type in self.activity_types


class Selection:
    """What one kind of client (a filter, a position) takes of a batch: the frames it
    wants, and the newest seq the batch moves it to (None: the batch has no event for it)."""

    __slots__ = ("_encoded", "_wire", "frames", "last_seq")

    def __init__(self, frames: list[Frame], last_seq: int | None) -> None:
        self.frames = frames
        self.last_seq = last_seq
        self._wire: bytes | None = None
        self._encoded: dict[Callable[[Frame], str], str] = {}

    def wire(self) -> bytes:
        """The frames' encoded WebSocket frames back to back: built once per selection."""
        if self._wire is None:
            frames = self.frames
            self._wire = frames[0].wire() if len(frames) == 1 else b"".join(frame.wire() for frame in frames)
        return self._wire

    def encoded(self, encode: Callable[[Frame], str]) -> str:
        """The frames as ``encode`` puts them on a text stream (SSE), back to back."""
        text = self._encoded.get(encode)
        if text is None:
            text = self._encoded[encode] = "".join(encode(frame) for frame in self.frames)
        return text


class Batch:
    """The frames of one broadcast pass, in order, and what each kind of client takes of them."""

    __slots__ = ("_selections", "first_seq", "frames")

    def __init__(self, frames: Sequence[Frame]) -> None:
        self.frames = frames
        self.first_seq = next((frame.seq for frame in frames if frame.seq is not None), None)
        self._selections: dict[tuple[ClientFilter, int], Selection] = {}

    def select(self, client_filter: ClientFilter, min_seq: int) -> Selection:
        # Clients whose snapshot predates the batch (nearly all) share a selection per filter.
        start = min_seq if self.first_seq is not None and min_seq >= self.first_seq else 0
        key = (client_filter, start)
        selection = self._selections.get(key)
        if selection is None:
            chosen: list[Frame] = []
            last_seq: int | None = None
            for frame in self.frames:
                if frame.seq is not None:
                    if frame.seq <= min_seq:
                        continue
                    last_seq = frame.seq
                if client_filter.wants(frame):
                    chosen.append(frame)
            selection = Selection(chosen, last_seq)
            if len(self._selections) < MAX_SHARED_SELECTIONS:
                self._selections[key] = selection
        return selection


@types.coroutine
def _finish(coro: Coroutine[Any, Any, None], pending: Any) -> Generator[Any, Any, None]:
    """Resume ``coro``, which already ran up to yielding ``pending``, to its end
    (``yield from`` for a coroutine started by hand)."""
    while True:
        try:
            received = yield pending
        except BaseException as error:
            try:
                pending = coro.throw(error)
            except StopIteration:
                return
        else:
            try:
                pending = coro.send(received)
            except StopIteration:
                return


class Subscriber:
    """One client: its filter, its position, and its backlog if it is behind."""

    def __init__(
        self,
        send_text: Callable[[str], Coroutine[Any, Any, None]],
        close: Callable[[int, str], Coroutine[Any, Any, None]],
        *,
        max_backlog: int,
        max_backlog_bytes: int = DEFAULT_BACKLOG_BYTES,
        client_id: str = "",
        encode: Callable[[Frame], str] | None = None,
        direct: DirectWrite | None = None,
    ) -> None:
        self.client_id = client_id
        # How a frame goes on this client's wire; None: its JSON text as it is (WebSocket).
        self.encode = encode
        # Writes a frame's encoded bytes straight to the connection (bridge/wire.py); only
        # for frames that go on the wire as they are.
        self.direct = direct if encode is None else None
        # An encoded stream (SSE) is one text: several messages go in one ``send_text``.
        # A WebSocket ``send_text`` is one message; several go in one write only directly.
        self.joins_text = encode is not None
        self.filter = ClientFilter()
        # The epoch the client's position is in, and the events up to ``min_seq`` that
        # what it already has (its snapshot) covers.
        self.epoch = ""
        self.min_seq = 0
        # The newest event offered to the client, and the newest one handed to its socket
        # (or filtered out while it was keeping up): where it could resume from.
        self.last_seq = 0
        self.written_seq = 0
        self.too_slow = False
        self.max_backlog = max_backlog
        # Messages can be 64 KiB and more: the backlog is bounded in characters of text too.
        self.max_backlog_bytes = max_backlog_bytes
        self.backlog_bytes = 0
        self.high_water = 0
        self.closed = False
        # Writes this client was given, and the messages they carried (more when coalesced).
        self.writes = 0
        self.messages_written = 0
        self._send_text = send_text
        self._close = close
        # What waits: (text, its encoded WebSocket frame if already built, seq, messages).
        self._backlog: deque[tuple[str, bytes | None, int | None, int]] = deque()
        self._backlog_messages = 0
        self._writer: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    @property
    def behind(self) -> bool:
        return self._writer is not None

    @property
    def backlog(self) -> int:
        """Messages waiting to be written."""
        return self._backlog_messages

    @property
    def closing(self) -> asyncio.Task[None] | None:
        """The close under way once ``disconnect`` was called."""
        return self._closing

    def deliver(self, frame: Frame) -> None:
        """Offer a broadcast frame; it is written if the client wants it and lacks it."""
        if frame.seq is not None:
            if frame.seq <= self.min_seq:
                return
            self.last_seq = frame.seq
            if not self.filter.wants(frame):
                if self._writer is None:
                    self.written_seq = frame.seq
                return
        elif not self.filter.wants(frame):
            return
        self.send_frame(frame)

    def offer(self, batch: Batch) -> None:
        """Offer the frames of a broadcast pass: those the client wants and lacks go out
        in one write (in order, each its own message), or one at a time where the
        connection cannot take several in one write."""
        if self.closed:
            return
        if not (self.direct is not None or self.joins_text):
            for frame in batch.frames:  # the ASGI path: one `send` per message
                self.deliver(frame)
            return
        selection = batch.select(self.filter, self.min_seq)
        last_seq = selection.last_seq
        if last_seq is not None:
            self.last_seq = last_seq
        frames = selection.frames
        if not frames:
            if last_seq is not None and self._writer is None:
                self.written_seq = last_seq
            return
        if self.direct is not None:
            if self._writer is None and self.direct(selection.wire()):
                self.writes += 1
                self.messages_written += len(frames)
                if last_seq is not None:
                    self.written_seq = last_seq
                return
            # Not writable now: the first through `send` (which waits), the rest queued.
            for frame in frames:
                self._write(frame.text, frame.seq, 1, frame.wire())
            return
        assert self.encode is not None
        # Once written, the client has all it wants up to the batch's last event.
        self._write(selection.encoded(self.encode), last_seq, len(frames), None)

    def send_frame(self, frame: Frame) -> None:
        """Write ``frame`` whatever the filter says (the connection's own messages)."""
        if self.direct is not None and self._writer is None and not self.closed and self.direct(frame.wire()):
            self.writes += 1
            self.messages_written += 1
            if frame.seq is not None:
                self.written_seq = frame.seq
            return
        self.write(frame.text if self.encode is None else self.encode(frame), frame.seq)

    def write(self, text: str, seq: int | None = None) -> None:
        """Write now if the client keeps up, else queue behind what is already waiting."""
        self._write(text, seq, 1, None)

    def _write(self, text: str, seq: int | None, messages: int, wire: bytes | None) -> None:
        if self.closed:
            return
        if self._writer is not None:
            if self._backlog_messages + messages > self.max_backlog:
                self._too_slow(f"more than {self.max_backlog} messages")
                return
            if self._backlog and self.backlog_bytes + len(text) > self.max_backlog_bytes:
                self._too_slow(f"more than {self.max_backlog_bytes} bytes of messages")
                return
            self._backlog.append((text, wire, seq, messages))
            self._backlog_messages += messages
            self.backlog_bytes += len(text)
            self.high_water = max(self.high_water, self._backlog_messages)
            return
        coro = self._send_text(text)
        self.writes += 1
        self.messages_written += messages
        try:
            pending = coro.send(None)
        except StopIteration:
            if seq is not None:
                self.written_seq = seq
            return
        except Exception as error:  # the connection is gone; its handler will notice
            log.debug("write to %s failed: %s", self.client_id, error)
            self.closed = True
            return
        self._writer = asyncio.create_task(self._catch_up(_finish(coro, pending), seq))

    def _too_slow(self, waiting: str) -> None:
        self.too_slow = True
        self.disconnect(CLOSE_TOO_SLOW, f"too slow: {waiting} waiting; reconnect with since={self.written_seq}")

    async def drained(self) -> None:
        """Return once nothing is waiting to be written (at once for a client keeping up)."""
        writer = self._writer
        if writer is not None:
            await asyncio.wait({writer})

    def _take_backlog(self) -> tuple[list[tuple[str, bytes | None, int | None, int]], int | None]:
        """Everything waiting, and the newest seq among it."""
        taken = list(self._backlog)
        self._backlog.clear()
        self._backlog_messages = 0
        self.backlog_bytes = 0
        seq = next((item[2] for item in reversed(taken) if item[2] is not None), None)
        return taken, seq

    async def _catch_up(self, blocked: Awaitable[None], seq: int | None) -> None:
        try:
            await blocked
            if seq is not None:
                self.written_seq = seq
            while self._backlog:
                if self.direct is None and not self.joins_text:
                    text, _, seq, messages = self._backlog.popleft()
                    self._backlog_messages -= messages
                    self.backlog_bytes -= len(text)
                    await self._send_text(text)
                elif self.joins_text:
                    taken, seq = self._take_backlog()
                    await self._send_text("".join(item[0] for item in taken))
                    self.writes += 1
                    self.messages_written += sum(item[3] for item in taken)
                else:  # the whole backlog as one write of frames, if the transport takes it now
                    data = b"".join(
                        wire if wire is not None else text_frame(text) for text, wire, _, _ in self._backlog
                    )
                    if self.direct is not None and self.direct(data):
                        taken, seq = self._take_backlog()
                        self.writes += 1
                        self.messages_written += len(taken)
                        # Let the transport start sending before more is joined.
                        await asyncio.sleep(0)
                    else:  # paused: `send` waits until the transport drains
                        text, _, seq, messages = self._backlog.popleft()
                        self._backlog_messages -= messages
                        self.backlog_bytes -= len(text)
                        await self._send_text(text)
                if seq is not None:
                    self.written_seq = seq
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.debug("write to %s failed: %s", self.client_id, error)
            self.closed = True
        finally:
            self._writer = None

    def disconnect(self, code: int, reason: str) -> None:
        """Stop writing and close the connection with ``code``."""
        if self.closed:
            return
        self.closed = True
        self._backlog.clear()
        self._backlog_messages = 0
        self.backlog_bytes = 0
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        log.info("disconnecting client", extra={"client_id": self.client_id, "code": code, "reason": reason})
        self._closing = asyncio.get_running_loop().create_task(self._close(code, reason))


class Fanout:
    """The set of connected clients and the broadcast loop over them."""

    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        # Tallies the bridge's metrics read when scraped: plain numbers, so a broadcast
        # costs one addition per event, not a metrics call per client.
        self.slow_disconnects = 0
        self.messages_offered: dict[str, int] = {}  # by message type
        self.peak_backlog = 0  # the deepest backlog of any client that has left
        # Broadcast passes and the frames they carried (more frames than passes: coalesced).
        self.passes = 0
        self.frames_passed = 0
        # Told of each subscriber leaving (the metrics take its backlog high-water mark).
        self.on_leave: Callable[[Subscriber], None] | None = None

    def add(self, subscriber: Subscriber) -> None:
        self.subscribers.add(subscriber)

    def remove(self, subscriber: Subscriber) -> None:
        """Forget ``subscriber`` (closed, or its connection ended); once, whichever comes first."""
        if subscriber not in self.subscribers:
            return
        self.subscribers.discard(subscriber)
        self.slow_disconnects += subscriber.too_slow
        self.peak_backlog = max(self.peak_backlog, subscriber.high_water)
        if self.on_leave is not None:
            self.on_leave(subscriber)

    async def close_all(self, code: int, reason: str, within: float) -> None:
        """Disconnect every client with ``code`` and wait, at most ``within`` seconds, for
        the closes to be written (a client that does not read may never take its close)."""
        subscribers = tuple(self.subscribers)
        for subscriber in subscribers:
            subscriber.disconnect(code, reason)
            self.remove(subscriber)
        closing = [subscriber.closing for subscriber in subscribers if subscriber.closing is not None]
        if closing:
            await asyncio.wait(closing, timeout=within)

    def broadcast(self, frame: Frame) -> None:
        self.broadcast_batch((frame,))

    def broadcast_batch(self, frames: Sequence[Frame]) -> None:
        """One pass over the clients for ``frames`` (in order): each client gets those it
        wants in one write."""
        if not frames:
            return
        subscribers = tuple(self.subscribers)
        offered = self.messages_offered
        for frame in frames:
            offered[frame.type] = offered.get(frame.type, 0) + len(subscribers)
        self.passes += 1
        self.frames_passed += len(frames)
        if len(frames) == 1:
            frame = frames[0]
            for subscriber in subscribers:
                subscriber.deliver(frame)
                if subscriber.closed:
                    self.remove(subscriber)
            return
        batch = Batch(frames)
        for subscriber in subscribers:
            subscriber.offer(batch)
            if subscriber.closed:
                self.remove(subscriber)
