// collab.js: the browser client of the collab hub's WebSocket. One dependency-free ES
// module, served by the bridge at /client/collab.js.
//
//   import { CollabClient } from "/client/collab.js";
//   const hub = new CollabClient({ token, clientId: "dashboard" });
//   hub.addEventListener("agent_activity", (e) => console.log(e.detail.activity));
//   hub.addEventListener("state", (e) => console.log(e.detail.state)); // connecting, live, reconnecting, resumed, closed
//   hub.subscribe(["agent_activity", "memory_update"]);
//   hub.connect();
//
// After any disconnect it reconnects with exponential backoff and jitter, resuming with
// ?since=<last seq>&epoch=<epoch> so that no event is missed or repeated; it re-sends its
// subscription and pings every 30 s. When the hub cannot fill the gap it sends a fresh
// `collaboration_state` (a `reset` event is dispatched first).

/**
 * @typedef {"connecting" | "live" | "reconnecting" | "resumed" | "closed"} ConnectionState
 *
 * @typedef {Object} Activity
 * @property {string} activity_id
 * @property {string} agent_id
 * @property {string} department
 * @property {string} activity_type
 * @property {number} timestamp  epoch seconds
 * @property {Object<string, *>} metadata
 * @property {string[]} related_agents
 * @property {string} status  "active", "completed" or "failed"
 * @property {?string} session_id
 * @property {?string} parent_activity_id
 *
 * @typedef {Object} AgentActivityMessage
 * @property {"agent_activity"} type
 * @property {Activity} activity
 * @property {number} seq
 * @property {string} timestamp  ISO 8601
 *
 * @typedef {Object} ActivityCompletedMessage
 * @property {"activity_completed"} type
 * @property {string} activity_id
 * @property {string} agent_id
 * @property {boolean} success
 * @property {Object<string, *>} metadata  the keys this completion added to the activity's metadata ({} for none)
 * @property {number} seq
 * @property {string} timestamp
 *
 * @typedef {Object} AgentView
 * @property {"active" | "idle"} status
 * @property {?string} current_activity
 * @property {?string} last_activity
 * @property {number} collaboration_count
 * @property {string} department
 *
 * @typedef {Object} CollaborationStateMessage
 * @property {"collaboration_state"} type
 * @property {{total_agents: number, active_agents: number, idle_agents: number,
 *             active_activities: number, active_collaborations: number,
 *             agents: Object<string, AgentView>}} agent_status
 * @property {Array<Object>} active_collaborations
 * @property {string} epoch
 * @property {number} seq
 * @property {boolean} [reset]
 *
 * @typedef {Object} ActivityLinkedMessage  an activity recorded as a root got its parent,
 *   which arrived after it (an OpenTelemetry span exported before its parent span ended)
 * @property {"activity_linked"} type
 * @property {string} activity_id
 * @property {string} parent_activity_id
 * @property {string} agent_id
 * @property {string} activity_type
 * @property {number} seq
 * @property {string} timestamp  ISO 8601
 *
 * @typedef {Object} ClientOptions
 * @property {string} [url]  the WebSocket URL; default: this page's host, /api/v1/collaboration/ws
 * @property {string} [token]  the credential, sent as ?token=
 * @property {string} [clientId]
 * @property {string} [clientType]
 * @property {number} [pingInterval]  milliseconds, default 30000
 * @property {number} [initialBackoff]  milliseconds, default 500
 * @property {number} [maxBackoff]  milliseconds, default 15000
 */

const FATAL_CLOSE_CODES = new Set([4400, 4401, 4403]);

