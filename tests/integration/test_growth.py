"""Growth (issue 17): a hub that has seen 100,000 distinct agents, 10,000 sessions of 100
participants and hundreds of thousands of activities, some with metadata near the limit,
still answers every route, RPC, WebSocket and SSE connect, and a restarted bridge,
every answer within its byte budget and both processes' memory within their bounds.

The load and the probes are bench/growth.py's; `python -m bench.growth` runs the full
million activities (docs/RELIABILITY.md has its figures). The memory store keeps this
test to a minute or two of CI.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.growth import GrowthLoad, grow, probe, probe_rpcs, rss_kb
from collab_grpc.config import ServerConfig
from tests.support.processes import BridgeProcess
from tests.support.rpc import WRITE_KEY
from tests.support.stack import BRIDGE_ENV, running_stack, wait_ready

pytestmark = pytest.mark.integration

BUDGET = ServerConfig().max_reply_bytes
# 100,000 agents: the scale at which issue 17's failures came (from about 35,000 on).
# Sessions of 100 participants are what cost the load most (each is a record of 100
# ids, for the server and for the bridge that follows it): 3,000 is three times both
# what a snapshot lists (max_snapshot_sessions) and what fills a reply's byte budget
# (about 800 of them), and they name 300,000 participants over the agents.
SESSIONS = 3 * ServerConfig().max_snapshot_sessions
LOAD = GrowthLoad(agents=100_000, sessions=SESSIONS, participants=100, activities=300_000)
# The bridge's JSON of a budgeted reply adds field names and ISO times to what the
# protobuf carries: REST bodies stay within twice the budget, and the initial
# collaboration_state within 1 MiB, what WebSocket client libraries take by default.
JSON_BUDGET = 2 * BUDGET
WEBSOCKET_DEFAULT_MAX = 1024 * 1024
# Resident memory after the load (documented in docs/RELIABILITY.md, "Growth").
SERVER_RSS_BOUND_KB = 640 * 1024
BRIDGE_RSS_BOUND_KB = 200 * 1024
SERVER_ENV = {
    "COLLAB_STORE": "memory",
    # Activities the load leaves open expire within seconds, as abandoned ones would.
    "COLLAB_ACTIVITY_TTL": "2",
}


def test_a_grown_hub_answers_everything_within_its_budgets(tmp_path: Path) -> None:
    with running_stack(tmp_path, SERVER_ENV) as stack:
        assert stack.server.process is not None and stack.bridge.process is not None
        report = asyncio.run(grow(stack.server.target, WRITE_KEY, LOAD))
        assert report.recorded == LOAD.activities and not report.refused, report.refused
        assert report.sessions == LOAD.sessions

        rpc_sizes = asyncio.run(probe_rpcs(stack.server.target, WRITE_KEY, report))
        over = {name: size for name, size in rpc_sizes.items() if size > BUDGET}
        assert not over, f"gRPC answers over the {BUDGET}-byte budget: {over}"

        found = asyncio.run(probe(stack.bridge.http, stack.bridge.ws, WRITE_KEY, report))
        assert not found.failures, found.failures
        over = {name: size for name, size in found.sizes.items() if size > JSON_BUDGET}
        assert not over, f"bridge answers over {JSON_BUDGET} bytes: {over}"
        assert found.sizes["websocket collaboration_state"] <= WEBSOCKET_DEFAULT_MAX
        # Exact totals, whatever the lists leave out.
        assert found.totals["total_agents"] == LOAD.agents
        assert found.totals["agents_omitted"] == LOAD.agents - ServerConfig().max_status_agents
        assert found.totals["active_collaborations"] == LOAD.sessions

        server_kb, bridge_kb = rss_kb(stack.server.process.pid), rss_kb(stack.bridge.process.pid)
        assert server_kb <= SERVER_RSS_BOUND_KB, f"server RSS {server_kb} KB"
        assert bridge_kb <= BRIDGE_RSS_BOUND_KB, f"bridge RSS {bridge_kb} KB"

        # A bridge started over the grown state follows it and serves every route.
        assert stack.bridge.stop() == 0
        restarted = BridgeProcess(stack.server.target, data_dir=tmp_path / "bridge2", env=BRIDGE_ENV).start()
        stack.bridge = restarted
        wait_ready(stack)
        again = asyncio.run(probe(restarted.http, restarted.ws, WRITE_KEY, report))
        assert not again.failures, again.failures
        assert again.totals["total_agents"] == LOAD.agents
