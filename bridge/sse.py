"""`GET /api/v1/collaboration/events`: the same event stream as Server-Sent Events, for
curl, proxies and clients without WebSocket. Served from the same fan-out as the
WebSocket: `id:` is the event's seq, and a reconnecting client sends it back as
`Last-Event-ID` to resume (`?epoch=` pins the epoch; default: the current one).

`?types=` takes the names `subscribe` takes, comma-separated.

When the credential expires (a JWT's `exp`) or the server stops accepting it, the stream
ends with an `error` event (`data`: the guide's error shape, with `code` 4401 or 4403)
and no more: a browser's EventSource then reconnects once, is answered 401/403, and
stops; it does not retry in a loop.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

import grpc
from starlette.types import Receive, Scope, Send

from bridge.credential_watch import CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED
from bridge.credentials import InvalidCredential, credential_from_scope, query_params
from bridge.errors import HubError, ServerUnavailable, hub_error_response
from bridge.fanout import ClientFilter, Frame, Subscriber
from bridge.limits import token_key
from bridge.mapping import dumps, iso_now
from bridge.origins import OriginPolicy
from bridge.protocol import error, subscribe
from bridge.runtime import BridgeRuntime

__all__ = ["EventStream", "sse_encode"]

log = logging.getLogger("bridge.sse")


def sse_encode(frame: Frame) -> str:
    """Encode ``frame`` as one Server-Sent Event: its seq as ``id:``, its type as ``event:``."""
    head = f"id: {frame.seq}\n" if frame.seq is not None else ""
    return f"{head}event: {frame.type}\ndata: {frame.text}\n\n"


class EventStream:
    """The event-stream endpoint (a plain ASGI app); ``clients`` counts the streams open now."""

    def __init__(self, runtime: BridgeRuntime) -> None:
        self.runtime = runtime
        self.origins = OriginPolicy(runtime.config.allowed_origins)
        self.clients = 0  # streams open now, for the metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # However the stream ends, what it holds (its place in its token's connection
        # budget) is released.
        with ExitStack() as held:
            await self._serve(scope, receive, send, held)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, held: ExitStack) -> None:
        """Admit the request and stream events to it; a refusal before the 200 is an HTTP error."""
        if (refused_origin := self.origins.refusal(scope)) is not None:
            await hub_error_response(HubError(403, "PERMISSION_DENIED", refused_origin))(scope, receive, send)
            return
        query = query_params(scope)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        hub = self.runtime.hub
        event_filter = ClientFilter()
        if query.get("types"):
            names = [name.strip() for name in query["types"].split(",") if name.strip()]
            reply, event_filter = subscribe(names, event_filter)
            if reply["type"] == "error":
                await hub_error_response(HubError(400, "INVALID_ARGUMENT", reply["error"]))(scope, receive, send)
                return
        last_event_id = headers.get("last-event-id") or query.get("last_event_id")
        since: int | None = None
        if last_event_id:
            try:
                since = int(last_event_id)
                if since < 0:  # no such seq; it would not even fit the resume request
                    raise ValueError
            except ValueError:
                detail = f"Last-Event-ID must be an integer seq (0 or more), got {last_event_id!r}"
                await hub_error_response(HubError(400, "INVALID_ARGUMENT", detail))(scope, receive, send)
                return
        try:
            credential = credential_from_scope(scope, query, self.runtime.config.max_credential_bytes)
        except InvalidCredential as refused:
            log.info("event stream refused", extra={"code": 401, "reason": str(refused)})
            detail = f"invalid credential: {refused}"
            await hub_error_response(HubError(401, "UNAUTHENTICATED", detail))(scope, receive, send)
            return
        limit = self.runtime.connection_limit
        if (too_many := limit.refusal_for(token_key(credential))) is not None:
            await hub_error_response(HubError(429, "RESOURCE_EXHAUSTED", too_many))(scope, receive, send)
            return
        try:
            snapshot = await self.runtime.fetch_snapshot(credential)
        except (grpc.aio.AioRpcError, ServerUnavailable) as failure:
            await hub_error_response(HubError.from_rpc(failure))(scope, receive, send)
            return
        slot = limit.take(token_key(credential))
        if slot is None:
            await hub_error_response(HubError(429, "RESOURCE_EXHAUSTED", limit.refusal()))(scope, receive, send)
            return
        held.callback(slot.release)
        # The 200 goes out with the first message: until then a refusal (a resume that
        # must wait for its turn, say) can still be an HTTP status with Retry-After.
        started = False

        async def start() -> None:
            nonlocal started
            if not started:
                started = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no"),
                        ],
                    }
                )

        async def send_text(text: str) -> None:
            await start()
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

        async def close(code: int, reason: str) -> None:
            await start()
            last = b""
            if code in (CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN):  # the credential ended: say so
                last = f"event: error\ndata: {dumps(error(reason, code=code))}\n\n".encode()
            await send({"type": "http.response.body", "body": last, "more_body": False})

        subscriber = Subscriber(
            send_text, close, max_backlog=self.runtime.config.client_backlog, client_id="sse", encode=sse_encode
        )
        subscriber.filter = event_filter
        established: dict[str, Any] = {"type": "connection_established", "client_type": "sse", "timestamp": iso_now()}
        try:
            watched = await self.runtime.credentials.enter(token_key(credential), credential, subscriber.disconnect)
            held.callback(watched.release)
            await self.runtime.open_client(
                subscriber, snapshot, credential, established, since, query.get("epoch") or hub.epoch
            )
        except (grpc.aio.AioRpcError, ServerUnavailable) as failure:
            if started:
                await close(0, "")
            else:
                await hub_error_response(HubError.from_rpc(failure))(scope, receive, send)
            return
        await self._wait_for_disconnect(receive, subscriber)

    async def _wait_for_disconnect(self, receive: Receive, subscriber: Subscriber) -> None:
        """Hold the stream open until the client leaves, then take it out of the hub."""
        self.clients += 1
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        finally:
            self.clients -= 1
            self.runtime.hub.leave(subscriber)
            subscriber.closed = True
