// sortgate console: live pages from the agent's status (server-sent events, one a second), the
// stats charts (uPlot). No inline script anywhere: the Content-Security-Policy forbids it.
"use strict";

const $ = (sel) => document.querySelector(sel);
const esc = (v) => String(v ?? "-").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const time = (t) => {
  const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);
  return isNaN(d) ? "-" : d.toLocaleTimeString([], {hour12: false}) + "." + String(d.getMilliseconds()).padStart(3, "0");
};
const ago = (t) => { const s = Math.max(0, Date.now() / 1000 - t); return s < 120 ? `${s.toFixed(0)} s` : `${(s / 60).toFixed(0)} min`; };

function banner(st) {
  const b = $("#banner");
  if (!b) return;
  if (!st.ok) { b.hidden = false; b.textContent = "Agent not reachable: " + (st.error || "?"); return; }
  const probs = st.line.problems;
  b.hidden = probs.length === 0;
  b.textContent = probs.length ? "Line unhealthy — every parcel goes to inspection: " + probs.join(", ") : "";
}

function renderLine(st) {
  if (!st.ok) return;
  const c = st.controller, s = c.status || {};
  $("#health").innerHTML = st.line.healthy ? '<span class="ok">healthy</span>' : '<span class="bad">UNHEALTHY</span> ' + esc(st.line.problems.join(", "));
  $("#mode").textContent = "mode " + st.agent.mode + (st.agent.mode !== "normal" ? ` (set by ${st.agent.mode_set_by})` : "");
  $("#controller").innerHTML = c.connected ? `<span class="ok">connected</span> ${esc(c.link)} · contract ${esc(c.contract)}` : `<span class="bad">OFFLINE</span> ${esc(c.error)}`;
  $("#bits").textContent = c.connected ? `${(s.bits || []).join(" ") || "-"} · belt ${s.belt_mps} m/s · lanes full ${(s.lane_full || []).join(",") || "-"} · watchdog trips ${s.watchdog_trips} · defaulted ${s.defaulted}` : "";
  const k = st.counters;
  $("#counters").textContent = Object.keys(k).sort().filter((n) => /^(decided|released|inspected|result_|lookups_|verdicts_)/.test(n)).slice(0, 12).map((n) => `${n} ${k[n]}`).join(" · ") || "-";
  $("#mqtt").innerHTML = st.mqtt.connected ? `<span class="ok">connected</span> ${esc(st.mqtt.broker)}` : `<span class="bad">OFFLINE</span> ${esc(st.mqtt.detail)}`;
  $("#outbox").textContent = `outbox ${st.outbox.pending} waiting (${st.outbox.fill_pct}%)`;
  $("#inflight").textContent = `${st.parcels.in_flight} in flight`;
  const rows = st.parcels.recent.slice().reverse().map((p) => `<tr data-record="${esc(p.record_id)}">
    <td>${time(p.recorded_at)}</td><td>${esc(p.seq)}</td><td><a href="/parcels/${encodeURIComponent(p.record_id)}">${esc(p.waybill || "(no code)")}</a></td>
    <td>${esc(p.verdict)}</td><td>${esc(p.image)}</td><td class="lane-${esc(p.lane_class)}">${esc(p.lane_class)}</td>
    <td>${esc((p.reasons || []).join(", "))}</td><td>${esc(p.decision_ms)}</td><td>${esc(p.ack)}</td><td>${esc(p.lane_reached)}</td><td>${esc(p.disposition)}</td></tr>`);
  $("#parcels tbody").innerHTML = rows.join("");
}

