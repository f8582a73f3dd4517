"""Input checks: each refusal is InvalidArgument naming the field and the limit."""

from __future__ import annotations

import datetime
import enum
import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collab_grpc.errors import InvalidArgument
from collab_grpc.validation import (
    Limits,
    _nesting,
    _plain_size,
    check_id,
    check_id_list,
    check_limit,
    check_metadata,
    check_text,
)

LIMITS = Limits()


def nested(depth: int) -> dict[str, Any]:
    """A mapping whose nesting depth (as check_metadata counts it) is ``depth``."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_default_limits() -> None:
    expected = Limits(
        max_metadata_bytes=65536,
        max_metadata_depth=32,
        max_id_length=128,
        max_list_length=100,
        max_text_length=8192,
        max_page=500,
        default_page=50,
    )
    assert Limits() == expected


# -- check_id -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["agent_1", "a", "a" * 128, "agént-ß.7:x", "act_1700000000_agent_1_ab12"])
def test_check_id_accepts(value: str) -> None:
    assert check_id("agent_id", value, LIMITS) == value


def test_check_id_required() -> None:
    with pytest.raises(InvalidArgument, match=r"^agent_id is required$"):
        check_id("agent_id", "", LIMITS)
    assert check_id("agent_id", "", LIMITS, required=False) == ""


def test_check_id_too_long() -> None:
    with pytest.raises(InvalidArgument, match="agent_id is longer than 128 characters"):
        check_id("agent_id", "a" * 129, LIMITS)
    with pytest.raises(InvalidArgument, match="longer than 4"):
        check_id("x", "abcde", Limits(max_id_length=4), required=False)


@pytest.mark.parametrize("value", ["a b", " a", "a\t", "a\nb", "a\x00", "\x7f", "a\u2028b", "a\u00a0b"])
def test_check_id_rejects_space_and_control(value: str) -> None:
    with pytest.raises(InvalidArgument, match="session_id must be printable"):
        check_id("session_id", value, LIMITS, required=False)


# -- check_text -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "engineering", "use postgres, not mysql", "日本語 テキスト", "x" * 8192])
def test_check_text_accepts(value: str) -> None:
    assert check_text("decision", value, LIMITS) == value


def test_check_text_required() -> None:
    with pytest.raises(InvalidArgument, match=r"^decision is required$"):
        check_text("decision", "", LIMITS, required=True)


def test_check_text_length() -> None:
    with pytest.raises(InvalidArgument, match="rationale is longer than 8192 characters"):
        check_text("rationale", "x" * 8193, LIMITS)
    assert check_text("department", "d" * 10, LIMITS, max_length=10) == "d" * 10
    with pytest.raises(InvalidArgument, match="department is longer than 10 characters"):
        check_text("department", "d" * 11, LIMITS, max_length=10)


@pytest.mark.parametrize("value", ["line\nbreak", "tab\there", "bell\x07", "nul\x00", "esc\x1b[0m"])
def test_check_text_rejects_control_characters(value: str) -> None:
    with pytest.raises(InvalidArgument, match="department must not contain control characters"):
        check_text("department", value, LIMITS)


# -- check_id_list ---------------------------------------------------------------------------


def test_check_id_list_accepts_any_iterable() -> None:
    assert check_id_list("participants", (f"a{i}" for i in range(3)), LIMITS) == ["a0", "a1", "a2"]
    assert check_id_list("participants", [], LIMITS) == []
    assert len(check_id_list("participants", [f"a{i}" for i in range(100)], LIMITS)) == 100


def test_check_id_list_min_length() -> None:
    with pytest.raises(InvalidArgument, match=r"participants needs at least 1 entry$"):
        check_id_list("participants", [], LIMITS, min_length=1)
    with pytest.raises(InvalidArgument, match=r"participants needs at least 2 entries$"):
        check_id_list("participants", ["a"], LIMITS, min_length=2)
    assert check_id_list("participants", ["a", "b"], LIMITS, min_length=2) == ["a", "b"]


def test_check_id_list_too_long() -> None:
    with pytest.raises(InvalidArgument, match="related_agents has more than 100 entries"):
        check_id_list("related_agents", [f"a{i}" for i in range(101)], LIMITS)


@pytest.mark.parametrize(("values", "message"), [(["a", ""], r"\[1\] is required"), (["a b"], r"\[0\] must be")])
def test_check_id_list_checks_each_entry(values: list[str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=f"related_agents{message}"):
        check_id_list("related_agents", values, LIMITS)


def test_check_id_list_duplicates() -> None:
    with pytest.raises(InvalidArgument, match="participants has duplicate entries"):
        check_id_list("participants", ["a", "b", "a"], LIMITS)


# -- check_metadata -------------------------------------------------------------------------


def test_check_metadata_returns_a_copy() -> None:
    source = {"k": [1, 2.5, "s", None, True, {"n": {}}]}
    result = check_metadata("metadata", source, LIMITS)
    assert result == source
    assert result is not source


def test_check_metadata_depth() -> None:
    assert check_metadata("metadata", nested(32), LIMITS) == nested(32)
    with pytest.raises(InvalidArgument, match="metadata is nested deeper than 32 levels"):
        check_metadata("metadata", nested(33), LIMITS)
    shallow = Limits(max_metadata_depth=3)
    assert check_metadata("m", {"a": [[1]]}, shallow)  # object, list, list: 3 levels
    with pytest.raises(InvalidArgument, match="deeper than 3"):
        check_metadata("m", {"a": [[[1]]]}, shallow)
    with pytest.raises(InvalidArgument, match="deeper than 3"):
        check_metadata("m", {"a": [{"b": {}}]}, shallow)


def test_check_metadata_very_deep_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="deeper than 32"):
        check_metadata("metadata", nested(5000), LIMITS)


def test_check_metadata_size() -> None:
    limits = Limits(max_metadata_bytes=20)
    assert check_metadata("metadata", {"a": "x" * 12}, limits)  # {"a":"xxxxxxxxxxxx"} is 20 bytes
    with pytest.raises(InvalidArgument, match="metadata is 21 bytes serialised; the limit is 20"):
        check_metadata("metadata", {"a": "x" * 13}, limits)
    # the serialised form counts: json.dumps escapes "é" to six ASCII bytes
    with pytest.raises(InvalidArgument, match="bytes serialised"):
        check_metadata("metadata", {"a": "é" * 3}, limits)


def test_check_metadata_default_size_limit() -> None:
    fits = {"a": "x" * (64 * 1024 - 8)}
    assert check_metadata("metadata", fits, LIMITS) == fits
    with pytest.raises(InvalidArgument, match="65537 bytes"):
        check_metadata("metadata", {"a": "x" * (64 * 1024 - 7)}, LIMITS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_metadata_rejects_non_json_numbers(value: float) -> None:
    with pytest.raises(InvalidArgument, match="metadata is not valid JSON"):
        check_metadata("metadata", {"n": [value]}, LIMITS)


@pytest.mark.parametrize("value", [{1, 2}, b"bytes", object()])
def test_check_metadata_rejects_non_json_values(value: object) -> None:
    with pytest.raises(InvalidArgument, match="metadata"):
        check_metadata("metadata", {"v": value}, LIMITS)


@pytest.mark.parametrize(
    "metadata", [{"v": "a\ud800"}, {"\udfff": 1}, {"v": ["ok", {"w": "\ud83d\ude00"}]}], ids=["value", "key", "pair"]
)
def test_check_metadata_rejects_lone_surrogates(metadata: dict[str, Any]) -> None:
    """A str of lone surrogates (the Python API allows one) is not text: it could not be
    stored, and would fail the commit of every write that shares it."""
    with pytest.raises(InvalidArgument, match="metadata is not valid JSON: a string holds a lone surrogate"):
        check_metadata("metadata", metadata, LIMITS)


def test_check_metadata_accepts_text_beyond_the_bmp() -> None:
    metadata = {"emoji": "\U0001f600", "escaped": "\\ud800 is six characters"}
    assert check_metadata("metadata", metadata, LIMITS) == metadata


# What metadata can hold, with the values where orjson and the json module differ made
# likely: tiny and huge numbers, integers beyond 64 bits, DEL and other control
# characters, non-ASCII text, NaN and infinities, nesting.
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=1e-12, max_value=1e-3),
    st.sampled_from([1e-05, 1e-06, 1.5e-05, 1e16, 1e22, -0.0, 5e-324]),
    st.text(max_size=12),
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=12),
)
_JSON_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
_METADATA = st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=5)


def _exact_size(metadata: dict[str, Any]) -> int | None:
    """What check_metadata measured before its orjson fast path: the json module's size."""
    try:
        return len(json.dumps(metadata, separators=(",", ":"), allow_nan=False).encode())
    except ValueError:
        return None  # NaN or an infinity


