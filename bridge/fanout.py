"""Fan-out: one serialised message written to every WebSocket client that wants it.

While a client keeps up, a write completes synchronously (the ASGI server puts the frame
in the socket's buffer without suspending), so a broadcast is one loop over the clients
with no task and no queue. Only when a client's write would block (its socket buffer is
full: it is not reading) does that client get a writer task and a bounded backlog; if
the backlog overflows, the client is disconnected with CLOSE_TOO_SLOW and can reconnect
and resume. Nobody else ever waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any

from bridge.wire import DirectWrite, text_frame

__all__ = ["CLOSE_TOO_SLOW", "DEFAULT_BACKLOG_BYTES", "ClientFilter", "Fanout", "Frame", "Subscriber"]

log = logging.getLogger("bridge.fanout")

# Close code for a client that fell too far behind: reconnect, resuming with since/epoch.
CLOSE_TOO_SLOW = 4008

# The characters of text a client that is behind may have waiting (COLLAB_CLIENT_BACKLOG_BYTES).
DEFAULT_BACKLOG_BYTES = 4 * 1024 * 1024


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
    """One WebSocket client: its filter, its position, and its backlog if it is behind."""

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
        self._send_text = send_text
        self._close = close
        self._backlog: deque[tuple[str, int | None]] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    @property
    def behind(self) -> bool:
        return self._writer is not None

    @property
    def backlog(self) -> int:
        return len(self._backlog)

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

    def send_frame(self, frame: Frame) -> None:
        """Write ``frame`` whatever the filter says (the connection's own messages)."""
        if self.direct is not None and self._writer is None and not self.closed and self.direct(frame.wire()):
            if frame.seq is not None:
                self.written_seq = frame.seq
            return
        self.write(frame.text if self.encode is None else self.encode(frame), frame.seq)

    def write(self, text: str, seq: int | None = None) -> None:
        """Write now if the client keeps up, else queue behind what is already waiting."""
        if self.closed:
            return
        if self._writer is not None:
            if len(self._backlog) >= self.max_backlog:
                self._too_slow(f"more than {self.max_backlog} messages")
                return
            if self._backlog and self.backlog_bytes + len(text) > self.max_backlog_bytes:
                self._too_slow(f"more than {self.max_backlog_bytes} bytes of messages")
                return
            self._backlog.append((text, seq))
            self.backlog_bytes += len(text)
            self.high_water = max(self.high_water, len(self._backlog))
            return
        coro = self._send_text(text)
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

    async def _catch_up(self, blocked: Awaitable[None], seq: int | None) -> None:
        try:
            await blocked
            if seq is not None:
                self.written_seq = seq
            while self._backlog:
                text, seq = self._backlog.popleft()
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
        subscribers = tuple(self.subscribers)
        self.messages_offered[frame.type] = self.messages_offered.get(frame.type, 0) + len(subscribers)
        for subscriber in subscribers:
            subscriber.deliver(frame)
            if subscriber.closed:
                self.remove(subscriber)
