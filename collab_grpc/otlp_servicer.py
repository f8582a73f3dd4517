"""OTLP/gRPC ``TraceService/Export`` on the server's port: OpenTelemetry spans in.

Each GenAI span becomes an activity by the table in collab_grpc/otlp.py. How a batch
is applied:

- Spans are taken parents first (within the batch), so a tree exported at once is
  recorded top down; a span whose parent is not a GenAI span hangs from its nearest
  GenAI ancestor in the batch.
- A parent that arrives later links its children. Exporters send a span when it ends,
  so the children of a long-running agent span come in batches before it. Such a child
  is recorded at once as a root (nothing is held back) and waits, by its activity id,
  under its parent's span key in a bounded index (``waiting_children``, oldest dropped
  first, counted in ``collab_otlp_links{outcome="dropped"}``). When that span arrives,
  in any later export, its activity is recorded first, then each waiting child is
  linked to it (CollaborationState.link_activity: an ACTIVITY_LINKED event). A span
  that is not GenAI passes its waiting children on to its own parent's key (through the
  dropped spans of its batch), so they link to their nearest GenAI ancestor when it
  comes. Only a child still without a parent is linked, never into a cycle (the core
  refuses, counted as ``refused``). A child exported long before its parent has often
  left the in-memory history (an exported span is completed at once): it is read back
  from the store (``Store.read_activities``), as are ancestors of the parent the cycle
  check needs; one the store does not keep (the memory store, or past its retention) is
  counted as ``evicted``. The index is in memory: it is rebuilt from the activities the
  hub holds in memory (roots with ``otel.parent_span_id`` among the newest
  ``history_limit`` and the open ones) when the server starts or reloads its state, so
  a child that had left that history before a restart is not linked; a child recorded
  by another replica sharing a Redis store waits only in that replica's index (each
  replica links what it recorded), and one whose non-GenAI parent came before a restart
  waits for that span again (not linked).
- ``(trace id, span id)`` is the idempotency key of a span's records: the hub keeps
  which activity a span became in a span index, an IdempotencyCache of its own
  (collab_grpc/idempotency.py: the newest ``span_index`` spans, for 24 hours), so that
  spans never crowd out the idempotency keys of other writes. Its entries are stored by
  the store like any write's answer, and come back after a restart (in the hub's main
  idempotency cache, where they are looked up too). A span seen again (an exporter's
  retry, or the in-process processor's start followed by the span's end) records
  nothing new; an ended span whose activity is still open completes it. A span seen
  again once out of the index (over ``span_index`` spans later) is recorded again.
- ``gen_ai.conversation.id`` is a collaboration session: started when a conversation
  is first seen (participants: that span's agent, type ``conversation``), and ended
  when the span that started it ends. A later span of the same conversation after that
  starts a new session. A span without the attribute joins its GenAI parent's session
  while that session is active.
- Ended spans are completed children first, after every record of the batch: success,
  or failed with the span's status message (else ``error.type``, else ``error``).
  A memory operation's memory update is recorded when its span ends without an error.
- Span times are kept in metadata (``otel.start_time``, ``otel.end_time``, epoch
  seconds): the hub stamps ``timestamp`` and ``completed_at`` with its own clock.
- A span recorded at its start (sent live, in-process) and later sent ended: what the
  ended span's metadata adds or changes (token usage, response model and id, finish
  reasons, end time and duration) is merged into the activity as it completes, within
  the metadata limit (collab_grpc/otlp.py completion_metadata).

Refusals: a span the hub cannot take (bad ids, metadata over the limit...) is counted in
``partial_success.rejected_spans`` with the first reasons in ``error_message``; the others
are recorded. An agent over its rate limit ends the call with RESOURCE_EXHAUSTED, a
``retry-after`` trailer and google.rpc.RetryInfo (exporters wait that long and retry;
what was recorded is not recorded again). A request with more spans than ``max_spans``
is refused whole with INVALID_ARGUMENT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client import Counter

from collab_grpc import metrics
from collab_grpc.errors import BudgetExhausted, CollabError, InvalidArgument, RateLimited
from collab_grpc.idempotency import IdempotencyCache
from collab_grpc.model import Activity, ActivityStatus
from collab_grpc.otlp import SpanPlan, SpanView, completion_metadata, fit_metadata, plan_span, span_key
from collab_grpc.servicer import Context, abort_with
from collab_grpc.state import MAX_LINK_DEPTH, CollaborationState
from collab_grpc.store.base import READ_ACTIVITIES_MAX, Store, StoreUnavailable

__all__ = [
    "DEFAULT_MAX_SPANS",
    "DEFAULT_SPAN_INDEX",
    "DEFAULT_WAITING_CHILDREN",
    "TRACE_SERVICE",
    "OtlpTraceServicer",
    "add_trace_servicer",
    "span_views",
]

TRACE_SERVICE = otlp.DESCRIPTOR.services_by_name["TraceService"].full_name
DEFAULT_MAX_SPANS = 10_000
log = logging.getLogger("collab_grpc.otlp")

# Spans (and conversations) whose records the hub remembers; an entry holds ~100 bytes.
DEFAULT_SPAN_INDEX = 100_000
# Children recorded before their parent span arrived, waiting to be linked (~150 bytes each).
DEFAULT_WAITING_CHILDREN = 100_000
# Reasons quoted in a partial success's error_message; the count says how many more.
MAX_REASONS = 5
# Nesting of an attribute value kept (kvlist in array in ...); deeper is cut.
MAX_VALUE_DEPTH = 4

# Namespaces in the idempotency cache: which activity a span became, which session a
# conversation is. Their "request" is the span's identity, so the fingerprint is fixed.
SPAN_METHOD = "otlp.span"
CONVERSATION_METHOD = "otlp.conversation"
_IDENTITY = hashlib.sha256(b"collab otlp identity").digest()

SPANS = Counter(
    "collab_otlp_spans",
    "OTLP spans received, by outcome: recorded (GenAI, new or completing), duplicate, dropped (not GenAI), rejected",
    ["outcome"],
)

LINKS = Counter(
    "collab_otlp_links",
    "OTLP spans recorded before their parent span, by outcome: linked (to the parent once it came), "
    "refused (the hub would not link them: already has a parent, a cycle, an ancestry not held or stored), "
    "evicted (left the in-memory history and the store keeps no copy: the memory store, or past retention), "
    "dropped (out of the waiting index, oldest first, before their parent came)",
    ["outcome"],
)


class WaitingChildren:
    """Activities recorded before their parent span: parent span key -> the child activity
    ids waiting for it, at most ``capacity`` children in all (the oldest dropped first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._parent_of: OrderedDict[str, str] = OrderedDict()  # child -> key, oldest first
        self._children: dict[str, dict[str, None]] = {}  # key -> children (an ordered set)

    def __len__(self) -> int:
        return len(self._parent_of)

    def __contains__(self, key: str) -> bool:
        return key in self._children

    def add(self, key: str, child: str) -> int:
        """``child`` waits for span ``key`` (and for it only); how many were dropped for room."""
        self._forget(child)
        self._parent_of[child] = key
        self._children.setdefault(key, {})[child] = None
        dropped = 0
        while len(self._parent_of) > self.capacity:
            oldest, oldest_key = self._parent_of.popitem(last=False)
            self._unlist(oldest, oldest_key)
            dropped += 1
        return dropped

    def take(self, key: str) -> list[str]:
        """The children waiting for ``key``, oldest first; they wait no more."""
        children = list(self._children.pop(key, {}))
        for child in children:
            del self._parent_of[child]
        return children

    def clear(self) -> None:
        self._parent_of.clear()
        self._children.clear()

    def _forget(self, child: str) -> None:
        key = self._parent_of.pop(child, None)
        if key is not None:
            self._unlist(child, key)

    def _unlist(self, child: str, key: str) -> None:
        listed = self._children.get(key)
        if listed is not None:
            listed.pop(child, None)
            if not listed:
                del self._children[key]


@dataclass(frozen=True, slots=True)
class _SpanRecord:
    """What a span became: kept (JSON) in the idempotency cache under its key."""

    activity_id: str
    agent_id: str
    session_id: str
    opened_session: bool
    # Its activity was completed and its memory update is still to record (a refusal
    # after the completion, as a rate limit, leaves it for the exporter's retry).
    memory_pending: bool = False

    def encode(self) -> bytes:
        fields = [self.activity_id, self.agent_id, self.session_id, self.opened_session]
        return json.dumps([*fields, True] if self.memory_pending else fields).encode()

    @classmethod
    def decode(cls, answer: bytes) -> _SpanRecord:
        activity_id, agent_id, session_id, opened, *pending = json.loads(answer)
        return cls(activity_id, agent_id, session_id, bool(opened), bool(pending and pending[0]))


def _value(value: common_pb2.AnyValue, depth: int = 0) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(item, depth + 1) for item in value.array_value.values] if depth < MAX_VALUE_DEPTH else []
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values, depth + 1) if depth < MAX_VALUE_DEPTH else {}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def _attributes(pairs: Iterable[common_pb2.KeyValue], depth: int = 0) -> dict[str, Any]:
    return {pair.key: _value(pair.value, depth) for pair in pairs}


