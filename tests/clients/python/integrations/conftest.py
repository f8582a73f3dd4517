"""A real `collab-server` process per test, and the probes the integration tests share."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from collab import Client
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.processes import ServerProcess
from tests.support.rpc import WRITE_KEY

ENV = {"COLLAB_API_KEYS": WRITE_KEY, "COLLAB_RATE_LIMIT": "0"}
T = TypeVar("T")


@dataclass
class Hub:
    target: str
    client: Client

    def activities(self) -> list[pb.Activity]:
        """Every activity on the hub, oldest first."""
        return list(reversed(self.client.activity_feed(limit=200)))


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    """The hub, and the COLLAB_* variables that reach it: the integrations are made as
    docs/INTEGRATIONS.md writes them, with no arguments."""
    with ServerProcess(tmp_path, env=ENV) as server, Client(server.target, WRITE_KEY) as client:
        monkeypatch.setenv("COLLAB_GRPC_TARGET", server.target)
        monkeypatch.setenv("COLLAB_TOKEN", WRITE_KEY)
        yield Hub(server.target, client)


def eventually(probe: Callable[[], T | None], within: float = 20.0) -> T:
    """What ``probe`` returns once it returns something (spans reach the hub a batch at a time)."""
    deadline = time.monotonic() + within
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("never happened")
        time.sleep(0.02)


def meta(activity: pb.Activity, name: str) -> object:
    """A metadata entry of an activity (None when absent)."""
    # A Struct has no get(): its [] makes an empty entry for a name it lacks.
    return activity.metadata[name] if name in activity.metadata else None  # noqa: SIM401


def one(activities: list[pb.Activity], **fields: object) -> pb.Activity | None:
    """The activity whose fields (``agent_id``, ``activity_type``...) or metadata entries
    (``meta_<name with dots as __>``) are as given; None if none is, an error if several are."""
    found = [
        activity
        for activity in activities
        if all(
            (meta(activity, name[5:].replace("__", ".")) if name.startswith("meta_") else getattr(activity, name))
            == value
            for name, value in fields.items()
        )
    ]
    assert len(found) <= 1, found
    return found[0] if found else None
