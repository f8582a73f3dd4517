"""OTLP/HTTP trace ingest: ``POST /v1/traces``, forwarded to the server's OTLP/gRPC
``TraceService/Export`` with the caller's own credential (the server authenticates,
validates, limits and maps; collab_grpc/otlp_servicer.py).

Per the OTLP/HTTP specification: the body is an ``ExportTraceServiceRequest`` in binary
protobuf (``Content-Type: application/x-protobuf``) or OTLP/JSON (``application/json``:
lowerCamelCase field names, trace and span ids in hex), optionally gzip-compressed
(``Content-Encoding: gzip``, inflated up to ``otlp_max_bytes``). The answer is an
``ExportTraceServiceResponse`` (with ``partialSuccess`` when the hub refused spans) in the
request's encoding; a failure is a ``google.rpc.Status`` in that encoding with 400
(malformed), 401, 403, 413 (too large), 415 (another content type), 429 or 503 (with
``Retry-After``: exporters retry those), or 502/504.
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from starlette.requests import Request
from starlette.responses import Response

from bridge.errors import ServerUnavailable, calling_server, retry_after_of
from bridge.rest import credential_from_request
from bridge.runtime import BridgeRuntime, credential_metadata

__all__ = ["PATH", "export_traces"]

PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
# Seconds a 503 asks the exporter to wait (the server gives its own for 429).
UNAVAILABLE_RETRY_AFTER = "1"

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# OTLP/JSON writes these bytes fields in hex, where protobuf's JSON mapping has base64.
_HEX_IDS = ("traceId", "spanId", "parentSpanId")


class _Refused(Exception):
    """A refused export: its HTTP status, and the gRPC code and message its google.rpc.Status body carries."""

    def __init__(self, status: int, code: grpc.StatusCode, message: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def _ids_to_base64(holder: Any, where: str) -> None:
    """Rewrite the hex trace and span ids in ``holder`` as the base64 protobuf's JSON mapping reads."""
    if not isinstance(holder, dict):
        return
    for name in _HEX_IDS:
        value = holder.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise _Refused(400, grpc.StatusCode.INVALID_ARGUMENT, f"{where}.{name} must be a hex string")
        try:
            holder[name] = base64.b64encode(bytes.fromhex(value)).decode()
        except ValueError:
            raise _Refused(
                400, grpc.StatusCode.INVALID_ARGUMENT, f"{where}.{name} is not hex: {value[:40]!r}"
            ) from None


def _items(holder: Any, name: str) -> list[Any]:
    """Return ``holder[name]`` when it is a list, else an empty one."""
    value = holder.get(name) if isinstance(holder, dict) else None
    return value if isinstance(value, list) else []


def _from_json(body: bytes) -> otlp.ExportTraceServiceRequest:
    """Parse OTLP/JSON: the protobuf JSON mapping, but ids in hex (translated here first)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise _Refused(400, grpc.StatusCode.INVALID_ARGUMENT, f"the body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise _Refused(400, grpc.StatusCode.INVALID_ARGUMENT, "the body must be a JSON object")
    for r, resource_spans in enumerate(_items(data, "resourceSpans") or _items(data, "resource_spans")):
        for s, scope_spans in enumerate(_items(resource_spans, "scopeSpans") or _items(resource_spans, "scope_spans")):
            for n, span in enumerate(_items(scope_spans, "spans")):
                where = f"resourceSpans[{r}].scopeSpans[{s}].spans[{n}]"
                _ids_to_base64(span, where)
                for k, link in enumerate(_items(span, "links")):
                    _ids_to_base64(link, f"{where}.links[{k}]")
    request = otlp.ExportTraceServiceRequest()
    try:
        # Receivers ignore fields they do not know (the specification asks it).
        json_format.ParseDict(data, request, ignore_unknown_fields=True, max_recursion_depth=64)
    except (json_format.ParseError, RecursionError, ValueError) as error:
        raise _Refused(400, grpc.StatusCode.INVALID_ARGUMENT, f"not an OTLP trace export: {error}") from None
    return request


def _inflate(body: bytes, limit: int) -> bytes:
    """Gunzip ``body``, refusing one that inflates past ``limit`` bytes (413) or is not whole gzip (400)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
        if len(data) > limit:
            raise _Refused(413, grpc.StatusCode.RESOURCE_EXHAUSTED, f"the body inflates to more than {limit} bytes")
        if not inflater.eof:
            raise _Refused(400, grpc.StatusCode.INVALID_ARGUMENT, "the gzip body is truncated")
    except zlib.error as error:
        raise _Refused(400, grpc.StatusCode.INVALID_ARGUMENT, f"the body is not valid gzip: {error}") from None
    return data


