// The cockpit: the hub's state back-filled over REST, then kept live by the CollabClient,
// drawn at most once per animation frame whatever the event rate.
//
// No gap, no duplicate: the WebSocket connects first; its collaboration_state carries the
// seq the snapshot stands at, the client drops any event at or below it, and the back-fill
// (fetched after the snapshot arrived) and the live events are merged by id: an activity,
// decision or session is one entry however often it arrives, and a completed status is
// never turned back into an open one.
import { CollabClient } from "/client/collab.js";
import { Graph, WINDOW as GRAPH_WINDOW } from "/static/graph.js";
import { Timeline } from "/static/timeline.js";
import { ACTIVITY_TYPES, clock, duration, epoch, flatten, label, sessionName, summary, typeColour } from "/static/words.js";

const params = new URLSearchParams(location.search);
const token = params.get("token") || "";
/** A budget the URL may change (?name=value), kept within [low, high]. */
const setting = (name, fallback, low, high) => {
  const asked = Number(params.get(name));
  return Number.isFinite(asked) && asked > 0 ? Math.min(high, Math.max(low, asked)) : fallback;
};
// An activity open longer than this marks its agent stalled.
const STALLED_SECONDS = setting("stalled", 300, 5, 86400);
// Budgets: what the page holds in memory and draws.
const MAX_ACTIVITIES = setting("max_activities", 20000, 500, 200000); // oldest completed dropped first
const FEED_SIZE = setting("feed", 150, 10, 1000); // rows in the activity list
const BACKFILL_PAGES = 4; // activity-feed pages of 500 fetched on opening
const BACKFILL_SESSIONS = 12; // sessions whose decisions are fetched on opening
const MAX_DECISIONS = 500;
const MEMORY_SIZE = 150;
const SEARCH_PAGE = 100;
const TREE_NODES = 300; // activities shown in one trace tree
const EARLY_COMPLETIONS = 1000; // completions held for activities the back-fill has not brought yet
const LOOKUPS = 32; // activities fetched at once to name what an agent is doing
const TERMINAL = new Set(["completed", "failed"]);
const DONE_STATUSES = { true: "completed", false: "failed" };

const $ = (id) => document.getElementById(id);
// Writes only a change: an unchanged write still costs a layout.
const setText = (node, value) => { if (node.textContent !== value) node.textContent = value; };
const el = (tag, props = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "on") for (const [name, handler] of Object.entries(value)) node.addEventListener(name, handler);
    else if (key === "style") node.style.cssText = value;
    else node[key] = value;
  }
  node.append(...children.filter((child) => child !== null && child !== undefined && child !== false));
  return node;
};

