// omerta dashboard: the control API's documents (status, peers, vms) under
// /api/v1, re-fetched on every event of /api/v1/events and polled as a
// fallback.  No libraries; the graph is inline SVG.
"use strict";

const POLL_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";
const NAT_COLORS = {
  public: "#2e8b57", full_cone: "#7fb800", restricted_cone: "#c08a00",
  port_restricted_cone: "#e67e22", symmetric: "#c0392b", blocked: "#555", unknown: "#bbb",
};
const view = { status: null, peers: [], vms: null, provider: null, sortKey: "name", sortDir: 1, filter: "" };
let refreshing = null, again = false;

function $(id) { return document.getElementById(id); }
function el(tag, attrs, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}
function short(id) { return id ? String(id).slice(0, 8) : ""; }
function fmt(n, digits) { return (n === null || n === undefined) ? "–" : Number(n).toFixed(digits); }

async function getJSON(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (!response.ok) throw new Error(path + ": " + response.status);
  return response.json();
}

async function refresh() {
  if (refreshing) { again = true; return refreshing; }
  refreshing = (async () => {
    try {
      const [status, peers, vms, provider] = await Promise.all([
        getJSON("/api/v1/status"), getJSON("/api/v1/peers"),
        getJSON("/api/v1/vms").catch(() => null), getJSON("/api/v1/provider").catch(() => null)]);
      view.status = status; view.peers = peers; view.vms = vms;
      view.provider = provider && provider.provider;
      render();
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      $("updated").textContent = "cannot reach the node (" + e.message + ")";
    } finally {
      refreshing = null;
      if (again) { again = false; refresh(); }
    }
  })();
  return refreshing;
}

function role(capabilities) {
  const caps = capabilities || [];
  if (caps.includes("relay")) return "relay";
  if (caps.includes("provider")) return "provider";
  return "member";
}
function stateOf(peer) { return peer.gone ? "gone" : (peer.state || "unknown"); }

// One row per peer: the peers document, with the live path of the status's
// view of the same peer (path kind, RTT, relay).
function rows() {
  const live = new Map();
  for (const p of (view.status && view.status.peers) || []) live.set(p.peer_id, p);
  return view.peers.map((peer) => {
    const s = live.get(peer.peer_id) || {};
    const path = s.path || null;
    return {
      peer_id: peer.peer_id, name: peer.name || "", nat_type: peer.nat_type || "unknown",
      path_kind: path ? path.kind : "none", endpoint: (path && path.endpoint) || peer.endpoint || "",
      via: path && path.via ? path.via : null,
      rtt_ms: path && path.rtt_ms !== null && path.rtt_ms !== undefined ? path.rtt_ms : peer.rtt_ms,
      last_heard_ago_s: peer.last_heard_ago_s, state: stateOf(peer),
      role: role(peer.capabilities), active: !!s.active,
    };
  });
}

function render() {
  const status = view.status;
  $("node-name").textContent = (status.name || short(status.peer_id)) + " · " + role(status.capabilities);
  document.title = "omerta · " + (status.name || short(status.peer_id));
  const all = rows();
  renderGraph(status, all);
  renderTable(all);
  renderNode(status);
  renderProvider(status);
}

