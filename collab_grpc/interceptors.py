"""The server's interceptors.

Auth: every CollaborationService call needs a credential. Health checking and
reflection stay open (load balancers and grpcurl-style tools use them before they hold
a token); they reveal no state.

Observing (outermost): a request id for every call and every line it logs, calls
counted by method and status code, latency histograms, failed and slow calls logged.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from collab_grpc.auth import Authenticator, token_from_headers
from collab_grpc.errors import CollabError
from collab_grpc.logs import REQUEST_ID, request_id_from_metadata
from collab_grpc.metrics import rpc_series
from collab_grpc.servicer import STATUS_FOR_ERROR, WRITE_METHODS, Context

__all__ = ["SLOW_RPC_SECONDS", "AuthInterceptor", "ObservingInterceptor"]

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

log = logging.getLogger("collab_grpc.auth")

SERVICE_PREFIX = "/collab.v1.CollaborationService/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _refusal(handler: Handler, code: grpc.StatusCode, details: str) -> Handler:
    """A handler of the same shape as ``handler`` that only ends the call with ``code``."""

    async def refuse(_request: Any, context: Context) -> None:
        await context.abort(code, details)

    async def refuse_stream(_request: Any, context: Context) -> Any:
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator, as streams expect

    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, deserializer, serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, deserializer, serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, deserializer, serializer)


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in the type stubs
    _ServerInterceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_ServerInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES) or not self.authenticator.enabled:
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        headers = {key: value for key, value in metadata if isinstance(value, str)}
        name = method.removeprefix(SERVICE_PREFIX)
        # Anything not known to be a read needs write access: deny by default.
        write = name in WRITE_METHODS or not method.startswith(SERVICE_PREFIX)
        try:
            self.authenticator.require(token_from_headers(headers), write=write)
        except CollabError as error:
            log.warning("refused %s: %s", method, error, extra={"rpc": method, "reason": str(error)})
            return _refusal(handler, STATUS_FOR_ERROR[type(error)], str(error))
        return handler


# A unary call taking longer than this is logged as slow.
SLOW_RPC_SECONDS = 1.0
# Statuses that say the server (or what it depends on) failed rather than the caller:
# logged as warnings; the callers' mistakes (NOT_FOUND, INVALID_ARGUMENT...) as info.
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
# Ends that are no failure to report: a client going away ends its stream with CANCELLED.
_QUIET_CODES = frozenset({grpc.StatusCode.OK, grpc.StatusCode.CANCELLED})

rpc_log = logging.getLogger("collab_grpc.rpc")

# A handler's behaviour attribute, and how to make a handler of that kind around another.
_HANDLER_KINDS: tuple[tuple[str, Callable[..., Handler]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


class _Call:
    """One RPC under observation: its labels, its request id and its clock."""

    __slots__ = ("method", "request_id", "series", "slow_seconds", "started", "timed")

    def __init__(self, method: str, request_id: str, *, timed: bool, slow_seconds: float) -> None:
        self.method = method
        self.series = rpc_series(method)
        self.request_id = request_id
        # A server stream's duration is how long the client stayed, not a latency.
        self.timed = timed
        self.slow_seconds = slow_seconds
        self.started = 0.0

    def begin(self) -> None:
        REQUEST_ID.set(self.request_id)
        self.series.in_flight.inc()
        self.started = time.perf_counter()

    def end(self, context: Context, error: BaseException | None) -> None:
        seconds = time.perf_counter() - self.started
        code: grpc.StatusCode | None = context.code()  # set by abort() or set_code()
        if code is None:
            if error is None:
                code = grpc.StatusCode.OK
            elif isinstance(error, asyncio.CancelledError | GeneratorExit):
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN
        self.series.in_flight.dec()
        self.series.finished(code).inc()
        if self.timed:
            self.series.duration.observe(seconds)
        slow = self.timed and seconds >= self.slow_seconds
        if code in _QUIET_CODES and not slow and not rpc_log.isEnabledFor(logging.DEBUG):
            return
        fields: dict[str, Any] = {"rpc": self.method, "code": code.name, "duration_ms": round(seconds * 1000, 3)}
        if code not in _QUIET_CODES:
            fields["details"] = context.details() or ""
            level = logging.WARNING if code in _SERVER_FAULTS else logging.INFO
            rpc_log.log(level, "rpc failed: %s %s", self.method, code.name, extra=fields)
        elif slow:
            rpc_log.warning("slow rpc: %s took %.3f s", self.method, seconds, extra=fields)
        else:
            rpc_log.debug("rpc: %s %s", self.method, code.name, extra=fields)


def _asynchronous(handler: Handler) -> bool:
    """Whether the handler's behaviour is a coroutine or async generator function (what
    the observing wrappers await)."""
    behaviours = (getattr(handler, kind) for kind, _ in _HANDLER_KINDS)
    behaviour = next((b for b in behaviours if b is not None), None)
    return inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)


def _observed(handler: Handler, call: _Call) -> Handler:
    """``handler`` with ``call`` begun before and ended after its behaviour."""

    def around(behaviour: Callable[[Any, Context], Awaitable[Any]]) -> Callable[[Any, Context], Awaitable[Any]]:
        async def run(request: Any, context: Context) -> Any:
            call.begin()
            try:
                result = await behaviour(request, context)
            except BaseException as error:
                call.end(context, error)
                raise
            call.end(context, None)
            return result

        return run

    def around_stream(behaviour: Callable[[Any, Context], AsyncIterator[Any]]) -> Callable[[Any, Context], Any]:
        async def run(request: Any, context: Context) -> AsyncIterator[Any]:
            call.begin()
            try:
                async for response in behaviour(request, context):
                    yield response
            except BaseException as error:
                call.end(context, error)
                raise
            call.end(context, None)

        return run

    def wrap(behaviour: Any) -> Any:
        if inspect.isasyncgenfunction(behaviour):
            return around_stream(behaviour)
        return around(behaviour)

    for kind, make_handler in _HANDLER_KINDS:
        if behaviour := getattr(handler, kind):
            return make_handler(wrap(behaviour), handler.request_deserializer, handler.response_serializer)
    return handler


class ObservingInterceptor(_ServerInterceptor):
    """Put first, so that it also sees the calls the auth interceptor refuses."""

    def __init__(self, slow_seconds: float = SLOW_RPC_SECONDS) -> None:
        self.slow_seconds = slow_seconds

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        metadata = handler_call_details.invocation_metadata or ()
        request_id = request_id_from_metadata(metadata)
        # The interceptors after this one, and the handler, run in this call's own task:
        # the auth interceptor's refusals are logged with the request id too.
        REQUEST_ID.set(request_id)
        handler = await continuation(handler_call_details)
        if handler is None or not _asynchronous(handler):
            return handler  # an unknown method (UNIMPLEMENTED), or a synchronous handler
        method: str = handler_call_details.method
        timed = not handler.unary_stream and not handler.stream_stream
        call = _Call(
            method.removeprefix(SERVICE_PREFIX).lstrip("/"), request_id, timed=timed, slow_seconds=self.slow_seconds
        )
        return _observed(handler, call)
