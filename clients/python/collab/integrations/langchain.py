"""LangGraph and LangChain runs in the hub, live from the moment each step starts.

    from collab.integrations.langchain import CollabCallbackHandler

    graph.invoke(inputs, config={"callbacks": [CollabCallbackHandler()]})   # COLLAB_* variables

A LangChain callback handler: every run (a graph, its nodes, a chat model call, a tool
call) reports its start and its end, with ``run_id`` as the span and ``parent_run_id``
as its parent. Each becomes an OTLP span with the GenAI attributes and goes through the
one mapping table (collab_grpc/otlp.py):

- the outermost run (a compiled graph, or any chain invoked with the handler) ->
  ``invoke_workflow``: an ``agent_started`` of an agent named after the run (a graph's
  ``name``, "LangGraph" unless compiled with another); the ``thread_id`` of the run's
  config (else the run id) is ``gen_ai.conversation.id``: its collaboration session;
- a graph node -> ``invoke_agent``, agent = the node's name. A node run is the chain run
  whose name is its metadata's ``langgraph_node``; runs inside a node (the runnables a
  node calls) carry the same metadata under other names and are not agents. Nodes in
  ``tool_nodes`` (default ``("tools",)``, the name of LangGraph's ``ToolNode``) are not
  agents: the tools they run are tasks of the agent node that ran last before them in
  the same graph run (the one that asked for them). When ``agent_nodes`` is given, only
  the nodes named there are agents;
- a chat model run -> ``chat``, an LLM run -> ``text_completion`` (``message_sent``,
  with the model name; token usage, the model that answered and the finish reasons are
  merged into its metadata when it ends);
- a tool run -> ``execute_tool`` (``task_assigned``, ``gen_ai.tool.name``);
- any other chain run (a runnable sequence, a hidden LangGraph step) is not reported:
  what runs under it hangs from its nearest reported ancestor.

A run's error (``on_*_error``) fails its activity with the error as the reason. Never in
the graph's way: see `collab.integrations.live`.

Needs the ``langchain`` extra (``langchain-core``).
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from collab import Client
from collab.integrations.live import DEFAULT_MAX_OPEN, LiveSpans, ReportsLiveSpans, usage_attributes
from collab.integrations.spans import DEFAULT_MAX_BATCH, DEFAULT_MAX_BUFFER, DEFAULT_MAX_DELAY

__all__ = ["CollabCallbackHandler"]

SERVICE = "langchain"
NODE = "langgraph_node"
HIDDEN = "langgraph:hidden"


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _model_attributes(
    serialized: dict[str, Any] | None, metadata: dict[str, Any] | None, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The model a chat model or LLM run calls, as LangChain tells it (its ``ls_*``
    metadata, else its invocation parameters)."""
    metadata = metadata or {}
    parameters = kwargs.get("invocation_params") or {}
    attributes: dict[str, Any] = {}
    model = metadata.get("ls_model_name") or parameters.get("model") or parameters.get("model_name")
    if isinstance(model, str) and model:
        attributes["gen_ai.request.model"] = model
    provider = metadata.get("ls_provider") or parameters.get("_type")
    if isinstance(provider, str) and provider:
        attributes["gen_ai.provider.name"] = provider
    return attributes


def _ended(response: Any) -> dict[str, Any]:
    """What an LLM result tells at the end: token usage (summed over its generations'
    ``usage_metadata``, else the provider's ``llm_output["token_usage"]``), the model
    that answered and the finish reasons."""
    totals: dict[str, int] = {}
    model = ""
    reasons: list[str] = []
    for generations in getattr(response, "generations", None) or []:
        for generation in generations:
            message = getattr(generation, "message", None)
            for attribute, count in usage_attributes(getattr(message, "usage_metadata", None)).items():
                totals[attribute] = totals.get(attribute, 0) + count
            details = {**(getattr(generation, "generation_info", None) or {})}
            details.update(getattr(message, "response_metadata", None) or {})
            name = details.get("model_name") or details.get("model")
            if isinstance(name, str) and name:
                model = name
            reason = details.get("finish_reason") or details.get("stop_reason")
            if isinstance(reason, str) and reason:
                reasons.append(reason)
    output = getattr(response, "llm_output", None)
    output = output if isinstance(output, dict) else {}
    attributes: dict[str, Any] = totals or usage_attributes(output.get("token_usage"))
    name = output.get("model_name") or output.get("model")
    model = model or (name if isinstance(name, str) else "")
    if model:
        attributes["gen_ai.response.model"] = model
    if reasons:
        attributes["gen_ai.response.finish_reasons"] = reasons
    return attributes


