"""A parent that arrives later links its children, with real processes and the real
OpenTelemetry SDK: a long-running agent span whose tool span (under a span that is not
GenAI) is exported, by the SDK's BatchSpanProcessor force-flushed, before the agent span
ends. The tool is first a root; when the agent span arrives it is linked to it
(`activity_linked` on the WebSocket, the parent in the REST read), and the link survives
a restart of the server, on the SQLite store and on Redis (the machine's, at
127.0.0.1:6379; without it the Redis case skips unless COLLAB_REQUIRE_REDIS=1). A child
that left the in-memory history (COLLAB_HISTORY_LIMIT) before its parent came is read
back from the store and linked."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from websockets.asyncio.client import ClientConnection, connect

from tests.support.rpc import WRITE_KEY
from tests.support.services import redis_store_url
from tests.support.stack import AUTH, Stack, opened, recv_until, running_stack, wait_ready

pytestmark = pytest.mark.integration

API = "/api/v1/collaboration"


HISTORY_LIMIT = 5


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        yield "sqlite"
        return
    with redis_store_url() as url:
        yield url


def read_activity(stack: Stack, activity_id: str) -> dict[str, Any]:
    response = httpx.get(f"{stack.bridge.http}{API}/activities/{activity_id}", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    activity: dict[str, Any] = response.json()["activity"]
    return activity


def children_of(stack: Stack, parent_activity_id: str) -> list[dict[str, Any]]:
    """The history search (GET activities) for the children of ``parent_activity_id``."""
    response = httpx.get(
        f"{stack.bridge.http}{API}/activities",
        params={"parent_activity_id": parent_activity_id},
        headers=AUTH,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["activities"]
    return found


async def activity_of(ws: ClientConnection, agent: str, activity_type: str) -> dict[str, Any]:
    message = await recv_until(
        ws,
        lambda m: (
            m["type"] == "agent_activity"
            and m["activity"]["agent_id"] == agent
            and m["activity"]["activity_type"] == activity_type
        ),
    )
    activity: dict[str, Any] = message["activity"]
    return activity


def links_total(stack: Stack) -> dict[str, float]:
    """collab_otlp_links_total by outcome, from the server's /metrics."""
    found: dict[str, float] = {}
    for line in httpx.get(stack.server.metrics_url).text.splitlines():
        if line.startswith("collab_otlp_links_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('outcome="', 1)[1].split('"', 1)[0]] = float(value)
    return found


def exporting_provider(target: str, service_name: str = "") -> TracerProvider:
    """The OpenTelemetry SDK exporting to the server at ``target`` over OTLP/gRPC, in
    batches as it does by default (a span is sent once it ends)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name} if service_name else {}))
    exporter = OTLPSpanExporter(endpoint=target, insecure=True, headers={"authorization": f"Bearer {WRITE_KEY}"})
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


async def test_a_child_exported_before_its_parent_is_linked_when_the_parent_arrives(tmp_path: Path, store: str) -> None:
    agent = f"long-agent-{uuid.uuid4().hex[:8]}"
    with running_stack(tmp_path, server_env={"COLLAB_STORE": store}) as stack:
        provider = exporting_provider(stack.server.target, "otlp-links-test")
        tracer = provider.get_tracer("test")
        async with connect(stack.ws_url()) as ws:
            await opened(ws)
            with tracer.start_as_current_span(
                f"invoke_agent {agent}",
                attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": agent},
            ):
                with tracer.start_as_current_span("workflow step"):  # not GenAI: dropped
                    with tracer.start_as_current_span(
                        "execute_tool lookup",
                        # Named: a span recorded before its parent cannot take the parent's agent.
                        attributes={
                            "gen_ai.operation.name": "execute_tool",
                            "gen_ai.tool.name": "lookup",
                            "gen_ai.agent.name": agent,
                        },
                    ):
                        pass
                    # The tool's batch goes while the step and the agent still run.
                    assert provider.force_flush(10_000)
                    tool = await activity_of(ws, agent, "task_assigned")
                    assert tool["parent_activity_id"] is None  # a root, for now
                    assert read_activity(stack, tool["activity_id"])["parent_activity_id"] is None
                # The step's batch: it passes the tool on to wait for the agent span.
                assert provider.force_flush(10_000)
                with tracer.start_as_current_span(
                    "chat model", attributes={"gen_ai.operation.name": "chat", "gen_ai.agent.name": agent}
                ):
                    pass
                assert provider.force_flush(10_000)
                chat = await activity_of(ws, agent, "message_sent")
                assert chat["parent_activity_id"] is None
            assert provider.force_flush(10_000)
            root = await activity_of(ws, agent, "agent_started")
            assert root["parent_activity_id"] is None
            linked = [
                await recv_until(ws, lambda m: m["type"] == "activity_linked" and m["agent_id"] == agent)
                for _ in range(2)
            ]
        provider.shutdown()
        assert sorted(m["activity_id"] for m in linked) == sorted([tool["activity_id"], chat["activity_id"]])
        assert {m["parent_activity_id"] for m in linked} == {root["activity_id"]}
        assert all(m["seq"] > 0 and m["timestamp"] for m in linked)
        assert links_total(stack).get("linked") == 2
        for child in (tool, chat):
            read = read_activity(stack, child["activity_id"])
            assert read["parent_activity_id"] == root["activity_id"]
            assert read["status"] == "completed"  # the link kept its completion
        found = children_of(stack, root["activity_id"])
        assert sorted(a["activity_id"] for a in found) == sorted([tool["activity_id"], chat["activity_id"]])

        # The link is stored: a restarted server reads it back.
        port = stack.server.port
        assert stack.server.stop() == 0
        stack.server.start(port)
        wait_ready(stack)
        for child in (tool, chat):
            assert read_activity(stack, child["activity_id"])["parent_activity_id"] == root["activity_id"]


def test_a_child_waiting_across_a_restart_is_linked(tmp_path: Path) -> None:
    """The waiting index is rebuilt from the stored roots that name their parent span."""
    agent = f"restart-agent-{uuid.uuid4().hex[:8]}"
    with running_stack(tmp_path) as stack:
        provider = exporting_provider(stack.server.target)
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span(
            "invoke_agent", attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": agent}
        ):
            tool_attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.agent.name": agent}
            with tracer.start_as_current_span("execute_tool", attributes=tool_attributes):
                pass
            assert provider.force_flush(10_000)
            port = stack.server.port
            assert stack.server.stop() == 0
            stack.server.start(port)
            wait_ready(stack)
        assert provider.force_flush(10_000)
        provider.shutdown()
        feed = httpx.get(
            f"{stack.bridge.http}{API}/activity-feed", params={"agent_id": agent}, headers=AUTH, timeout=10
        ).json()["activities"]
        by_type = {a["activity_type"]: a for a in feed}
        assert set(by_type) == {"agent_started", "task_assigned"}
        assert by_type["task_assigned"]["parent_activity_id"] == by_type["agent_started"]["activity_id"]


async def test_a_child_that_left_the_history_is_linked_from_the_store(tmp_path: Path, store: str) -> None:
    """The tool span is exported, then more spans than the server's history holds, then
    the agent span: the tool, no longer in memory, is read from the store and linked."""
    agent = f"evicting-agent-{uuid.uuid4().hex[:8]}"
    server_env = {"COLLAB_STORE": store, "COLLAB_HISTORY_LIMIT": str(HISTORY_LIMIT)}
    with running_stack(tmp_path, server_env=server_env) as stack:
        provider = exporting_provider(stack.server.target)
        tracer = provider.get_tracer("test")
        async with connect(stack.ws_url()) as ws:
            await opened(ws)
            with tracer.start_as_current_span(
                "invoke_agent", attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": agent}
            ):
                tool_attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.agent.name": agent}
                with tracer.start_as_current_span("execute_tool", attributes=tool_attributes):
                    pass
                assert provider.force_flush(10_000)
                tool = await activity_of(ws, agent, "task_assigned")
                # Other work, in traces of its own, pushes the completed tool out of the history.
                others = f"other-{agent}"
                for _ in range(HISTORY_LIMIT + 3):
                    other_attributes = {"gen_ai.operation.name": "chat", "gen_ai.agent.name": others}
                    with tracer.start_as_current_span("chat", context=Context(), attributes=other_attributes):
                        pass
                assert provider.force_flush(10_000)
                for _ in range(HISTORY_LIMIT + 3):
                    await activity_of(ws, others, "message_sent")
                assert tool["activity_id"] not in feed_ids(stack)
            assert provider.force_flush(10_000)
            root = await activity_of(ws, agent, "agent_started")
            link = await recv_until(ws, lambda m: m["type"] == "activity_linked" and m["agent_id"] == agent)
        provider.shutdown()
        assert (link["activity_id"], link["parent_activity_id"]) == (tool["activity_id"], root["activity_id"])
        assert links_total(stack).get("linked") == 1
        assert links_total(stack).get("refused", 0) == 0 and links_total(stack).get("evicted", 0) == 0
        stored = stored_activity(stack, store, tool["activity_id"], root["activity_id"])
        assert stored["parent_activity_id"] == root["activity_id"]
        assert stored["status"] == "completed"  # the stored body, whole, took the link
        assert stored["metadata"]["otel.span_id"] == tool["metadata"]["otel.span_id"]
        assert "otel.end_time" in stored["metadata"]


def feed_ids(stack: Stack) -> set[str]:
    """The ids in the activity feed: the server's in-memory history."""
    feed = httpx.get(f"{stack.bridge.http}{API}/activity-feed", headers=AUTH, timeout=10).json()
    return {a["activity_id"] for a in feed["activities"]}


def stored_activity(stack: Stack, store: str, activity_id: str, parent_activity_id: str) -> dict[str, Any]:
    """The activity as the store keeps it: through the history search for the children of
    ``parent_activity_id`` (SQLite searches its file), or from Redis's hash of activity
    bodies (its search reads only what the server holds)."""
    if store == "sqlite":
        (found,) = [a for a in children_of(stack, parent_activity_id) if a["activity_id"] == activity_id]
        return found
    prefix = store.split("prefix=", 1)[1]
    body = redis.Redis.from_url(store.split("?", 1)[0]).hget(f"{prefix}:activity", activity_id)
    assert body is not None
    activity: dict[str, Any] = json.loads(body)
    return activity
