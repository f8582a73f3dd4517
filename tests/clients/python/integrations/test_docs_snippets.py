"""The Pydantic AI lines of docs/INTEGRATIONS.md, run as written (they set the process's
global tracer provider, which a process sets once: so in a process of their own) against
a real `collab-server`, on Pydantic AI's TestModel."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from collab_grpc.v1 import collaboration_pb2 as pb
from tests.clients.python.integrations.conftest import Hub, eventually, one

pytestmark = pytest.mark.integration
DOC = Path(__file__).resolve().parents[4] / "docs" / "INTEGRATIONS.md"


def snippet(section: str) -> str:
    """The first Python block of a section of docs/INTEGRATIONS.md."""
    text = DOC.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", body, re.S)
    assert found, f"no Python block in {section}"
    return found.group(1)


def test_the_pydantic_ai_lines_as_written(hub: Hub) -> None:
    program = (
        snippet("Pydantic AI")
        + "from pydantic_ai.models.test import TestModel\n"
        + "Agent(TestModel(), name='documented').run_sync('hello')\n"
        + "provider.shutdown()\n"
    )
    subprocess.run([sys.executable, "-c", program], check=True, timeout=60, env=dict(os.environ))
    run = eventually(lambda: one(hub.activities(), agent_id="documented", activity_type=pb.ACTIVITY_TYPE_AGENT_STARTED))
    assert run.status == pb.ACTIVITY_STATUS_COMPLETED