class CollabCallbackHandler(ReportsLiveSpans, BaseCallbackHandler):
    """``client``: the hub to report to (default: a Client from COLLAB_* variables, closed
    on ``shutdown``). ``agent_nodes``: the graph nodes that are agents (default: every
    node not in ``tool_nodes``). ``max_open`` runs tracked at once; ``max_batch``,
    ``max_delay``, ``max_buffer`` as for `collab.integrations.spans.SpanSender`."""

    # Called in the run's own thread, in order: a start is queued before its children's.
    run_inline = True

    def __init__(
        self,
        client: Client | None = None,
        *,
        agent_nodes: Collection[str] | None = None,
        tool_nodes: Collection[str] = ("tools",),
        max_open: int = DEFAULT_MAX_OPEN,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_delay: float = DEFAULT_MAX_DELAY,
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        self.spans = LiveSpans(
            SERVICE, client, max_open=max_open, max_batch=max_batch, max_delay=max_delay, max_buffer=max_buffer
        )
        self.agent_nodes = None if agent_nodes is None else frozenset(agent_nodes)
        self.tool_nodes = frozenset(tool_nodes)
        self.max_open = max_open
        self._lock = threading.Lock()
        # Per trace: the agent node that started last. Per open tool node run: its agent.
        self._last_agent: dict[str, str] = {}
        self._tool_node_agent: dict[str, str] = {}
        self._roots: set[str] = set()

    def _is_agent_node(self, name: str) -> bool:
        if name.startswith("__") or name in self.tool_nodes:
            return False
        return self.agent_nodes is None or name in self.agent_nodes

    # -- chains: the graph, its nodes, everything else ------------------------------------

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        run, parent = str(run_id), str(parent_run_id) if parent_run_id else None
        metadata = metadata or {}
        name = kwargs.get("name") or (serialized or {}).get("name") or "chain"
        node = metadata.get(NODE)
        # The outermost run this handler sees (also when the handler was given to an inner call).
        if parent is None or not self.spans.is_open(parent):
            conversation = metadata.get("thread_id")
            attributes = {
                "gen_ai.operation.name": "invoke_workflow",
                "gen_ai.agent.name": str(name),
                "gen_ai.conversation.id": str(conversation) if conversation else run,
            }
            with self._lock:
                self._roots.add(run)
            self.spans.start(run, str(name), attributes, trace=run)
            return
        is_node = node == name and HIDDEN not in (tags or [])
        if is_node and self._is_agent_node(str(name)):
            self.spans.start(
                run, str(name), {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": str(name)}, parent=parent
            )
            trace = self.spans.trace_of(run)
            with self._lock:
                if trace is not None and (trace in self._last_agent or len(self._last_agent) < self.max_open):
                    self._last_agent[trace] = str(name)
            return
        self.spans.skip(run, parent=parent)
        if is_node and name in self.tool_nodes:
            trace = self.spans.trace_of(run)
            with self._lock:
                agent = self._last_agent.get(trace or "")
                if agent and len(self._tool_node_agent) < self.max_open:
                    self._tool_node_agent[run] = agent

    def _chain_finished(self, run_id: UUID, error: BaseException | None) -> None:
        run = str(run_id)
        trace = self.spans.trace_of(run)
        with self._lock:
            self._tool_node_agent.pop(run, None)
            if run in self._roots:
                self._roots.discard(run)
                self._last_agent.pop(trace or "", None)
        self.spans.end(run, error=None if error is None else _error(error))

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._chain_finished(run_id, None)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._chain_finished(run_id, error)

    # -- tools -------------------------------------------------------------------------

    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        parent = str(parent_run_id) if parent_run_id else None
        name = kwargs.get("name") or (serialized or {}).get("name") or "tool"
        attributes: dict[str, Any] = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": str(name)}
        call_id = kwargs.get("tool_call_id")
        if isinstance(call_id, str) and call_id:
            attributes["gen_ai.tool.call.id"] = call_id
        with self._lock:
            agent = self._tool_node_agent.get(parent or "")
        if agent:
            attributes["gen_ai.agent.name"] = agent
        self.spans.start(str(run_id), str(name), attributes, parent=parent)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.spans.end(str(run_id))

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.spans.end(str(run_id), error=_error(error))

    # -- models ------------------------------------------------------------------------

    def _model_started(
        self,
        operation: str,
        serialized: dict[str, Any] | None,
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        attributes = {"gen_ai.operation.name": operation, **_model_attributes(serialized, metadata, kwargs)}
        name = f"{operation} {attributes.get('gen_ai.request.model', '')}".strip()
        self.spans.start(str(run_id), name, attributes, parent=str(parent_run_id) if parent_run_id else None)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._model_started("chat", serialized, run_id, parent_run_id, metadata, kwargs)

    def on_llm_start(
        self,
        serialized: dict[str, Any] | None,
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._model_started("text_completion", serialized, run_id, parent_run_id, metadata, kwargs)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.spans.end(str(run_id), attributes=_ended(response))

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.spans.end(str(run_id), error=_error(error))

    # -- the handler's own lifetime ----------------------------------------------------------