function renderGraph(status, all) {
  const svg = $("graph");
  svg.replaceChildren();
  const cx = 320, cy = 220, radius = 160;
  const peers = all;
  const position = new Map();
  position.set(status.peer_id, [cx, cy]);
  peers.forEach((p, i) => {
    const angle = -Math.PI * 0.8 + (2 * Math.PI * i) / Math.max(peers.length, 1);
    position.set(p.peer_id, [cx + radius * Math.cos(angle), cy + radius * Math.sin(angle)]);
  });
  const edges = el("svg:g"), labels = el("svg:g"), nodes = el("svg:g");
  for (const p of peers) {
    if (p.path_kind === "none") continue;
    const [x, y] = position.get(p.peer_id);
    const relay = p.via && position.get(p.via);
    const points = relay ? `${cx},${cy} ${relay[0]},${relay[1]} ${x},${y}` : `${cx},${cy} ${x},${y}`;
    const down = p.state !== "online" ? " down" : "";
    edges.append(el("svg:polyline", { points, class: `edge kind-${p.path_kind}${down}`,
      "data-peer": p.peer_id, "data-kind": p.path_kind }));
    const [lx, ly] = relay ? [(relay[0] + x) / 2, (relay[1] + y) / 2] : [(cx + x) / 2, (cy + y) / 2];
    labels.append(el("svg:text", { x: lx, y: ly - 4, class: "edge-label" },
      p.path_kind + (p.rtt_ms !== null && p.rtt_ms !== undefined ? " " + fmt(p.rtt_ms, 1) + " ms" : "")));
  }
  const self = { peer_id: status.peer_id, name: status.name, role: role(status.capabilities),
    nat_type: status.nat ? (status.nat.nat_type || status.nat.type || "unknown") : "unknown", state: "online" };
  for (const p of [self, ...peers]) {
    const [x, y] = position.get(p.peer_id);
    const g = el("svg:g", { class: "node" + (p.state !== "online" ? " down" : ""),
      "data-peer": p.peer_id, "data-state": p.state });
    const nat = String(p.nat_type || "unknown").toLowerCase();
    g.append(el("svg:circle", { cx: x, cy: y, r: 25, fill: "none", stroke: NAT_COLORS[nat] || "#bbb", "stroke-width": 5 }));
    g.append(el("svg:circle", { cx: x, cy: y, r: 19,
      class: "role-" + p.role + (p.peer_id === status.peer_id ? " role-self" : "") }));
    g.append(el("svg:text", { x, y: y + 42 }, p.name || short(p.peer_id)));
    g.append(el("svg:text", { x, y: y + 55, class: "edge-label" }, p.peer_id === status.peer_id ? "this node" : p.state));
    g.append(el("svg:title", {}, `${p.name || ""} ${p.peer_id}\nrole ${p.role}, NAT ${nat}, ${p.state}`));
    nodes.append(g);
  }
  svg.append(edges, labels, nodes);
}

function compare(a, b) {
  const key = view.sortKey;
  const x = a[key], y = b[key];
  if (x === y) return 0;
  if (x === null || x === undefined) return 1;
  if (y === null || y === undefined) return -1;
  return (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y))) * view.sortDir;
}

function renderTable(all) {
  const words = view.filter.toLowerCase().split(/\s+/).filter(Boolean);
  const shown = all.filter((r) => {
    const text = [r.peer_id, r.name, r.nat_type, r.path_kind, r.endpoint, r.state, r.role].join(" ").toLowerCase();
    return words.every((w) => text.includes(w));
  }).sort(compare);
  const body = $("peers").tBodies[0];
  body.replaceChildren(...shown.map((r) => {
    const tr = el("tr", { "data-peer": r.peer_id, "data-state": r.state, "data-kind": r.path_kind });
    tr.append(el("td", { title: r.peer_id }, short(r.peer_id)), el("td", {}, r.name),
      el("td", {}, r.nat_type), el("td", { class: "kind" }, r.path_kind + (r.via ? " via " + short(r.via) : "")),
      el("td", {}, r.endpoint), el("td", {}, fmt(r.rtt_ms, 2)), el("td", {}, fmt(r.last_heard_ago_s, 1)),
      el("td", { class: "state state-" + r.state }, r.state));
    return tr;
  }));
  for (const th of document.querySelectorAll("#peers th[data-key]")) {
    th.classList.toggle("sorted-asc", th.dataset.key === view.sortKey && view.sortDir > 0);
    th.classList.toggle("sorted-desc", th.dataset.key === view.sortKey && view.sortDir < 0);
  }
}

function info(dl, pairs) {
  dl.replaceChildren();
  for (const [k, v] of pairs) {
    if (v === undefined || v === null || v === "") continue;
    dl.append(el("dt", {}, k), el("dd", {}, typeof v === "object" ? JSON.stringify(v) : v));
  }
}