async function api(path) {
  // Not followed: a hub without the history search redirects /activities to /activities/
  // (the one-activity route), which is "no such route" here.
  const response = await fetch(`/api/v1/collaboration/${path}`, { headers: token ? { Authorization: `Bearer ${token}` } : {}, redirect: "manual" });
  if (response.type === "opaqueredirect") {
    const error = new Error("this hub has no such route");
    error.status = 404;
    throw error;
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.detail?.message || body.message || body.detail || `${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// ---------------------------------------------------------------- the model

// A span exported over OpenTelemetry reaches the hub when it ends (or later, in a batch);
// the hub stamps the activity with its arrival, and the span's own times travel in its
// metadata. The page draws the span when it ran; the arrival stays as `recorded_at`.
function spanStart(activity) {
  const start = activity.metadata?.["otel.start_time"];
  return typeof start === "number" && start > 0 ? start : null;
}

function spanEnd(activity) {
  const end = activity.metadata?.["otel.end_time"];
  return typeof end === "number" && end > 0 ? end : null;
}

function spanTimes(activity) {
  const start = spanStart(activity);
  if (start !== null && activity.recorded_at === undefined) {
    activity.recorded_at = activity.timestamp;
    activity.timestamp = start;
  }
  const end = spanEnd(activity);
  if (end !== null && TERMINAL.has(activity.status)) activity.completed_at = end;
  return activity;
}

const model = {
  agents: new Map(), // agent_id -> AgentView (+ department)
  activities: new Map(), // activity_id -> activity (+ completed_at once known)
  lanes: new Map(), // agent_id -> activities, oldest first
  byTime: [], // every activity held, oldest first (the feed reads it from the end)
  sessions: new Map(), // session_id -> session (active and recently ended)
  decisions: new Map(), // decision_id -> decision
  earlyCompletions: new Map(), // activity_id -> its completion, received before the activity
  earlyLinks: new Map(), // activity_id -> the parent it was linked to before it came (as many as earlyCompletions)
  memory: [], // memory updates of this epoch, newest first, each with its event's seq
  agentsOmitted: 0,
  dirty: new Set(),
  changedAgents: new Set(), // agents whose card alone needs drawing
  touchAgent(id) {
    this.changedAgents.add(id);
    schedule();
  },
  touch(...parts) {
    for (const part of parts) this.dirty.add(part);
    schedule();
  },
  laneActivities(agentId) {
    return this.lanes.get(agentId) || [];
  },
  agent(id, department) {
    let known = this.agents.get(id);
    if (!known) {
      known = { status: "idle", current_activity: null, last_activity: null, department: department || "", collaboration_count: 0 };
      this.agents.set(id, known);
    }
    if (department && !known.department) known.department = department;
    return known;
  },
  /** Merge one activity in; a known one keeps what is newer (a terminal status, a completion time). */
  putActivity(activity) {
    activity = this.withLink(activity);
    const known = this.activities.get(activity.activity_id);
    if (known) {
      if (TERMINAL.has(known.status) && !TERMINAL.has(activity.status)) return known;
      Object.assign(known, activity, { timestamp: known.timestamp, recorded_at: known.recorded_at, completed_at: activity.completed_at ?? known.completed_at });
      return spanTimes(known);
    }
    const entry = spanTimes({ ...activity });
    const early = this.earlyCompletions.get(entry.activity_id);
    if (early) {
      // Its completion came live before the back-fill brought the activity itself.
      this.earlyCompletions.delete(entry.activity_id);
      if (!TERMINAL.has(entry.status)) this.completeEarly(entry, early);
    }
    this.activities.set(entry.activity_id, entry);
    let lane = this.lanes.get(entry.agent_id);
    if (!lane) this.lanes.set(entry.agent_id, (lane = []));
    let at = lane.length;
    while (at > 0 && lane[at - 1].timestamp > entry.timestamp) at -= 1;
    lane.splice(at, 0, entry);
    at = this.byTime.length;
    while (at > 0 && this.byTime[at - 1].timestamp > entry.timestamp) at -= 1;
    this.byTime.splice(at, 0, entry);
    this.agent(entry.agent_id, entry.department);
    if (this.activities.size > MAX_ACTIVITIES) this.evict();
    return entry;
  },
  /** ``activity`` with the parent a link gave it that it lacks: a copy from before the
   * link (a back-fill taken earlier) never takes the parent away, and a link that came
   * before the activity itself is applied now. */
  withLink(activity) {
    const linked = this.earlyLinks.get(activity.activity_id) || this.activities.get(activity.activity_id)?.parent_activity_id;
    this.earlyLinks.delete(activity.activity_id);
    return linked && !activity.parent_activity_id ? { ...activity, parent_activity_id: linked } : activity;
  },
  /** An activity recorded as a root got its parent (activity_linked); one not here yet is
   * kept (a bounded number) for when the back-fill, still in flight, brings it. */
  link(activityId, parentId) {
    const known = this.activities.get(activityId);
    if (known) {
      known.parent_activity_id = parentId;
      return known;
    }
    this.earlyLinks.set(activityId, parentId);
    if (this.earlyLinks.size > EARLY_COMPLETIONS) this.earlyLinks.delete(this.earlyLinks.keys().next().value);
    return null;
  },
  /** One memory update in its place by seq (the back-fill and the live events overlap). */
  putMemory(seq, update) {
    let at = 0;
    while (at < this.memory.length && this.memory[at].seq > seq) at += 1;
    if (this.memory[at]?.seq === seq) return;
    this.memory.splice(at, 0, { ...update, seq });
    if (this.memory.length > MEMORY_SIZE) this.memory.length = MEMORY_SIZE;
  },
  /** A completion received before its activity, applied as the back-fill brings the activity still open. */
  completeEarly(entry, early) {
    const { added, ...completion } = early;
    Object.assign(entry, completion);
    // The back-fill read the activity before it completed: without the keys the completion added.
    if (added) entry.metadata = { ...entry.metadata, ...added };
  },
  complete(activityId, status, at, failureReason, added) {
    const known = this.activities.get(activityId);
    if (!known) {
      // Kept (a bounded number) for when the back-fill, still in flight, brings it: an
      // activity read before the completion lacks what it added (token usage...).
      const hasAdded = added && Object.keys(added).length;
      this.earlyCompletions.set(activityId, {
        status,
        completed_at: at,
        ...(failureReason ? { failure_reason: failureReason } : {}),
        ...(hasAdded ? { added } : {}),
      });
      if (this.earlyCompletions.size > EARLY_COMPLETIONS) this.earlyCompletions.delete(this.earlyCompletions.keys().next().value);
      return null;
    }
    // What the completion added (token usage, the response model, the span's end time).
    if (added && Object.keys(added).length) known.metadata = { ...known.metadata, ...added };
    known.status = status;
    known.completed_at = known.completed_at ?? spanEnd(known) ?? at;
    if (failureReason) known.failure_reason = failureReason;
    return known;
  },
  evict() {
    const oldest = [...this.activities.values()].filter((a) => TERMINAL.has(a.status))
      .sort((a, b) => a.timestamp - b.timestamp).slice(0, Math.ceil(MAX_ACTIVITIES / 10));
    const dropped = new Set(oldest);
    this.byTime = this.byTime.filter((activity) => !dropped.has(activity));
    for (const activity of oldest) {
      this.activities.delete(activity.activity_id);
      const lane = this.lanes.get(activity.agent_id);
      const at = lane ? lane.indexOf(activity) : -1;
      if (at >= 0) lane.splice(at, 1);
    }
  },
  putDecision(decision) {
    this.decisions.set(decision.decision_id, decision);
    if (this.decisions.size > MAX_DECISIONS) {
      const oldest = [...this.decisions.values()].sort((a, b) => a.timestamp - b.timestamp)[0];
      this.decisions.delete(oldest.decision_id);
    }
  },
  /** What the agent is doing now: its current activity, if the page knows it. */
  doing(id) {
    const agent = this.agents.get(id);
    const current = agent?.current_activity && this.activities.get(agent.current_activity);
    if (current && current.status === "active") return current;
    const lane = this.lanes.get(id) || [];
    for (let at = lane.length - 1; at >= 0 && at >= lane.length - 20; at -= 1) if (lane[at].status === "active") return lane[at];
    return null;
  },
};

// ---------------------------------------------------------------- the frame loop

let frameRequested = false;
const drawTimes = []; // the last 600 frames' drawing time, ms (bench/frames.py reads them)
function schedule() {
  if (frameRequested) return;
  frameRequested = true;
  requestAnimationFrame(frame);
}

function frame() {
  frameRequested = false;
  const started = performance.now();
  const dirty = model.dirty;
  model.dirty = new Set();
  const view = route.view;
  if (view === "overview") {
    if (dirty.has("agents")) drawAgents();
    else if (model.changedAgents.size || dirty.has("clock")) {
      // The clock ages the cards on screen (drawAgents draws no other; one off screen is
      // brought up to date when it scrolls into view: the observer below marks it changed).
      if (dirty.has("clock")) for (const id of cardsInView) model.changedAgents.add(id);
      drawAgents(model.changedAgents);
      if (dirty.has("clock")) drawStalledNote(Date.now() / 1000);
    }
    model.changedAgents = new Set();
    if (dirty.has("feed")) drawFeed();
    if (dirty.has("sessions")) drawSessions();
    if (dirty.has("decisions")) drawDecisions();
    if (dirty.has("memory")) drawMemory();
  } else {
    // Drawn when the overview is shown again.
    for (const part of ["agents", "feed", "sessions", "decisions", "memory"]) if (dirty.has(part)) model.dirty.add(part);
    if (model.changedAgents.size || dirty.has("clock")) model.dirty.add("agents");
    model.changedAgents = new Set();
  }
  if (view === "timeline" && timeline.draw(timelineLanes())) model.dirty.add("timeline");
  if (view === "graph" && (dirty.has("graph") || dirty.has("feed"))) drawGraphSoon();
  if (dirty.has("panel")) drawPanel();
  drawTotals();
  drawTimes.push(performance.now() - started);
  if (drawTimes.length > 600) drawTimes.splice(0, drawTimes.length - 600);
  if (model.dirty.size) schedule();
}
// Durations and "stalled" marks age with the clock, not with events.
setInterval(() => model.touch("clock", "panel"), 1000);

// ---------------------------------------------------------------- overview

const cards = new Map(); // agent_id -> card element
const departmentBoxes = new Map();
// The agents whose card is on screen. A card off screen is neither laid out (CSS
// content-visibility) nor aged by the clock; it is redrawn as it comes into view.
const cardsInView = new Set();
const cardWatch = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    const id = entry.target.dataset.agent;
    if (!entry.isIntersecting) { cardsInView.delete(id); continue; }
    cardsInView.add(id);
    if (model.agents.has(id)) model.touchAgent(id);
  }
});
function agentCard(id, now) {
  const agent = model.agents.get(id);
  let card = cards.get(id);
  if (!card) {
    card = el("div", { className: "agent", dataset: { agent: id }, on: { click: () => navigate({ agent: id, session: null, activity: null }) } },
      el("div", { className: "id" }, el("span"), el("span", { className: "badge", hidden: true })),
      el("div", { className: "doing" }), el("div", { className: "meta" }));
    cards.set(id, card);
    cardWatch.observe(card);
  }
  const doing = model.doing(id);
  if (!doing && agent.current_activity) lookUp(agent.current_activity, id);
  const open = doing ? now - doing.timestamp : 0;
  const isStalled = Boolean(doing) && open > STALLED_SECONDS;
  if (card.dataset.status !== agent.status) card.dataset.status = agent.status;
  if (card.dataset.stalled !== String(isStalled)) card.dataset.stalled = String(isStalled);
  const [name, badge] = card.firstChild.children;
  setText(name, id);
  if (badge.hidden === isStalled) badge.hidden = !isStalled;
  setText(badge, isStalled ? `stalled ${duration(open)}` : "");
  setText(card.children[1], doing
    ? `${label(doing.activity_type)} for ${duration(open)}`
    : agent.status === "active" ? "working" : "idle");
  const last = !doing && agent.last_activity && model.activities.get(agent.last_activity);
  setText(card.children[2], doing
    ? summary(doing.metadata) || (doing.session_id ? `in ${sessionName(model.sessions.get(doing.session_id))}` : "")
    : last ? `last: ${label(last.activity_type)} at ${clock(last.completed_at ?? last.timestamp)}` : "");
  card.stalled = isStalled;
  return card;
}

// An agent busy with an activity the page has not seen (older than the back-fill): fetch
// it once, so the card says what it is rather than showing its id.
const lookups = new Set();
function lookUp(activityId, agentId) {
  if (lookups.has(activityId) || lookups.size >= LOOKUPS) return;
  lookups.add(activityId);
  api(`activities/${encodeURIComponent(activityId)}`)
    .then(({ activity }) => { model.putActivity(activity); model.touchAgent(agentId); })
    .catch(() => {})
    .finally(() => setTimeout(() => lookups.delete(activityId), 30000));
}

/** Only the cards of agents whose activity changed; everything (grouping, counts, the
 * clock's durations) when `changed` is null: on a snapshot, a new agent, and once a second. */
function drawAgents(changed = null) {
  const now = Date.now() / 1000;
  if (changed && cards.size === model.agents.size && [...changed].every((id) => cards.has(id) || !model.agents.has(id))) {
    // Only cards on screen: one off screen is brought up to date as it scrolls into view.
    for (const id of changed) if (model.agents.has(id) && cardsInView.has(id)) agentCard(id, now);
    return;
  }
  const byDepartment = new Map();
  for (const [id, agent] of model.agents) {
    const department = agent.department || "no department";
    if (!byDepartment.has(department)) byDepartment.set(department, []);
    byDepartment.get(department).push(id);
  }
  const boxes = [];
  let stalled = 0;
  for (const department of [...byDepartment.keys()].sort()) {
    const ids = byDepartment.get(department).sort();
    let box = departmentBoxes.get(department);
    if (!box) {
      box = el("div", { className: "department" }, el("h3"), el("div", { className: "cards" }));
      departmentBoxes.set(department, box);
    }
    const active = ids.filter((id) => model.agents.get(id).status === "active").length;
    setText(box.firstChild, `${department} · ${ids.length} agents, ${active} working`);
    const row = ids.map((id) => agentCard(id, now));
    stalled += row.filter((card) => card.stalled).length;
    syncChildren(box.lastChild, row);
    boxes.push(box);
  }
  for (const [id, card] of cards) {
    if (model.agents.has(id)) continue;
    cards.delete(id);
    cardsInView.delete(id);
    cardWatch.unobserve(card);
    card.remove();
  }
  syncChildren($("agents"), boxes);
  writeStalledNote(stalled);
}

/** The count of stalled agents, from the model (cards off screen may be stale). */
function drawStalledNote(now) {
  let stalled = 0;
  for (const id of model.agents.keys()) {
    const doing = model.doing(id);
    if (doing && now - doing.timestamp > STALLED_SECONDS) stalled += 1;
  }
  writeStalledNote(stalled);
}

function writeStalledNote(stalled) {
  setText($("stalled-note"), `grouped by department; stalled = one activity open over ${duration(STALLED_SECONDS)}` +
    (stalled ? ` (${stalled} now)` : "") + (model.agentsOmitted ? `; ${model.agentsOmitted} more agents not listed by the hub's snapshot` : ""));
}

/** Put exactly `nodes` in `parent`, in order, moving only what moved (new rows at the
 * top of a list cost one insertion each, not a rebuild: layout is the expensive part). */
function syncChildren(parent, nodes) {
  const wanted = new Set(nodes);
  for (const child of [...parent.children]) if (!wanted.has(child)) child.remove();
  for (let i = 0; i < nodes.length; i += 1) {
    const here = parent.children[i];
    if (here !== nodes[i]) parent.insertBefore(nodes[i], here || null);
  }
}

const feedRows = new Map();
function activityWords(activity) {
  const about = summary(activity.metadata, 60);
  const took = activity.completed_at ? ` · ${duration(activity.completed_at - activity.timestamp)}` : "";
  return `${label(activity.activity_type)} (${statusWord(activity.status)}${took})${about ? ` · ${about}` : ""}`;
}
const statusWord = (status) => ({ active: "open", completed: "done", failed: "failed" })[status] || status;

function drawFeed() {
  const agentFilter = $("filter-agent").value.trim();
  const typeFilter = $("filter-type").value;
  const shown = [];
  // Newest first: walk the lanes' ends is not ordered across agents, so sort the candidates.
  const all = model.byTime;
  for (let at = all.length - 1; at >= 0; at -= 1) {
    const activity = all[at];
    if (agentFilter && !activity.agent_id.includes(agentFilter)) continue;
    if (typeFilter && activity.activity_type !== typeFilter) continue;
    shown.push(activity);
    if (shown.length === FEED_SIZE) break;
  }
  const rows = shown.map((activity) => {
    let row = feedRows.get(activity.activity_id);
    if (!row) {
      row = el("li", { dataset: { activity: activity.activity_id }, on: { click: () => navigate({ activity: activity.activity_id, agent: null, session: null }) } },
        el("span", { className: "dim" }), el("b"), " ", el("span", { className: "what" }));
      feedRows.set(activity.activity_id, row);
    }
    // Words are worked out again only when the activity changed (it completed or failed).
    const version = `${activity.status} ${activity.completed_at ?? ""}`;
    if (row.version !== version) {
      row.version = version;
      row.dataset.status = activity.status;
      row.children[0].textContent = `${clock(activity.timestamp)} `;
      row.children[1].textContent = activity.agent_id;
      row.lastChild.textContent = activityWords(activity);
    }
    return row;
  });
  const keep = new Set(shown.map((a) => a.activity_id));
  for (const id of feedRows.keys()) if (!keep.has(id)) feedRows.delete(id);
  syncChildren($("feed"), rows);
}

function sessionRow(session) {
  const open = el("button", { className: "link", textContent: sessionName(session),
    on: { click: () => navigate({ session: session.session_id, agent: null, activity: null }) } });
  const when = session.ended_at ? `ended ${new Date(session.ended_at).toLocaleTimeString()}` : `since ${new Date(session.started_at).toLocaleTimeString()}`;
  return el("li", { dataset: { session: session.session_id } }, open,
    el("span", { className: "dim", textContent: ` · ${when} · ${session.activity_count} activities · ${session.decision_count} decisions · ${session.session_id}` }));
}

function drawSessions() {
  const sessions = [...model.sessions.values()].sort((a, b) => Date.parse(b.started_at) - Date.parse(a.started_at));
  $("collaborations").replaceChildren(...sessions.filter((s) => !s.ended_at).map(sessionRow));
  const ended = sessions.filter((s) => s.ended_at).sort((a, b) => Date.parse(b.ended_at) - Date.parse(a.ended_at));
  $("history").replaceChildren(...ended.slice(0, 30).map(sessionRow));
}

function decisionItem(decision, withSession = true) {
  const votes = Object.entries(decision.votes || {});
  const session = model.sessions.get(decision.session_id);
  return el("li", { className: "decision", dataset: { decision: decision.decision_id } },
    el("div", {}, el("span", { className: "dim", textContent: `${clock(decision.timestamp)} ` }), el("b", { textContent: decision.agent_id }),
      " decided ", el("b", { textContent: `“${decision.decision}”` })),
    decision.rationale ? el("div", { className: "dim", textContent: `because ${decision.rationale}` }) : null,
    votes.length ? el("div", {}, ...votes.map(([who, vote]) => el("span", { className: "vote", textContent: `${who}: ${vote}` }))) : null,
    withSession ? el("button", { className: "link", textContent: `in ${sessionName(session)}`,
      on: { click: () => navigate({ session: decision.session_id, agent: null, activity: null }) } }) : null);
}

function drawDecisions() {
  const decisions = [...model.decisions.values()].sort((a, b) => b.timestamp - a.timestamp).slice(0, 50);
  $("decisions").replaceChildren(...decisions.map((d) => decisionItem(d)));
}

function drawMemory() {
  $("memory").replaceChildren(...model.memory.map((u) => el("li", {},
    el("span", { className: "dim", textContent: `${clock(u.timestamp)} ` }), el("b", { textContent: u.agent_id }),
    ` ${u.operation === "write" ? "wrote" : u.operation === "read" ? "read" : u.operation} `,
    el("span", { textContent: u.item_id }), summary(u.metadata) ? el("span", { className: "dim", textContent: ` · ${summary(u.metadata)}` }) : null)));
}

function drawTotals() {
  let active = 0;
  for (const agent of model.agents.values()) if (agent.status === "active") active += 1;
  const live = [...model.sessions.values()].filter((s) => !s.ended_at).length;
  $("totals").textContent = `${model.agents.size + model.agentsOmitted} agents, ${active} working, ${live} collaborations`;
}

// ---------------------------------------------------------------- timeline and graph

const timeline = new Timeline($("lanes"), model, (activityId, lane) =>
  navigate(activityId ? { activity: activityId, agent: null, session: null } : { agent: lane.agent_id, activity: null, session: null }));
$("zoom-in").addEventListener("click", () => timeline.zoom(0.5));
$("zoom-out").addEventListener("click", () => timeline.zoom(2));
$("follow").addEventListener("click", () => timeline.followLive());
$("legend").append(...ACTIVITY_TYPES.map((type) => el("span", {}, el("i", { style: `background:${typeColour(type)}` }), label(type))),
  el("span", {}, el("i", { style: "border:2px solid #f85149" }), "failed"), el("span", {}, el("i", { style: "background:#fff" }), "open (growing)"));

function timelineLanes() {
  return [...model.agents.entries()]
    .map(([agent_id, agent]) => ({ agent_id, department: agent.department || "", status: agent.status }))
    .sort((a, b) => a.department.localeCompare(b.department) || a.agent_id.localeCompare(b.agent_id));
}

let graph = null;
const legendChips = new Map();
let graphDrawnAt = 0;
let graphTimer = null;
// The graph is re-weighted at most once a second: a layout engine is not a per-event thing.
function drawGraphSoon() {
  const wait = 1000 - (performance.now() - graphDrawnAt);
  if (wait > 0) {
    if (!graphTimer) graphTimer = setTimeout(() => { graphTimer = null; model.touch("graph"); }, wait);
    return;
  }
  graphDrawnAt = performance.now();
  if (!graph) graph = new Graph($("graph"), (id) => navigate({ agent: id, session: null, activity: null }));
  const since = Date.now() / 1000 - GRAPH_WINDOW;
  const edges = new Map();
  const link = (a, b, weight = 1) => {
    if (!a || !b || a === b) return;
    const key = a < b ? `${a}\u0000${b}` : `${b}\u0000${a}`;
    edges.set(key, (edges.get(key) || 0) + weight);
  };
  const counts = new Map();
  for (const activity of model.activities.values()) {
    if ((activity.completed_at ?? Date.now() / 1000) < since) continue;
    counts.set(activity.agent_id, (counts.get(activity.agent_id) || 0) + 1);
    for (const other of activity.related_agents || []) link(activity.agent_id, other);
    const to = activity.metadata?.recipient || activity.metadata?.to;
    if (activity.activity_type === "message_sent" && typeof to === "string") link(activity.agent_id, to);
  }
  for (const session of model.sessions.values()) {
    if (session.ended_at && Date.parse(session.ended_at) / 1000 < since) continue;
    const people = session.participants || [];
    for (let i = 0; i < people.length; i += 1) for (let j = i + 1; j < people.length; j += 1) link(people[i], people[j]);
  }
  const agents = [...model.agents.entries()].map(([agent_id, agent]) => ({ agent_id, department: agent.department, status: agent.status, count: counts.get(agent_id) || 0 }));
  graph.update(agents, edges);
  graph.select(route.agent);
  $("graph-note").textContent = `${edges.size} pairs that worked together in the last ${duration(GRAPH_WINDOW)}: ` +
    "named in related_agents, messages, shared sessions; thicker = more traffic; colour = department; click an agent";
  window.collabDashboard.graphEdges = Object.fromEntries(edges);
  syncChildren($("graph-legend"), [...graph.departments].map(([name, colour]) =>
    legendChips.get(`${name}${colour}`) || legendChips.set(`${name}${colour}`,
      el("span", { className: "dim" }, el("i", { className: "chip", style: `background:${colour}` }), name || "no department")).get(`${name}${colour}`)));
}

// ---------------------------------------------------------------- the side panel

const panelCache = { session: null, sessionData: null, activityTree: null, treeIds: new Set() };

function drawPanel() {
  const { agent, session, activity } = route;
  $("panel").hidden = !(agent || session || activity);
  $("panel-agent").hidden = !agent;
  $("panel-session").hidden = !session;
  $("panel-activity").hidden = !activity;
  if (agent) drawAgentPanel(agent);
  if (session) drawSessionPanel(session);
  if (activity) drawActivityPanel(activity);
}

function agentLink(id) {
  return el("button", { className: "link", textContent: id, on: { click: () => navigate({ agent: id, session: null, activity: null }) } });
}
function activityLink(activity) {
  return el("button", { className: "link", textContent: `${label(activity.activity_type)}${summary(activity.metadata, 40) ? ` · ${summary(activity.metadata, 40)}` : ""}`,
    on: { click: () => navigate({ activity: activity.activity_id, agent: null, session: null }) } });
}

function drawAgentPanel(id) {
  const agent = model.agents.get(id) || { status: "unknown", department: "" };
  const doing = model.doing(id);
  const lane = model.laneActivities(id);
  const sessions = [...model.sessions.values()].filter((s) => (s.participants || []).includes(id));
  const searchAll = new URLSearchParams({ view: "search", agent_id: id });
  $("panel-agent").replaceChildren(
    el("h2", { textContent: id }),
    el("dl", {}, el("dt", { textContent: "department" }), el("dd", { textContent: agent.department || "none" }),
      el("dt", { textContent: "status" }), el("dd", { textContent: agent.status }),
      el("dt", { textContent: "doing" }), el("dd", {}, doing ? activityLink(doing) : "nothing open"),
      el("dt", { textContent: "for" }), el("dd", { textContent: doing ? duration(Date.now() / 1000 - doing.timestamp) : "" }),
      el("dt", { textContent: "sessions" }), el("dd", {}, ...sessions.map((s) => el("div", {}, el("button", { className: "link", textContent: sessionName(s),
        on: { click: () => navigate({ session: s.session_id, agent: null, activity: null }) } }))))),
    el("h3", {}, "Recent activity ", el("a", { className: "link", href: `?${withToken(searchAll)}`, textContent: "(search all its history)",
      on: { click: (event) => { event.preventDefault(); navigate({ view: "search", agent_id: [id], agent: null }, { search: true }); } } })),
    el("ul", {}, ...lane.slice(-40).reverse().map((a) => el("li", { dataset: { activity: a.activity_id, status: a.status } },
      el("span", { className: "dim", textContent: `${clock(a.timestamp)} ` }), activityLink(a),
      el("span", { className: "what", textContent: ` ${statusWord(a.status)}${a.completed_at ? ` in ${duration(a.completed_at - a.timestamp)}` : ""}` })))));
}

async function loadSession(id) {
  if (panelCache.session === id && panelCache.sessionData) return;
  panelCache.session = id;
  panelCache.sessionData = null;
  try {
    const detail = await api(`collaborations/${encodeURIComponent(id)}`);
    if (panelCache.session !== id) return;
    panelCache.sessionData = detail;
    model.sessions.set(id, { ...model.sessions.get(id), ...detail.session });
    for (const activity of detail.activities) model.putActivity(activity);
    for (const decision of detail.decisions) model.putDecision(decision);
  } catch (error) {
    if (panelCache.session === id) panelCache.sessionData = { error: error.message };
  }
  model.touch("panel", "feed", "decisions");
}

function drawSessionPanel(id) {
  if (panelCache.session !== id) { loadSession(id); }
  const data = panelCache.sessionData;
  const session = model.sessions.get(id);
  $("session-title").textContent = session ? sessionName(session) : "session";
  if (data?.error) {
    $("session-facts").textContent = `could not load this session: ${data.error}`;
    $("timeline").replaceChildren();
    return;
  }
  if (!session) { $("session-facts").textContent = "loading…"; return; }
  const activities = [...model.activities.values()].filter((a) => a.session_id === id);
  const decisions = [...model.decisions.values()].filter((d) => d.session_id === id);
  const facts = el("div", {}, el("div", {}, "participants: ", ...(session.participants || []).flatMap((p, i) => [i ? ", " : "", agentLink(p)])),
    el("div", { textContent: `started ${new Date(session.started_at).toLocaleTimeString()}${session.ended_at ? `, ended ${new Date(session.ended_at).toLocaleTimeString()}` : ", still open"} · ${activities.length} activities · ${decisions.length} decisions · id ${id}` }),
    data && (data.activities_omitted || data.decisions_omitted) ? el("div", { className: "notice", textContent: `the hub left out ${data.activities_omitted} activities and ${data.decisions_omitted} decisions (too many for one reply)` }) : null);
  $("session-facts").replaceChildren(facts);
  const entries = [...activities.map((a) => ({ at: a.timestamp, activity: a })), ...decisions.map((d) => ({ at: d.timestamp, decision: d }))]
    .sort((a, b) => a.at - b.at);
  $("timeline").replaceChildren(...entries.map((entry) => entry.decision ? decisionItem(entry.decision, false)
    : el("li", { dataset: { activity: entry.activity.activity_id, status: entry.activity.status } },
      el("span", { className: "dim", textContent: `${clock(entry.at)} ` }), el("b", { textContent: entry.activity.agent_id }), " ", activityLink(entry.activity),
      el("span", { className: "what", textContent: ` ${statusWord(entry.activity.status)}` }))));
}

// The trace tree of the selected activity: its root (parents followed up) and every
// descendant the page can find (held here, in its session, or from the history search).
async function loadTree(id) {
  const tree = { id, root: null, loading: true, note: "" };
  panelCache.activityTree = tree;
  const fetchOne = async (activityId) => model.activities.get(activityId) || model.putActivity((await api(`activities/${encodeURIComponent(activityId)}`)).activity);
  try {
    let node = await fetchOne(id);
    for (let depth = 0; node.parent_activity_id && depth < 30; depth += 1) node = await fetchOne(node.parent_activity_id);
    tree.root = node.activity_id;
    if (node.session_id) await loadSession(node.session_id).catch(() => {});
    // Children from the history search, a level at a time, when the hub has it.
    let level = [node.activity_id];
    for (let depth = 0; level.length && depth < 10 && searchAvailable !== false && model.activities.size < MAX_ACTIVITIES; depth += 1) {
      const query = new URLSearchParams({ limit: "500", order: "asc" });
      for (const parent of level.slice(0, 50)) query.append("parent_activity_id", parent);
      try {
        const page = await api(`activities?${query}`);
        searchAvailable = true;
        level = page.activities.map((a) => model.putActivity(a).activity_id);
      } catch (error) {
        if (error.status === 404) { searchAvailable = false; tree.note = "children found only among the activities this page holds: the hub has no history search (it needs a newer hub)"; }
        break;
      }
    }
  } catch (error) {
    tree.note = `could not load this activity: ${error.message}`;
  }
  tree.loading = false;
  if (panelCache.activityTree === tree) model.touch("panel");
}

function drawActivityPanel(id) {
  if (panelCache.activityTree?.id !== id) loadTree(id);
  const activity = model.activities.get(id);
  const tree = panelCache.activityTree;
  if (!activity) {
    $("activity-title").textContent = tree?.note || "loading…";
    $("activity-facts").replaceChildren();
    $("tree").replaceChildren();
    $("metadata").replaceChildren();
    return;
  }
  const now = Date.now() / 1000;
  const end = activity.completed_at ?? (activity.status === "active" ? now : null);
  $("activity-title").textContent = `${label(activity.activity_type)} by ${activity.agent_id}`;
  const session = activity.session_id && model.sessions.get(activity.session_id);
  const parent = activity.parent_activity_id && model.activities.get(activity.parent_activity_id);
  const facts = [
    ["status", el("span", { className: activity.status === "failed" ? "failed" : "", textContent: `${statusWord(activity.status)}${activity.failure_reason ? `: ${activity.failure_reason}` : ""}` })],
    ["agent", agentLink(activity.agent_id)], ["department", activity.department || "none"],
    ["started", new Date(activity.timestamp * 1000).toLocaleString()],
    ...(activity.recorded_at !== undefined ? [["reported", `${new Date(activity.recorded_at * 1000).toLocaleString()} (an OpenTelemetry span, drawn at its own times)`]] : []),
    ["took", end ? `${duration(end - activity.timestamp)}${activity.status === "active" ? " so far" : ""}` : ""],
    ["session", activity.session_id ? el("button", { className: "link", textContent: sessionName(session), on: { click: () => navigate({ session: activity.session_id, activity: null }) } }) : "none"],
    ["part of", parent ? activityLink(parent) : activity.parent_activity_id ? "an activity this page has not loaded" : "nothing (a root)"],
    ["with", (activity.related_agents || []).length ? el("span", {}, ...activity.related_agents.flatMap((p, i) => [i ? ", " : "", agentLink(p)])) : "nobody named"],
    ["type", activity.activity_type], ["id", activity.activity_id],
  ];
  $("activity-facts").replaceChildren(...facts.flatMap(([name, value]) => [el("dt", { textContent: name }), el("dd", {}, value)]));
  $("metadata").replaceChildren(...flatten(activity.metadata).map(([key, value]) => el("tr", {}, el("td", { textContent: key }), el("td", { textContent: value }))));
  if (!flatten(activity.metadata).length) $("metadata").append(el("tr", {}, el("td", { textContent: "none" })));
  drawTree(tree, id, now);
}

function drawTree(tree, selected, now) {
  const root = tree?.root && model.activities.get(tree.root);
  if (!root) { $("tree").replaceChildren(el("div", { className: "dim", textContent: tree?.note || "loading…" })); return; }
  const children = new Map();
  for (const activity of model.activities.values()) {
    if (!activity.parent_activity_id) continue;
    if (!children.has(activity.parent_activity_id)) children.set(activity.parent_activity_id, []);
    children.get(activity.parent_activity_id).push(activity);
  }
  const rows = [];
  const walk = (node, depth) => {
    if (rows.length >= TREE_NODES) return;
    rows.push([node, depth]);
    for (const child of (children.get(node.activity_id) || []).sort((a, b) => a.timestamp - b.timestamp)) walk(child, depth + 1);
  };
  walk(root, 0);
  panelCache.treeIds = new Set(rows.map(([a]) => a.activity_id));
  const start = Math.min(...rows.map(([a]) => a.timestamp));
  const finish = Math.max(...rows.map(([a]) => a.completed_at ?? (a.status === "active" ? now : a.timestamp)), start + 0.001);
  const span = finish - start;
  $("tree").replaceChildren(...rows.map(([a, depth]) => {
    const end = a.completed_at ?? (a.status === "active" ? now : a.timestamp);
    const bar = el("i", { className: a.status === "active" ? "open" : a.status === "failed" ? "failed" : "",
      style: `left:${((a.timestamp - start) / span) * 100}%;width:${Math.max(0.5, ((end - a.timestamp) / span) * 100)}%;background:${typeColour(a.activity_type)}` });
    return el("div", { className: "row", dataset: { activity: a.activity_id, status: a.status, depth: String(depth) }, ariaCurrent: String(a.activity_id === selected),
      title: `${label(a.activity_type)} by ${a.agent_id}: ${statusWord(a.status)}${a.completed_at ? `, ${duration(a.completed_at - a.timestamp)}` : ""}`,
      on: { click: () => navigate({ activity: a.activity_id }) } },
      el("span", { className: "name", style: `padding-left:${depth * 12}px`, textContent: `${a.agent_id}: ${label(a.activity_type)}` }),
      el("span", { className: "track" }, bar));
  }), ...(tree.note ? [el("div", { className: "dim", textContent: tree.note })] : []));
  if (rows.length >= TREE_NODES) $("tree").append(el("div", { className: "dim", textContent: `showing the first ${TREE_NODES} activities of this trace` }));
}

$("panel-close").addEventListener("click", () => navigate({ agent: null, session: null, activity: null }));

// ---------------------------------------------------------------- search

let searchAvailable = null; // unknown until the hub answered once
const FILTERS = ["agent_id", "department", "activity_type", "status", "session_id", "parent_activity_id", "since", "until", "order", "meta"];
const searchState = { key: null, cursor: null, rows: 0 };
for (const type of ACTIVITY_TYPES) $("search-form").elements.activity_type.append(new Option(label(type), type));

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target.elements;
  const changes = { view: "search" };
  const list = (value) => value.split(",").map((v) => v.trim()).filter(Boolean);
  for (const name of ["agent_id", "department", "session_id", "parent_activity_id"]) changes[name] = list(form[name].value);
  for (const name of ["activity_type", "status"]) changes[name] = [...form[name].selectedOptions].map((o) => o.value);
  for (const name of ["since", "until", "meta", "last"]) changes[name] = form[name].value.trim() ? [form[name].value.trim()] : [];
  changes.order = form.order.value === "asc" ? ["asc"] : [];
  navigate(changes, { search: true });
});
$("search-more").addEventListener("click", () => runSearch(true));

