"""collab_grpc.model: ``copied``, the shallow copy every write makes of what it records."""

from __future__ import annotations

import dataclasses

import pytest

from collab_grpc.model import (
    Activity,
    ActivityCompletion,
    ActivityType,
    Decision,
    MemoryOperation,
    MemoryUpdate,
    Session,
    copied,
)

MODELS = [
    Activity("act_1", "agent_1", "eng", ActivityType.MESSAGE_SENT, 1.5, {"a": [1]}, ["agent_2"], session_id="s"),
    Session("s", ["agent_1", "agent_2"], "debate", 2.0, {"k": "v"}, activity_count=4),
    Decision("d", "s", "agent_1", "ship it", "tests pass", {"agent_2": "yes"}, {}, 3.0),
    MemoryUpdate(MemoryOperation.WRITE, "item", "agent_1", 4.0, {"size": 3}),
]


@pytest.mark.parametrize("model", MODELS, ids=lambda model: type(model).__name__)
def test_copied_is_what_dataclasses_replace_gives(model: object) -> None:
    copy = copied(model)
    assert copy == dataclasses.replace(model)  # type: ignore[type-var]
    assert copy is not model and type(copy) is type(model)
    for field in dataclasses.fields(model):  # type: ignore[arg-type]
        assert getattr(copy, field.name) is getattr(model, field.name)  # shallow, as replace


def test_a_copy_does_not_follow_later_changes() -> None:
    activity = MODELS[0]
    assert isinstance(activity, Activity)
    copy = copied(activity)
    activity.failure_reason = "later"
    assert copy.failure_reason == ""
    completion = ActivityCompletion(copied(activity), success=False)
    assert completion.activity == activity


def test_single_field_dataclasses_and_refusals() -> None:
    @dataclasses.dataclass
    class One:
        value: int

    @dataclasses.dataclass
    class Derived:
        value: int
        twice: int = dataclasses.field(init=False, default=0)

    assert copied(One(3)) == One(3)
    with pytest.raises(TypeError, match="every field"):
        copied(Derived(1))