function renderReaders(st) {
  if (!st.ok) return;
  $("#readers tbody").innerHTML = st.readers.map((r) => `<tr><td>${esc(r.name)}</td><td>${esc(r.device)}</td>
    <td>${r.open ? '<span class="ok">open</span>' : '<span class="bad">OFFLINE</span> ' + esc(r.state)}</td><td>${r.frames}</td>
    <td>${esc(r.read_pct)}</td><td>${esc(r.no_read_pct)}</td><td>${esc(r.multi_read_pct)}</td><td>${r.framing_errors}</td><td>${ago(r.since)} ago</td></tr>`).join("");
  const frames = st.readers.flatMap((r) => r.last).sort((a, b) => b.at - a.at);
  $("#frames tbody").innerHTML = frames.map((f) => `<tr><td>${time(f.at)}</td><td>${esc(f.reader)}</td><td>${esc(f.kind)}</td>
    <td>${esc(f.kind === "framing_error" ? f.error + ": " + f.detail : (f.codes || []).join(", "))}</td><td><code>${esc(f.raw)}</code></td></tr>`).join("");
}

let alarmHelp = null;
function renderAlarms(st) {
  if (!st.ok) return;
  alarmHelp = alarmHelp || JSON.parse($("#alarm-help").textContent);
  const h = (k) => alarmHelp[k] || {kind: "", means: "", todo: ""};
  $("#active tbody").innerHTML = st.alarms.active.map((a) => `<tr><td class="bad">${esc(a.alarm)}</td><td>${esc(a.subject)}</td>
    <td>${esc(a.detail)}</td><td>${esc(h(a.alarm).means)}</td><td>${esc(h(a.alarm).todo)}</td></tr>`).join("") || '<tr><td colspan="5">none</td></tr>';
  $("#recent tbody").innerHTML = st.alarms.recent.slice().reverse().map((a) => `<tr><td>${time(a.at)}</td><td>${esc(a.alarm)}</td>
    <td>${(h(a.alarm).kind || "").startsWith("event") ? "event" : a.active ? "raised" : "cleared"}</td><td>${esc(a.detail)}</td><td>${esc(h(a.alarm).todo)}</td></tr>`).join("");
}

function renderCommissioning(st) {
  if (!st.ok) return;
  $("#mode-now").textContent = st.agent.mode;
  $("#mode-by").textContent = st.agent.mode !== "normal" ? `(set by ${st.agent.mode_set_by})` : "";
}

const live = {"/": renderLine, "/readers": renderReaders, "/alarms": renderAlarms, "/commissioning": renderCommissioning};

function connect() {
  const page = document.body.dataset.page;
  const es = new EventSource("/events");
  es.onmessage = (ev) => {
    const st = JSON.parse(ev.data);
    banner(st);
    if (live[page]) live[page](st);
    document.body.dataset.updated = String(Date.now());
  };
}

async function charts(hours) {
  const st = await (await fetch(`/api/stats?hours=${hours}`)).json();
  $("#stats-note").textContent = `${st.parcels} parcels in the last ${hours} h`;
  const width = Math.min(900, document.body.clientWidth - 40);
  const make = (id, series, data) => {
    const el = $(id);
    el.innerHTML = "";
    new uPlot({width, height: 220, series: [{}, ...series], axes: [{}, {}]}, [st.t, ...data], el);
  };
  const colours = ["#c0392b", "#2471a3", "#229954", "#b9770e", "#7d3c98", "#566573"];
  make("#chart-throughput", [{label: "parcels/min", stroke: "#2471a3"}], [st.parcels_per_min]);
  const reasons = Object.keys(st.inspected_pct);
  make("#chart-inspect", reasons.map((r, i) => ({label: r, stroke: colours[i % colours.length]})), reasons.map((r) => st.inspected_pct[r]));
  make("#chart-decision", [{label: "p50", stroke: "#229954"}, {label: "p99", stroke: "#c0392b"}], [st.decision_p50, st.decision_p99]);
  make("#chart-image", [{label: "p50", stroke: "#229954"}, {label: "p99", stroke: "#c0392b"}], [st.image_p50, st.image_p99]);
  document.body.dataset.charts = "drawn";
}

document.addEventListener("DOMContentLoaded", () => {
  connect();
  if (document.body.dataset.page === "/stats") {
    charts(6);
    document.querySelectorAll("a.hours").forEach((a) => a.addEventListener("click", (e) => { e.preventDefault(); charts(Number(a.dataset.hours)); }));
  }
});