function fillSearchForm() {
  const form = $("search-form").elements;
  for (const name of ["agent_id", "department", "session_id", "parent_activity_id"]) form[name].value = route.params.getAll(name).join(", ");
  for (const name of ["activity_type", "status"]) {
    const chosen = new Set(route.params.getAll(name));
    for (const option of form[name].options) option.selected = chosen.has(option.value);
  }
  for (const name of ["since", "until", "meta", "last"]) form[name].value = route.params.get(name) || "";
  form.order.value = route.params.get("order") || "desc";
}

async function runSearch(more = false) {
  const query = new URLSearchParams();
  for (const name of FILTERS) for (const value of route.params.getAll(name)) query.append(name, value);
  const last = Number(route.params.get("last"));
  if (last > 0 && !query.has("since")) query.set("since", String(Math.floor(Date.now() / 1000 - last)));
  query.set("limit", String(SEARCH_PAGE));
  const key = route.params.toString();
  if (!more) { searchState.key = key; searchState.cursor = null; searchState.rows = 0; $("search-results").tBodies[0].replaceChildren(); }
  else if (searchState.cursor) query.set("cursor", searchState.cursor);
  $("search-status").textContent = "searching…";
  $("search-more").hidden = true;
  try {
    const page = await api(`activities?${query}`);
    if (searchState.key !== key) return;
    searchAvailable = true;
    showResults(page.activities, page.next_cursor);
    searchState.rows += page.activities.length;
    $("search-status").textContent = searchState.rows ? `${searchState.rows} activities${page.next_cursor ? ", more to load" : ""}` : "no activity matches";
  } catch (error) {
    if (searchState.key !== key) return;
    failedSearch(error, query);
    return;
  }
  $("search-status").className = "dim";
}

