"""The bridge's own limits on what one client may take.

- BodySizeLimit: a REST request body over the cap gets 413 with a JSON body, nothing called.
- ConnectionLimit: open WebSocket and SSE connections per token; one more is refused
  (WebSocket close 4429, SSE HTTP 429) until one of them closes.
- MessageRate: messages one WebSocket connection may send per second (a token bucket);
  one over the rate is dropped and answered with an `error`, and a connection that keeps
  flooding is closed with 1008. The same bucket counts a connection's frames (pings,
  pongs and fragments too) in bridge/edge.py.
- ThrottledLog: one log line per kind of refusal every few seconds, however many happen.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import time
from collections import Counter, deque
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from bridge.credentials import Credential, token_of

__all__ = [
    "FLOOD_FACTOR",
    "FLOOD_SECONDS",
    "Admission",
    "BodySizeLimit",
    "ConnectionLimit",
    "ConnectionSlot",
    "MessageRate",
    "ThrottledLog",
    "token_key",
]


class _TooLarge(BaseException):
    """Raised from ``receive`` once a body without Content-Length outgrows the cap. Not
    an Exception: FastAPI turns any Exception raised while it reads a body into a 400
    ("There was an error parsing the body"); this one must reach BodySizeLimit (413)."""


class BodySizeLimit:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {"detail": f"request body is larger than {self.max_bytes} bytes", "code": "PAYLOAD_TOO_LARGE"}
        ).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._refuse(send)
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)


def token_key(credential: Credential) -> str:
    """The token a connection authenticates with, however it was sent (``?token=``,
    ``Authorization: Bearer``, ``X-API-Key``); "" for none. Connections are counted per
    token, so the same token sent two ways shares one budget."""
    return token_of(credential)


class ConnectionSlot:
    """One open connection's place in its token's budget; released once, however the
    connection ends."""

    __slots__ = ("_key", "_limit")

    def __init__(self, limit: ConnectionLimit, key: str) -> None:
        self._limit: ConnectionLimit | None = limit
        self._key = key

    def release(self) -> None:
        if self._limit is not None:
            self._limit.release(self._key)
            self._limit = None


class ConnectionLimit:
    """At most ``per_token`` open WebSocket and SSE connections per token (0: no limit).

    Each connection costs the bridge a socket, memory and a place in every broadcast; the
    cap keeps one leaked or runaway token (a page reconnecting in a loop without closing)
    from taking a bridge's every connection from everyone else."""

    def __init__(self, per_token: int) -> None:
        self.per_token = per_token
        self._open: Counter[str] = Counter()
        self.refused = 0  # connections refused so far: a tally the metrics can read

    def open_for(self, key: str) -> int:
        return self._open[key]

    def refusal_for(self, key: str) -> str | None:
        """Why a new connection with this token is refused (counted), or None while it has
        slots left. Asked before the snapshot RPC a connection costs the server, so a page
        reconnecting in a loop is refused without one; ``take`` still decides, after the
        token is verified.

        Connections without a credential (only possible with the server's auth off) are
        counted but never refused: they would all share one budget, a bridge-wide cap."""
        if not (self.per_token and key and self._open[key] >= self.per_token):
            return None
        self.refused += 1
        return self.refusal()

    def take(self, key: str) -> ConnectionSlot | None:
        """A slot for one more connection with this token, or None when it has none left."""
        if self.refusal_for(key) is not None:
            return None
        self._open[key] += 1
        return ConnectionSlot(self, key)

    def refusal(self) -> str:
        return (
            f"too many connections with this token: {self.per_token} are open, the most one token may hold; "
            "close one, or use another token"
        )

    def release(self, key: str) -> None:
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]  # nothing kept for tokens no longer connected


# A connection is closed for flooding once FLOOD_FACTOR x its rate x FLOOD_SECONDS of its
# messages were dropped within FLOOD_SECONDS (1,000 at 20/s): its excess alone ran at ten
# times what it may, for seconds, after being told (every dropped message is answered).
FLOOD_FACTOR = 10
FLOOD_SECONDS = 5.0


class Admission(enum.Enum):
    ACCEPT = "accept"
    DROP = "drop"  # over the rate: answered with an error, not handled
    CLOSE = "close"  # flooding: the connection is closed


class MessageRate:
    """A token bucket over one WebSocket connection's messages: ``per_second`` on average,
    bursts of up to twice that (at least 1). ``per_second`` 0: no limit."""

    def __init__(self, per_second: float, now: float, unit: str = "messages", fate: str = "dropped") -> None:
        self.per_second = per_second
        # What is counted, and what becomes of one over the rate (for the close's reason).
        self.unit = unit
        self.fate = fate
        self.burst = max(1.0, 2 * per_second)
        self._tokens = self.burst
        self._at = now
        flood = max(1, math.ceil(FLOOD_FACTOR * per_second * FLOOD_SECONDS))
        # When the newest ``flood`` drops happened; made at the first drop, as most
        # connections never have one.
        self._flood = flood
        self._drops: deque[float] | None = None
        self.retry_after = 0.0  # after a drop: seconds until a message would be accepted

    def admit(self, now: float) -> Admission:
        if not self.per_second:
            return Admission.ACCEPT
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return Admission.ACCEPT
        self.retry_after = (1 - self._tokens) / self.per_second
        if self._drops is None:
            self._drops = deque(maxlen=self._flood)
        self._drops.append(now)
        if len(self._drops) == self._flood and now - self._drops[0] <= FLOOD_SECONDS:
            return Admission.CLOSE
        return Admission.DROP

    def refusal(self) -> str:
        return (
            f"rate limited: more than {self.per_second:g} {self.unit} per second (bursts of {self.burst:g}); "
            f"this message was dropped, retry in {self.retry_after:.2f} s"
        )

    def flood_reason(self) -> str:
        return (
            f"flooding: {self._flood} {self.unit} over the rate of {self.per_second:g} per second "
            f"were {self.fate} within {FLOOD_SECONDS:g} s"
        )


class ThrottledLog:
    """A warning for a kind of event (a timeout, a refusal) at most every ``interval``
    seconds, saying how many happened since the last line: a client causing thousands a
    second costs one line, and none is hidden."""

    def __init__(self, logger: logging.Logger, message: str, interval: float = 10.0) -> None:
        self.logger = logger
        self.message = message
        self.interval = interval
        self.total = 0
        self._unlogged = 0
        self._logged_at = -math.inf
        self._fields: dict[str, object] = {}
        self._flush_at: asyncio.TimerHandle | None = None

    def record(self, **fields: object) -> None:
        """One more event; ``fields`` (of the newest) go on the line."""
        self.total += 1
        self._unlogged += 1
        self._fields = fields
        if time.monotonic() - self._logged_at >= self.interval:
            self._flush()
        elif self._flush_at is None:
            # The ones that follow a line are reported when the interval is over.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._flush_at = loop.call_later(self._logged_at + self.interval - time.monotonic(), self._flush)

    def _flush(self) -> None:
        self._flush_at = None
        if self._unlogged:
            extra = {**self._fields, "count": self._unlogged, "total": self.total}
            self.logger.warning("%s: %d since the last report", self.message, self._unlogged, extra=extra)
            self._unlogged = 0
            self._logged_at = time.monotonic()