async def export_traces(request: Request) -> Response:
    """Forward a ``POST /v1/traces`` export to the server and answer in the request's encoding."""
    runtime: BridgeRuntime = request.app.state.runtime
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    encoding = JSON if media_type == JSON else PROTOBUF
    try:
        if media_type not in (PROTOBUF, JSON):
            raise _Refused(
                415,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Content-Type must be {PROTOBUF} or {JSON}, got {media_type or 'none'!r}",
            )
        body = await request.body()
        message = _decode(body, request.headers.get("content-encoding", ""), encoding, runtime.config.otlp_max_bytes)
        reply = await _forward(request, runtime, message)
    except _Refused as refused:
        headers = {"Retry-After": refused.retry_after} if refused.retry_after else {}
        if refused.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        status = status_pb2.Status(code=refused.code.value[0], message=refused.message)
        return _answer(status, encoding, refused.status, headers)
    return _answer(reply, encoding, 200, {})


def _decode(body: bytes, content_encoding: str, encoding: str, max_bytes: int) -> otlp.ExportTraceServiceRequest:
    """Read the export from ``body`` (inflated when gzip), refusing one over ``max_bytes`` or malformed."""
    coding = content_encoding.strip().lower()
    if coding == "gzip":
        body = _inflate(body, max_bytes)
    elif coding not in ("", "identity"):
        raise _Refused(415, grpc.StatusCode.INVALID_ARGUMENT, f"Content-Encoding {coding!r} is not supported; use gzip")
    if len(body) > max_bytes:
        raise _Refused(413, grpc.StatusCode.RESOURCE_EXHAUSTED, f"the body is larger than {max_bytes} bytes")
    if encoding == JSON:
        return _from_json(body)
    try:
        return otlp.ExportTraceServiceRequest.FromString(body)
    except DecodeError as error:
        raise _Refused(400, grpc.StatusCode.INVALID_ARGUMENT, f"not an OTLP trace export: {error}") from None


async def _forward(
    request: Request, runtime: BridgeRuntime, message: otlp.ExportTraceServiceRequest
) -> otlp.ExportTraceServiceResponse:
    """Send the export to the server's TraceService with the caller's credential; its refusal as _Refused."""
    stub = otlp_grpc.TraceServiceStub(runtime.channel)  # type: ignore[no-untyped-call]
    metadata = credential_metadata(credential_from_request(request, runtime.config.max_credential_bytes))
    try:
        with calling_server():
            reply: otlp.ExportTraceServiceResponse = await stub.Export(
                message, metadata=metadata, timeout=runtime.config.rpc_timeout
            )
    except ServerUnavailable as unavailable:
        # Exporters retry a 503 after Retry-After (the server may give its own).
        retry_after = unavailable.retry_after or UNAVAILABLE_RETRY_AFTER
        raise _Refused(503, grpc.StatusCode.UNAVAILABLE, unavailable.detail, retry_after) from None
    except grpc.aio.AioRpcError as failure:
        code = failure.code()
        status = _HTTP_STATUS.get(code, 502)
        raise _Refused(status, code, failure.details() or code.name, retry_after_of(failure)) from None
    return reply


def _answer(message: Message, encoding: str, status: int, headers: dict[str, str]) -> Response:
    """``message`` as the response body, in the request's encoding."""
    body = json_format.MessageToJson(message, indent=None).encode() if encoding == JSON else message.SerializeToString()
    return Response(body, status_code=status, media_type=encoding, headers=headers)