function showResults(activities, cursor) {
    const body = $("search-results").tBodies[0];
    for (const activity of activities) {
      body.append(el("tr", { dataset: { activity: activity.activity_id, status: activity.status },
        on: { click: () => navigate({ activity: activity.activity_id, agent: null, session: null }) } },
        el("td", { textContent: new Date(activity.timestamp * 1000).toLocaleString() }), el("td", { textContent: activity.agent_id }),
        el("td", { textContent: label(activity.activity_type) }),
        el("td", { className: activity.status === "failed" ? "failed" : "", textContent: statusWord(activity.status) }),
        el("td", { textContent: activity.completed_at ? duration(activity.completed_at - activity.timestamp) : "" }),
        el("td", { className: "dim", textContent: summary(activity.metadata) })));
    }
    searchState.cursor = cursor;
    $("search-more").hidden = !cursor;
}

function failedSearch(error, query) {
    if (error.status === 404) {
      searchAvailable = false;
      const held = localSearch(query);
      showResults(held, null);
      $("search-status").textContent = "search needs a newer hub: this one has no history search " +
        `(it has no GET /api/v1/collaboration/activities). Below: the ${held.length} matching activities among the ${model.activities.size} this page holds.`;
    } else {
      $("search-status").textContent = `the hub refused this search: ${error.message}`;
    }
    $("search-status").className = "notice";
}

