"""The guide's wire contract (../shared/contract, beside the repository) as validators."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

__all__ = ["CONTRACT_DIR", "validate_rest", "validate_ws"]

CONTRACT_DIR = Path(__file__).resolve().parents[3] / "shared" / "contract"


@cache
def _definitions(name: str) -> dict[str, Any]:
    path = CONTRACT_DIR / name
    assert path.exists(), f"the contract schemas are missing: {path} (shared/ must sit beside the repository)"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema["$defs"]  # type: ignore[no-any-return]


def validate_ws(message: dict[str, Any]) -> dict[str, Any]:
    """Validate a server-to-client WebSocket message against the definition of its type."""
    definitions = _definitions("ws-messages.schema.json")
    assert message.get("type") in definitions, f"no contract for message type {message.get('type')!r}"
    jsonschema.validate(message, definitions[message["type"]])
    return message


def validate_rest(route: str, body: dict[str, Any]) -> dict[str, Any]:
    """Validate a REST success body against the definition for ``route`` (e.g. `agent-status`)."""
    jsonschema.validate(body, _definitions("rest-responses.schema.json")[route])
    return body
