"""GET /api/v1/collaboration/activities, the history search over REST, on real
`collab-server` (SQLite store) and `collab-bridge` processes: every query parameter,
repeated ones, ISO 8601 and epoch times, the cursor, bad values answered 400/422 with a
JSON body, the route beside `activities/{id}`, and the OpenAPI spec."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.support.stack import API, AUTH, Stack, running_stack


@dataclass
class Seeded:
    stack: Stack
    activities: list[dict[str, Any]]  # as `GET activities/{id}` answers, after every write
    session_id: str
    root_id: str

    def expected(self, keep: Callable[[dict[str, Any]], bool], newest_first: bool = True) -> list[str]:
        chosen = sorted(
            (a for a in self.activities if keep(a)),
            key=lambda a: (a["timestamp"], a["activity_id"]),
            reverse=newest_first,
        )
        return [a["activity_id"] for a in chosen]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    with (
        running_stack(tmp_path_factory.mktemp("history")) as stack,
        httpx.Client(base_url=stack.bridge.http, headers=AUTH, timeout=10) as http,
    ):

        def post(route: str, body: dict[str, Any]) -> dict[str, Any]:
            response = http.post(f"{API}/{route}", json=body)
            assert response.status_code == 200, response.text
            answer: dict[str, Any] = response.json()
            return answer

        session_id = post("start-collaboration", {"participants": ["ada", "bob"], "session_type": "council"})[
            "session_id"
        ]
        root_id = post("record-activity", {"agent_id": "ada", "activity_type": "agent_started", "department": "eng"})[
            "activity_id"
        ]
        ids = [root_id]
        types = ["council_debate", "message_sent", "memory_write"]
        for n in range(30):
            agent = ("ada", "bob", "cyd")[n % 3]
            body: dict[str, Any] = {
                "agent_id": agent,
                "department": "ops" if agent == "cyd" else "eng",
                "activity_type": types[n % 3],
                "metadata": {"topic": "budget" if n % 4 == 0 else "hiring", "n": n},
            }
            if n % 2 == 0:
                body["session_id"] = session_id
            if n % 5 == 0:
                body["parent_activity_id"] = root_id
            activity_id = post("record-activity", body)["activity_id"]
            ids.append(activity_id)
            if n % 3 == 1:
                post("complete-activity", {"activity_id": activity_id, "success": n % 2 == 0})
        post("end-collaboration", {"session_id": session_id})
        activities = []
        for activity_id in ids:
            response = http.get(f"{API}/activities/{activity_id}")
            assert response.status_code == 200, response.text
            activities.append(response.json()["activity"])
        yield Seeded(stack, activities, session_id, root_id)


def search(seeded: Seeded, params: list[tuple[str, str]]) -> httpx.Response:
    with httpx.Client(base_url=seeded.stack.bridge.http, headers=AUTH, timeout=10) as http:
        return http.get(f"{API}/activities", params=tuple(params))


def search_all(seeded: Seeded, params: list[tuple[str, str]]) -> list[str]:
    """Every page, following next_cursor."""
    ids: list[str] = []
    cursor: str | None = None
    for _ in range(200):
        response = search(seeded, params + ([("cursor", cursor)] if cursor else []))
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"activities", "next_cursor"}
        ids.extend(a["activity_id"] for a in body["activities"])
        cursor = body["next_cursor"]
        if cursor is None:
            return ids
    raise AssertionError("the cursor never ended")


def test_everything_newest_first_by_default_and_oldest_first_with_asc(seeded: Seeded) -> None:
    response = search(seeded, [])
    assert response.status_code == 200
    body = response.json()
    assert body["next_cursor"] is None
    assert [a["activity_id"] for a in body["activities"]] == seeded.expected(lambda a: True)
    # The guide's activity shape, as `activities/{id}` gives it.
    by_id = {a["activity_id"]: a for a in seeded.activities}
    assert all(a == by_id[a["activity_id"]] for a in body["activities"])
    assert search_all(seeded, [("order", "asc"), ("limit", "4")]) == seeded.expected(lambda a: True, False)


CASES: list[tuple[str, list[tuple[str, str]], Callable[[dict[str, Any]], bool]]] = [
    ("agent", [("agent_id", "bob")], lambda a: a["agent_id"] == "bob"),
    ("agents", [("agent_id", "bob"), ("agent_id", "cyd")], lambda a: a["agent_id"] in ("bob", "cyd")),
    ("department", [("department", "ops")], lambda a: a["department"] == "ops"),
    (
        "types",
        [("activity_type", "council_debate"), ("activity_type", "agent_started")],
        lambda a: a["activity_type"] in ("council_debate", "agent_started"),
    ),
    ("failed", [("status", "failed")], lambda a: a["status"] == "failed"),
    (
        "completed or active",
        [("status", "completed"), ("status", "active")],
        lambda a: a["status"] in ("completed", "active"),
    ),
    ("meta", [("meta", "topic=budget")], lambda a: a["metadata"].get("topic") == "budget"),
    (
        "two metas",
        [("meta", "topic=hiring"), ("meta", "n=7")],
        lambda a: a["metadata"].get("topic") == "hiring" and a["metadata"].get("n") == 7,
    ),
    (
        "combined",
        [
            ("agent_id", "ada"),
            ("agent_id", "bob"),
            ("department", "eng"),
            ("status", "active"),
            ("meta", "topic=hiring"),
        ],
        lambda a: (
            a["agent_id"] in ("ada", "bob")
            and a["department"] == "eng"
            and a["status"] == "active"
            and a["metadata"].get("topic") == "hiring"
        ),
    ),
]


@pytest.mark.parametrize(("name", "params", "keep"), CASES, ids=[c[0] for c in CASES])
def test_filters(
    seeded: Seeded, name: str, params: list[tuple[str, str]], keep: Callable[[dict[str, Any]], bool]
) -> None:
    expected = seeded.expected(keep)
    assert expected or name == "two metas"
    assert search_all(seeded, [*params, ("limit", "3")]) == expected


def test_an_ended_sessions_activities_and_an_activitys_children(seeded: Seeded) -> None:
    in_session = seeded.expected(lambda a: a["session_id"] == seeded.session_id)
    assert in_session and search_all(seeded, [("session_id", seeded.session_id), ("limit", "2")]) == in_session
    children = seeded.expected(lambda a: a["parent_activity_id"] == seeded.root_id)
    assert children and search_all(seeded, [("parent_activity_id", seeded.root_id)]) == children


def test_since_and_until_in_epoch_seconds_and_iso_8601(seeded: Seeded) -> None:
    ordered = sorted(seeded.activities, key=lambda a: (a["timestamp"], a["activity_id"]))
    since, until = ordered[5]["timestamp"], ordered[15]["timestamp"]
    expected = seeded.expected(lambda a: since <= a["timestamp"] < until)
    assert expected
    assert search_all(seeded, [("since", repr(since)), ("until", repr(until))]) == expected
    # ISO 8601 to the microsecond: the bounds a microsecond apart from the epoch floats.
    iso_since = datetime.fromtimestamp(since - 1e-6, UTC).isoformat()
    iso_until = datetime.fromtimestamp(until - 1e-6, UTC).isoformat()
    assert search_all(seeded, [("since", iso_since), ("until", iso_until)]) == expected
    # A naive ISO time is UTC; an offset is honoured.
    naive = datetime.fromtimestamp(ordered[0]["timestamp"] - 60, UTC).replace(tzinfo=None).isoformat()
    assert search_all(seeded, [("since", naive)]) == seeded.expected(lambda a: True)
    future = datetime.fromtimestamp(ordered[-1]["timestamp"] + 3600, UTC).astimezone().isoformat()
    assert search_all(seeded, [("since", future)]) == []


def test_the_list_route_and_the_one_activity_route_do_not_shadow_each_other(seeded: Seeded) -> None:
    with httpx.Client(base_url=seeded.stack.bridge.http, headers=AUTH, timeout=10) as http:
        one = http.get(f"{API}/activities/{seeded.root_id}")
        assert one.status_code == 200 and one.json()["activity"]["activity_id"] == seeded.root_id
        listed = http.get(f"{API}/activities", params={"limit": 1})
        assert listed.status_code == 200 and len(listed.json()["activities"]) == 1


BAD_400: list[tuple[list[tuple[str, str]], str]] = [
    ([("since", "yesterday")], "since must be epoch seconds or an ISO 8601 time"),
    ([("until", "nan")], "until must be a time between"),
    ([("since", "1e30")], "since must be a time between"),
    ([("since", "0001-01-01T00:00:00+01:00")], "since must be a time between"),
    ([("since", "200"), ("until", "100")], "must not be after until"),
    ([("meta", "no-equals")], "meta must be key=value"),
    ([("meta", "=x")], "meta must be key=value"),
    ([("agent_id", "has space")], "agent_ids"),
    ([("cursor", "bogus")], "cursor is not a cursor this listing gave out"),
]


@pytest.mark.parametrize(("params", "message"), BAD_400, ids=[b[1][:30] for b in BAD_400])
def test_bad_values_answer_400_with_the_json_error_body(
    seeded: Seeded, params: list[tuple[str, str]], message: str
) -> None:
    response = search(seeded, params)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "INVALID_ARGUMENT" and message in body["detail"]


@pytest.mark.parametrize(
    "params",
    [
        [("status", "running")],
        [("activity_type", "dancing")],
        [("order", "sideways")],
        [("limit", "0")],
        [("limit", "501")],
        [("limit", "many")],
    ],
)
def test_values_outside_the_schema_answer_422_with_a_json_body(seeded: Seeded, params: list[tuple[str, str]]) -> None:
    response = search(seeded, params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["detail"]


def test_the_openapi_spec_lists_the_route_and_its_parameters(seeded: Seeded) -> None:
    with httpx.Client(base_url=seeded.stack.bridge.http, timeout=10) as http:
        spec = http.get("/openapi.json").json()
    operation = spec["paths"][f"{API}/activities"]["get"]
    names = {p["name"] for p in operation["parameters"]}
    assert names >= {
        "agent_id",
        "department",
        "activity_type",
        "status",
        "session_id",
        "parent_activity_id",
        "since",
        "until",
        "order",
        "limit",
        "cursor",
        "meta",
    }
    assert "200" in operation["responses"] and "400" in operation["responses"]
    assert f"{API}/activities/{{activity_id}}" in spec["paths"]