/** The search over what this page holds: the fallback of a hub with no history search. */
function localSearch(query) {
  const wanted = (name) => { const values = query.getAll(name); return values.length ? new Set(values) : null; };
  const filters = ["agent_id", "department", "activity_type", "status", "session_id", "parent_activity_id"].map((name) => [name, wanted(name)]);
  const time = (value) => (value === null ? null : /^[0-9.]+$/.test(value) ? Number(value) : Date.parse(value) / 1000);
  const since = time(query.get("since"));
  const until = time(query.get("until"));
  const metas = query.getAll("meta").map((pair) => pair.split("="));
  const found = [...model.activities.values()].filter((a) =>
    filters.every(([name, values]) => !values || values.has(a[name] ?? "")) &&
    (since === null || a.timestamp >= since) && (until === null || a.timestamp < until) &&
    metas.every(([key, ...value]) => a.metadata && String(a.metadata[key]) === value.join("=")));
  found.sort((a, b) => (query.get("order") === "asc" ? a.timestamp - b.timestamp : b.timestamp - a.timestamp));
  return found.slice(0, SEARCH_PAGE);
}

// ---------------------------------------------------------------- the URL (History API)

// ?view=overview|timeline|graph|search, the side panel's ?agent= / ?session= / ?activity=,
// the search's filters under the query API's own names; the token stays.
const route = { view: "overview", agent: null, session: null, activity: null, params: new URLSearchParams() };

