"""Issue 17, item 5: ids the hub builds pass the hub's own checks, and every id it
accepts can be used in every route, from the outside (real server and bridge).

An activity id holds its agent_id, so a 128-character agent_id used to give an id over
the 128-character limit that every later call refused; and an id with `/` could never
be found by `GET activities/{id}`, even percent-encoded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import httpx
import pytest
import pytest_asyncio

from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.validation import Limits
from tests.support.rpc import Client
from tests.support.stack import API, Stack, record, running_stack

# What a caller may put in an id, beyond letters: everything printable without white space.
AGENT_IDS = [
    "team/agent",
    "a/../b",
    "/leading/and/trailing/",
    "100%",
    "%2F-already-encoded",
    "what?now",
    "hash#tag",
    "ünïcødé-агент-代理",
    "x" * Limits().max_id_length,  # its activity id is longer than the id limit
    "y" * (Limits().max_id_length - 3) + "/?#",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("ids"), {"COLLAB_STORE": "memory"}) as running:
        yield running


@pytest_asyncio.fixture
async def rpc(stack: Stack) -> AsyncIterator[Client]:
    client = Client.connect(stack.server.target)
    yield client
    await client.close()


def path(value: str) -> str:
    """``value`` as one path segment: every reserved character percent-encoded."""
    return quote(value, safe="")


@pytest.mark.parametrize("agent_id", AGENT_IDS)
async def test_every_route_takes_an_accepted_agent_id_and_the_ids_built_from_it(
    http: httpx.AsyncClient, rpc: Client, agent_id: str
) -> None:
    started = await http.post(f"{API}/start-collaboration", json={"participants": [agent_id, "peer"]})
    assert started.status_code == 200, started.text
    session_id = started.json()["session_id"]
    activity_id = await record(http, agent_id, session_id=session_id)
    assert activity_id.startswith("act_") and agent_id in activity_id

    # The activity by id, over REST (percent-encoded) and gRPC.
    found = await http.get(f"{API}/activities/{path(activity_id)}")
    assert found.status_code == 200, found.text
    assert (found.json()["activity"]["activity_id"], found.json()["activity"]["agent_id"]) == (activity_id, agent_id)
    by_rpc = await rpc.stub.GetActivity(pb.GetActivityRequest(activity_id=activity_id), metadata=rpc.metadata)
    assert by_rpc.activity.agent_id == agent_id

    # A step of it, then both completed: the hub-built id is accepted wherever an activity is named.
    step = await record(http, agent_id, parent_activity_id=activity_id)
    for done in (step, activity_id):
        completed = await http.post(f"{API}/complete-activity", json={"activity_id": done})
        assert completed.status_code == 200, completed.text
    assert (await http.get(f"{API}/activities/{path(activity_id)}")).json()["activity"]["status"] == "completed"

    # The agent's feed, its session, the session's decisions, the status map.
    feed = await http.get(f"{API}/activity-feed", params={"agent_id": agent_id})
    assert feed.status_code == 200, feed.text
    assert {a["activity_id"] for a in feed.json()["activities"]} == {activity_id, step}
    decided = await http.post(
        f"{API}/record-decision", json={"session_id": session_id, "agent_id": agent_id, "decision": "go"}
    )
    assert decided.status_code == 200, decided.text
    session = await http.get(f"{API}/collaborations/{path(session_id)}")
    assert session.status_code == 200, session.text
    assert agent_id in session.json()["session"]["participants"]
    decisions = await http.get(f"{API}/collaborations/{path(session_id)}/decisions")
    assert [d["agent_id"] for d in decisions.json()["decisions"]] == [agent_id]
    status = await http.get(f"{API}/agent-status")
    assert status.json()["agents"][agent_id]["last_activity"] == step
    listed = await http.get(f"{API}/agents", params={"limit": 500})
    assert agent_id in listed.json()["agents"]


@pytest.mark.parametrize("unknown", ["no/such/activity", "a%b", "q?x", "h#x", "ünknown", "act_1_" + "z" * 150])
async def test_unknown_ids_with_reserved_characters_are_not_found(http: httpx.AsyncClient, unknown: str) -> None:
    """Reaching the route with the whole id (not a prefix of it, not another route)."""
    answer = await http.get(f"{API}/activities/{path(unknown)}")
    assert answer.status_code == 404, answer.text
    assert answer.json()["code"] == "NOT_FOUND" and repr(unknown) in answer.json()["detail"]
    for route in (f"collaborations/{path(unknown)}", f"collaborations/{path(unknown)}/decisions"):
        answer = await http.get(f"{API}/{route}")
        assert answer.status_code in (400, 404), answer.text
        assert answer.json()["code"] in ("NOT_FOUND", "INVALID_ARGUMENT")


async def test_ids_over_the_limits_are_refused_at_the_start(http: httpx.AsyncClient) -> None:
    limits = Limits()
    too_long_agent = "a" * (limits.max_id_length + 1)
    refused = await http.post(
        f"{API}/record-activity", json={"agent_id": too_long_agent, "activity_type": "memory_read"}
    )
    assert refused.status_code == 400 and "agent_id is longer than 128" in refused.json()["detail"]
    too_long_activity = "act_" + "b" * limits.max_hub_id_length
    answer = await http.get(f"{API}/activities/{path(too_long_activity)}")
    assert answer.status_code == 400, answer.text
    assert f"longer than {limits.max_hub_id_length}" in answer.json()["detail"]
    spaced = await http.get(f"{API}/activities/{path('act with space')}")
    assert spaced.status_code == 400 and "white space" in spaced.json()["detail"]
