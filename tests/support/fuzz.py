"""Property-based fuzzing helpers: reproducible hypothesis runs that count their examples,
and strategies for the junk clients send."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

__all__ = ["json_values", "junk_text", "run_property", "scalars", "ws_messages", "ws_texts"]

T = TypeVar("T")


def run_property(name: str, strategy: st.SearchStrategy[T], check: Callable[[T], object], max_examples: int) -> int:
    """Run ``check`` on examples of ``strategy``: derandomized (the same examples on every
    run, so CI is reproducible), no deadline (the machine is shared), no example database.
    Returns, and prints for docs/RELIABILITY.md, how many examples ran; fails unless at
    least half the asked-for number did (a strategy that cannot generate proves nothing)."""
    count = 0

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(strategy)
    def prop(value: T) -> None:
        nonlocal count
        count += 1
        check(value)

    prop()
    print(f"hypothesis {name}: {count} examples")
    assert count >= max_examples // 2, f"{name}: only {count} of {max_examples} examples ran"
    return count


def scalars() -> st.SearchStrategy[Any]:
    """JSON scalars and the values JSON libraries let through anyway: NaN, infinities,
    integers beyond a double, strings with control characters and lone surrogates."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=2**63, max_value=2**1100),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308]),
        junk_text(),
    )


def junk_text(max_size: int = 64) -> st.SearchStrategy[str]:
    """Any text, with lone surrogates and control characters often enough to matter."""
    alphabet = st.one_of(
        st.characters(codec=None, exclude_categories=()),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),
        st.characters(max_codepoint=0x20, exclude_categories=()),
    )
    # Joined by hand: st.text() keeps lone surrogates rare.
    return st.lists(alphabet, max_size=max_size).map("".join)


def json_values(max_leaves: int = 30) -> st.SearchStrategy[Any]:
    """Nested lists and objects of ``scalars``."""
    return st.recursive(
        scalars(),
        lambda children: st.lists(children, max_size=5) | st.dictionaries(junk_text(16), children, max_size=5),
        max_leaves=max_leaves,
    )


# What a client may name in `subscribe` (bridge.protocol's names, spelled out so the
# strategy does not import the code under test).
SUBSCRIBE_NAMES = [
    "agent_activity",
    "activity_completed",
    "agent_status_update",
    "memory_update",
    "collaboration_started",
    "collaboration_ended",
    "decision_recorded",
    "agent_started",
    "memory_write",
    "council_debate",
]


def ws_messages() -> st.SearchStrategy[dict[str, Any]]:
    """Objects shaped like WebSocket client messages, with every field wrong in every way
    (and now and then right: a `ping`, a `subscribe` with good names)."""
    names = st.lists(st.sampled_from(SUBSCRIBE_NAMES) | junk_text(80), max_size=30)
    return st.fixed_dictionaries(
        {"type": st.sampled_from(["ping", "subscribe"]) | scalars() | json_values(5)},
        optional={"activity_types": names | json_values(10), "extra": json_values(10)},
    )


def _nested(depth: int, opener: str, closed: bool) -> str:
    return opener * depth + ("1" + ("]" if opener == "[" else "}") * depth if closed else "")


def ws_texts(max_bytes: int) -> st.SearchStrategy[str]:
    """WebSocket text frames: JSON of any shape (escaped or not, NaN included),
    message-shaped objects, deep nesting within the size limit, random text, cut-off
    JSON, and pings padded to just under and at ``max_bytes``."""
    return st.one_of(
        st.builds(json.dumps, json_values(), ensure_ascii=st.booleans()),
        st.builds(json.dumps, ws_messages(), ensure_ascii=st.booleans()),
        st.builds(_nested, st.integers(1, 40_000), st.sampled_from(["[", '{"a":']), st.booleans()),
        junk_text(2000),
        st.builds(lambda n: json.dumps({"type": "ping", "pad": "x" * n}), st.integers(max_bytes - 40, max_bytes)),
        st.builds(lambda text, cut: text[:cut], st.builds(json.dumps, ws_messages()), st.integers(0, 200)),
    )