function withToken(query) {
  if (token && !query.has("token")) query.set("token", token);
  return query;
}

function readRoute() {
  const query = new URLSearchParams(location.search);
  route.params = query;
  route.view = ["overview", "timeline", "graph", "search"].includes(query.get("view")) ? query.get("view") : "overview";
  route.agent = query.get("agent");
  route.session = query.get("session");
  route.activity = query.get("activity");
}

/** Change the URL (a new history entry) and show what it says. */
function navigate(changes, { search = false } = {}) {
  const query = new URLSearchParams(location.search);
  if (search) for (const name of [...FILTERS, "last"]) query.delete(name);
  for (const [name, value] of Object.entries(changes)) {
    query.delete(name);
    for (const item of Array.isArray(value) ? value : value === null ? [] : [value]) query.append(name, item);
  }
  const next = `?${withToken(query)}`;
  if (next !== location.search) history.pushState(null, "", next);
  applyRoute();
}

function applyRoute() {
  const before = { ...route, params: route.params.toString() };
  readRoute();
  for (const view of ["overview", "timeline", "graph", "search"]) {
    $(`view-${view}`).hidden = route.view !== view;
    const tab = document.querySelector(`nav a[data-view="${view}"]`);
    tab.href = `?${withToken(new URLSearchParams({ view }))}`;
    if (route.view === view) tab.setAttribute("aria-current", "page"); else tab.removeAttribute("aria-current");
  }
  if (route.view === "search") {
    fillSearchForm();
    if (searchState.key !== route.params.toString() || before.view !== "search") runSearch();
  }
  if (route.view === "graph" && graph) setTimeout(() => graph.resize(), 0);
  if (route.session !== before.session) { panelCache.session = null; panelCache.sessionData = null; }
  model.touch("panel", "agents", "feed", "sessions", "decisions", "memory", "timeline", "graph");
}

