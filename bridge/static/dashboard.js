// The live dashboard: the CollabClient's messages rendered at most once per frame, so
// it stays fast with dozens of agents and tens of events a second.
import { CollabClient } from "/client/collab.js";

const ACTIVITY_TYPES = ["agent_started", "agent_completed", "memory_write", "memory_read", "council_debate",
  "council_synthesis", "decision_made", "task_assigned", "task_completed", "message_sent",
  "collaboration_started", "collaboration_ended"];
const FEED_SIZE = 100;
const token = new URLSearchParams(location.search).get("token") || "";
const api = (path) => fetch(`/api/v1/collaboration/${path}`, { headers: token ? { Authorization: `Bearer ${token}` } : {} })
  .then((response) => (response.ok ? response.json() : Promise.reject(new Error(`${path}: ${response.status}`))));

const view = { agents: new Map(), open: new Map(), feed: [], sessions: new Map(), memory: [], history: [], totals: null };
let dirty = false;
const $ = (id) => document.getElementById(id);
const text = (tag, value, className) => {
  const node = document.createElement(tag);
  node.textContent = value;
  if (className) node.className = className;
  return node;
};
const time = (seconds) => new Date(seconds * 1000).toLocaleTimeString();

for (const type of ACTIVITY_TYPES) $("filter-type").append(new Option(type, type));
$("filter-agent").addEventListener("input", () => render(true));
$("filter-type").addEventListener("change", () => render(true));

function render(now = false) {
  if (now) { dirty = false; draw(); return; }
  if (dirty) return;
  dirty = true;
  requestAnimationFrame(() => { dirty = false; draw(); });
}

function draw() {
  const agents = [...view.agents.entries()].sort(([a], [b]) => a.localeCompare(b));
  const active = agents.filter(([, agent]) => agent.status === "active").length;
  $("totals").textContent = `${agents.length} agents, ${active} active, ${view.sessions.size} collaborations`;
  $("agents").replaceChildren(...agents.map(([id, agent]) => {
    const card = document.createElement("div");
    card.className = "agent";
    card.dataset.agent = id;
    card.dataset.status = agent.status;
    card.append(text("div", id, "id"), text("div", `${agent.status} · ${agent.department || "no department"}`, "meta"),
      text("div", agent.current_activity || "no current activity", "meta"));
    return card;
  }));
  const agentFilter = $("filter-agent").value.trim();
  const typeFilter = $("filter-type").value;
  const shown = view.feed.filter((a) => (!agentFilter || a.agent_id.includes(agentFilter)) && (!typeFilter || a.activity_type === typeFilter));
  $("feed").replaceChildren(...shown.map((a) => {
    const item = document.createElement("li");
    item.dataset.activity = a.activity_id;
    item.dataset.status = a.status;
    item.append(text("span", `${time(a.timestamp)} `, "dim"), text("b", a.agent_id), " ",
      text("span", `${a.activity_type} (${a.status})`, "what"));
    return item;
  }));
  $("collaborations").replaceChildren(...[...view.sessions.values()].map((s) => {
    const item = document.createElement("li");
    item.dataset.session = s.session_id;
    const open = text("button", s.session_id, "link");
    open.addEventListener("click", () => showDecisions(s.session_id));
    item.append(open, text("span", ` ${s.participants.join(", ")} · ${s.activity_count} activities · ${s.decision_count} decisions`, "dim"));
    return item;
  }));
  $("history").replaceChildren(...view.history.map((s) => {
    const item = document.createElement("li");
    const open = text("button", s.session_id, "link");
    open.addEventListener("click", () => showDecisions(s.session_id));
    item.append(open, text("span", ` ended ${new Date(s.ended_at).toLocaleTimeString()} · ${s.decision_count} decisions`, "dim"));
    return item;
  }));
  $("memory").replaceChildren(...view.memory.map((u) =>
    text("li", `${time(u.timestamp)} ${u.agent_id} ${u.operation} ${u.item_id}`)));
}

