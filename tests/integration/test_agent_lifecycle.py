"""Agents have a lifecycle, on real processes: an idle agent leaves the live status with
an `agent_retired` message that browsers receive, its history stays readable, it comes
back when it records again, and a restart over many historic agents reads back only the
live ones (memory and SQLite stores; Redis: test_redis_lifecycle.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser
from websockets.asyncio.client import connect

from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.contract import validate_rest
from tests.support.processes import ServerProcess
from tests.support.rpc import WRITE_KEY, Client
from tests.support.stack import API, AUTH, SERVER_ENV, is_event, opened, record, recv_until, running_stack

pytestmark = pytest.mark.integration

# Short TTLs so that agents retire within the test; the sweep runs every tenth of them.
IDLE_TTL = "1"


async def agent_status(client: Client) -> pb.AgentStatusSummary:
    answer = await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=client.metadata)
    return answer.agent_status


async def test_an_idle_agent_is_retired_for_browsers_and_comes_back(tmp_path: Path) -> None:
    server_env = {"COLLAB_STORE": "memory", "COLLAB_AGENT_IDLE_TTL": IDLE_TTL}
    with running_stack(tmp_path, server_env) as stack:
        async with (
            httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH, timeout=10) as http,
            connect(stack.ws_url(client_id="watcher")) as watcher,
            connect(stack.ws_url(client_id="narrow")) as narrow,
        ):
            await opened(watcher)
            await opened(narrow)
            await narrow.send(json.dumps({"type": "subscribe", "activity_types": ["agent_retired"]}))
            assert (await recv_until(narrow, is_event("subscribed")))["activity_types"] == ["agent_retired"]
            # A session member stays live however long it is idle.
            started = await http.post(f"{API}/start-collaboration", json={"participants": ["member"]})
            assert started.status_code == 200, started.text

            activity_id = await record(http, "ephemeral_1", department="research")
            done = await http.post(f"{API}/complete-activity", json={"activity_id": activity_id, "success": True})
            assert done.status_code == 200, done.text

            for ws in (watcher, narrow):
                retired = await recv_until(ws, is_event("agent_retired"), within=30)
                assert {k: retired[k] for k in ("agent_id", "department", "last_activity")} == {
                    "agent_id": "ephemeral_1",
                    "department": "research",
                    "last_activity": activity_id,
                }
                assert isinstance(retired["seq"], int) and isinstance(retired["last_seen"], float)
                assert retired["timestamp"].endswith("+00:00")

            status = validate_rest("agent-status", (await http.get(f"{API}/agent-status")).json())
            assert set(status["agents"]) == {"member"}
            assert (status["total_agents"], status["idle_agents"]) == (1, 1)
            # Its history stays readable.
            kept = await http.get(f"{API}/activities/{activity_id}")
            assert kept.status_code == 200 and kept.json()["activity"]["agent_id"] == "ephemeral_1"
            feed = (await http.get(f"{API}/activity-feed", params={"agent_id": "ephemeral_1"})).json()
            assert [a["activity_id"] for a in feed["activities"]] == [activity_id]

            # Recording again brings it back, for everyone.
            again = await record(http, "ephemeral_1")
            message = await recv_until(watcher, is_event("agent_activity"))
            assert message["activity"]["activity_id"] == again
            status = (await http.get(f"{API}/agent-status")).json()
            assert status["agents"]["ephemeral_1"]["status"] == "active"

        # A browser that connects now starts from a state without retired agents.
        async with connect(stack.ws_url(client_id="late")) as late:
            _, state = await opened(late)
            assert set(state["agent_status"]["agents"]) == {"ephemeral_1", "member"}


async def bulk_record(client: Client, agent_ids: list[str], per_message: int = 500) -> None:
    def messages() -> list[pb.BulkRecordActivitiesRequest]:
        return [
            pb.BulkRecordActivitiesRequest(
                activities=[
                    pb.RecordActivityRequest(agent_id=agent_id, activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED)
                    for agent_id in agent_ids[start : start + per_message]
                ]
            )
            for start in range(0, len(agent_ids), per_message)
        ]

    answer = await client.stub.BulkRecordActivities(iter(messages()), metadata=client.metadata, timeout=120)
    assert (answer.recorded, answer.failed) == (len(agent_ids), 0)


async def wait_for(
    client: Client, done: Callable[[pb.AgentStatusSummary], bool], within: float = 60.0
) -> pb.AgentStatusSummary:
    """Poll the status until ``done(status)``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        status = await agent_status(client)
        if done(status):
            return status
        assert loop.time() < deadline, f"the status never got there: {status.total_agents} agents"
        await asyncio.sleep(0.1)