def _id_problem(name: str, value: bytes, size: int, *, required: bool = True) -> str | None:
    if not value:
        return f"{name} is required" if required else None
    if len(value) != size:
        return f"{name} must be {size} bytes, got {len(value)}"
    if not any(value):
        return f"{name} must not be all zeros"
    return None


def span_views(request: otlp.ExportTraceServiceRequest) -> tuple[list[SpanView], list[str]]:
    """The request's spans as the mapping reads them, and why any could not be read."""
    views: list[SpanView] = []
    problems: list[str] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                problem = (
                    _id_problem("trace_id", span.trace_id, 16)
                    or _id_problem("span_id", span.span_id, 8)
                    or _id_problem("parent_span_id", span.parent_span_id, 8, required=False)
                )
                if problem is not None:
                    problems.append(f"span {span.name[:64]!r}: {problem}")
                    continue
                views.append(
                    SpanView(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        error=span.status.code == trace_pb2.Status.STATUS_CODE_ERROR,
                        status_message=span.status.message,
                        attributes=_attributes(span.attributes),
                        resource=resource,
                    )
                )
    return views, problems


def parents_first(spans: Sequence[SpanView]) -> list[SpanView]:
    """``spans`` ordered so that a span's parent in the batch comes before it (otherwise
    in the order given), each span once; iterative, and safe with cycles a malformed
    batch may hold."""
    by_key = {span.key: span for span in spans}  # a span sent twice: its last state
    placed: set[str] = set()
    ordered: list[SpanView] = []
    for span in spans:
        chain: list[SpanView] = []
        current: SpanView | None = by_key[span.key]
        while current is not None and current.key not in placed:
            placed.add(current.key)
            chain.append(current)
            current = by_key.get(current.parent_key)
        ordered.extend(reversed(chain))
    return ordered