async function showDecisions(sessionId) {
  $("timeline-session").textContent = sessionId;
  const detail = await api(`collaborations/${encodeURIComponent(sessionId)}`);
  $("timeline").replaceChildren(...detail.decisions.map((d) =>
    text("li", `${time(d.timestamp)} ${d.agent_id}: ${d.decision}${d.rationale ? ` (${d.rationale})` : ""}`)));
}

async function refreshHistory() {
  try { view.history = (await api("ended-collaborations?limit=20")).collaborations; render(); } catch (error) { console.warn(error); }
}

function agent(id) {
  if (!view.agents.has(id)) view.agents.set(id, { status: "idle", current_activity: null, last_activity: null, department: "", collaboration_count: 0 });
  return view.agents.get(id);
}

const hub = new CollabClient({ token, clientId: `dashboard_${Math.random().toString(36).slice(2, 8)}`, clientType: "dashboard" });
window.collabDashboard = { hub, view };
hub.addEventListener("state", (event) => {
  const badge = $("state");
  badge.dataset.state = event.detail.state;
  badge.textContent = event.detail.state;
});
hub.addEventListener("collaboration_state", ({ detail }) => {
  view.agents = new Map(Object.entries(detail.agent_status.agents));
  view.sessions = new Map(detail.active_collaborations.map((s) => [s.session_id, s]));
  refreshHistory();
  render();
});
hub.addEventListener("agent_status_update", ({ detail }) => {
  for (const [id, update] of Object.entries(detail.agents)) Object.assign(agent(id), update);
  render();
});
hub.addEventListener("agent_activity", ({ detail: { activity } }) => {
  view.feed.unshift({ ...activity });
  view.feed.length = Math.min(view.feed.length, FEED_SIZE);
  const known = agent(activity.agent_id);
  Object.assign(known, { status: "active", current_activity: activity.activity_id, last_activity: activity.activity_id });
  if (activity.department) known.department = activity.department;
  if (!view.open.has(activity.agent_id)) view.open.set(activity.agent_id, new Set());
  view.open.get(activity.agent_id).add(activity.activity_id);
  const session = activity.session_id && view.sessions.get(activity.session_id);
  if (session) session.activity_count += 1;
  render();
});
hub.addEventListener("activity_completed", ({ detail }) => {
  const item = view.feed.find((a) => a.activity_id === detail.activity_id);
  if (item) item.status = detail.success ? "completed" : "failed";
  const open = view.open.get(detail.agent_id);
  if (open) open.delete(detail.activity_id);
  const known = agent(detail.agent_id);
  if (known.current_activity === detail.activity_id) {
    // Idle now unless it has other open activities; the next status update confirms.
    const next = open && [...open].pop();
    Object.assign(known, next ? { current_activity: next } : { status: "idle", current_activity: null });
  }
  render();
});
hub.addEventListener("collaboration_started", ({ detail: { session } }) => {
  view.sessions.set(session.session_id, { activity_count: 0, decision_count: 0, ...session });
  render();
});
hub.addEventListener("decision_recorded", ({ detail: { decision } }) => {
  const session = view.sessions.get(decision.session_id);
  if (session) session.decision_count += 1;
  if ($("timeline-session").textContent === decision.session_id) showDecisions(decision.session_id);
  render();
});
hub.addEventListener("collaboration_ended", ({ detail }) => {
  view.sessions.delete(detail.session_id);
  refreshHistory();
  render();
});
hub.addEventListener("agent_retired", ({ detail }) => {
  // Idle past the server's agent TTL: it left the live status (its history stays).
  view.agents.delete(detail.agent_id);
  view.open.delete(detail.agent_id);
  render();
});
hub.addEventListener("memory_update", ({ detail: { update } }) => {
  view.memory.unshift(update);
  view.memory.length = Math.min(view.memory.length, FEED_SIZE);
  render();
});
hub.connect();