def _fast_size(metadata: dict[str, Any]) -> int | None:
    """The size check_metadata takes from orjson, or None where it asks the json module."""
    depth, plain = _nesting(metadata, LIMITS.max_metadata_depth)
    return _plain_size(metadata) if plain and depth <= LIMITS.max_metadata_depth else None


@settings(max_examples=300, derandomize=True, database=None)
@given(_METADATA)
def test_fast_size_is_the_json_modules_size_or_defers_to_it(metadata: dict[str, Any]) -> None:
    fast = _fast_size(metadata)
    if fast is not None:
        assert fast == _exact_size(metadata)


@settings(max_examples=300, derandomize=True, database=None)
@given(_METADATA, st.integers(min_value=2, max_value=200))
def test_check_metadata_decides_as_the_json_module_measures(metadata: dict[str, Any], limit: int) -> None:
    limits = Limits(max_metadata_bytes=limit, max_metadata_depth=3)
    size = _exact_size(metadata)
    deep = _depth(metadata) > 3
    if size is None or deep or size > limit:
        with pytest.raises(InvalidArgument):
            check_metadata("metadata", metadata, limits)
    else:
        assert check_metadata("metadata", metadata, limits) == metadata


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(item) for item in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(item) for item in value), default=0)
    return 0


class _Colour(enum.Enum):
    RED = "red"