for (const tab of document.querySelectorAll("nav a")) {
  tab.addEventListener("click", (event) => { event.preventDefault(); navigate({ view: tab.dataset.view }); });
}
window.addEventListener("popstate", applyRoute);
for (const type of ACTIVITY_TYPES) $("filter-type").append(new Option(label(type), type));
$("filter-agent").addEventListener("input", () => model.touch("feed"));
$("filter-type").addEventListener("change", () => model.touch("feed"));

// ---------------------------------------------------------------- back-fill and live

let backfillRun = 0;
async function backfill() {
  const run = (backfillRun += 1);
  $("backfill-note").textContent = "loading the hub's recent history…";
  let loaded = 0;
  try {
    let cursor = null;
    for (let pageNumber = 0; pageNumber < BACKFILL_PAGES; pageNumber += 1) {
      const page = await api(`activity-feed?limit=500${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
      if (run !== backfillRun) return;
      for (const activity of page.activities) model.putActivity(activity);
      loaded += page.activities.length;
      model.touch("feed", "agents", "timeline");
      cursor = page.next_cursor;
      if (!cursor) break;
    }
    const memory = await api(`memory-updates?limit=${MEMORY_SIZE}`);
    if (run !== backfillRun) return;
    if (memory.epoch !== hub.epoch) model.memory = []; // another history: its seqs do not compare
    for (const { seq, update } of memory.memory_updates) model.putMemory(seq, update);
    model.touch("memory");
    const ended = await api("ended-collaborations?limit=30");
    if (run !== backfillRun) return;
    for (const session of ended.collaborations) model.sessions.set(session.session_id, { ...model.sessions.get(session.session_id), ...session });
    model.touch("sessions");
    const recent = [...model.sessions.values()].sort((a, b) => Date.parse(b.started_at) - Date.parse(a.started_at)).slice(0, BACKFILL_SESSIONS);
    const details = await Promise.all(recent.map((s) => api(`collaborations/${encodeURIComponent(s.session_id)}`).catch(() => null)));
    if (run !== backfillRun) return;
    for (const detail of details) {
      if (!detail) continue;
      for (const decision of detail.decisions) model.putDecision(decision);
      for (const activity of detail.activities) model.putActivity(activity);
    }
    $("backfill-note").textContent = `newest first; ${loaded} from before this page opened, then live`;
    timeline.fitted = false;
    // A search answered from what the page holds is answered again now that it holds more.
    if (route.view === "search" && searchAvailable === false) runSearch();
  } catch (error) {
    $("backfill-note").textContent = `the hub's history could not be loaded (${error.message}); showing live events only`;
  }
  model.touch("feed", "agents", "sessions", "decisions", "timeline", "graph", "panel");
}

const hub = new CollabClient({ token, clientId: `dashboard_${Math.random().toString(36).slice(2, 8)}`, clientType: "dashboard" });
window.collabDashboard = { hub, model, timeline, drawTimes, route, navigate, get graph() { return graph; } };
$("memory-note").textContent = "newest first";

hub.addEventListener("state", (event) => {
  const badge = $("state");
  badge.dataset.state = event.detail.state;
  badge.textContent = event.detail.state;
});
hub.addEventListener("collaboration_state", ({ detail }) => {
  // The first state, or a fresh one after a gap the hub could not fill: start over from it.
  model.agents = new Map(Object.entries(detail.agent_status.agents));
  model.agentsOmitted = detail.agent_status.agents_omitted || 0;
  for (const [id, session] of model.sessions) if (!session.ended_at) model.sessions.delete(id);
  for (const session of detail.active_collaborations) model.sessions.set(session.session_id, session);
  for (const activity of model.activities.values()) model.agent(activity.agent_id, activity.department);
  if (detail.epoch !== model.epoch) model.memory = []; // a new history numbers its events anew
  model.epoch = detail.epoch;
  backfill();
  model.touch("agents", "sessions");
});
hub.addEventListener("agent_status_update", ({ detail }) => {
  for (const [id, update] of Object.entries(detail.agents)) {
    if (!model.agents.has(id)) model.dirty.add("agents");
    Object.assign(model.agent(id), update);
    model.touchAgent(id);
  }
});
hub.addEventListener("agent_activity", ({ detail: { activity } }) => {
  model.putActivity(activity);
  const known = model.agent(activity.agent_id, activity.department);
  if (activity.status === "active") Object.assign(known, { status: "active", current_activity: activity.activity_id, last_activity: activity.activity_id });
  const session = activity.session_id && model.sessions.get(activity.session_id);
  if (session) session.activity_count += 1;
  model.touchAgent(activity.agent_id);
  model.touch("feed", "timeline", ...(session ? ["sessions"] : []), ...(panelMentions(activity) ? ["panel"] : []));
});
hub.addEventListener("activity_completed", ({ detail }) => {
  const done = model.complete(detail.activity_id, detail.status || DONE_STATUSES[detail.success], epoch(detail.timestamp), detail.failure_reason, detail.metadata);
  const known = model.agent(detail.agent_id);
  if (known.current_activity === detail.activity_id) {
    // Idle now unless it has other open activities; the next status update confirms.
    const next = model.doing(detail.agent_id);
    Object.assign(known, next ? { current_activity: next.activity_id } : { status: "idle", current_activity: null });
  }
  model.touchAgent(detail.agent_id);
  model.touch("feed", "timeline", ...(done && panelMentions(done) ? ["panel"] : []));
});
hub.addEventListener("collaboration_started", ({ detail: { session } }) => {
  model.sessions.set(session.session_id, { activity_count: 0, decision_count: 0, ...session });
  model.touch("sessions", "graph");
});
hub.addEventListener("decision_recorded", ({ detail: { decision } }) => {
  const known = model.decisions.has(decision.decision_id);
  model.putDecision(decision);
  const session = model.sessions.get(decision.session_id);
  if (session && !known) session.decision_count += 1;
  model.touch("decisions", "sessions", ...(route.session === decision.session_id ? ["panel"] : []));
});
hub.addEventListener("collaboration_ended", ({ detail }) => {
  model.sessions.set(detail.session_id, { ...model.sessions.get(detail.session_id), ...detail.session });
  model.touch("sessions", "panel");
});
hub.addEventListener("agent_retired", ({ detail }) => {
  // Idle past the server's agent TTL: it left the live status (its history stays).
  model.agents.delete(detail.agent_id);
  model.touch("agents", "timeline", "graph");
});
hub.addEventListener("activity_linked", ({ detail }) => {
  // An activity recorded as a root got its parent, which arrived later (an OpenTelemetry
  // span exported before its parent ended): it moves under it in the trace tree.
  model.link(detail.activity_id, detail.parent_activity_id);
  const tree = panelCache.activityTree;
  if (tree && (tree.id === detail.activity_id || tree.root === detail.activity_id || panelCache.treeIds.has(detail.activity_id))) {
    // The shown tree's root is now higher up: found again from the selected activity.
    panelCache.activityTree = null;
    model.touch("panel");
  } else if (panelCache.treeIds.has(detail.parent_activity_id)) {
    model.touch("panel");
  }
});
hub.addEventListener("memory_update", ({ detail: { update, seq } }) => {
  model.putMemory(seq, update);
  model.touch("memory");
});

function panelMentions(activity) {
  return route.agent === activity.agent_id || (route.session && route.session === activity.session_id) ||
    (route.activity && (route.activity === activity.activity_id || panelCache.treeIds.has(activity.activity_id) ||
      panelCache.treeIds.has(activity.parent_activity_id)));
}

applyRoute();
hub.connect();