async def test_a_sqlite_restart_over_many_historic_agents_reads_back_only_the_live_ones(tmp_path: Path) -> None:
    historic = 20_000
    data_dir = tmp_path / "server"
    # First life: agents are kept for an hour; their activities expire within a second.
    first_env = {**SERVER_ENV, "COLLAB_ACTIVITY_TTL": "1", "COLLAB_AGENT_IDLE_TTL": "3600"}
    with ServerProcess(data_dir, env=first_env) as server:
        client = Client.connect(server.target)
        try:
            await bulk_record(client, [f"sub_agent_{n}" for n in range(historic)])
            started = await client.stub.StartCollaboration(
                pb.StartCollaborationRequest(participants=["lead", "reviewer"]), metadata=client.metadata
            )
            status = await wait_for(client, lambda s: s.active_agents == 0)
            assert status.total_agents == historic + 2  # idle, but within the hour
        finally:
            await client.close()
        assert server.stop() == 0
    await asyncio.sleep(1.5)  # longer than the next life's TTL since any of them was seen

    # Second life: a TTL of a second. Only the session's members are read back.
    second_env = {**SERVER_ENV, "COLLAB_ACTIVITY_TTL": "1", "COLLAB_AGENT_IDLE_TTL": IDLE_TTL}
    with ServerProcess(data_dir, env=second_env) as server:
        client = Client.connect(server.target)
        try:
            status = await agent_status(client)
            assert sorted(a.agent_id for a in status.agents) == ["lead", "reviewer"]
            assert status.total_agents == 2 and status.active_collaborations == 1
            events = client.stub.SubscribeEvents(
                pb.SubscribeEventsRequest(kinds=[pb.EVENT_KIND_AGENT_RETIRED]), metadata=client.metadata
            )
            await client.stub.EndCollaboration(
                pb.EndCollaborationRequest(session_id=started.session_id), metadata=client.metadata
            )
            retired: set[str] = set()
            while len(retired) < 2:
                message = await asyncio.wait_for(events.read(), 30)
                assert isinstance(message, pb.SubscribeEventsResponse)
                retired.add(message.event.agent_retired.agent_id)
            events.cancel()
            assert retired == {"lead", "reviewer"}
            assert (await agent_status(client)).total_agents == 0
        finally:
            await client.close()
        assert server.stop() == 0

    with ServerProcess(data_dir, env=second_env) as server:  # the retirements were stored
        client = Client.connect(server.target)
        try:
            assert (await agent_status(client)).total_agents == 0
        finally:
            await client.close()
        assert server.stop() == 0


async def test_the_ttl_setting_is_checked_at_start(tmp_path: Path) -> None:
    for variable, value in (("COLLAB_AGENT_IDLE_TTL", "0"), ("COLLAB_AGENT_RETIRE_BATCH", "0")):
        server = ServerProcess(tmp_path / "server", env={**SERVER_ENV, variable: value}, capture_stderr=True)
        try:
            with pytest.raises(
                AssertionError,
                match=r"--agent-(idle-ttl|retire-batch) / COLLAB_AGENT_(IDLE_TTL|RETIRE_BATCH): invalid value .*: "
                "must be",
            ):
                server.start()
        finally:
            server.__exit__()


async def test_the_dashboard_drops_a_retired_agents_card(tmp_path: Path, browser: Browser) -> None:
    """In a real headless Chromium: the card goes on `agent_retired`; the other stays."""
    server_env = {"COLLAB_STORE": "memory", "COLLAB_AGENT_IDLE_TTL": IDLE_TTL}
    with running_stack(tmp_path, server_env) as stack:
        async with httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH, timeout=10) as http:
            page = await browser.new_page()
            try:
                errors: list[str] = []
                page.on("pageerror", lambda error: errors.append(str(error)))
                await page.goto(f"{stack.bridge.http}/?token={WRITE_KEY}")
                await page.wait_for_selector('#state[data-state="live"]', timeout=10_000)
                started = await http.post(f"{API}/start-collaboration", json={"participants": ["staying"]})
                assert started.status_code == 200, started.text
                activity_id = await record(http, "leaving")
                await page.wait_for_selector('#agents [data-agent="leaving"]', timeout=10_000)
                # The member's card comes with the next periodic status update (the server's
                # status_interval), not with an event: on screen before the other retires.
                await page.wait_for_selector('#agents [data-agent="staying"]', timeout=10_000)
                done = await http.post(f"{API}/complete-activity", json={"activity_id": activity_id})
                assert done.status_code == 200, done.text
                await page.wait_for_selector('#agents [data-agent="leaving"]', state="detached", timeout=30_000)
                assert await page.locator('#agents [data-agent="staying"]').count() == 1
                assert not errors, errors
            finally:
                await page.context.close()  # before the stack stops, as a closed browser was
