// The Open-AGI node dashboard. Served by the daemon, read-only: it loads
// the whole state once (/dashboard/api/state), then follows one
// server-sent event stream (/dashboard/api/events) for live updates.
// No third-party code: charts are drawn as SVG here.
"use strict";

const state = { doc: null, series: new Map(), range: "fine", page: "overview" };

const $ = (id) => document.getElementById(id);
const text = (id, value) => {
  const el = $(id);
  if (el) el.textContent = value;
};

function fmt(v, digits = 1) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(digits) + "G";
  if (a >= 1e6) return (v / 1e6).toFixed(digits) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(digits) + "k";
  if (Number.isInteger(v)) return String(v);
  return v.toFixed(a < 1 ? 3 : digits);
}

function duration(secs) {
  const d = Math.floor(secs / 86400), h = Math.floor((secs % 86400) / 3600);
  const m = Math.floor((secs % 3600) / 60), s = Math.floor(secs % 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString();
}

function el(tag, attrs = {}, children = []) {
  const node = tag === "svg" || ["path", "line", "text", "g"].includes(tag)
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

// A line chart of `lines` ([{points: [{t, v}], cls}]) into an <svg>.
// `limit`, when given, draws a dashed horizontal line (a budget, a
// threshold); `xfmt` labels the x axis (times of day by default). The
// svg's data-points says how many points were drawn.
function drawChart(svg, lines, limit, xfmt = clock, empty = "no data yet") {
  const W = 400, H = 160, L = 44, R = 6, T = 8, B = 18;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const all = lines.flatMap((l) => l.points);
  svg.dataset.points = String(all.length);
  if (all.length === 0) {
    svg.append(el("text", { x: 12, y: H / 2 }, [empty]));
    return;
  }
  let t0 = Math.min(...all.map((p) => p.t)), t1 = Math.max(...all.map((p) => p.t));
  let v0 = Math.min(0, ...all.map((p) => p.v)), v1 = Math.max(...all.map((p) => p.v));
  if (limit !== undefined && limit !== null) v1 = Math.max(v1, limit);
  if (t1 === t0) t1 = t0 + 1;
  if (v1 === v0) v1 = v0 + 1;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => H - B - ((v - v0) / (v1 - v0)) * (H - T - B);
  svg.append(
    el("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    el("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    el("text", { x: 2, y: T + 8 }, [fmt(v1)]),
    el("text", { x: 2, y: H - B }, [fmt(v0)]),
    el("text", { x: L, y: H - 4 }, [xfmt(t0)]),
    el("text", { x: W - R - 48, y: H - 4 }, [xfmt(t1)]),
  );
  if (limit !== undefined && limit !== null) {
    svg.append(el("line", { class: "limit", x1: L, y1: y(limit), x2: W - R, y2: y(limit) }));
  }
  for (const line of lines) {
    if (line.points.length === 0) continue;
    const d = line.points
      .map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`)
      .join("");
    svg.append(el("path", { class: line.cls || "line", d }));
  }
}

function drawSeriesCharts() {
  for (const svg of document.querySelectorAll("svg.chart[data-series]")) {
    const s = state.series.get(svg.dataset.series);
    if (!s) continue;
    drawChart(svg, [{ points: state.range === "fine" ? s.fine : s.coarse }]);
  }
}

function renderOverview(doc) {
  const node = doc.status.node, net = doc.status.network, c = doc.status.consensus;
  text("peer-id", node.peer_id);
  text("peer-short", node.peer_id.slice(-8));
  text("role", !c ? "node (no ledger)" : c.role === "full" ? `full node (${c.validators} validators)` : `validator ${c.validator_index + 1} of ${c.validators}`);
  text("uptime", duration(node.uptime_secs));
  text("version", node.version);
  text("transport", `${net.transport} · ${net.network_id}`);
  const tor = doc.status.tor;
  text("tor", tor ? `${tor.bootstrapped ? "bootstrapped" : "bootstrapping"}${tor.onion_address ? " · " + tor.onion_address : ""}` : "not used");
  text("peers", String(net.connected_peers));
  text("height", c ? String(c.height) : "–");
  text("view", c && c.role === "validator" ? `${c.view}${c.changing_view ? " (changing)" : ""}` : "–");
  const rate = state.series.get("committed_tx_rate");
  const last = rate && rate.fine.length ? rate.fine[rate.fine.length - 1].v : null;
  text("tx-rate", fmt(last));
  const lat = doc.latency;
  text("latency", lat && lat.samples ? `${fmt(lat.p50_ms)} / ${fmt(lat.p99_ms)} ms` : "–");
  text("jobs-running", String(doc.jobs.filter((j) => j.state === "running" || j.state === "gathering").length));
  const firing = doc.alerts.rules.filter((r) => r.state === "firing");
  text("alerts-active", firing.length ? firing.map((r) => r.alert).join(", ") : "none");
  text("alert-count", firing.length ? String(firing.length) : "");
}

function traffic(entries) {
  const by = new Map();
  for (const e of entries || []) {
    const row = by.get(e.protocol) || { inbound: 0, outbound: 0 };
    row[e.direction] = e.bytes;
    by.set(e.protocol, row);
  }
  return [...by.entries()].map(([p, r]) => `${p} ${fmt(r.inbound)}B / ${fmt(r.outbound)}B`).join(" · ") || "–";
}

function renderPeers(doc) {
  const body = $("peer-table").tBodies[0];
  body.replaceChildren(...doc.peers.map((p) => el("tr", {}, [
    el("td", { class: "mono" }, [p.peer_id]),
    el("td", { class: "mono" }, [(p.addresses || []).join(" ")]),
    el("td", {}, [p.rtt_ms == null ? "–" : `${p.rtt_ms.toFixed(1)} ms`]),
    el("td", {}, [traffic(p.traffic)]),
    el("td", {}, [p.agent_version || "–"]),
  ])));
  $("connection-events").tBodies[0].replaceChildren(...(doc.connection_events || []).slice().reverse().map((e) => el("tr", {}, [
    el("td", {}, [new Date(e.at * 1000).toLocaleString()]),
    el("td", {}, [`${e.event} (${e.outbound ? "dialled" : "inbound"})`]),
    el("td", { class: "mono" }, [e.peer_id]),
    el("td", { class: "mono" }, [e.address]),
  ])));
}

function renderConsensus(doc) {
  const dl = $("consensus-facts");
  const c = doc.status.consensus;
  if (!c) {
    dl.replaceChildren(el("dt", {}, ["role"]), el("dd", {}, ["this node holds no ledger (no genesis)"]));
    return;
  }
  if (c.role === "full") {
    const facts = [
      ["role", "full node: follows and verifies the ledger, never votes"],
      ["height", c.height], ["head", c.head_hash], ["epoch", c.epoch],
      ["last block", c.last_block_unix_ms ? clock(c.last_block_unix_ms) : "–"],
      ["from", c.last_source || "–"], ["answers refused", c.refused_answers],
      ...c.validators_keys.map((k, i) => [`validator ${i + 1}`, k]),
    ];
    dl.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, [k]), el("dd", { class: "mono" }, [String(v)])]));
    $("validator-table").tBodies[0].replaceChildren();
    return;
  }
  const facts = [
    ["primary", `${c.primary_index + 1} (${c.primary})`],
    ["chosen by", (c.skipped_validators || []).length
      ? `rotation skipping ${c.skipped_validators.map((i) => i + 1).join(", ")} (recent failures as primary, checkpoint ${c.schedule_checkpoint})`
      : "rotation"],
    ["this validator", `${c.validator_index + 1} of ${c.validators} (tolerates f = ${c.f})`],
    ["epoch", `${c.epoch} (the validator set after ${c.epoch} change${c.epoch === 1 ? "" : "s"})`],
    ["height", c.height], ["head", c.head_hash], ["view", c.view],
    ["stable checkpoint", c.stable_checkpoint], ["waiting transactions", c.pending],
    ["committed transactions", c.committed_txs],
    ["last commit", c.last_commit_unix_ms ? clock(c.last_commit_unix_ms) : "–"],
    ["recovering validators", c.recovering_validators],
  ];
  dl.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, [k]), el("dd", { class: "mono" }, [String(v)])]));
  const ago = (ms) => ms ? `${Math.max(0, Math.round((Date.now() - ms) / 1000))} s ago` : "–";
  $("validator-table").tBodies[0].replaceChildren(...(c.activity || []).map((v) => el("tr", {}, [
    el("td", {}, [String(v.index + 1) + (v.index === c.primary_index ? " (primary)" : "")]),
    el("td", { class: "mono" }, [v.peer_id + (v.this_node ? " (this node)" : "")]),
    el("td", {}, [v.this_node ? "–" : `${v.last_message || "nothing yet"} ${ago(v.last_message_unix_ms)}`]),
    el("td", {}, [v.last_vote ? `${v.last_vote.kind} view ${v.last_vote.view} seq ${v.last_vote.seq}, ${ago(v.last_vote.unix_ms)}` : "–"]),
  ])));
}

// How a job protects updates, in words (JobView::privacy_mode).
const PRIVACY_MODES = {
  none: "no privacy: the coordinator sees each update",
  central: "central DP: the coordinator sees each update and adds the noise",
  "none+secagg": "secure aggregation: the coordinator sees only sums",
  "distributed+secagg": "distributed DP under secure aggregation: participants add the noise, the coordinator sees only sums",
};

function renderJobs(doc) {
  const root = $("jobs");
  if (!doc.jobs.length) {
    root.replaceChildren(el("p", { class: "empty" }, ["No training job on this node's ledger."]));
    return;
  }
  root.replaceChildren(...doc.jobs.map((job) => {
    const acc = job.history.filter((r) => r.accuracy != null).map((r) => ({ t: r.round, v: r.accuracy }));
    const eps = job.history.filter((r) => r.epsilon != null).map((r) => ({ t: r.round, v: r.epsilon }));
    const last = job.history.length ? job.history[job.history.length - 1] : null;
    const accSvg = el("svg", { class: "chart job-accuracy" });
    const epsSvg = el("svg", { class: "chart job-epsilon" });
    const partSvg = el("svg", { class: "chart job-participants" });
    const div = el("div", { class: "job" }, [
      el("h2", {}, [`${job.name} · ${job.state}`]),
      el("p", { class: "mono" }, [`job ${job.job_id} · coordinator ${job.coordinator} · ${job.architecture}`]),
      el("p", {}, [
        `round ${job.round} of ${job.rounds} · ${job.joined} joined (min ${job.min_clients})`,
        last && last.accuracy != null ? ` · accuracy ${(last.accuracy * 100).toFixed(1)}%` : "",
        last && last.epsilon != null ? ` · ε ${last.epsilon.toFixed(2)}` : "",
        el("span", { class: "privacy-mode" }, [` · ${PRIVACY_MODES[job.privacy_mode] || job.privacy_mode || "no privacy"}`]),
      ]),
      job.waiting_for ? el("p", { class: "empty" }, [job.waiting_for]) : "",
      el("div", { class: "charts" }, [
        el("figure", {}, [el("figcaption", {}, ["Accuracy by round"]), accSvg]),
        el("figure", {}, [el("figcaption", {}, ["ε by round (dashed: budget)"]), epsSvg]),
        el("figure", {}, [el("figcaption", {}, ["Participants: selected and responded"]), partSvg]),
      ]),
      el("p", { class: "mono lineage" }, [
        "models (download): ",
        ...[{ round: 0, model: job.initial_model }, ...job.history].flatMap((r, i) => [
          i ? " → " : "",
          el("a", {
            href: `/api/v1/learn/jobs/${job.job_id}/model?round=${r.round}`,
            title: `round ${r.round}: ${r.model}`,
          }, [r.model.slice(0, 12)]),
        ]),
      ]),
    ]);
    // Rounds on the x axis.
    const round = (t) => `round ${t}`;
    drawChart(accSvg, [{ points: acc }], 1, round);
    drawChart(epsSvg, [{ points: eps, cls: "line2" }], job.epsilon_budget, round,
      job.epsilon_budget == null && !eps.length ? "no differential privacy in this job" : "no round has ended yet");
    drawChart(partSvg, [
      { points: job.history.map((r) => ({ t: r.round, v: r.selected })) },
      { points: job.history.map((r) => ({ t: r.round, v: r.responded })), cls: "line2" },
    ], undefined, round);
    return div;
  }));
}

function renderAlerts(doc) {
  $("alert-table").tBodies[0].replaceChildren(...doc.alerts.rules.map((r) => el("tr", {}, [
    el("td", {}, [r.alert]),
    el("td", { class: `state-${r.state}` }, [r.state + (r.since_ms ? ` since ${clock(r.since_ms)}` : "")]),
    el("td", {}, [r.severity]),
    el("td", {}, [r.value == null ? "–" : fmt(r.value, 2)]),
    el("td", {}, [r.summary, el("br"), el("code", {}, [r.expr])]),
  ])));
  $("alert-events").tBodies[0].replaceChildren(...doc.alerts.events.slice().reverse().map((e) => el("tr", {}, [
    el("td", {}, [new Date(e.at_ms).toLocaleString()]),
    el("td", {}, [e.alert]),
    el("td", { class: e.firing ? "state-firing" : "state-inactive" }, [e.firing ? "fired" : "resolved"]),
    el("td", {}, [e.reason]),
  ])));
}

async function loadBench() {
  const r = await fetch("/dashboard/api/bench", { credentials: "same-origin" });
  if (!r.ok) return;
  const { runs } = await r.json();
  $("bench-table").tBodies[0].replaceChildren(...runs.slice().reverse().map((run) => el("tr", {}, [
    el("td", {}, [new Date(run.unix_ms).toLocaleString()]),
    el("td", {}, [run.benchmark]),
    el("td", { class: "mono" }, [`${run.version} (${run.git_commit})`]),
    el("td", { class: "mono" }, [JSON.stringify(run.settings)]),
    el("td", {}, [run.figures.map((f) => `${f.name} ${fmt(f.value, 2)} ${f.unit}`).join(" · ")]),
  ])));
  // One chart per (benchmark, figure), over the runs.
  const series = new Map();
  for (const run of runs) {
    for (const f of run.figures) {
      const key = `${run.benchmark}: ${f.name} (${f.unit})`;
      if (!series.has(key)) series.set(key, []);
      series.get(key).push({ t: run.unix_ms, v: f.value });
    }
  }
  const day = (t) => new Date(t).toLocaleDateString();
  $("bench-charts").replaceChildren(...[...series.entries()].slice(0, 24).map(([key, points]) => {
    const svg = el("svg", { class: "chart bench" });
    drawChart(svg, [{ points }], undefined, day);
    return el("figure", {}, [el("figcaption", {}, [key]), svg]);
  }));
}

function render() {
  const doc = state.doc;
  if (!doc) return;
  renderOverview(doc);
  renderPeers(doc);
  renderConsensus(doc);
  renderJobs(doc);
  renderAlerts(doc);
  drawSeriesCharts();
}

// Live update: the latest point of each series and the small documents.
function applyEvent(ev) {
  const doc = state.doc;
  for (const [name, point] of ev.points) {
    const s = state.series.get(name);
    if (!s) continue;
    const last = s.fine[s.fine.length - 1];
    if (!last || point.t > last.t) {
      s.fine.push(point);
      if (s.fine.length > ev.fine_points) s.fine.shift();
    }
  }
  Object.assign(doc, {
    status: ev.status, peers: ev.peers, jobs: ev.jobs, alerts: ev.alerts,
    latency: ev.latency, connection_events: ev.connection_events,
  });
  render();
}

function showPage(name) {
  state.page = name;
  for (const s of document.querySelectorAll("section.page")) s.hidden = s.id !== `page-${name}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.dataset.page === name);
}

async function explore(path) {
  const out = $("explorer");
  out.textContent = "…";
  try {
    const r = await fetch(path, { credentials: "same-origin" });
    const body = await r.json();
    out.textContent = JSON.stringify(body, null, 2);
  } catch (e) {
    out.textContent = `failed: ${e}`;
  }
}

async function start() {
  showPage((location.hash || "#overview").slice(1));
  window.addEventListener("hashchange", () => showPage((location.hash || "#overview").slice(1)));
  for (const b of document.querySelectorAll(".range button")) {
    b.addEventListener("click", () => {
      state.range = b.dataset.range;
      for (const o of document.querySelectorAll(".range button")) o.classList.toggle("on", o === b);
      drawSeriesCharts();
    });
  }
  $("block-form").addEventListener("submit", (e) => {
    e.preventDefault();
    explore(`/api/v1/ledger/blocks/${encodeURIComponent($("block-height").value)}`);
  });
  $("tx-form").addEventListener("submit", (e) => {
    e.preventDefault();
    explore(`/api/v1/tx/${encodeURIComponent($("tx-hash").value.trim())}`);
  });
  const r = await fetch("/dashboard/api/state", { credentials: "same-origin" });
  if (!r.ok) {
    document.body.textContent = "Not logged in: run `openagi dashboard` for a login link.";
    return;
  }
  state.doc = await r.json();
  for (const s of state.doc.history) state.series.set(s.name, s);
  render();
  loadBench();
  const events = new EventSource("/dashboard/api/events");
  events.onopen = () => { $("live").className = "live on"; $("live").textContent = "live"; };
  events.onerror = () => { $("live").className = "live off"; $("live").textContent = "reconnecting"; };
  events.onmessage = (m) => applyEvent(JSON.parse(m.data));
}

start();
