"""The guide's wire contract as validators.

The schemas are kept in tests/contract/, copied from ../shared/contract/ (the binding
source, beside the repository); tests/test_contract_copy.py fails if the copy drifts.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

__all__ = ["CONTRACT_DIR", "SHARED_CONTRACT_DIR", "load_schema", "validate_rest", "validate_ws"]

CONTRACT_DIR = Path(__file__).resolve().parents[1] / "contract"
SHARED_CONTRACT_DIR = Path(__file__).resolve().parents[3] / "shared" / "contract"


@cache
def load_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CONTRACT_DIR / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def validate_ws(message: dict[str, Any]) -> dict[str, Any]:
    """Validate a server-to-client WebSocket message against the definition of its type."""
    definitions = load_schema("ws-messages.schema.json")["$defs"]
    assert message.get("type") in definitions, f"no contract for message type {message.get('type')!r}"
    jsonschema.validate(message, definitions[message["type"]])
    return message


def validate_rest(route: str, body: dict[str, Any]) -> dict[str, Any]:
    """Validate a REST success body against the definition for ``route`` (e.g. `agent-status`)."""
    jsonschema.validate(body, load_schema("rest-responses.schema.json")["$defs"][route])
    return body
