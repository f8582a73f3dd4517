// The collaboration graph: agents as nodes (coloured by department), an edge between two
// agents that worked together in the last WINDOW seconds (one activity naming the other in
// related_agents, a message, a shared session), as thick as that traffic. Laid out by
// cytoscape (vendored from npm: static/vendor/cytoscape); re-laid out only when agents join.
import cytoscape from "/static/vendor/cytoscape/cytoscape.esm.min.js";

export const WINDOW = 600;
const DEPARTMENT_COLOURS = ["#58a6ff", "#3fb950", "#d29922", "#bc8cff", "#ff7b72", "#39c5cf", "#f778ba", "#e3b341"];
// Past this many agents the force layout costs seconds: a concentric layout instead.
const FORCE_LAYOUT_LIMIT = 150;

export class Graph {
  constructor(box, onPick) {
    this.cy = cytoscape({
      container: box,
      minZoom: 0.1,
      maxZoom: 4,
      style: [
        { selector: "node", style: { label: "data(label)", color: "#d8dee6", "font-size": 14, "text-valign": "bottom",
          "text-margin-y": 4, "background-color": "data(colour)", width: "data(size)", height: "data(size)" } },
        { selector: "node[?active]", style: { "border-width": 3, "border-color": "#3fb950" } },
        { selector: "edge", style: { width: "data(width)", "line-color": "#6b7d90", "curve-style": "haystack",
          opacity: 0.8 } },
        { selector: ":selected", style: { "border-width": 3, "border-color": "#ffffff" } },
      ],
      layout: { name: "preset" },
    });
    this.departments = new Map();
    this.cy.on("tap", "node", (event) => onPick(event.target.id()));
  }

  colour(department) {
    if (!this.departments.has(department)) {
      this.departments.set(department, DEPARTMENT_COLOURS[this.departments.size % DEPARTMENT_COLOURS.length]);
    }
    return this.departments.get(department);
  }

  /** @param agents [{agent_id, department, status, count}] @param edges Map "a\u0000b" -> weight */
  update(agents, edges) {
    const cy = this.cy;
    let added = false;
    cy.batch(() => {
      const present = new Set();
      for (const agent of agents) {
        present.add(agent.agent_id);
        const data = { label: agent.agent_id, colour: this.colour(agent.department || ""),
          size: 26 + Math.min(34, Math.sqrt(agent.count) * 4), active: agent.status === "active" };
        const node = cy.getElementById(agent.agent_id);
        if (node.empty()) {
          cy.add({ group: "nodes", data: { id: agent.agent_id, ...data } });
          added = true;
        } else node.data(data);
      }
      cy.nodes().forEach((node) => { if (!present.has(node.id())) node.remove(); });
      const wanted = new Set();
      for (const [key, weight] of edges) {
        const [a, b] = key.split("\u0000");
        if (!present.has(a) || !present.has(b)) continue;
        const id = `e:${key}`;
        wanted.add(id);
        const data = { width: 1 + Math.min(12, Math.log2(1 + weight) * 2.5), weight };
        const edge = cy.getElementById(id);
        if (edge.empty()) cy.add({ group: "edges", data: { id, source: a, target: b, ...data } });
        else edge.data(data);
      }
      cy.edges().forEach((edge) => { if (!wanted.has(edge.id())) edge.remove(); });
    });
    if (added) this.layout();
  }

  layout() {
    const many = this.cy.nodes().length > FORCE_LAYOUT_LIMIT;
    const box = this.cy.container();
    const boundingBox = { x1: 0, y1: 0, w: Math.max(300, box.clientWidth), h: Math.max(300, box.clientHeight) };
    this.cy.layout(many
      ? { name: "concentric", concentric: (node) => node.degree(), levelWidth: () => 2, animate: false, fit: false, boundingBox }
      : { name: "cose", animate: false, randomize: true, nodeRepulsion: () => 400000, idealEdgeLength: () => 120,
        nodeOverlap: 20, componentSpacing: 120, fit: false, boundingBox }).run();
    this.fit();
  }

  resize() {
    this.cy.resize();
    this.fit();
  }

  // Fitted, but never zoomed in so far that a dozen agents fill the screen with giant labels.
  fit() {
    this.cy.fit(undefined, 40);
    if (this.cy.zoom() > 1.6) {
      this.cy.zoom(1.6);
      this.cy.center();
    }
  }

  select(agentId) {
    this.cy.$(":selected").unselect();
    if (agentId) this.cy.getElementById(agentId).select();
  }
}
