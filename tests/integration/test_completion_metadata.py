"""Metadata at completion through real `collab-server` and `collab-bridge` processes: the
REST route and the SDK send it, the WebSocket and SSE `activity_completed` messages carry
the keys added, the activity holds the merge, a retry with the same idempotency key gets
the same answer, and bad input is refused saying why, changing nothing."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from collab import AsyncClient, Client
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.contract import validate_ws
from tests.support.rpc import WRITE_KEY
from tests.support.stack import API, Stack, is_event, opened, record, recv_until, running_stack

pytestmark = pytest.mark.integration

USAGE = {"gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 34, "gen_ai.response.model": "m-2"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


async def activity(http: httpx.AsyncClient, activity_id: str) -> dict[str, Any]:
    response = await http.get(f"{API}/activities/{activity_id}")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()["activity"]
    return found


async def test_rest_completion_metadata_reaches_the_websocket_and_the_activity(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    async with connect(stack.ws_url(client_type="dashboard")) as ws:
        await opened(ws)
        activity_id = await record(
            http, "meta_agent", "message_sent", metadata={"gen_ai.response.model": "m-1", "k": 1}
        )
        await recv_until(ws, is_event("agent_activity"))
        done = await http.post(f"{API}/complete-activity", json={"activity_id": activity_id, "metadata": USAGE})
        assert done.status_code == 200, done.text
        assert done.json() == {"success": True, "activity_id": activity_id}
        message = validate_ws(await recv_until(ws, is_event("activity_completed")))
        assert message["activity_id"] == activity_id and message["metadata"] == USAGE

        plain = await record(http, "meta_agent", "task_assigned")
        await http.post(f"{API}/complete-activity", json={"activity_id": plain, "success": False})
        failed = validate_ws(
            await recv_until(ws, lambda m: m["type"] == "activity_completed" and m["activity_id"] == plain)
        )
        assert failed["metadata"] == {}, "always present, empty when the completion added nothing"
    merged = await activity(http, activity_id)
    assert merged["metadata"] == {"k": 1, **USAGE}
    assert merged["status"] == "completed"


async def test_sse_carries_the_added_metadata_too(http: httpx.AsyncClient) -> None:
    activity_id = await record(http, "sse_meta_agent", "message_sent")
    async with http.stream("GET", f"{API}/events?types=activity_completed") as response:
        assert response.status_code == 200
        await http.post(f"{API}/complete-activity", json={"activity_id": activity_id, "metadata": {"tokens": 5}})

        async def completed() -> dict[str, Any]:
            event, data = "", ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data = line.removeprefix("data: ")
                elif not line and event == "activity_completed":
                    message: dict[str, Any] = json.loads(data)
                    return message
            raise AssertionError("the stream ended first")

        message = await asyncio.wait_for(completed(), 10)
    assert message["activity_id"] == activity_id and message["metadata"] == {"tokens": 5}


async def test_refusals_say_what_is_wrong_and_change_nothing(http: httpx.AsyncClient) -> None:
    activity_id = await record(http, "refused_meta_agent", "message_sent", metadata={"blob": "x" * 40_000})
    not_object = await http.post(f"{API}/complete-activity", json={"activity_id": activity_id, "metadata": [1, 2]})
    assert not_object.status_code == 422 and "metadata" in not_object.text
    over = await http.post(
        f"{API}/complete-activity", json={"activity_id": activity_id, "metadata": {"more": "y" * 30_000}}
    )
    assert over.status_code == 400, over.text
    detail = over.json()["detail"]
    assert "metadata merged at completion would be" in detail and "the limit is 65536" in detail
    unchanged = await activity(http, activity_id)
    assert unchanged["status"] == "active" and unchanged["metadata"] == {"blob": "x" * 40_000}


async def test_a_retry_with_the_same_key_gets_the_same_answer(http: httpx.AsyncClient) -> None:
    activity_id = await record(http, "idem_meta_agent", "message_sent")
    body = {"activity_id": activity_id, "metadata": {"tokens": 9}}
    first = await http.post(f"{API}/complete-activity", json=body, headers={"Idempotency-Key": "meta-1"})
    again = await http.post(f"{API}/complete-activity", json=body, headers={"Idempotency-Key": "meta-1"})
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    other = await http.post(
        f"{API}/complete-activity",
        json={**body, "metadata": {"tokens": 10}},
        headers={"Idempotency-Key": "meta-1"},
    )
    assert other.status_code == 409 and "already used" in other.json()["detail"]
    assert (await activity(http, activity_id))["metadata"] == {"tokens": 9}


def test_the_sdk_completes_with_metadata_and_from_an_activity_block(stack: Stack) -> None:
    with Client(stack.server.target, WRITE_KEY) as hub:
        activity_id = hub.record_activity("sdk_meta_agent", "message_sent", metadata={"model": "a"})
        done = hub.complete_activity(activity_id, metadata={"model": "b", "tokens": 3})
        assert dict(done.metadata) == {"model": "b", "tokens": 3.0}
        with hub.activity("sdk_meta_agent", "task_assigned", metadata={"step": 1}) as handle:
            handle.metadata["tokens"] = 7
        block = hub.get_activity(handle.activity_id)
        assert dict(block.metadata) == {"step": 1.0, "tokens": 7.0}
        with pytest.raises(ZeroDivisionError), hub.activity("sdk_meta_agent", "task_assigned") as failing:
            failing.metadata["partial_tokens"] = 2
            raise ZeroDivisionError
        failed = hub.get_activity(failing.activity_id)
        assert failed.failure_reason == "ZeroDivisionError" and dict(failed.metadata) == {"partial_tokens": 2.0}


async def test_the_async_sdk_completes_with_metadata(stack: Stack) -> None:
    async with AsyncClient(stack.server.target, WRITE_KEY) as hub:
        activity_id = await hub.record_activity("async_meta_agent", "message_sent")
        done = await hub.complete_activity(activity_id, success=False, failure_reason="cut", metadata={"tokens": 4})
        assert done.failure_reason == "cut" and dict(done.metadata) == {"tokens": 4.0}


BIG = {"blob": "x" * 40_000}
OVER = {"more": "y" * 30_000, "tokens": 3}  # with BIG: over the 64 KiB limit once merged


def test_a_block_whose_metadata_is_refused_completes_without_it_and_warns(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    with Client(stack.server.target, WRITE_KEY) as hub, caplog.at_level(logging.WARNING, logger="collab"):
        with hub.activity("sdk_over_agent", "message_sent", metadata=BIG) as handle:
            handle.metadata.update(OVER)
        done = hub.get_activity(handle.activity_id)
        assert done.status == pb.ACTIVITY_STATUS_COMPLETED and dict(done.metadata) == BIG
        with pytest.raises(ZeroDivisionError), hub.activity("sdk_over_agent", "task_assigned", metadata=BIG) as failing:
            failing.metadata.update(OVER)
            raise ZeroDivisionError  # the caller's own error, not the SDK's refusal
        failed = hub.get_activity(failing.activity_id)
        assert failed.status == pb.ACTIVITY_STATUS_FAILED and failed.failure_reason == "ZeroDivisionError"
        assert dict(failed.metadata) == BIG
    warnings = [entry.getMessage() for entry in caplog.records]
    assert len(warnings) == 2
    for activity_id, message in zip([handle.activity_id, failing.activity_id], warnings, strict=True):
        assert activity_id in message and "(more, tokens, not kept)" in message
        assert "metadata merged at completion would be" in message


async def test_the_async_block_whose_metadata_is_refused_completes_without_it_and_warns(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    async with AsyncClient(stack.server.target, WRITE_KEY) as hub:
        with caplog.at_level(logging.WARNING, logger="collab"):
            async with hub.activity("async_over_agent", "message_sent", metadata=BIG) as handle:
                handle.metadata.update(OVER)
            with pytest.raises(ZeroDivisionError):
                async with hub.activity("async_over_agent", "task_assigned", metadata=BIG) as failing:
                    failing.metadata.update(OVER)
                    raise ZeroDivisionError
        done = await hub.get_activity(handle.activity_id)
        assert done.status == pb.ACTIVITY_STATUS_COMPLETED and dict(done.metadata) == BIG
        failed = await hub.get_activity(failing.activity_id)
        assert failed.status == pb.ACTIVITY_STATUS_FAILED and failed.failure_reason == "ZeroDivisionError"
    warnings = [entry.getMessage() for entry in caplog.records]
    assert len(warnings) == 2 and all("(more, tokens, not kept)" in message for message in warnings)


def test_a_failed_block_raises_its_own_error_when_the_completion_fails_too(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """The activity completed meanwhile (elsewhere): completing it as failed is refused
    (FAILED_PRECONDITION); the block's own exception is still what the caller gets."""
    with (
        Client(stack.server.target, WRITE_KEY) as hub,
        caplog.at_level(logging.WARNING, logger="collab"),
        pytest.raises(KeyError),
        hub.activity("sdk_twice_agent", "task_assigned") as handle,
    ):
        hub.complete_activity(handle.activity_id)
        raise KeyError("the caller's")
    (warning,) = [entry.getMessage() for entry in caplog.records]
    assert handle.activity_id in warning and "could not be completed as failed" in warning and "KeyError" in warning
