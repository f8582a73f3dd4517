"""A request the protobuf runtime cannot decode is refused with INVALID_ARGUMENT.

grpc.aio decodes each request before any handler runs, and a decoding failure ends the
call with UNKNOWN ("Unexpected <class 'DecodeError'>"), which says nothing to the caller.
The protobuf decoder stops at 100 levels of nested messages: every level of a metadata
Struct is about three, so metadata nested over ~33 levels (the hub's own limit is 32)
never reaches the hub's validation; a string field that is not UTF-8 fails the same way.
This interceptor lets the decoding fail softly and ends such a call with
INVALID_ARGUMENT and the decoder's reason instead.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from collab_grpc.validation import Limits

__all__ = ["DecodeGuard", "Undecodable"]

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class Undecodable:
    """Stands in for a request that could not be decoded, so the call can be refused."""

    __slots__ = ("details",)

    def __init__(self, error: DecodeError) -> None:
        reason = str(error)
        if "MaxDepth" in reason:
            reason = f"messages nest too deeply (metadata may nest at most {Limits().max_metadata_depth} levels)"
        self.details = f"the request could not be decoded: {reason}"


def _soft(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    decode = deserializer

    def soft(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError as error:
            return Undecodable(error)

    return soft


async def _refuse(request: Undecodable, context: Context) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)


async def _checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    """A request stream that ends the call at the first message that could not be decoded."""
    async for request in requests:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        yield request


def _guarded(behavior: Callable[..., Any], streaming_requests: bool) -> Callable[..., Any]:
    """``behavior`` that refuses an undecodable request first (``streaming_requests``: the
    call ends at the first undecodable message); of the same kind (coroutine or async
    generator), since grpc.aio runs the two differently."""

    def request_for(request: Any, context: Context) -> Any:
        return _checked(request, context) if streaming_requests else request

    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _refuse(request, context)
            async for response in behavior(request_for(request, context), context):
                yield response

        return stream

    async def unary(request: Any, context: Context) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        result = behavior(request_for(request, context), context)
        return await result if inspect.isawaitable(result) else result

    return unary


def _guard(handler: Handler, per_item: bool) -> Handler:
    deserializer = _soft(handler.request_deserializer)
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_guarded(handler.unary_unary, False), deserializer, serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_guarded(handler.unary_stream, False), deserializer, serializer)
    if handler.stream_unary:
        behavior = handler.stream_unary if per_item else _guarded(handler.stream_unary, True)
        return grpc.stream_unary_rpc_method_handler(behavior, deserializer, serializer)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(_guarded(handler.stream_stream, True), deserializer, serializer)


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in the type stubs
    _ServerInterceptor = grpc.aio.ServerInterceptor


class DecodeGuard(_ServerInterceptor):
    """Goes after the auth interceptor, so a call without a credential is still refused
    as UNAUTHENTICATED whatever its body.

    ``per_item``: client-streaming methods whose handler answers each message on its own
    (BulkRecordActivities); they get an Undecodable in place of a message that could not
    be decoded, and the rest of the stream still counts."""

    def __init__(self, per_item: frozenset[str] = frozenset()) -> None:
        self.per_item = per_item
        # method -> (its handler, that handler guarded): made once, not on every call.
        self._guarded: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = _guard(handler, method in self.per_item)
        self._guarded[method] = (handler, guarded)
        return guarded
