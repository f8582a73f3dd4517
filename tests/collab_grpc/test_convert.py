"""convert.struct_to_dict against protobuf's own json_format, on random Structs."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from collab_grpc.convert import struct_to_dict
from collab_grpc.errors import InvalidArgument

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, derandomize=True, database=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_struct_to_dict_equals_json_format(data: dict[str, Any]) -> None:
    struct = struct_pb2.Struct()
    struct.update(data)
    # As JSON text: 1 == 1.0 in Python, but not in what clients receive.
    assert json.dumps(struct_to_dict(struct)) == json.dumps(json_format.MessageToDict(struct))


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_at_any_depth(number: float) -> None:
    struct = struct_pb2.Struct()
    struct.update({"outer": {"list": [1, number]}})
    with pytest.raises(InvalidArgument, match="metadata is not valid JSON"):
        struct_to_dict(struct)


def test_an_unset_value_reads_as_null_as_json_format_has_it() -> None:
    struct = struct_pb2.Struct()
    struct.fields["empty"].Clear()
    assert struct_to_dict(struct) == json_format.MessageToDict(struct) == {"empty": None}
