"""The bridge's request ids and `/metrics`, on the ASGI app in this process (its server
unreachable: the routes answer 503 and the upstream keeps retrying)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from bridge.app import create_asgi_app
from bridge.config import BridgeConfig, parse_bridge_config
from bridge.request_id import REQUEST_ID, request_id_filter, request_id_from_headers
from bridge.runtime import credential_metadata
from tests.bridge.test_hub import newer_kind_event

HEX_ID = re.compile(r"[0-9a-f]{32}")
TOKEN = "bridge-metrics-token"
UNREACHABLE = "127.0.0.1:1"


# -- request ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"abc-123", b"x" * 128, b"!~", b"0f" * 16])
def test_an_acceptable_request_id_is_kept(value: bytes) -> None:
    assert request_id_from_headers([(b"accept", b"*/*"), (b"x-request-id", value)]) == value.decode()


@pytest.mark.parametrize("value", [b"", b"x" * 129, b"two words", b"tab\there", b"caf\xe9", b"line\nbreak"])
def test_an_unacceptable_request_id_is_replaced(value: bytes) -> None:
    assert HEX_ID.fullmatch(request_id_from_headers([(b"x-request-id", value)]))


def test_without_a_request_id_each_request_gets_a_new_one() -> None:
    first, second = request_id_from_headers([]), request_id_from_headers([])
    assert HEX_ID.fullmatch(first) and HEX_ID.fullmatch(second) and first != second


def test_the_request_id_rides_on_the_rpcs_and_the_log_records() -> None:
    add_request_id = request_id_filter()
    record = logging.LogRecord("bridge", logging.INFO, __file__, 1, "outside", None, None)
    assert add_request_id(record) and not hasattr(record, "request_id")
    assert credential_metadata(("authorization", "Bearer k")) == (("authorization", "Bearer k"),)
    token = REQUEST_ID.set("rid-1")
    try:
        assert add_request_id(record) and vars(record)["request_id"] == "rid-1"
        assert credential_metadata(None) == (("x-request-id", "rid-1"),)
        assert credential_metadata(("x-api-key", "k")) == (("x-api-key", "k"), ("x-request-id", "rid-1"))
    finally:
        REQUEST_ID.reset(token)


# -- the settings -----------------------------------------------------------------------------


def test_metrics_settings() -> None:
    assert parse_bridge_config([], {}).metrics_token == "" and not parse_bridge_config([], {}).metrics_public
    config = parse_bridge_config(["--metrics-token", TOKEN], {"COLLAB_METRICS_PUBLIC": "on"})
    assert (config.metrics_token, config.metrics_public) == (TOKEN, True)
    assert TOKEN not in repr(config), "the token stays out of reprs (and logs)"


def test_a_bad_metrics_public_value_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_bridge_config(["--metrics-public", "maybe"], {})
    assert "--metrics-public / COLLAB_METRICS_PUBLIC: invalid value 'maybe': expected on or off" in (
        capsys.readouterr().err
    )


# -- the app ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def bridge_app(**settings: object) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """The app uvicorn would serve, started (its lifespan runs: the runtime, the upstream),
    with a client; and the app (its state holds the runtime)."""
    config = BridgeConfig(grpc_target=UNREACHABLE, upstream_token="k", **settings)  # type: ignore[arg-type]
    app = create_asgi_app(config)
    framework: FastAPI = app.app.app  # inside the request middleware and the WebSocket dispatch
    async with framework.router.lifespan_context(framework):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bridge", timeout=10) as client:
            yield client, framework


@contextlib.asynccontextmanager
async def bridge(**settings: object) -> AsyncIterator[httpx.AsyncClient]:
    async with bridge_app(**settings) as (client, _):
        yield client


@pytest_asyncio.fixture
async def with_token() -> AsyncIterator[httpx.AsyncClient]:
    async with bridge(metrics_token=TOKEN) as client:
        yield client


async def test_metrics_are_closed_until_a_token_is_set_or_they_are_made_public() -> None:
    async with bridge() as closed:
        refused = await closed.get("/metrics")
        assert refused.status_code == 403 and "COLLAB_METRICS_TOKEN" in refused.json()["detail"]
    async with bridge(metrics_public=True) as public:
        assert (await public.get("/metrics")).status_code == 200


async def test_metrics_need_the_token_when_one_is_set(with_token: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        answer = await with_token.get("/metrics", headers=headers)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", headers
    answer = await with_token.get("/metrics", headers={"Authorization": f"bearer {TOKEN}"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    assert "# TYPE collab_bridge_websocket_connections gauge" in answer.text
    openmetrics = await with_token.get(
        "/metrics", headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/openmetrics-text"}
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    assert "/metrics" not in (await with_token.get("/openapi.json")).json()["paths"]


async def metric(client: httpx.AsyncClient, series: str) -> float:
    text = (await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " ")]
    return values[0] if values else 0.0


async def test_requests_are_counted_by_route_template_and_logged_with_their_id(
    with_token: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(request_id_filter())
    caplog.set_level(logging.INFO, logger="bridge.http")
    route = "/api/v1/collaboration/activities/{activity_id}"
    unavailable = f'collab_bridge_http_requests_total{{method="GET",route="{route}",status="503"}}'
    unmatched = 'collab_bridge_http_requests_total{method="GET",route="unmatched",status="404"}'
    for n in range(2):
        answer = await with_token.get(f"/api/v1/collaboration/activities/act_{n}", headers={"X-Request-ID": f"rid-{n}"})
        assert answer.status_code == 503 and answer.headers["x-request-id"] == f"rid-{n}"
    assert (await with_token.get("/no/such/path/x1")).status_code == 404
    assert (await with_token.get("/no/such/path/x2")).status_code == 404
    assert await metric(with_token, unavailable) == 2
    assert await metric(with_token, unmatched) == 2, "unknown paths share one label"
    scrapes = 'collab_bridge_http_requests_total{method="GET",route="/metrics",status="200"}'
    assert await metric(with_token, scrapes) == 2, "the two scrapes before this one"

    failed = [vars(r) for r in caplog.records if r.name == "bridge.http" and r.levelno == logging.WARNING]
    assert [(r["request_id"], r["status"], r["route"]) for r in failed] == [
        ("rid-0", 503, route),
        ("rid-1", 503, route),
    ]
    assert all(TOKEN not in str(vars(r)) for r in caplog.records)


async def test_upstream_reconnects_are_counted(with_token: httpx.AsyncClient) -> None:
    reconnects = 'collab_bridge_upstream_reconnects_total{stream="events"}'
    for _ in range(200):  # the upstream retries an unreachable server with backoff (0.05 s, 0.1 s...)
        if await metric(with_token, reconnects) >= 2:
            break
        await asyncio.sleep(0.05)
    assert await metric(with_token, reconnects) >= 2
    assert await metric(with_token, "collab_bridge_upstream_connected") == 0


async def test_events_the_bridge_cannot_show_are_counted_by_kind() -> None:
    async with bridge_app(metrics_token=TOKEN) as (client, app):
        hub = app.state.runtime.hub
        assert await metric(client, 'collab_bridge_events_skipped_total{kind="field_99"}') == 0
        for seq in (1, 2, 3):
            hub.on_event(newer_kind_event(seq))
        assert await metric(client, 'collab_bridge_events_skipped_total{kind="field_99"}') == 3
