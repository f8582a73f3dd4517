// The timeline: one lane per agent (grouped by department), each activity a bar from its
// start to its completion, growing while open. Drawn on one canvas, only the lanes in view,
// at most once per animation frame (the dashboard calls draw()); wheel + Ctrl (or the
// buttons) zooms, dragging pans, "Follow live" keeps the right edge at now.
import { typeColour } from "/static/words.js";

const LANE = 20;
const AXIS = 22;
const NAMES = 170;
const STACK = 3; // rows a lane splits into for overlapping activities
const MIN_SPAN = 5; // seconds on screen, zoomed in fully
const MAX_SPAN = 7 * 24 * 3600;

export class Timeline {
  /** @param {HTMLElement} box  a scrolling container; @param {(id: string) => void} onPick */
  constructor(box, store, onPick) {
    this.box = box;
    this.store = store;
    this.onPick = onPick;
    this.span = 300;
    this.end = Date.now() / 1000;
    this.follow = true;
    this.lanes = [];
    this.drawn = [];
    this.spacer = document.createElement("div");
    this.canvas = document.createElement("canvas");
    this.canvas.className = "lanes-canvas";
    box.append(this.canvas, this.spacer);
    box.addEventListener("scroll", () => this.store.touch("timeline"));
    box.addEventListener("wheel", (event) => {
      if (!event.ctrlKey && !event.altKey) return;
      event.preventDefault();
      const at = this._timeAt(event.offsetX);
      this.zoom(event.deltaY > 0 ? 1.25 : 0.8, at);
    }, { passive: false });
    let dragging = null;
    this.canvas.addEventListener("pointerdown", (event) => {
      dragging = { x: event.clientX, end: this.end, moved: false };
      this.canvas.setPointerCapture(event.pointerId);
    });
    this.canvas.addEventListener("pointermove", (event) => {
      if (!dragging) return;
      const dx = event.clientX - dragging.x;
      if (Math.abs(dx) > 3) dragging.moved = true;
      if (!dragging.moved) return;
      this.follow = false;
      this.end = dragging.end - (dx / this._plotWidth()) * this.span;
      this.store.touch("timeline");
    });
    this.canvas.addEventListener("pointerup", (event) => {
      const click = dragging && !dragging.moved;
      dragging = null;
      if (click) this._pick(event.offsetX, event.offsetY);
    });
  }

  zoom(factor, around = null) {
    const now = Date.now() / 1000;
    const end = this.follow ? now : this.end;
    const centre = around ?? end - this.span / 2;
    const span = Math.min(MAX_SPAN, Math.max(MIN_SPAN, this.span * factor));
    if (!this.follow) this.end = centre + (end - centre) * (span / this.span);
    this.span = span;
    this.store.touch("timeline");
  }

  followLive() {
    this.follow = true;
    this.store.touch("timeline");
  }

  _plotWidth() {
    return Math.max(50, this.box.clientWidth - NAMES);
  }

  _timeAt(x) {
    const end = this.follow ? Date.now() / 1000 : this.end;
    return end - this.span + ((x - NAMES) / this._plotWidth()) * this.span;
  }

  _pick(x, y) {
    for (const bar of this.drawn) {
      if (x >= bar.x - 2 && x <= bar.x + bar.width + 2 && y >= bar.y && y <= bar.y + bar.height) {
        this.onPick(bar.activity_id);
        return;
      }
    }
    const lane = this.lanes[Math.floor((y - AXIS + this.box.scrollTop) / LANE)];
    if (x < NAMES && lane) this.onPick(null, lane);
  }

  // On opening, the span shows the back-filled history (30 s to 15 minutes of it).
  _fit(lanes, now) {
    let oldest = now;
    for (const lane of lanes) {
      const first = this.store.laneActivities(lane.agent_id)[0];
      if (first) oldest = Math.min(oldest, first.timestamp);
    }
    if (oldest === now) return;
    this.fitted = true;
    this.span = Math.min(900, Math.max(30, (now - oldest) * 1.15));
  }

  /** What the last frame drew (the tests read it: a canvas has no DOM to query). */
  bars() {
    return this.drawn.map(({ activity_id, agent_id, x, y, width, height, status }) => ({ activity_id, agent_id, x, y, width, height, status }));
  }

