// Words for people: activity types, durations, metadata summaries. Ids are shown only
// where a person asked for them (the detail panel); everywhere else these words are.

const LABELS = {
  agent_started: "Starting up", agent_completed: "Finishing", memory_write: "Writing memory",
  memory_read: "Reading memory", council_debate: "Council debate", council_synthesis: "Council synthesis",
  decision_made: "Deciding", task_assigned: "Task assigned", task_completed: "Task completed",
  message_sent: "Sending a message", collaboration_started: "Starting a session",
  collaboration_ended: "Ending a session",
};
export const ACTIVITY_TYPES = Object.keys(LABELS);

// One colour per activity type (the timeline's bars, the legend, the tree).
const COLOURS = ["#58a6ff", "#3fb950", "#d29922", "#bc8cff", "#ff7b72", "#39c5cf", "#f2cc60", "#a5d6ff",
  "#7ee787", "#f778ba", "#ffa657", "#8b949e"];
export const typeColour = (type) => COLOURS[Math.max(0, ACTIVITY_TYPES.indexOf(type)) % COLOURS.length];

export const label = (type) => LABELS[type] || String(type || "activity").replaceAll("_", " ");

export function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return seconds % 60 >= 1 ? `${minutes}m ${Math.floor(seconds % 60)}s` : `${minutes}m`;
  return `${Math.floor(minutes / 60)}h ${minutes % 60}m`;
}

export const clock = (seconds) => new Date(seconds * 1000).toLocaleTimeString();
export const epoch = (value) => (typeof value === "number" ? value : Date.parse(value) / 1000);

// Keys that say best what an activity is about, in order; OpenTelemetry GenAI span
// attributes first (a span mapped by the hub carries them).
const SUMMARY_KEYS = [
  ["gen_ai.tool.name", "tool"], ["gen_ai.operation.name", ""], ["gen_ai.request.model", "model"],
  ["gen_ai.agent.name", "agent"], ["task", ""], ["topic", ""], ["title", ""], ["description", ""],
  ["query", ""], ["item_id", "item"], ["message", ""], ["summary", ""], ["decision", ""],
];
const HIDDEN_IN_SUMMARY = new Set(["otel.trace_id", "otel.span_id", "otel.parent_span_id", "otel.duration_ms"]);

const short = (value, room = 48) => {
  const textual = typeof value === "string" ? value : JSON.stringify(value);
  return textual.length > room ? `${textual.slice(0, room - 1)}…` : textual;
};

/** A few words on what an activity is about, from its metadata (empty when it has none). */
export function summary(metadata, room = 70) {
  if (!metadata || typeof metadata !== "object") return "";
  const parts = [];
  for (const [key, name] of SUMMARY_KEYS) {
    if (metadata[key] !== undefined && metadata[key] !== null && metadata[key] !== "") {
      parts.push(name ? `${name} ${short(metadata[key], 32)}` : short(metadata[key], 40));
    }
    if (parts.length === 2) break;
  }
  if (!parts.length) {
    for (const [key, value] of Object.entries(metadata)) {
      if (HIDDEN_IN_SUMMARY.has(key) || (typeof value === "object" && value !== null)) continue;
      parts.push(`${key.split(".").pop()} ${short(value, 24)}`);
      if (parts.length === 2) break;
    }
  }
  const tokens = metadata["gen_ai.usage.input_tokens"] ?? metadata["gen_ai.usage.output_tokens"];
  if (tokens !== undefined && parts.length < 3) {
    const total = (metadata["gen_ai.usage.input_tokens"] || 0) + (metadata["gen_ai.usage.output_tokens"] || 0);
    parts.push(`${total.toLocaleString("en-US")} tokens`);
  }
  return short(parts.join(" · "), room);
}

/** A session in words: its type and who takes part. */
export function sessionName(session) {
  if (!session) return "a session";
  const type = session.session_type ? session.session_type.replaceAll("_", " ") : "session";
  const people = session.participants || [];
  const who = people.length > 3 ? `${people.slice(0, 3).join(", ")} +${people.length - 3}` : people.join(", ");
  return who ? `${type} with ${who}` : type;
}

/** The metadata as rows of (dotted key, value shown), nested objects flattened. */
export function flatten(metadata, prefix = "", rows = []) {
  for (const [key, value] of Object.entries(metadata || {})) {
    const name = prefix ? `${prefix}.${key}` : key;
    if (value && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length) {
      flatten(value, name, rows);
    } else {
      let shown = typeof value === "string" ? value : JSON.stringify(value);
      if (name.endsWith("duration_ms") && typeof value === "number") shown = `${duration(value / 1000)} (${value} ms)`;
      rows.push([name, shown]);
    }
  }
  return rows;
}