export class CollabClient extends EventTarget {
  /** @param {ClientOptions} [options] */
  constructor(options = {}) {
    super();
    const here = typeof location !== "undefined" ? location : { protocol: "http:", host: "127.0.0.1:8000" };
    this.url = options.url || `${here.protocol === "https:" ? "wss:" : "ws:"}//${here.host}/api/v1/collaboration/ws`;
    this.token = options.token || "";
    this.clientId = options.clientId || `browser_${Math.random().toString(36).slice(2, 10)}`;
    this.clientType = options.clientType || "general";
    this.pingInterval = options.pingInterval ?? 30000;
    this.initialBackoff = options.initialBackoff ?? 500;
    this.maxBackoff = options.maxBackoff ?? 15000;
    /** @type {ConnectionState} */
    this.state = "closed";
    /** @type {?string} */
    this.epoch = null;
    /** The seq of the newest event received (or of the state it started from). */
    this.seq = 0;
    /** @type {?string[]} */
    this.subscription = null;
    this.attempt = 0;
    this._socket = null;
    this._pinger = null;
    this._retry = null;
    this._closing = false;
  }

  /** Open the connection (again, after close()). */
  connect() {
    this._closing = false;
    this._open(false);
  }

  /** Close for good: no reconnect. */
  close() {
    this._closing = true;
    clearTimeout(this._retry);
    clearInterval(this._pinger);
    if (this._socket) this._socket.close(1000, "client closed");
    this._setState("closed");
  }

  /**
   * Receive only these message types and activity types (an empty list: everything).
   * Remembered, and sent again after every reconnect.
   * @param {string[]} types
   */
  subscribe(types) {
    this.subscription = [...types];
    this._send({ type: "subscribe", activity_types: this.subscription });
  }

  /** Send a ping now (one is sent every pingInterval anyway). */
  ping() {
    this._send({ type: "ping" });
  }

  _send(message) {
    if (this._socket && this._socket.readyState === WebSocket.OPEN) this._socket.send(JSON.stringify(message));
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, attempt: this.attempt } }));
  }

  _open(resuming) {
    const query = new URLSearchParams({ client_id: this.clientId, client_type: this.clientType });
    if (this.token) query.set("token", this.token);
    if (resuming && this.epoch !== null) {
      query.set("since", String(this.seq));
      query.set("epoch", this.epoch);
    }
    this._setState(resuming ? "reconnecting" : "connecting");
    const socket = new WebSocket(`${this.url}?${query}`);
    this._socket = socket;
    socket.onopen = () => {
      if (this.subscription) this._send({ type: "subscribe", activity_types: this.subscription });
      clearInterval(this._pinger);
      this._pinger = setInterval(() => this.ping(), this.pingInterval);
    };
    socket.onmessage = (event) => this._receive(JSON.parse(event.data));
    socket.onclose = (event) => {
      clearInterval(this._pinger);
      if (this._socket !== socket) return;
      this._socket = null;
      if (this._closing) return;
      if (FATAL_CLOSE_CODES.has(event.code)) {
        this.dispatchEvent(new CustomEvent("error", { detail: { code: event.code, reason: event.reason } }));
        this._setState("closed");
        return;
      }
      this._scheduleReconnect();
    };
  }

  _scheduleReconnect() {
    this.attempt += 1;
    const ceiling = Math.min(this.maxBackoff, this.initialBackoff * 2 ** (this.attempt - 1));
    const delay = ceiling / 2 + Math.random() * (ceiling / 2); // exponential, with jitter
    this._setState("reconnecting");
    this._retry = setTimeout(() => this._open(true), delay);
  }

  _receive(message) {
    switch (message.type) {
      case "connection_established":
        if (message.recovered === true) {
          this.attempt = 0;
          this._setState("resumed");
        } else if (message.recovered === false) {
          this.dispatchEvent(new CustomEvent("reset", { detail: message }));
        }
        this.epoch = message.epoch;
        break;
      case "collaboration_state":
        if (message.reset) this.dispatchEvent(new CustomEvent("reset", { detail: message }));
        this.epoch = message.epoch;
        this.seq = message.seq;
        this.attempt = 0;
        this._setState(this.state === "reconnecting" ? "resumed" : "live");
        break;
      default:
        if (typeof message.seq === "number") {
          if (message.seq <= this.seq) return; // already delivered before a reconnect
          this.seq = message.seq;
        }
        if (this.state === "connecting") this._setState("live");
    }
    this.dispatchEvent(new CustomEvent("message", { detail: message }));
    this.dispatchEvent(new CustomEvent(message.type, { detail: message }));
  }
}