  /** Draw the lanes in view; true when something in view is still growing. */
  draw(lanes) {
    this.lanes = lanes;
    const now = Date.now() / 1000;
    if (!this.fitted) this._fit(lanes, now);
    if (this.follow) this.end = now;
    const start = this.end - this.span;
    const width = this.box.clientWidth;
    const height = this.box.clientHeight;
    this.spacer.style.height = `${Math.max(0, lanes.length * LANE + AXIS - height)}px`;
    const ratio = window.devicePixelRatio || 1;
    if (this.canvas.width !== Math.round(width * ratio) || this.canvas.height !== Math.round(height * ratio)) {
      this.canvas.width = Math.round(width * ratio);
      this.canvas.height = Math.round(height * ratio);
      this.canvas.style.width = `${width}px`;
      this.canvas.style.height = `${height}px`;
    }
    const g = this.canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    g.font = "12px system-ui, sans-serif";
    g.textBaseline = "middle";
    const plot = this._plotWidth();
    const xOf = (t) => NAMES + ((t - start) / this.span) * plot;
    const first = Math.max(0, Math.floor(this.box.scrollTop / LANE));
    const last = Math.min(lanes.length, first + Math.ceil((height - AXIS) / LANE) + 1);
    const drawn = [];
    let growing = false;
    let department = null;
    for (let index = first; index < last; index += 1) {
      const lane = lanes[index];
      const y = AXIS + (index - first) * LANE - (this.box.scrollTop % LANE);
      if (index % 2) {
        g.fillStyle = "rgba(255,255,255,0.025)";
        g.fillRect(0, y, width, LANE);
      }
      if (lane.department !== department) {
        department = lane.department;
        g.fillStyle = "#27323d";
        g.fillRect(0, y, width, 1);
      }
      g.fillStyle = lane.status === "active" ? "#d8dee6" : "#8a97a5";
      g.fillText(`${lane.agent_id}`.slice(0, 22), 6, y + LANE / 2);
      g.save();
      g.beginPath();
      g.rect(NAMES, y, plot, LANE);
      g.clip();
      // Activities of one agent that overlap in time share the lane in up to STACK rows.
      const shown = [];
      const rowEnds = [];
      for (const activity of this.store.laneActivities(lane.agent_id)) {
        const begin = activity.timestamp;
        const open = activity.status === "active";
        const finish = open ? now : activity.completed_at ?? begin;
        if (finish < start || begin > this.end) continue;
        let row = rowEnds.findIndex((end) => end <= begin);
        if (row < 0) row = rowEnds.length < STACK ? rowEnds.length : STACK - 1;
        rowEnds[row] = Math.max(rowEnds[row] ?? 0, finish);
        shown.push([activity, begin, finish, open, row]);
      }
      const rowHeight = (LANE - 6) / Math.max(1, rowEnds.length);
      for (const [activity, begin, finish, open, row] of shown) {
        const x = xOf(begin);
        const top = y + 3 + row * rowHeight;
        const barWidth = Math.max(2, xOf(finish) - x);
        g.globalAlpha = open ? 1 : 0.75;
        g.fillStyle = typeColour(activity.activity_type);
        g.fillRect(x, top, barWidth, rowHeight - (rowEnds.length > 1 ? 1 : 0));
        if (activity.status === "failed") {
          g.strokeStyle = "#f85149";
          g.lineWidth = 2;
          g.strokeRect(x + 1, top + 1, Math.max(1, barWidth - 2), Math.max(1, rowHeight - 2));
        } else if (open) {
          g.fillStyle = "#ffffff";
          g.fillRect(x + barWidth - 2, top, 2, rowHeight); // the growing edge
          growing = true;
        }
        drawn.push({ activity_id: activity.activity_id, agent_id: lane.agent_id, x, y: top, height: rowHeight, width: barWidth, status: activity.status });
      }
      g.restore();
      g.globalAlpha = 1;
    }
    // The time axis, over the lanes.
    g.fillStyle = "#182028";
    g.fillRect(0, 0, width, AXIS);
    g.fillStyle = "#8a97a5";
    const step = niceStep(this.span / Math.max(1, plot / 90));
    for (let tick = Math.ceil(start / step) * step; tick <= this.end; tick += step) {
      const x = xOf(tick);
      g.fillRect(x, AXIS - 5, 1, 5);
      g.fillText(new Date(tick * 1000).toLocaleTimeString(), x + 3, AXIS / 2);
    }
    if (this.follow) {
      g.fillStyle = "#3fb950";
      g.fillRect(NAMES + plot - 1, 0, 2, height);
    }
    this.drawn = drawn;
    return growing || this.follow;
  }
}

function niceStep(seconds) {
  for (const step of [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400]) {
    if (step >= seconds) return step;
  }
  return 86400 * Math.ceil(seconds / 86400);
}
