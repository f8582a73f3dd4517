"""`/api/v1/collaboration/ws`: the guide's WebSocket, as a plain ASGI app.

It talks ASGI directly (not through a framework's WebSocket wrapper) so that the fan-out
can write each frame with the server's own ``send``: when the client keeps up that call
finishes without suspending, and a broadcast costs no task per client.

Close codes (all with a reason text):
- 4400: bad query parameters (``since`` not an integer, ``since`` without ``epoch``);
- 4401: missing or invalid token, also on an open connection when its token expires (a
  JWT's `exp`) or the server stops accepting it (checked every
  COLLAB_CREDENTIAL_RECHECK_INTERVAL, bridge/credential_watch.py); 4403: the token may not
  read, or the page's `Origin` is not allowed (bridge/origins.py). Both come after an
  `error` message saying why;
- 4429: the token already holds its most connections (COLLAB_MAX_CONNECTIONS_PER_TOKEN);
  retry once one of them has closed;
- 4008: the client fell too far behind; reconnect with ``since``/``epoch`` to resume;
- 1008: flooding: the client kept sending far over COLLAB_WS_MESSAGES_PER_SECOND after
  its messages were dropped (each answered with an `error` with ``retry_after``);
- 1013: the hub is unavailable right now; retry later;
- 1012 ("service restart"): the bridge is shutting down; reconnect (to it or another
  bridge) and resume with ``since``/``epoch``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import ExitStack
from typing import Any

import grpc
from starlette.types import Receive, Scope, Send

from bridge.credentials import InvalidCredential, credential_from_scope, query_params
from bridge.errors import ServerUnavailable
from bridge.fanout import Subscriber
from bridge.limits import Admission, MessageRate, token_key
from bridge.mapping import dumps, iso_now
from bridge.origins import OriginPolicy
from bridge.protocol import error, handle_client_message
from bridge.runtime import BridgeRuntime
from bridge.wire import direct_writer

__all__ = [
    "CLOSE_BAD_REQUEST",
    "CLOSE_FORBIDDEN",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_SERVICE_RESTART",
    "CLOSE_TOO_MANY",
    "CLOSE_TRY_AGAIN",
    "CLOSE_UNAUTHORIZED",
    "CollaborationWebSocket",
    "close_for",
]

log = logging.getLogger("bridge.websocket")

CLOSE_BAD_REQUEST = 4400
CLOSE_TOO_MANY = 4429
CLOSE_POLICY_VIOLATION = 1008
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TRY_AGAIN = 1013
CLOSE_SERVICE_RESTART = 1012
# How long a close waits for a client that is not reading (its socket buffer full).
CLOSE_TIMEOUT = 60.0

# Closes an open connection gets an `error` message before (as every refusal at connect).
_SAY_WHY_FIRST = frozenset({CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN})

_CLOSE_FOR_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: CLOSE_UNAUTHORIZED,
    grpc.StatusCode.PERMISSION_DENIED: CLOSE_FORBIDDEN,
}


def close_for(failure: grpc.aio.AioRpcError | ServerUnavailable) -> tuple[int, str]:
    """Return the close code and reason for a call made on a connecting client's behalf that failed."""
    if isinstance(failure, ServerUnavailable) or failure.code() == grpc.StatusCode.UNAVAILABLE:
        return CLOSE_TRY_AGAIN, ServerUnavailable.of(failure).detail
    code = _CLOSE_FOR_STATUS.get(failure.code(), CLOSE_TRY_AGAIN)
    reason = failure.details() or failure.code().name
    if code == CLOSE_TRY_AGAIN:
        reason = f"the hub is unavailable: {reason}"
    return code, reason