function renderNode(status) {
  const metrics = status.metrics || {};
  const pick = (name) => {
    const v = metrics[name];
    if (v === undefined) return undefined;
    return Array.isArray(v) ? v.reduce((a, b) => a + (b && typeof b.value === "number" ? b.value : 0), 0) : v;
  };
  const reservations = [];
  for (const n of status.network_status || []) {
    for (const r of (n.relays && n.relays.reservations) || []) {
      reservations.push(`relay ${short(r.relay)} at ${r.address}` + (r.live ? "" : " (not live)") +
        (r.expires_in_s !== undefined ? `, renews in ${Math.round(r.expires_in_s)} s` : ""));
    }
  }
  const nat = status.nat ? Object.entries(status.nat).filter(([, v]) => v !== null && typeof v !== "object")
    .map(([k, v]) => `${k}: ${v}`).join(", ") : "no report yet";
  const peers = (status.peers || []).length, online = (status.peers || []).filter((p) => p.state === "online").length;
  info($("node-info"), [
    ["id", status.peer_id], ["name", status.name], ["roles", (status.capabilities || []).join(", ")],
    ["listen", status.listen], ["public", (status.public_endpoints || []).join(", ")],
    ["NAT", nat],
    ["peers", `${online} online of ${peers}`],
    ["relay service", status.relay], ["reservations", reservations.join("; ") || "none"],
    ["packets in", pick("packets_in")], ["bytes in", pick("bytes_in")], ["frames out", pick("frames_out")],
    ["bytes out", pick("bytes_out")], ["drops", pick("drops") || 0],
  ]);
}

function renderProvider(status) {
  const provider = view.provider || null;
  const resources = status.resources && Object.keys(status.resources).length ? status.resources : null;
  const vms = view.vms && Array.isArray(view.vms.vms) ? view.vms.vms : [];
  $("provider-section").hidden = !(provider || resources || vms.length);
  const jobs = provider && provider.jobs ? provider.jobs : null;
  const quantity = (r) => r ? Object.entries(r).map(([k, v]) => `${k} ${v}`).join(", ") : null;
  info($("provider-info"), [
    ["capacity", quantity(provider && provider.capacity)],
    ["free", quantity(provider ? provider.free : resources)], ["VMs running", provider ? provider.vms : null],
    ["jobs", provider ? (jobs ? (Object.entries(jobs.jobs || {}).map(([k, v]) => `${v} ${k}`).join(", ") || "none") : "off") : null],
    ["job runner", jobs ? jobs.runner || jobs.problem : null],
  ]);
  $("vms").tBodies[0].replaceChildren(...vms.map((vm) => {
    const tr = el("tr");
    tr.append(el("td", {}, vm.vm_id || vm.id || vm.name), el("td", {}, vm.state),
      el("td", {}, vm.provider_name || short(vm.provider)), el("td", {}, JSON.stringify(vm.resources || vm.spec || {})));
    return tr;
  }));
}

function connect() {
  const live = $("live");
  if (!window.EventSource) { live.dataset.state = "polling"; live.textContent = "polling"; return; }
  const kinds = "peer_discovered,peer_connected,peer_suspected,peer_disconnected,peer_gone,path_changed,nat_changed,vm_state,member_suspected";
  const source = new EventSource("/api/v1/events?kinds=" + kinds);
  source.onopen = () => { live.dataset.state = "live"; live.textContent = "live"; refresh(); };
  source.onerror = () => { live.dataset.state = "polling"; live.textContent = "reconnecting"; };
  for (const kind of kinds.split(",")) source.addEventListener(kind, () => refresh());
}

document.addEventListener("DOMContentLoaded", () => {
  for (const th of document.querySelectorAll("#peers th[data-key]")) {
    th.addEventListener("click", () => {
      if (view.sortKey === th.dataset.key) view.sortDir = -view.sortDir;
      else { view.sortKey = th.dataset.key; view.sortDir = 1; }
      if (view.status) renderTable(rows());
    });
  }
  $("filter").addEventListener("input", (e) => { view.filter = e.target.value; if (view.status) renderTable(rows()); });
  if (location.search.includes("token=")) history.replaceState(null, "", location.pathname);
  refresh();
  connect();
  setInterval(refresh, POLL_MS);
});
