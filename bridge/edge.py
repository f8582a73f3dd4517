"""The bridge's edge: what uvicorn leaves unbounded on a connection, bounded.

uvicorn (h11 for HTTP, websockets-sansio for WebSocket) closes an idle keep-alive
connection (``timeout_keep_alive``) and caps a message's size, but it has no time limit
for a request's head or body, no cap on open connections, and it answers every ping and
assembles every fragment however fast a client sends them. Two small subclasses of its
protocols add that, configured by EdgeLimits (from the bridge's settings):

- a request's head must arrive within ``header_timeout`` seconds of the connection
  opening (or of the previous answer), its body within ``body_timeout`` of its head;
  otherwise the connection is closed, with 408 if a request was begun;
- at most ``max_connections`` open connections (HTTP and WebSocket); one more is
  answered 503 and closed at once. ``check_open_file_limit`` keeps the cap below the
  process's open-file limit, so accepting never fails for want of a descriptor;
- every WebSocket frame (pings, pongs and fragments included) takes a place in the
  connection's frame budget (bridge/limits.MessageRate); a client that floods far over it
  is closed with 1008, as for messages;
- a client whose pongs pile up unread (its socket is not draining) is cut off with
  4008, as a slow reader is (bridge/fanout.py);
- a connection that takes nothing it is sent for ``send_timeout`` seconds (writing stays
  paused) is dropped: asyncio's close waits for a full buffer to drain, so one that
  never reads would otherwise stay open, and count against the cap, for good.

Each of these logs a line (ThrottledLog: at most one every few seconds, with a count).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from bridge.config import BridgeConfig
from bridge.fanout import CLOSE_TOO_SLOW
from bridge.limits import Admission, MessageRate, ThrottledLog

__all__ = [
    "FILE_HEADROOM",
    "BoundedH11Protocol",
    "BoundedWebSocketProtocol",
    "EdgeLimits",
    "check_open_file_limit",
    "edge_protocols",
]

log = logging.getLogger("bridge.edge")

# Descriptors the process needs besides its client connections: the listening sockets,
# the channel to the server, log and data files, the event loop's own, and refused
# connections on their way out (REFUSED_LINGERING at most).
FILE_HEADROOM = 128
# Refused connections read what the client sent before closing (closing unread data
# resets the connection, and the client might lose the answer); at most this many at
# once, for at most REFUSED_LINGER seconds; beyond that they are closed at once.
REFUSED_LINGERING = 64
REFUSED_LINGER = 1.0
# A connection cut off (flooding, not reading) has this long to take its close frame
# before its socket is dropped with whatever it did not read.
CUT_OFF_GRACE = 2.0
CLOSE_POLICY_VIOLATION = 1008


def _http_answer(status: int, phrase: str, detail: str, code: str, extra: str = "") -> bytes:
    body = json.dumps({"detail": detail, "code": code}).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"{extra}content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class EdgeLimits:
    """One server's connection limits, and the tallies and log lines of their refusals."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    send_timeout: float = 30.0
    max_connections: int = 4096
    frames_per_second: float = 100.0
    max_unread_pong_bytes: int = 64 * 1024
    refused_lingering: int = 0
    timeouts: ThrottledLog = field(
        default_factory=lambda: ThrottledLog(log, "connections closed for sending a request too slowly")
    )
    stalls: ThrottledLog = field(
        default_factory=lambda: ThrottledLog(log, "connections dropped for reading nothing they were sent")
    )
    refusals: ThrottledLog = field(
        default_factory=lambda: ThrottledLog(log, "connections refused: the bridge holds its most open connections")
    )
    floods: ThrottledLog = field(
        default_factory=lambda: ThrottledLog(log, "WebSocket clients closed for flooding frames (1008)")
    )
    early_data: ThrottledLog = field(
        default_factory=lambda: ThrottledLog(log, "WebSocket clients dropped for sending before the handshake's answer")
    )
    pong_cutoffs: ThrottledLog = field(
        default_factory=lambda: ThrottledLog(log, "WebSocket clients cut off for leaving their pongs unread (4008)")
    )

    @classmethod
    def from_config(cls, config: BridgeConfig, max_connections: int) -> EdgeLimits:
        return cls(
            header_timeout=config.header_timeout,
            body_timeout=config.body_timeout,
            send_timeout=config.send_timeout,
            max_connections=max_connections,
            frames_per_second=config.ws_frames_per_second,
            max_unread_pong_bytes=config.ws_max_unread_pong_bytes,
        )


