"""collab_grpc.names: the one table between the guide's names and the proto's numbers
(issue 18): every value of each proto enum has exactly one name, the domain enums use the
same names, and the server, the bridge and the SDK all read this table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from bridge import mapping, protocol, rest, schemas
from collab import _requests
from collab_grpc import convert, model, names
from collab_grpc.v1 import collaboration_pb2 as pb

# (proto enum, its value prefix, the Literal of its names, name -> number, number -> name)
TABLES: list[tuple[Any, str, Any, Mapping[str, Any], Mapping[int, str]]] = [
    (pb.ActivityType, "ACTIVITY_TYPE_", names.ActivityTypeName, names.ACTIVITY_TYPES, names.ACTIVITY_TYPE_NAMES),
    (
        pb.ActivityStatus,
        "ACTIVITY_STATUS_",
        names.ActivityStatusName,
        names.ACTIVITY_STATUSES,
        names.ACTIVITY_STATUS_NAMES,
    ),
    (
        pb.MemoryOperation,
        "MEMORY_OPERATION_",
        names.MemoryOperationName,
        names.MEMORY_OPERATIONS,
        names.MEMORY_OPERATION_NAMES,
    ),
    (pb.EventKind, "EVENT_KIND_", names.EventKindName, names.EVENT_KINDS, names.EVENT_KIND_NAMES),
]


@pytest.mark.parametrize(("enum", "prefix", "literal", "numbers", "by_number"), TABLES)
def test_every_proto_value_but_unspecified_has_its_lower_case_name(
    enum: EnumTypeWrapper, prefix: str, literal: Any, numbers: Mapping[str, Any], by_number: Mapping[int, str]
) -> None:
    expected = {
        name.removeprefix(prefix).lower(): number for name, number in enum.items() if not name.endswith("_UNSPECIFIED")
    }
    assert dict(numbers) == expected
    assert set(get_args(literal)) == set(expected)
    assert dict(by_number) == {number: name for name, number in expected.items()}
    assert enum.Value(f"{prefix}UNSPECIFIED") not in by_number


@pytest.mark.parametrize(
    ("domain", "literal"),
    [
        (model.ActivityType, names.ActivityTypeName),
        (model.ActivityStatus, names.ActivityStatusName),
        (model.MemoryOperation, names.MemoryOperationName),
        (model.EventKind, names.EventKindName),
    ],
)
def test_the_domain_enums_have_the_guides_names(domain: type[Any], literal: Any) -> None:
    assert {member.value for member in domain} == set(get_args(literal))


def test_the_tables_cannot_be_changed_by_one_of_their_users() -> None:
    with pytest.raises(TypeError):
        names.ACTIVITY_TYPES["new_type"] = 99  # type: ignore[index]
    with pytest.raises(TypeError):
        names.EVENT_KIND_NAMES[99] = "new_kind"  # type: ignore[index]


def test_the_server_the_bridge_and_the_sdk_read_the_one_table() -> None:
    assert _requests.ACTIVITY_TYPES is names.ACTIVITY_TYPES
    assert _requests.EVENT_KINDS is names.EVENT_KINDS
    assert _requests.MEMORY_OPERATIONS is names.MEMORY_OPERATIONS
    assert vars(rest)["ACTIVITY_TYPES"] is names.ACTIVITY_TYPES
    assert vars(rest)["ACTIVITY_STATUSES"] is names.ACTIVITY_STATUSES
    assert vars(rest)["MEMORY_OPERATIONS"] is names.MEMORY_OPERATIONS
    assert vars(protocol)["ACTIVITY_TYPES"] is names.ACTIVITY_TYPES
    assert vars(mapping)["ACTIVITY_TYPE_NAMES"] is names.ACTIVITY_TYPE_NAMES
    assert schemas.ActivityTypeName is names.ActivityTypeName
    for member, type_number in convert.ACTIVITY_TYPE_TO_PROTO.items():
        assert names.ACTIVITY_TYPES[member.value] == type_number
    for kind, kind_number in convert.EVENT_KIND_TO_PROTO.items():
        assert names.EVENT_KINDS[kind.value] == kind_number
