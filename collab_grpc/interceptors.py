"""The server's interceptor: what every call goes through before its handler.

In this order, for each call:
- observing: a request id for the call and every line it logs, calls counted by
  method and status code, latency histograms, failed and slow calls logged (refused
  calls too);
- auth: every call needs a credential; a method the contract marks as a read
  (``idempotency_level = NO_SIDE_EFFECTS``, collab_grpc/servicer.py READ_METHODS) needs
  read access, every other one write access, including any method nobody marked and
  other services' (deny by default). Health checking and reflection stay open (load
  balancers and grpcurl-style tools use them before they hold a token); they reveal no
  state;
- decoding: a request that could not be decoded is refused with INVALID_ARGUMENT
  (collab_grpc/decoding.py), after auth, so a call without a credential is refused as
  such whatever its body;
- handing on: what the credential grants, until when and whose (its Grant) goes to the
  handler in ``servicer.CALLER`` (a context variable: streams end when it expires,
  idempotency keys are scoped to it), and a server stream's serializer passes ``bytes``
  through, so a handler can write one serialisation to many streams.

One interceptor, and each method's handler wrapped once, on its first call: grpc.aio
runs every interceptor on every call, and three of them, each building a new handler
per call, cost a unary call ~70 µs of server CPU (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from collab_grpc.auth import Access, Authenticator, Grant, token_from_headers
from collab_grpc.decoding import Undecodable, checked, refuse, soft_deserializer
from collab_grpc.errors import CollabError
from collab_grpc.logs import REQUEST_ID, request_id_from_metadata
from collab_grpc.metrics import rpc_series
from collab_grpc.servicer import CALLER, READ_METHODS, STATUS_FOR_ERROR, Caller, Context

__all__ = ["SLOW_RPC_SECONDS", "CallInterceptor"]

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Metadata: TypeAlias = "Iterable[tuple[str, str | bytes]]"

log = logging.getLogger("collab_grpc.auth")

SERVICE_PREFIX = "/collab.v1.CollaborationService/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in the type stubs
    _ServerInterceptor = grpc.aio.ServerInterceptor

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


class _Method:
    """What the interceptor knows of one method: how to name it, whether it needs a
    credential (and write access), and how its requests are checked."""

    __slots__ = (
        "callers",
        "guarded",
        "method",
        "name",
        "per_item",
        "slow_seconds",
        "streams_requests",
        "timed",
        "write",
        "writes_bytes",
    )

    def __init__(
        self, method: str, handler: Handler, *, guarded: bool, write: bool, per_item: bool, slow_seconds: float
    ) -> None:
        self.method = method
        self.name = method.removeprefix(SERVICE_PREFIX).lstrip("/")
        self.guarded = guarded
        self.write = write
        # A server stream's duration is how long the client stayed, not a latency.
        self.timed = not handler.unary_stream and not handler.stream_stream
        self.streams_requests = bool(handler.stream_unary or handler.stream_stream)
        self.per_item = per_item
        self.slow_seconds = slow_seconds
        self.writes_bytes = bool(handler.unary_stream)
        # What a handler is told, by the access granted: made once, not on every call.
        self.callers = {
            access: Caller(access, self.writes_bytes) for access in (Access.READ, Access.WRITE, _READ_WRITE)
        }


# Without auth (off, or a bare server) every call may read and write.
_READ_WRITE = Access.READ | Access.WRITE


def _passing_bytes(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """``serialize``, except that ``bytes`` (a message serialised already) pass as they are."""
    if serialize is None:
        return None
    serializer = serialize

    def serialise(message: Any) -> bytes:
        return message if type(message) is bytes else serializer(message)

    return serialise


class CallInterceptor(_ServerInterceptor):
    """``authenticator`` None: no credential checked (a bare server in tests).
    ``per_item``: client-streaming methods whose handler answers each message on its
    own (BulkRecordActivities); they get an Undecodable in place of a message that could
    not be decoded, and the rest of the stream still counts.
    ``read_methods``: the paths that need read access only; any other needs write."""

    def __init__(
        self,
        authenticator: Authenticator | None,
        *,
        per_item: frozenset[str] = frozenset(),
        slow_seconds: float = SLOW_RPC_SECONDS,
        read_methods: frozenset[str] = READ_METHODS,
    ) -> None:
        self.authenticator = authenticator
        self.read_methods = read_methods
        self.per_item = per_item
        self.slow_seconds = slow_seconds
        # method -> (its handler, that handler wrapped): made once, not on every call.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # an unknown method: grpc answers UNIMPLEMENTED
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        about = _Method(
            method,
            handler,
            guarded=self.authenticator is not None and not method.startswith(OPEN_PREFIXES),
            write=method not in self.read_methods,
            per_item=method in self.per_item,
            slow_seconds=self.slow_seconds,
        )
        deserializer = soft_deserializer(handler.request_deserializer)
        for kind, make_handler in _HANDLER_KINDS:
            if (behaviour := getattr(handler, kind)) is not None:
                wrapped: Callable[[Any, Context], Any]
                if inspect.isasyncgenfunction(behaviour):
                    wrapped = self._around_stream(about, behaviour)
                elif inspect.iscoroutinefunction(behaviour) or about.guarded:
                    wrapped = self._around(about, behaviour)
                else:  # an open synchronous handler: grpc runs it as it is
                    return handler
                serializer = handler.response_serializer
                if about.writes_bytes:
                    serializer = _passing_bytes(serializer)
                return make_handler(wrapped, deserializer, serializer)
        return handler

    def _admit(self, about: _Method, request: Any, metadata: Metadata) -> CollabError | Undecodable | None:
        """Why the call is refused (no or a wrong credential, an undecodable request), if
        it is; else what the credential grants is handed to the handler (CALLER)."""
        granted: Grant | None = None  # auth off, or a method open to all
        if about.guarded:
            assert self.authenticator is not None
            if self.authenticator.enabled:
                headers = {key: value for key, value in metadata if isinstance(value, str)}
                try:
                    granted = self.authenticator.admit(token_from_headers(headers), write=about.write)
                except CollabError as error:
                    extra = {"rpc": about.method, "reason": str(error)}
                    log.warning("refused %s: %s", about.method, error, extra=extra)
                    return error
        if granted is None:
            CALLER.set(about.callers[_READ_WRITE])
        else:
            CALLER.set(Caller(granted.access, about.writes_bytes, granted))
        if isinstance(request, Undecodable):
            return request
        return None

    def _begin(self, about: _Method, context: Context) -> tuple[_Call, Metadata]:
        metadata = context.invocation_metadata() or ()
        call = _Call(about.name, request_id_from_metadata(metadata), timed=about.timed, slow_seconds=about.slow_seconds)
        call.begin()
        return call, metadata

    async def _enter(self, about: _Method, request: Any, metadata: Metadata, context: Context) -> Any:
        """The request the behaviour gets; the call ends here if it is refused."""
        refusal = self._admit(about, request, metadata)
        if refusal is not None:
            await _refuse(refusal, context)
        return self._requests(about, request, context)

    @staticmethod
    def _requests(about: _Method, request: Any, context: Context) -> Any:
        """The request, or a request stream that ends the call at an undecodable message."""
        if about.streams_requests and not about.per_item:
            return checked(request, context)
        return request

    def _around(
        self, about: _Method, behaviour: Callable[[Any, Context], Any]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def run(request: Any, context: Context) -> Any:
            call, metadata = self._begin(about, context)
            try:
                result = behaviour(await self._enter(about, request, metadata, context), context)
                if inspect.isawaitable(result):
                    result = await result
            except BaseException as error:
                call.end(context, error)
                raise
            call.end(context, None)
            return result

        return run

    def _around_stream(
        self, about: _Method, behaviour: Callable[[Any, Context], AsyncIterator[Any]]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def run(request: Any, context: Context) -> AsyncIterator[Any]:
            call, metadata = self._begin(about, context)
            try:
                async for response in behaviour(await self._enter(about, request, metadata, context), context):
                    yield response
            except BaseException as error:
                call.end(context, error)
                raise
            call.end(context, None)

        return run


async def _refuse(refusal: CollabError | Undecodable, context: Context) -> None:
    if isinstance(refusal, Undecodable):
        await refuse(refusal, context)
    else:
        await context.abort(STATUS_FOR_ERROR[type(refusal)], str(refusal))