class _Sizes(dict[str, Any]):
    """A dict whose items() the json module uses and orjson does not."""

    def items(self) -> Any:
        return [("zz", 1)]


@pytest.mark.parametrize(
    "metadata",
    [
        {"n": 1e-05},
        {"n": 2e-06},
        {"n": -3e-05},
        {"s": "\x7f"},
        {"s": "é"},
        {"n": 2**64},
        {"n": float("nan")},
        {"v": _Colour.RED},
        {"v": datetime.datetime(2026, 1, 1)},
        {"v": uuid.UUID(int=1)},
        {"v": _Sizes(b=1)},
        {"v": (1, 2)},
        {1: "int key"},
    ],
)
def test_fast_size_defers_where_orjson_writes_otherwise_or_accepts_more(metadata: dict[Any, Any]) -> None:
    assert _fast_size(metadata) is None


def test_fast_size_of_plain_metadata() -> None:
    metadata = {"a": [1, {"b": 2.5, "z": 0.0, "t": True, "n": None}], "c": "x-e-1e-05"}
    assert _fast_size(metadata) == _exact_size(metadata) == len(json.dumps(metadata, separators=(",", ":")))
    assert _nesting(nested(3), 2) == (3, True)  # deeper than the limit: limit + 1
    assert _nesting(nested(9), 2) == (3, True)


def test_mappings_that_are_not_dicts_are_levels_too() -> None:
    # not plain (the json module measures it), but nested all the same
    assert _nesting({"a": _Sizes(b={"c": [1]})}, 32) == (4, False)
    with pytest.raises(InvalidArgument, match="deeper than 3"):
        check_metadata("m", {"a": _Sizes(b={"c": [1]})}, Limits(max_metadata_depth=3))


@pytest.mark.parametrize("value", [_Colour.RED, datetime.datetime(2026, 1, 1), uuid.UUID(int=1), datetime.date.today()])
def test_check_metadata_refuses_what_the_json_module_cannot_write(value: object) -> None:
    with pytest.raises(InvalidArgument, match="metadata is not valid JSON"):
        check_metadata("metadata", {"v": value}, LIMITS)


# -- check_limit ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(0, 50), (1, 1), (50, 50), (499, 499), (500, 500)])
def test_check_limit_accepts(value: int, expected: int) -> None:
    assert check_limit("limit", value, LIMITS) == expected


@pytest.mark.parametrize("value", [-1, -500, 501, 1_000_000])
def test_check_limit_rejects(value: int) -> None:
    with pytest.raises(InvalidArgument, match=f"limit must be between 1 and 500, got {value}"):
        check_limit("limit", value, LIMITS)


def test_check_limit_custom_page() -> None:
    limits = Limits(max_page=10, default_page=3)
    assert check_limit("limit", 0, limits) == 3
    assert check_limit("limit", 10, limits) == 10
    with pytest.raises(InvalidArgument):
        check_limit("limit", 11, limits)


def test_printable_checks_agree_with_the_character_by_character_definition() -> None:
    # Ids: printable and no white space; text: printable (white space allowed only where
    # printable, i.e. the ASCII space). Checked for every code point.
    from collab_grpc.validation import _printable

    for code in range(0x110000):
        char = chr(code)
        assert _printable(char, allow_spaces=False) == (char.isprintable() and not char.isspace()), hex(code)
        assert _printable(char, allow_spaces=True) == char.isprintable(), hex(code)