class CollaborationWebSocket:
    """The WebSocket endpoint: admits a connection, opens it from a snapshot (or resumes
    it) and answers its messages; ``connections``, ``accepted`` and ``refused`` are its tallies."""

    def __init__(self, runtime: BridgeRuntime) -> None:
        self.runtime = runtime
        self.connections: set[Subscriber] = set()
        self.origins = OriginPolicy(runtime.config.allowed_origins)
        # Tallies for the metrics: clients started, and refusals by close code.
        self.accepted = 0
        self.refused: dict[int, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Whatever ends the connection (a refusal, the client, cancellation) releases
        # what it holds, such as its place in its token's connection budget.
        with ExitStack() as held:
            await self._serve(scope, receive, send, held)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, held: ExitStack) -> None:
        """Admit the connection (origin, query, credential, budgets), open it and converse until it ends."""
        if (await receive())["type"] != "websocket.connect":
            return
        query = query_params(scope)
        client_id = query.get("client_id") or f"client_{uuid.uuid4().hex[:12]}"
        client_type = query.get("client_type") or "general"

        async def refuse(code: int, reason: str, *, accepted: bool = False) -> None:
            """Send an `error` message saying why, then the close code (browsers see both)."""
            self.refused[code] = self.refused.get(code, 0) + 1
            log.info("websocket refused", extra={"client_id": client_id, "code": code, "reason": reason})
            if not accepted:
                await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": dumps(error(reason, code=code))})
            await send({"type": "websocket.close", "code": code, "reason": reason[:120]})

        # Before anything else: a page from a foreign origin learns nothing, costs no RPC.
        if (refused_origin := self.origins.refusal(scope)) is not None:
            await refuse(CLOSE_FORBIDDEN, refused_origin)  # refuse() logs it
            return
        since: int | None = None
        epoch = query.get("epoch", "")
        if "since" in query:
            try:
                since = int(query["since"])
                if since < 0:
                    raise ValueError
            except ValueError:
                await refuse(CLOSE_BAD_REQUEST, f"since must be a non-negative integer, got {query['since']!r}")
                return
            if not epoch:
                await refuse(CLOSE_BAD_REQUEST, "epoch is required with since")
                return
        try:
            credential = credential_from_scope(scope, query, self.runtime.config.max_credential_bytes)
        except InvalidCredential as refused:
            await refuse(CLOSE_UNAUTHORIZED, f"invalid credential: {refused}")
            return
        if (too_many := self.runtime.connection_limit.refusal_for(token_key(credential))) is not None:
            await refuse(CLOSE_TOO_MANY, too_many)
            return
        try:
            snapshot = await self.runtime.fetch_snapshot(credential)
        except (grpc.aio.AioRpcError, ServerUnavailable) as failure:
            await refuse(*close_for(failure))
            return
        # Counted once the token is known good: a wrong one is refused as such above.
        slot = self.runtime.connection_limit.take(token_key(credential))
        if slot is None:
            await refuse(CLOSE_TOO_MANY, self.runtime.connection_limit.refusal())
            return
        held.callback(slot.release)

        await send({"type": "websocket.accept"})

        def send_text(text: str) -> Any:
            return send({"type": "websocket.send", "text": text})

        async def closing(code: int, reason: str) -> None:
            if code in _SAY_WHY_FIRST:  # as a refusal at connect: the client learns why
                await send({"type": "websocket.send", "text": dumps(error(reason, code=code))})
            await send({"type": "websocket.close", "code": code, "reason": reason[:120]})

        async def close(code: int, reason: str) -> None:
            try:
                await asyncio.wait_for(closing(code, reason), CLOSE_TIMEOUT)
            except Exception as failure:  # already gone, or never reading again
                log.debug("close of %s failed: %s", client_id, failure)

        subscriber = Subscriber(
            send_text,
            close,
            max_backlog=self.runtime.config.client_backlog,
            client_id=client_id,
            direct=direct_writer(send),
        )
        established = {
            "type": "connection_established",
            "client_id": client_id,
            "client_type": client_type,
            "timestamp": iso_now(),
        }
        try:
            # Ended when its credential expires or is revoked (an `error`, then 4401).
            watched = await self.runtime.credentials.enter(token_key(credential), credential, subscriber.disconnect)
            held.callback(watched.release)
            await self.runtime.open_client(subscriber, snapshot, credential, established, since, epoch)
        except (grpc.aio.AioRpcError, ServerUnavailable) as failure:
            await refuse(*close_for(failure), accepted=True)
            return
        self.connections.add(subscriber)
        self.accepted += 1
        try:
            await self._converse(subscriber, receive)
        finally:
            self.connections.discard(subscriber)
            self.runtime.hub.leave(subscriber)
            subscriber.closed = True

    async def _converse(self, subscriber: Subscriber, receive: Receive) -> None:
        """Answer the client's messages until it disconnects, dropping them, then closing, when it floods."""
        max_bytes = self.runtime.config.max_ws_message_bytes
        rate = MessageRate(self.runtime.config.ws_messages_per_second, time.monotonic())
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message["type"] != "websocket.receive" or subscriber.closed:
                continue  # closing (flooding, too slow): what it still sends is not read
            admission = rate.admit(time.monotonic())
            if admission is Admission.DROP:
                subscriber.write(dumps(error(rate.refusal(), retry_after=round(rate.retry_after, 3))))
                continue
            if admission is Admission.CLOSE:
                subscriber.disconnect(CLOSE_POLICY_VIOLATION, rate.flood_reason())
                continue
            reply, subscriber.filter = handle_client_message(
                message.get("text"), message.get("bytes"), subscriber.filter, max_bytes
            )
            subscriber.write(dumps(reply))