class OtlpTraceServicer(otlp_grpc.TraceServiceServicer):
    def __init__(
        self,
        state: CollaborationState,
        store: Store,
        *,
        max_spans: int = DEFAULT_MAX_SPANS,
        span_index: int = DEFAULT_SPAN_INDEX,
        waiting_children: int = DEFAULT_WAITING_CHILDREN,
    ) -> None:
        self.state = state
        self.store = store
        self.max_spans = max_spans
        self.index = IdempotencyCache(capacity=span_index)
        self.waiting = WaitingChildren(waiting_children)
        self._rebuild_waiting()
        state.restore_listeners.add(self._rebuild_waiting)

    async def Export(  # noqa: N802
        self, request: otlp.ExportTraceServiceRequest, context: Context
    ) -> otlp.ExportTraceServiceResponse:
        count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        if count > self.max_spans:
            await abort_with(
                context,
                InvalidArgument(
                    f"the request carries {count} spans; at most {self.max_spans} are taken in one export "
                    "(lower the exporter's batch size, e.g. OTEL_BSP_MAX_EXPORT_BATCH_SIZE)"
                ),
            )
        views, reasons = span_views(request)
        rejected = len(reasons)
        ordered = parents_first(views)
        # A dropped (not GenAI) span's parent, so a GenAI child hangs from its GenAI ancestor.
        skipped: dict[str, str] = {}
        plans: list[SpanPlan] = []
        for view in ordered:
            plan = plan_span(view)
            if plan is None:
                skipped[view.key] = view.parent_key
            else:
                plans.append(plan)
        SPANS.labels("dropped").inc(len(skipped))
        try:
            failed: set[str] = set()
            for plan in plans:
                try:
                    async with self.store.writing():
                        self._record(plan, skipped)
                except CollabError as error:
                    if isinstance(error, RateLimited | StoreUnavailable):
                        raise
                    metrics.refused(error)
                    failed.add(plan.key)
                    reasons.append(f"span {plan.key}: {error}")
            for view in ordered:
                if view.key in self.waiting:
                    await self._adopt(view.key, skipped)
            for plan in reversed(plans):
                if plan.ended and plan.key not in failed:
                    try:
                        async with self.store.writing():
                            self._end(plan)
                    except CollabError as error:
                        if isinstance(error, RateLimited | StoreUnavailable):
                            raise
                        metrics.refused(error)
                        failed.add(plan.key)
                        reasons.append(f"span {plan.key}: {error}")
            await self.store.durable(self.state.log.last_seq)
        except (RateLimited, StoreUnavailable) as error:
            # Whatever was recorded stays; the exporter's retry records only the rest.
            with contextlib.suppress(StoreUnavailable):
                await self.store.durable(self.state.log.last_seq)
            await abort_with(context, error)
            raise AssertionError("unreachable: abort raises") from error
        rejected += len(failed)
        SPANS.labels("rejected").inc(rejected)
        response = otlp.ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = rejected
            more = f" (and {len(reasons) - MAX_REASONS} more)" if len(reasons) > MAX_REASONS else ""
            response.partial_success.error_message = "; ".join(reasons[:MAX_REASONS]) + more
        return response

    # -- the span index ---------------------------------------------------------------

    def _lookup(self, method: str, key: str) -> bytes | None:
        """What the index holds for ``key``; after a restart, the store's copy (restored
        into the main idempotency cache)."""
        now = self.state.clock()
        answer = self.index.lookup(method, key, _IDENTITY, now)
        return answer if answer is not None else self.state.idempotency.lookup(method, key, _IDENTITY, now)

    def _keep(self, method: str, key: str, answer: bytes) -> None:
        """Into the index, and to the store (with the write under way) as any answer goes."""
        now = self.state.clock()
        self.index.remember(method, key, _IDENTITY, answer, now)
        sink = self.state.idempotency.sink
        if sink is not None:
            sink(method, key, _IDENTITY, answer, now)

    def _span_record(self, key: str) -> _SpanRecord | None:
        answer = self._lookup(SPAN_METHOD, key)
        return None if answer is None else _SpanRecord.decode(answer)

    def _resolve(self, key: str, skipped: dict[str, str]) -> tuple[_SpanRecord | None, str]:
        """From span ``key`` up through the batch's dropped spans: the record of the first
        recorded span, or None and the key of the first span neither recorded nor dropped
        in the batch (the one to wait for; empty when there is none)."""
        for _ in range(len(skipped) + 1):
            if not key:
                return None, ""
            record = self._span_record(key)
            if record is not None or key not in skipped:
                return record, "" if record is not None else key
            key = skipped[key]
        return None, ""  # the batch's dropped spans make a cycle: nothing to wait for

    # -- children that came before their parent -----------------------------------------

    def _wait(self, key: str, activity_id: str, *, count_drops: bool = True) -> None:
        dropped = self.waiting.add(key, activity_id)
        if count_drops:
            LINKS.labels("dropped").inc(dropped)

    def _rebuild_waiting(self) -> None:
        """The waiting index from the activities the state holds (at a start, or after the
        store reloaded the state): each OTLP root that names its parent span waits for it.
        Children beyond the index's capacity were dropped (and counted) when they first
        waited; a rebuild (each reload of a Redis replica) does not count them again."""
        self.waiting.clear()
        for activity in self.state.held_activities():
            meta = activity.metadata
            if activity.parent_activity_id or meta.get("source") != "otel":
                continue
            trace_id, parent_span_id = meta.get("otel.trace_id"), meta.get("otel.parent_span_id")
            if not (isinstance(trace_id, str) and isinstance(parent_span_id, str) and trace_id and parent_span_id):
                continue
            key = span_key(trace_id, parent_span_id)
            if self._span_record(key) is None:  # else its parent came, and it was not linked
                self._wait(key, activity.activity_id, count_drops=False)

    async def _adopt(self, key: str, skipped: dict[str, str]) -> None:
        """Span ``key`` of this batch had children waiting: each is linked to its activity,
        or, for a span not GenAI, to its nearest recorded GenAI ancestor; when there is
        none yet, they wait for the nearest ancestor to come. A child (or an ancestor of
        the parent) that left the in-memory history is read from the store; one the store
        does not keep either is counted ``evicted``."""
        children = self.waiting.take(key)
        if key in skipped:
            record, waiting_key = self._resolve(skipped[key], skipped)
        else:
            record, waiting_key = self._span_record(key), key  # not recorded: refused, may come again
        if record is None:
            for child in children:
                if waiting_key:
                    self._wait(waiting_key, child)
            return
        settled = 0  # children linked, refused or evicted: the rest wait again if the store fails
        try:
            stored = await self._stored_for_links(children, record.activity_id)
            for child in children:
                async with self.store.writing():
                    if self.state.get_activity(child) is None and child not in stored:
                        outcome = "evicted"
                    else:
                        try:
                            self.state.link_activity(child, record.activity_id, stored)
                            outcome = "linked"
                        except CollabError:
                            outcome = "refused"
                settled += 1
                LINKS.labels(outcome).inc()
        except StoreUnavailable:
            for child in children[settled:]:  # the exporter's retry links them
                self._wait(key, child)
            raise

    async def _stored_for_links(self, children: Sequence[str], parent_activity_id: str) -> dict[str, Activity]:
        """The store's copies of what linking ``children`` to ``parent_activity_id`` needs
        and the state no longer holds: children that left the history (an exported span is
        completed at once, and its parent may run for long), and ancestors of the parent
        (MAX_LINK_DEPTH levels at most, the bound the link's cycle check follows)."""
        state = self.state
        missing = [child for child in children if state.get_activity(child) is None]
        stored: dict[str, Activity] = {}
        if not missing and not state.unheld_for_link(parent_activity_id, stored):
            return stored
        await self.store.durable(state.log.last_seq)  # what was decided here, readable in the store
        for start in range(0, len(missing), READ_ACTIVITIES_MAX):
            for activity in await self.store.read_activities(missing[start : start + READ_ACTIVITIES_MAX]):
                stored[activity.activity_id] = activity
        for _ in range(MAX_LINK_DEPTH):
            needed = state.unheld_for_link(parent_activity_id, stored)
            if not needed:
                break
            found = await self.store.read_activities([needed])
            if not found:
                break  # not stored either: the link is refused, a cycle cannot be ruled out
            stored[needed] = found[0]
        return stored

    def _active_session(self, session_id: str) -> bool:
        session = self.state.find_session(session_id) if session_id else None
        return session is not None and session.ended_at is None

    def _session_for(self, plan: SpanPlan, agent_id: str, parent: _SpanRecord | None) -> tuple[str, bool]:
        """The session the span's activity joins, and whether this span started it."""
        if plan.conversation_id:
            answer = self._lookup(CONVERSATION_METHOD, plan.conversation_id)
            if answer is not None and self._active_session(session_id := answer.decode()):
                session = self.state.find_session(session_id)
                # This span started it when a call that started it was cut short before the record.
                opened = session is not None and session.metadata.get("otel.span") == plan.key
                return session_id, opened
            session = self.state.start_collaboration(
                participants=[agent_id, *plan.related_agents],
                session_type="conversation",
                metadata={"source": "otel", "gen_ai.conversation.id": plan.conversation_id, "otel.span": plan.key},
            )
            self._keep(CONVERSATION_METHOD, plan.conversation_id, session.session_id.encode())
            return session.session_id, True
        if parent is not None and self._active_session(parent.session_id):
            return parent.session_id, False
        return "", False

    # -- applying a plan ----------------------------------------------------------------

    def _record(self, plan: SpanPlan, skipped: dict[str, str]) -> None:
        """The span's activity, unless it has one already."""
        if self._span_record(plan.key) is not None:
            SPANS.labels("duplicate").inc()
            return
        metadata = fit_metadata(plan.metadata, self.state.limits.max_metadata_bytes)
        if metadata is None:
            raise InvalidArgument(
                f"even the span's ids do not fit the metadata limit of {self.state.limits.max_metadata_bytes} bytes"
            )
        parent, waiting_key = self._resolve(plan.parent_key, skipped)
        agent_id = plan.agent_id or (parent.agent_id if parent is not None else "") or plan.fallback_agent_id
        parent_activity_id = parent.activity_id if parent is not None else ""
        if parent_activity_id and self.state.get_activity(parent_activity_id) is None:
            parent_activity_id = ""  # out of the hub's history: recorded as a root
        session_id, opened = self._session_for(plan, agent_id, parent)
        activity = self.state.record_activity(
            agent_id=agent_id,
            activity_type=plan.activity_type,
            metadata=metadata,
            related_agents=plan.related_agents,
            session_id=session_id,
            parent_activity_id=parent_activity_id,
        )
        record = _SpanRecord(activity.activity_id, agent_id, session_id, opened)
        self._keep(SPAN_METHOD, plan.key, record.encode())
        SPANS.labels("recorded").inc()
        if waiting_key:  # its parent has not come (yet): linked when it does
            self._wait(waiting_key, activity.activity_id)

    def _end(self, plan: SpanPlan) -> None:
        """Complete the span's activity if it is still open, then record its memory update
        (a memory operation's span ended without an error); end the session it started.
        The completion comes first: a refusal after it (a memory update over the rate
        limit) leaves the activity completed and the memory update marked pending in the
        span index, for the exporter's retry to record once."""
        record = self._span_record(plan.key)
        if record is None:
            return
        activity = self.state.get_activity(record.activity_id)
        if activity is None:
            return  # out of the hub's history
        if activity.status is ActivityStatus.ACTIVE:
            success = not plan.failure_reason
            if plan.memory is not None and success:
                record = dataclasses.replace(record, memory_pending=True)
                self._keep(SPAN_METHOD, plan.key, record.encode())
            self._complete(record, plan, activity.metadata, success)
        elif not record.memory_pending:
            return  # completed before (a retry), or expired
        if record.memory_pending and plan.memory is not None:
            self.state.record_memory_update(
                operation=plan.memory,
                item_id=plan.memory_item_id,
                agent_id=record.agent_id,
                metadata={"source": "otel", "otel.span": plan.key, "activity_id": record.activity_id},
            )
            record = dataclasses.replace(record, memory_pending=False)
            self._keep(SPAN_METHOD, plan.key, record.encode())
        if record.opened_session and self._active_session(record.session_id):
            self.state.end_collaboration(record.session_id)

    def _complete(self, record: _SpanRecord, plan: SpanPlan, recorded: dict[str, Any], success: bool) -> None:
        """Complete the span's activity, merging what the span gained after its activity
        was recorded (its start, sent live: token usage, the response model, its end
        time...); while the store is over its byte budget, without those keys (the
        completion itself is always taken)."""
        added = completion_metadata(recorded, plan.metadata, self.state.limits.max_metadata_bytes)
        try:
            self.state.complete_activity(
                record.activity_id, success=success, failure_reason=plan.failure_reason, metadata=added
            )
        except BudgetExhausted as refused:
            if refused.budget != "max-db-bytes" or not added:
                raise
            log.warning(
                "span %s: its activity %s completed without the metadata it gained at its end (%s): %s",
                plan.key,
                record.activity_id,
                ", ".join(sorted(added)),
                refused,
            )
            self.state.complete_activity(record.activity_id, success=success, failure_reason=plan.failure_reason)


def add_trace_servicer(servicer: OtlpTraceServicer, server: Any) -> None:
    """Serve ``servicer`` on ``server`` (a grpc.aio.Server), beside the CollaborationService;
    the server's interceptor treats Export as a write (it is not a known read)."""
    otlp_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