def check_open_file_limit(wanted: int) -> tuple[int, str | None]:
    """The connection cap the process can keep, and a warning when it is below
    ``wanted``. The soft open-file limit is raised (up to the hard one) when the cap and
    FILE_HEADROOM need more; raises ValueError when not even a small cap fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + FILE_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted, None
    usable = soft - FILE_HEADROOM
    if usable < 16:
        raise ValueError(
            f"the open-file limit ({soft}, hard {hard}) leaves no room for connections: the bridge needs "
            f"{FILE_HEADROOM} descriptors of its own; raise it (ulimit -n)"
        )
    return usable, (
        f"max-connections lowered from {wanted} to {usable}: the open-file limit is {soft} (hard {hard}) and "
        f"the bridge keeps {FILE_HEADROOM} for itself; raise it (ulimit -n) to allow more"
    )


class _SendWatchdog:
    """Drops a connection whose writing stays paused (the client reads nothing) for
    ``send_timeout`` seconds; mixed into both protocols, before uvicorn's class."""

    edge: ClassVar[EdgeLimits]
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    client: tuple[str, int] | None
    _stalled: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._stalled is None:
            self._stalled = self.loop.call_later(self.edge.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self._cancel_stall()

    def _cancel_stall(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _send_timed_out(self) -> None:
        self._stalled = None
        self.edge.stalls.record(client=f"{self.client[0]}:{self.client[1]}" if self.client else "")
        self.transport.abort()


class BoundedH11Protocol(_SendWatchdog, H11Protocol):
    """uvicorn's HTTP/1.1 protocol with header and body timeouts and the connection cap."""

    edge: ClassVar[EdgeLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None  # "head" or "body" while a deadline runs
        self._refused = False
        self._lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.edge.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._follow()

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused = True
        self.transport = transport
        edge = self.edge
        edge.refusals.record(open=len(self.connections), limit=edge.max_connections)
        detail = (
            f"the bridge holds its most open connections ({edge.max_connections}, COLLAB_MAX_CONNECTIONS); "
            "retry shortly"
        )
        transport.write(_http_answer(503, "Service Unavailable", detail, "UNAVAILABLE", "retry-after: 1\r\n"))
        if edge.refused_lingering >= REFUSED_LINGERING:
            transport.close()
            return
        edge.refused_lingering += 1
        self._lingering = True
        self._deadline = self.loop.call_later(REFUSED_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self.transport.close()  # what the client sent is read: the close is a clean one
            return
        super().data_received(data)
        self._follow()

    def eof_received(self) -> None:
        if self._refused:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._cancel_stall()
        if self._refused:
            if self._lingering:
                self._lingering = False
                self.edge.refused_lingering -= 1
            return
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._cancel_deadline()
        self._waiting_for = None
        super().handle_websocket_upgrade(event)
        # uvicorn hands the WebSocket protocol the request's head only; whatever the
        # client sent after it goes there too (and is refused: see data_received there).
        early, _ = self.conn.trailing_data
        if early:
            self.transport.get_protocol().data_received(early)  # type: ignore[attr-defined]

    def _follow(self) -> None:
        """Run the deadline of what the connection is waiting for from the client: a
        request's head, or its body; none while the app answers."""
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            self._cancel_deadline()
            return
        state = self.conn.their_state
        waiting_for = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if waiting_for == self._waiting_for:
            return
        self._cancel_deadline()
        self._waiting_for = waiting_for
        if waiting_for is not None:
            seconds = self.edge.header_timeout if waiting_for == "head" else self.edge.body_timeout
            self._deadline = self.loop.call_later(seconds, self._timed_out)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        waiting_for, self._waiting_for = self._waiting_for, None
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else ""
        self.edge.timeouts.record(waiting_for=waiting_for, client=client)
        seconds = self.edge.header_timeout if waiting_for == "head" else self.edge.body_timeout
        detail = f"the request's {waiting_for} did not arrive within {seconds:g} s"
        answer = _http_answer(408, "Request Timeout", detail, "DEADLINE_EXCEEDED")
        if waiting_for == "head":
            begun = bool(self.conn.trailing_data[0])  # bytes of a request head not yet complete
            if begun:
                self.transport.write(answer)
        elif self.cycle is not None and not self.cycle.response_started:
            self.transport.write(answer)
        if self.cycle is not None:
            # The app waiting for the body sees the client gone; what it still sends is dropped.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()


class BoundedWebSocketProtocol(_SendWatchdog, WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with a frame budget and a bound on unread pongs."""

    edge: ClassVar[EdgeLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frame_rate = MessageRate(self.edge.frames_per_second, time.monotonic(), unit="frames", fate="sent")
        self.unread_pong_bytes = 0  # written while the socket's buffer was full

    def data_received(self, data: bytes) -> None:
        if self.handshake_initiated and not self.handshake_complete:
            # RFC 6455 (4.1): a client sends nothing after its opening handshake until it
            # has the server's answer. Frames parsed now would be answered before the
            # handshake (pongs ahead of the 101), or fail the parser in a state uvicorn
            # does not expect.
            self.edge.early_data.record(client=self._client_text())
            self.transport.abort()
            return
        super().data_received(data)

    def _admit(self) -> bool:
        """Whether to handle the frame just parsed; counts it against the frame budget."""
        if self.close_sent or self.disconnected:
            return False
        if self.frame_rate.admit(time.monotonic()) is Admission.CLOSE:
            self.edge.floods.record(client=self._client_text())
            self._cut_off(CLOSE_POLICY_VIOLATION, self.frame_rate.flood_reason())
            return False
        return True

    def handle_text(self, event: Any) -> None:
        if self._admit():
            super().handle_text(event)

    def handle_bytes(self, event: Any) -> None:
        if self._admit():
            super().handle_bytes(event)

    def handle_cont(self, event: Any) -> None:
        if self._admit():
            super().handle_cont(event)

    def handle_pong(self, event: Any) -> None:
        if self._admit():
            super().handle_pong(event)

    def handle_ping(self) -> None:
        if not self._admit():
            return
        before = self.transport.get_write_buffer_size()
        super().handle_ping()  # writes the pong websockets queued on parsing the ping
        if self.writable.is_set():
            return
        # Pongs written while the client reads nothing (its socket's buffer is full) pile
        # up here: a client that pings without reading would grow them without end. A
        # client slow to take a large message but sending few pings is not cut off.
        self.unread_pong_bytes += self.transport.get_write_buffer_size() - before
        if self.unread_pong_bytes > self.edge.max_unread_pong_bytes:
            self.edge.pong_cutoffs.record(client=self._client_text())
            self._cut_off(
                CLOSE_TOO_SLOW,
                f"too slow: more than {self.edge.max_unread_pong_bytes} bytes of pongs left unread; reconnect",
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        self.unread_pong_bytes = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_stall()
        super().connection_lost(exc)

    def _client_text(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else ""

    def _cut_off(self, code: int, reason: str) -> None:
        """Send the close with ``code`` now; drop the socket CUT_OFF_GRACE seconds later.

        Until then what the client sends is read and discarded (websockets discards
        after failing a connection): closing a socket with unread data resets it at once,
        and a client still sending would lose the close frame that says why."""
        self.conn.fail(code, reason[:120])
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        # As uvicorn's close_timer, it also keeps uvicorn from closing the socket (unread
        # data and all) as soon as the app returns.
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(CUT_OFF_GRACE, self._drop)

    def _drop(self) -> None:
        self.close_timer = None
        if not self.disconnected:
            self.transport.abort()


def edge_protocols(limits: EdgeLimits) -> tuple[type[BoundedH11Protocol], type[BoundedWebSocketProtocol]]:
    """The protocol classes for uvicorn's ``http`` and ``ws``, bound to ``limits``."""

    class HTTP(BoundedH11Protocol):
        edge = limits

    class WebSocket(BoundedWebSocketProtocol):
        edge = limits

    return HTTP, WebSocket
