"""Input limits and checks, shared by every way into the hub.

Every check raises InvalidArgument with a message naming the field and the limit, so
a caller can fix the request without reading the source.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from collab_grpc.errors import InvalidArgument

__all__ = [
    "HUB_ID_EXTRA",
    "Limits",
    "check_hub_id",
    "check_id",
    "check_id_list",
    "check_limit",
    "check_metadata",
    "check_text",
    "decode_cursor",
    "encode_cursor",
    "largest_item_bytes",
    "measured_metadata",
]

# A cursor holds one key (ids, a time, an offset): far less than this.
MAX_CURSOR_LENGTH = 4096

# What the hub adds around a caller's id when it builds one: `act_<10-digit seconds>_`
# before the agent_id and `_<8 hex digits>` after it is 24 characters; the rest is room
# for a clock beyond 10 digits.
HUB_ID_EXTRA = 32


@dataclass(frozen=True, slots=True)
class Limits:
    max_metadata_bytes: int = 64 * 1024
    max_metadata_depth: int = 32
    max_id_length: int = 128
    max_list_length: int = 100
    max_text_length: int = 8 * 1024
    max_page: int = 500
    default_page: int = 50

    @property
    def max_hub_id_length(self) -> int:
        """The longest id the hub builds (an activity id holds its agent_id): what a
        field naming a hub-built id accepts, so every id the hub hands out passes."""
        return self.max_id_length + HUB_ID_EXTRA


def _printable(value: str, *, allow_spaces: bool) -> bool:
    # The ASCII space is the one white-space character str.isprintable() accepts.
    return value.isprintable() and (allow_spaces or " " not in value)


def check_id(field: str, value: str, limits: Limits, *, required: bool = True) -> str:
    """An identifier: printable, no white space, at most ``max_id_length`` characters."""
    if not value:
        if required:
            raise InvalidArgument(f"{field} is required")
        return value
    problem = _id_problem(value, limits)
    if problem is not None:
        raise InvalidArgument(f"{field} {problem}")
    return value


def check_hub_id(field: str, value: str, limits: Limits, *, required: bool = True) -> str:
    """An identifier the hub built (an activity id): as ``check_id``, up to
    ``max_hub_id_length`` characters."""
    if not value:
        if required:
            raise InvalidArgument(f"{field} is required")
        return value
    problem = _id_problem(value, limits, limits.max_hub_id_length)
    if problem is not None:
        raise InvalidArgument(f"{field} {problem}")
    return value


def _id_problem(value: str, limits: Limits, max_length: int | None = None) -> str | None:
    """What is wrong with a non-empty identifier, if anything."""
    bound = limits.max_id_length if max_length is None else max_length
    if len(value) > bound:
        return f"is longer than {bound} characters"
    if not _printable(value, allow_spaces=False):
        return "must be printable characters without white space"
    return None


def check_text(field: str, value: str, limits: Limits, *, max_length: int | None = None, required: bool = False) -> str:
    """Free text (department, decision, rationale): no control characters."""
    if not value:
        if required:
            raise InvalidArgument(f"{field} is required")
        return value
    bound = limits.max_text_length if max_length is None else max_length
    if len(value) > bound:
        raise InvalidArgument(f"{field} is longer than {bound} characters")
    if not _printable(value, allow_spaces=True):
        raise InvalidArgument(f"{field} must not contain control characters")
    return value


def check_id_list(field: str, values: Iterable[str], limits: Limits, *, min_length: int = 0) -> list[str]:
    """A list of distinct identifiers."""
    result = list(values)
    if len(result) < min_length:
        raise InvalidArgument(f"{field} needs at least {min_length} entr{'y' if min_length == 1 else 'ies'}")
    if len(result) > limits.max_list_length:
        raise InvalidArgument(f"{field} has more than {limits.max_list_length} entries")
    for index, value in enumerate(result):
        problem = _id_problem(value, limits) if value else "is required"
        if problem is not None:  # the entry's name is made only for the error
            raise InvalidArgument(f"{field}[{index}] {problem}")
    if len(set(result)) != len(result):
        raise InvalidArgument(f"{field} has duplicate entries")
    return result


def check_metadata(field: str, value: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """A JSON object no larger than ``max_metadata_bytes`` serialised (compact, with
    non-ASCII characters escaped), nor deeper than allowed."""
    return measured_metadata(field, value, limits)[0]


def measured_metadata(field: str, value: Mapping[str, Any], limits: Limits) -> tuple[dict[str, Any], int]:
    """``check_metadata``, with the serialised size it measured (what the memory
    budgets count, so a record is measured once)."""
    metadata = dict(value)
    limit = limits.max_metadata_depth
    depth, plain = _nesting(metadata, limit)
    if depth > limit:
        raise InvalidArgument(f"{field} is nested deeper than {limit} levels")
    size = _plain_size(metadata) if plain else None
    if size is None:
        try:
            text = _STRICT_JSON.encode(metadata)  # ASCII: a character is a byte
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"{field} is not valid JSON: {exc}") from None
        # Escaped as \udXXXX here, a lone surrogate could not be stored (it is not text);
        # only a string beyond the BMP is escaped that way too, so this rarely looks further.
        if "\\ud" in text and _has_lone_surrogate(metadata):
            raise InvalidArgument(f"{field} is not valid JSON: a string holds a lone surrogate, which is not text")
        size = len(text)
    if size > limits.max_metadata_bytes:
        raise InvalidArgument(f"{field} is {size} bytes serialised; the limit is {limits.max_metadata_bytes}")
    return metadata, size


# What json.dumps(separators=(",", ":"), allow_nan=False) does, without building an
# encoder on every call.
_STRICT_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_UNESCAPED_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def _has_lone_surrogate(metadata: dict[str, Any]) -> bool:
    try:
        _UNESCAPED_JSON.encode(metadata).encode()
    except UnicodeEncodeError:
        return True
    return False


def _nesting(metadata: dict[str, Any], limit: int) -> tuple[int, bool]:
    """How many levels mappings and lists nest (``limit + 1`` for anything deeper;
    iterative, so any depth is safe), and whether the data is plain: every value exactly
    a dict, a list, a string, an int, a bool, None or a float that orjson writes as the
    json module does: finite, and 0 or at least 1e-4 in size (orjson writes ``0.00001``
    and ``1e-6`` for ``1e-05`` and ``1e-06``). Only plain data is measured with orjson
    (_plain_size); anything else (a subclass, an Enum, a NaN) by the json module."""
    plain = True
    level: list[Any] = [metadata]
    depth = 0
    while level and depth <= limit:
        depth += 1
        children: list[Any] = []
        for container in level:
            mapping = type(container) is dict or isinstance(container, Mapping)  # the ABC check costs more
            for item in container.values() if mapping else container:
                kind = type(item)
                if kind is dict or kind is list:
                    children.append(item)
                elif kind is float:
                    plain = plain and math.isfinite(item) and (item == 0 or abs(item) >= 1e-4)
                elif kind not in _PLAIN_SCALARS:
                    plain = False
                    if isinstance(item, Mapping | list):
                        children.append(item)
        level = children
    return (depth if not level else limit + 1), plain


_PLAIN_SCALARS = frozenset({str, int, bool, type(None)})


def _plain_size(metadata: dict[str, Any]) -> int | None:
    """The json module's serialised size of plain data (see _nesting), from orjson's
    output, a few times faster; None where the two differ: non-ASCII and DEL, which the
    json module escapes, and what orjson refuses (integers beyond 64 bits, keys that
    are not exactly strings, which the json module converts).
    (tests/collab_grpc/test_validation.py compares the two on generated metadata.)"""
    try:
        text = orjson.dumps(metadata)
    except orjson.JSONEncodeError:
        return None
    if not text.isascii() or b"\x7f" in text:
        return None
    return len(text)


def largest_item_bytes(limits: Limits) -> int:
    """An upper bound of the serialised size of the largest single item the limits let in
    (an activity, session, decision or memory update, or an event carrying one): what a
    reply budget must hold at least.

    Metadata is measured as compact JSON; as a protobuf Struct it is larger, at worst
    5.5 times (a list of small numbers: 2 bytes each in JSON, 11 as a Value), so 6 times
    bounds it. A completion's event adds the names of the keys it added (``added_keys``,
    each a key of the merged metadata, listed once) and stays within the same 6 times: a
    key of ``n`` bytes costs at least ``n + 4`` in the JSON (quotes, colon, a comma or
    brace) and ``n + 6`` in the Struct's map entry beside its value, plus ``n + 3`` at most
    as a repeated string; ``2n + 9 <= 6 (n + 4)``, while the values' share stays within
    5.5 times. Every other field at its limit, in UTF-8 at 4 bytes a character: the
    larger of a decision's votes and texts or an activity's related agents, plus ids."""

    def text(characters: int) -> int:  # a length-delimited field
        return 4 * characters + 4

    votes = limits.max_list_length * (text(limits.max_id_length) * 2 + 4)
    texts = 2 * text(limits.max_text_length)
    ids = 16 * text(limits.max_hub_id_length)
    return 6 * limits.max_metadata_bytes + votes + texts + ids + 1024


def check_limit(field: str, value: int, limits: Limits) -> int:
    """A page size: 0 means the default; otherwise 1 to ``max_page``."""
    if value == 0:
        return limits.default_page
    if not 1 <= value <= limits.max_page:
        raise InvalidArgument(f"{field} must be between 1 and {limits.max_page}, got {value}")
    return value


def encode_cursor(kind: str, *key: str | float | int) -> str:
    """An opaque page cursor: where a listing of ``kind`` stopped, as URL-safe base64 of
    a JSON list (it can go in a query string as it is)."""
    text = json.dumps([kind, *key], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode("ascii").rstrip("=")


def decode_cursor(field: str, cursor: str, kind: str, *types: type) -> list[Any]:
    """The key a cursor of ``kind`` holds, each part of the matching type; InvalidArgument
    for anything else (another listing's cursor, a truncated or made-up one)."""
    invalid = InvalidArgument(f"{field} is not a cursor this listing gave out; start again without one")
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise invalid
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise invalid from None
    if not isinstance(parts, list) or len(parts) != len(types) + 1 or parts[0] != kind:
        raise invalid
    key = parts[1:]
    for part, expected in zip(key, types, strict=True):
        if isinstance(part, bool) or not isinstance(part, int | float if expected is float else expected):
            raise invalid
    return key
