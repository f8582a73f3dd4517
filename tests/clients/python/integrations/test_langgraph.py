"""A LangGraph graph of plain functions with a tool node, on a fake chat model from
langchain_core (no network), reporting through CollabCallbackHandler to a real
`collab-server`: the tool call the test holds open is running in the hub, as a task of
the node that asked for it; then the whole run is a tree in one session."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from collab.integrations.langchain import CollabCallbackHandler
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.clients.python.integrations.conftest import Hub, eventually, meta, one

pytestmark = pytest.mark.integration


@pytest.fixture
def handler(hub: Hub) -> Iterator[CollabCallbackHandler]:
    handler = CollabCallbackHandler()
    try:
        yield handler
    finally:
        handler.shutdown()


def build_graph(
    lookup_may_finish: threading.Event, lookup_started: threading.Event, model_may_answer: threading.Event
) -> Any:
    @tool
    def lookup(order: str) -> str:
        """Look an order up."""
        lookup_started.set()
        assert lookup_may_finish.wait(30)
        return f"{order} shipped"

    def replies() -> Iterator[AIMessage]:
        # The first call answers once the test saw it running: its start reaches the hub
        # alone, and what it learns at its end (usage, model) comes at completion.
        assert model_may_answer.wait(30)
        yield from [
            AIMessage(
                content="",
                tool_calls=[{"name": "lookup", "args": {"order": "A-1"}, "id": "call-1"}],
                usage_metadata={"input_tokens": 20, "output_tokens": 5, "total_tokens": 25},
                response_metadata={"model_name": "fake-model-1", "finish_reason": "tool_calls"},
            ),
            AIMessage(
                content="A-1 has shipped.",
                usage_metadata={"input_tokens": 30, "output_tokens": 7, "total_tokens": 37},
                response_metadata={"model_name": "fake-model-1", "finish_reason": "stop"},
            ),
        ]

    model = GenericFakeChatModel(messages=replies())

    def planner(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    def reviewer(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage(content="reviewed: " + str(state["messages"][-1].content))]}

    graph = StateGraph(MessagesState)
    graph.add_node("planner", planner)
    graph.add_node("tools", ToolNode([lookup]))
    graph.add_node("reviewer", reviewer)
    graph.add_edge(START, "planner")
    graph.add_conditional_edges("planner", tools_condition, {"tools": "tools", END: "reviewer"})
    graph.add_edge("tools", "planner")
    graph.add_edge("reviewer", END)
    return graph.compile(name="support")


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_a_held_tool_call_live_then_the_graph_as_a_tree(hub: Hub, handler: CollabCallbackHandler, mode: str) -> None:
    lookup_started, lookup_may_finish, model_may_answer = threading.Event(), threading.Event(), threading.Event()
    graph = build_graph(lookup_may_finish, lookup_started, model_may_answer)
    result: dict[str, Any] = {}

    def run() -> None:
        config = {"callbacks": [handler], "configurable": {"thread_id": "thread-7"}}
        inputs = {"messages": [HumanMessage(content="Where is A-1?")]}
        if mode == "invoke":
            result.update(graph.invoke(inputs, config=config))
        else:  # the handler's sync methods called inline from the event loop
            result.update(asyncio.run(graph.ainvoke(inputs, config=config)))

    runner = threading.Thread(target=run)
    runner.start()
    try:
        # The first model call is running: active in the hub, nothing it learns at its end yet.
        live_chat = eventually(lambda: one(hub.activities(), meta_gen_ai__operation__name="chat"))
        assert live_chat.status == pb.ACTIVITY_STATUS_ACTIVE
        assert meta(live_chat, "gen_ai.usage.input_tokens") is None
        model_may_answer.set()
        assert lookup_started.wait(30)
        # The tool is still running: the hub shows it active, a task of the planner node.
        running_tool = eventually(lambda: one(hub.activities(), activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED))
        assert running_tool.status == pb.ACTIVITY_STATUS_ACTIVE
        assert running_tool.agent_id == "planner"
        assert running_tool.metadata["gen_ai.tool.name"] == "lookup"
        graph_run = one(hub.activities(), agent_id="support")
        assert graph_run is not None and graph_run.status == pb.ACTIVITY_STATUS_ACTIVE
    finally:
        model_may_answer.set()
        lookup_may_finish.set()
        runner.join(30)
    assert result["messages"][-1].content == "reviewed: A-1 has shipped."
    assert handler.flush(10)

    final = hub.activities()
    by_id = {a.activity_id: a for a in final}
    graph_run = one(final, agent_id="support")
    tool_call = one(final, activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED)
    assert graph_run and tool_call
    assert graph_run.activity_type == pb.ACTIVITY_TYPE_AGENT_STARTED
    assert graph_run.metadata["gen_ai.conversation.id"] == "thread-7"
    # The nodes as agents: the planner ran twice, the reviewer once, each under the graph;
    # the tool node is not an agent, its tool hangs from the graph.
    nodes = sorted(
        (a.agent_id, a.parent_activity_id)
        for a in final
        if a.activity_type == pb.ACTIVITY_TYPE_AGENT_STARTED and a.activity_id != graph_run.activity_id
    )
    assert nodes == [("planner", graph_run.activity_id)] * 2 + [("reviewer", graph_run.activity_id)]
    assert tool_call.parent_activity_id == graph_run.activity_id
    assert tool_call.metadata["gen_ai.tool.call.id"] == "call-1"
    # Two model calls, each under a planner run.
    chats = [a for a in final if meta(a, "gen_ai.operation.name") == "chat"]
    assert len(chats) == 2
    assert all(by_id[a.parent_activity_id].agent_id == "planner" == a.agent_id for a in chats)
    assert all(a.activity_type == pb.ACTIVITY_TYPE_MESSAGE_SENT for a in chats)
    # What each call learnt at its end (usage, the model that answered, why it stopped),
    # merged into its activity at completion.
    learnt = sorted(
        (
            meta(a, "gen_ai.usage.input_tokens"),
            meta(a, "gen_ai.usage.output_tokens"),
            meta(a, "gen_ai.response.model"),
            MessageToDict(a.metadata).get("gen_ai.response.finish_reasons"),
        )
        for a in chats
    )
    assert learnt == [(20, 5, "fake-model-1", ["tool_calls"]), (30, 7, "fake-model-1", ["stop"])]
    assert {a.session_id for a in final} == {graph_run.session_id} and graph_run.session_id
    assert all(a.status == pb.ACTIVITY_STATUS_COMPLETED for a in final), [(a.agent_id, a.status) for a in final]
    assert hub.client.get_collaboration(graph_run.session_id).session.HasField("ended_at")
    assert handler.dropped == 0 and handler.rejected == 0


def test_a_failing_node_fails_its_activity_and_the_graph(hub: Hub, handler: CollabCallbackHandler) -> None:
    def fetch(state: MessagesState) -> dict[str, Any]:
        raise ValueError("upstream timed out")

    graph = StateGraph(MessagesState)
    graph.add_node("fetch", fetch)
    graph.add_edge(START, "fetch")
    graph.add_edge("fetch", END)
    with pytest.raises(ValueError, match="upstream timed out"):
        graph.compile(name="pipeline").invoke({"messages": []}, config={"callbacks": [handler]})
    assert handler.flush(10)
    final = hub.activities()
    node, workflow = one(final, agent_id="fetch"), one(final, agent_id="pipeline")
    assert node and workflow
    assert node.parent_activity_id == workflow.activity_id
    assert (node.status, node.failure_reason) == (pb.ACTIVITY_STATUS_FAILED, "ValueError: upstream timed out")
    assert workflow.status == pb.ACTIVITY_STATUS_FAILED


def test_agent_nodes_names_the_nodes_that_are_agents(hub: Hub) -> None:
    handler = CollabCallbackHandler(agent_nodes={"planner"})
    graph = StateGraph(MessagesState)
    graph.add_node("planner", lambda state: {"messages": [AIMessage(content="plan")]})
    graph.add_node("formatter", lambda state: {"messages": [AIMessage(content="formatted")]})
    graph.add_edge(START, "planner")
    graph.add_edge("planner", "formatter")
    graph.add_edge("formatter", END)
    graph.compile(name="pipeline").invoke({"messages": []}, config={"callbacks": [handler]})
    handler.shutdown()
    assert sorted(a.agent_id for a in hub.activities()) == ["pipeline", "planner"]
