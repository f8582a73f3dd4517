"""bridge/errors.py on its own: an unreachable server becomes one ServerUnavailable whatever
raised it, answered over HTTP as 503 (Retry-After when known) without internal addresses;
the server's other answers keep their statuses; the JSON encoders built once write the same
bytes as the per-call ones they replace."""

from __future__ import annotations

import json
import math

import grpc
import pytest
from starlette.responses import JSONResponse

from bridge.errors import CompactJSONResponse, HubError, ServerUnavailable, calling_server, hub_error_response
from bridge.mapping import JSON, dumps
from bridge.websocket import CLOSE_FORBIDDEN, CLOSE_TRY_AGAIN, CLOSE_UNAUTHORIZED, close_for

UNREACHABLE = "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.1.2.3:50051: Connection refused"
TOLD = (
    "the collab server is unavailable: failed to connect to all addresses; last error: UNKNOWN: [address]: "
    "Connection refused"
)


def rpc_error(code: grpc.StatusCode, details: str, *trailers: tuple[str, str]) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details, None)


async def failing(error: Exception) -> None:
    raise error


async def test_calling_server_raises_unavailable_as_server_unavailable_and_passes_the_rest() -> None:
    with pytest.raises(ServerUnavailable) as raised, calling_server():
        await failing(rpc_error(grpc.StatusCode.UNAVAILABLE, UNREACHABLE, ("retry-after", "3")))
    assert (raised.value.detail, raised.value.retry_after) == (TOLD, "3")
    for code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED):
        with pytest.raises(grpc.aio.AioRpcError) as passed, calling_server():
            await failing(rpc_error(code, "no"))
        assert passed.value.code() == code


def test_server_unavailable_is_one_503_over_http_with_retry_after_when_known() -> None:
    told = hub_error_response(HubError.unavailable(ServerUnavailable("too many resumes", "1")))
    assert told.status_code == 503 and told.headers["retry-after"] == "1"
    assert json.loads(bytes(told.body)) == {
        "detail": "the collab server is unavailable: too many resumes",
        "code": "UNAVAILABLE",
    }
    plain = hub_error_response(HubError.unavailable(ServerUnavailable("")))
    assert "retry-after" not in plain.headers
    assert json.loads(bytes(plain.body))["detail"] == "the collab server is unavailable: retry later"
    raised = HubError.from_rpc(ServerUnavailable(UNREACHABLE, "2"))
    assert (raised.status, raised.code, raised.detail, raised.retry_after) == (503, "UNAVAILABLE", TOLD, "2")
    # An UNAVAILABLE that reached HubError.from_rpc without calling_server is told the same, addresses removed.
    direct = HubError.from_rpc(rpc_error(grpc.StatusCode.UNAVAILABLE, UNREACHABLE))
    assert (direct.status, direct.code, direct.detail, direct.retry_after) == (503, "UNAVAILABLE", TOLD, None)


def test_the_servers_other_answers_keep_their_status() -> None:
    refused = hub_error_response(HubError.from_rpc(rpc_error(grpc.StatusCode.UNAUTHENTICATED, "bad key")))
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert json.loads(bytes(refused.body)) == {"detail": "bad key", "code": "UNAUTHENTICATED"}
    unmapped = HubError.from_rpc(rpc_error(grpc.StatusCode.INTERNAL, ""))
    assert (unmapped.status, unmapped.detail) == (502, "INTERNAL")


def test_a_websocket_is_closed_1013_for_an_unreachable_server_and_4401_4403_for_a_refused_credential() -> None:
    assert close_for(ServerUnavailable(UNREACHABLE)) == (CLOSE_TRY_AGAIN, TOLD)
    assert close_for(rpc_error(grpc.StatusCode.UNAVAILABLE, UNREACHABLE)) == (CLOSE_TRY_AGAIN, TOLD)
    assert close_for(rpc_error(grpc.StatusCode.UNAUTHENTICATED, "expired")) == (CLOSE_UNAUTHORIZED, "expired")
    assert close_for(rpc_error(grpc.StatusCode.PERMISSION_DENIED, "")) == (CLOSE_FORBIDDEN, "PERMISSION_DENIED")
    assert close_for(rpc_error(grpc.StatusCode.INTERNAL, "boom")) == (CLOSE_TRY_AGAIN, "the hub is unavailable: boom")


BODIES: list[JSON] = [
    {"detail": 'Zürich → 東京 \u2028 "quoted" \\ ', "code": "X", "n": [1, 2.5, -0.0, 10**20], "none": None},
    {"nested": {"deeper": [{"a": True}, {"b": False}]}, "empty": {}, "list": []},
    {},
]


@pytest.mark.parametrize("body", BODIES)
def test_the_encoders_built_once_write_what_the_per_call_ones_wrote(body: JSON) -> None:
    assert CompactJSONResponse(body).body == JSONResponse(body).body
    assert dumps(body) == json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def test_a_rest_body_refuses_nan_as_starlette_does_and_a_message_writes_valid_json() -> None:
    with pytest.raises(ValueError):
        CompactJSONResponse({"x": math.nan})
    # The server refuses non-finite metadata; were one to reach a message, it stays JSON.
    assert dumps({"x": math.nan}) == '{"x":null}'
    assert dumps({"big": 2**70}) == '{"big":1180591620717411303424}'  # past orjson: the json module
