"""schemathesis against the bridge's OpenAPI spec, answered by a real `collab-bridge` over
a real `collab-server`: every operation, inputs that fit the spec and inputs that do not,
with a write token.

Each case must get an answer the spec declares (status code, content type, body schema,
headers), never a 5xx, and an input that does not fit the spec must be refused (4xx).
The spec is generated here by the same code the process serves (the first test checks
the two are equal), so schemathesis can make one pytest item per operation at collection
time. The run is bounded and reproducible: a fixed number of examples per operation and
generation mode, derandomized, no example database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import negative_data_rejection

from bridge.app import create_app
from bridge.config import BridgeConfig
from tests.support.stack import AUTH, Stack, running_stack

pytestmark = pytest.mark.integration

# Per operation and generation mode (positive, negative), besides schemathesis' own
# boundary cases: about 1,700 cases over the 15 operations, 20-25 s on two cores.
MAX_EXAMPLES = 100
# An operation tried fewer times than this was not really fuzzed (a strategy that
# cannot generate, cases filtered away): the module fails.
MIN_CASES = 5

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
)

SPEC = create_app(BridgeConfig()).openapi()
schema = schemathesis.openapi.from_dict(
    SPEC,
    config=schemathesis.Config.from_dict(
        {
            "seed": 2026,
            "headers": AUTH,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        }
    ),
)

tried: Counter[str] = Counter()
statuses: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("fuzz-rest")) as running:
        yield running
    # The counts docs/RELIABILITY.md quotes (pytest -s shows them).
    for operation, count in sorted(tried.items()):
        answers = ", ".join(f"{status}: {n}" for (op, status), n in sorted(statuses.items()) if op == operation)
        print(f"schemathesis {operation}: {count} cases ({answers})")
    print(f"schemathesis total: {sum(tried.values())} cases over {len(tried)} operations")
    too_few = {operation: count for operation, count in tried.items() if count < MIN_CASES}
    assert not too_few, f"operations hardly fuzzed: {too_few}"


def test_the_process_serves_the_spec_fuzzed_here(stack: Stack) -> None:
    served = httpx.get(f"{stack.bridge.http}/openapi.json", timeout=10).json()
    assert served == SPEC
    assert len(SPEC["paths"]) >= 15


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
def test_every_operation_answers_as_its_spec_declares(case: schemathesis.Case[Any], stack: Stack) -> None:
    excluded: list[Any] | None = [negative_data_rejection] if _sent_as_a_valid_query(case) else None
    response = case.call_and_validate(base_url=stack.bridge.http, headers=AUTH, timeout=15, excluded_checks=excluded)
    tried[case.operation.label] += 1
    statuses[case.operation.label, response.status_code] += 1


def _sent_as_a_valid_query(case: schemathesis.Case[Any]) -> bool:
    """A negative case that puts a single value (a string, a boolean, a number, nothing)
    where a repeatable query parameter (an array of strings) goes: on the wire it is
    `agent_id=false`, a valid one-item array, so accepting it is right (the history
    search's filters)."""
    arrays = {
        name
        for parameter in SPEC["paths"].get(case.operation.path, {}).get("get", {}).get("parameters", [])
        for name in [parameter["name"]]
        if parameter.get("in") == "query"
        and any(option.get("type") == "array" for option in parameter["schema"].get("anyOf", [parameter["schema"]]))
    }
    return any(
        name in arrays and (value is None or isinstance(value, str | bool | int | float))
        for name, value in (case.query or {}).items()
    )


@pytest.mark.parametrize("last_event_id", ["-5", "abc", "1.5", ""])
def test_sse_refuses_a_last_event_id_that_is_no_seq(stack: Stack, last_event_id: str) -> None:
    """The event stream is not in the spec (it never ends); its one input is checked here.
    A negative id used to fail the stream after its 200 had gone out."""
    headers = {**AUTH, "Last-Event-ID": last_event_id}
    with httpx.stream("GET", f"{stack.bridge.http}/api/v1/collaboration/events", headers=headers, timeout=10) as sse:
        if not last_event_id:  # no id: a fresh stream
            assert sse.status_code == 200
            return
        sse.read()
        assert sse.status_code == 400, sse.text
        assert sse.json()["code"] == "INVALID_ARGUMENT" and "Last-Event-ID must be an integer" in sse.json()["detail"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        # A JSON escape that decodes to a lone surrogate: not UTF-8, protobuf refuses it (was 500).
        (b'{"agent_id": "\\ud800", "activity_type": "memory_read"}', "cannot be encoded"),
        (b'{"agent_id": "a", "activity_type": "memory_read", "related_agents": ["\\udfff"]}', "cannot be encoded"),
        # Deeper than protobuf's decoder takes (was 500), and deeper than Python's stack.
        (
            b'{"agent_id": "a", "activity_type": "memory_read", "metadata": ' + b'{"a":' * 40 + b"1" + b"}" * 41,
            "nested deeper",
        ),
        (b'{"agent_id": "a", "activity_type": "memory_read", "metadata": ' + b'{"a":' * 900 + b"1" + b"}" * 901, ""),
        # An integer no double holds (was 500).
        (b'{"agent_id": "a", "activity_type": "memory_read", "metadata": {"n": 1' + b"0" * 400 + b"}}", "float"),
        (b'{"agent_id": "a", "activity_type": "memory_read", "metadata": {"n": NaN}}', "NaN"),
        # Not UTF-8 at all (was a 400 without the error body's `code`).
        (b'{"agent_id": "\xff\xfe", "activity_type": "memory_read"}', ""),
    ],
)
def test_bodies_that_once_broke_the_bridge_are_400(stack: Stack, body: bytes, fragment: str) -> None:
    with httpx.Client(base_url=stack.bridge.http, headers=AUTH, timeout=10) as http:
        seq = http.get("/readyz").json()["seq"]
        response = http.post(
            "/api/v1/collaboration/record-activity", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "INVALID_ARGUMENT" and fragment in response.json()["detail"], response.text
        assert http.get("/readyz").json()["seq"] == seq, "nothing was recorded"
