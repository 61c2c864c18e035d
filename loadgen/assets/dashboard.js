// The drop page's script: draws one snapshot (see loadgen/src/dashboard.rs,
// `Snapshot`) at a time. Live, snapshots arrive as server-sent events from
// /events; in the HTML report, the final one is embedded as
// window.COUPONRUSH_REPORT. No library: it must open offline.
"use strict";

const $ = (id) => document.getElementById(id);
const fmt = (x) => (x === null || x === undefined ? "–" : Number(x).toLocaleString("en-US"));
const ms = (x) => (x === null || x === undefined ? "–" : x < 10 ? x.toFixed(2) : x < 100 ? x.toFixed(1) : Math.round(x).toLocaleString("en-US"));
const secs = (s) => (s < 60 ? s.toFixed(1) + " s" : Math.floor(s / 60) + " min " + (s % 60).toFixed(0) + " s");

// Writes touch the DOM only when the text changes: an unchanged figure
// costs the browser no layout.
function put(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

function setFig(id, value, text) {
  const el = $(id);
  const raw = value === null || value === undefined ? "" : String(value);
  if (el.dataset.value !== raw) el.dataset.value = raw;
  put(el, text === undefined ? fmt(value) : text);
}

function alarm(name, value) {
  const el = $("audit-" + name);
  const raw = value === null || value === undefined ? "" : String(value);
  if (el.dataset.value !== raw) el.dataset.value = raw;
  put(el.querySelector("b"), raw === "" ? "…" : fmt(value));
  const cls = "alarm " + (raw === "" ? "pending" : value === 0 ? "ok" : "bad");
  if (el.className !== cls) el.className = cls;
}

function canvas(id) {
  const c = $(id);
  const ratio = window.devicePixelRatio || 1;
  const w = c.clientWidth || c.width, h = Math.round(w * (c.height / c.width)) || c.height;
  if (c.width !== Math.round(w * ratio)) {
    c.dataset.h = c.dataset.h || c.height / c.width;
    c.width = Math.round(w * ratio);
    c.height = Math.round(w * ratio * c.dataset.h);
  }
  const g = c.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  const W = c.width / ratio, H = c.height / ratio;
  g.clearRect(0, 0, W, H);
  g.font = "11px system-ui, sans-serif";
  return { g, W, H };
}

function nice(max) {
  if (max <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(max)));
  for (const m of [1, 2, 5, 10]) if (m * p >= max) return m * p;
  return 10 * p;
}

function axes(g, W, H, pad, xmax, ymax, xlabel, ylabel) {
  g.strokeStyle = "#30363d"; g.fillStyle = "#8b98a5"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + (H - pad.t - pad.b) * (1 - i / 4);
    g.beginPath(); g.moveTo(pad.l, y); g.lineTo(W - pad.r, y); g.stroke();
    g.fillText(fmt(Math.round((ymax * i) / 4)), 4, y + 4);
  }
  for (let i = 0; i <= 4; i++) {
    const x = pad.l + (W - pad.l - pad.r) * (i / 4);
    const v = (xmax * i) / 4;
    g.fillText(xmax < 10 ? String(Math.round(v * 10) / 10) : fmt(Math.round(v)), x - 8, H - pad.b + 14);
  }
  g.fillText(xlabel, W - pad.r - g.measureText(xlabel).width, H - 4);
  g.fillText(ylabel, pad.l + 4, pad.t - 4);
}

const SERIES = [["accepted", "#58a6ff"], ["decided", "#d29922"], ["issued", "#3fb950"], ["r503", "#f85149"], ["r4xx", "#bc8cff"]];

function drawSeries(points) {
  const { g, W, H } = canvas("series");
  const pad = { l: 52, r: 10, t: 16, b: 22 };
  const xmax = Math.max(1, ...points.map((p) => p.t + 1));
  let ymax = 1;
  for (const p of points) for (const [k] of SERIES) if (p[k] != null) ymax = Math.max(ymax, p[k]);
  ymax = nice(ymax);
  axes(g, W, H, pad, xmax, ymax, "s", "per second");
  const X = (t) => pad.l + ((W - pad.l - pad.r) * (t + 0.5)) / xmax;
  const Y = (v) => pad.t + (H - pad.t - pad.b) * (1 - v / ymax);
  for (const [k, colour] of SERIES) {
    const pts = points.filter((p) => p[k] != null);
    if (!pts.length) continue;
    g.strokeStyle = colour; g.fillStyle = colour; g.lineWidth = 2;
    g.beginPath();
    pts.forEach((p, i) => (i ? g.lineTo(X(p.t), Y(p[k])) : g.moveTo(X(p.t), Y(p[k]))));
    g.stroke();
    for (const p of pts) { g.beginPath(); g.arc(X(p.t), Y(p[k]), 2, 0, 7); g.fill(); }
  }
}

function drawScatter(points) {
  const { g, W, H } = canvas("scatter");
  const pad = { l: 52, r: 10, t: 16, b: 22 };
  let xmax = 1, ymax = 1;
  for (const [x, y] of points) { xmax = Math.max(xmax, x); ymax = Math.max(ymax, y); }
  xmax = nice(xmax); ymax = nice(ymax);
  axes(g, W, H, pad, xmax, ymax, "arrived, ms", "decided, ms");
  const X = (v) => pad.l + ((W - pad.l - pad.r) * v) / xmax;
  const Y = (v) => pad.t + (H - pad.t - pad.b) * (1 - v / ymax);
  // Winners last, so the few are drawn over the many.
  for (const won of [0, 1]) {
    g.fillStyle = won ? "rgba(63,185,80,0.95)" : "rgba(210,153,34,0.45)";
    for (const [x, y, issued] of points) if (issued === won) g.fillRect(X(x) - 1.5, Y(y) - 1.5, 3, 3);
  }
}

function latencyRows(s) {
  const rows = [];
  const add = (label, l) => rows.push([label, ms(l.p50), ms(l.p90), ms(l.p99), ms(l.p999), ms(l.max), fmt(l.count)]);
  if (s.window) {
    add(`accept, last ${s.window_s} s`, s.window.accept);
    add(`end to end, last ${s.window_s} s`, s.window.e2e);
  }
  add("accept, whole run", s.cumulative.accept);
  add("end to end, whole run", s.cumulative.e2e);
  // Cells are rewritten in place (only those whose text changed): a new
  // table every update would cost the browser a layout of the whole table.
  const body = $("latency").querySelector("tbody");
  while (body.rows.length > rows.length) body.deleteRow(-1);
  rows.forEach((cells, i) => {
    const tr = body.rows[i] || body.insertRow();
    while (tr.cells.length < cells.length) tr.insertCell();
    cells.forEach((text, j) => put(tr.cells[j], text));
  });
}

function esc(x) {
  return String(x).replace(/[&<>]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;" })[c]);
}

function shares(s) {
  const maxLag = Math.max(1, ...s.partitions.map((p) => p.lag || 0));
  const maxDec = Math.max(1, ...s.partitions.map((p) => p.decided));
  $("partitions").querySelector("tbody").innerHTML = s.partitions
    .map((p) => `<tr><td>${p.partition}</td><td>${fmt(p.decided)}</td><td>${p.lag === null ? "–" : fmt(p.lag)}</td>` +
      `<td class="bar"><div style="width:${(100 * (p.lag === null ? p.decided / maxDec : p.lag / maxLag)).toFixed(1)}%${p.lag === null ? "" : ";background:#d29922"}"></div></td></tr>`)
    .join("");
  const total = Object.values(s.issuers).reduce((a, b) => a + b, 0) || 1;
  $("issuers").querySelector("tbody").innerHTML = Object.entries(s.issuers)
    .map(([k, v]) => `<tr><td>${esc(k)}</td><td>${fmt(v)}</td><td>${((100 * v) / total).toFixed(1)}%</td>` +
      `<td class="bar"><div style="width:${((100 * v) / total).toFixed(1)}%"></div></td></tr>`)
    .join("");
}

function config(s) {
  const rows = Object.entries(s.config || {}).map(([k, v]) =>
    `<tr><td>${esc(k)}</td><td>${esc(typeof v === "string" ? v : JSON.stringify(v))}</td></tr>`);
  rows.unshift(`<tr><td>event</td><td>${esc(s.event_id)}</td></tr>`,
    `<tr><td>stock, per-user limit</td><td>${fmt(s.stock)}, ${fmt(s.per_user_limit)}</td></tr>`);
  $("config").querySelector("tbody").innerHTML = rows.join("");
  $("notes").innerHTML = (s.notes || []).map((n) => `<li>${esc(n)}</li>`).join("");
}

function lastRates(series) {
  // The last full second while running: the current one is still filling.
  const p = series.length > 1 ? series[series.length - 2] : series[0];
  return p || {};
}

// What each panel last drew: a panel is redrawn only when its data changed,
// so an open tab costs the machine running the drop as little as it can.
const drawn = {};
function changed(panel, data) {
  const key = JSON.stringify(data);
  if (drawn[panel] === key) return false;
  drawn[panel] = key;
  return true;
}

// The holds panel: shown only for an event with a claim window.
function holds(s) {
  const h = s.holds;
  if ($("holds").hidden !== !h) $("holds").hidden = !h;
  if (!h) return;
  for (const k of ["issued", "held", "claimed", "cancelled", "expired", "reissued"]) setFig("holds-" + k, h[k]);
  for (const k of ["invariant_off", "rank_conflicts", "claimed_and_returned", "orphan_ends", "out_of_time", "stuck"]) alarm(k, s.audit[k]);
  const i = h.invariant;
  put($("holds-invariant"), i
    ? `invariant: issued ${fmt(i.issued_total)} − returned ${fmt(i.returned)} + remaining ${fmt(i.remaining)} = ${fmt(i.issued_total - i.returned + i.remaining)} (stock ${fmt(s.stock)})`
    : "invariant (issued − returned + remaining = stock): checked at the end");
}

function render(s) {
  $("event").textContent = s.event_id || "";
  setFig("phase", s.phase, s.phase);
  const verdict = s.passed === null || s.passed === undefined ? "" : s.passed ? "PASS" : "FAIL";
  setFig("verdict", verdict, verdict);
  if (s.phase === "waiting") return;
  setFig("stock", s.stock);
  setFig("stock-left", s.stock_left);
  $("stock-left").classList.toggle("zero", s.stock_left === 0);
  setFig("issued", s.totals.issued);
  setFig("elapsed", s.elapsed_s.toFixed(3), secs(s.elapsed_s));
  setFig("sold-out", s.sold_out_after_ms === null ? "" : s.sold_out_after_ms,
    s.sold_out_after_ms === null ? "not yet" : "after " + ms(s.sold_out_after_ms) + " ms");
  setFig("accepted", s.totals.accepted);
  setFig("decided", s.totals.decided);
  setFig("sent", s.totals.sent);
  setFig("total-r503", s.totals.r503);
  setFig("total-r4xx", s.totals.r4xx);
  setFig("total-other", s.totals.other_failed);
  for (const k of ["oversold", "double_issued", "lost", "phantom", "inconsistent_replays", "ledger_mismatch", "dlq"]) alarm(k, s.audit[k]);
  holds(s);
  const r = s.phase === "done" ? {} : lastRates(s.series);
  for (const [k] of SERIES) put($("rate-" + k), r[k] == null ? "–" : fmt(r[k]));
  // While running, the current second is still filling: plot the full ones
  // (the chart then changes once a second, not at every update).
  const full = s.phase === "done" ? s.series : s.series.slice(0, -1);
  if (changed("series", full)) drawSeries(full);
  if (changed("latency", [s.window, s.cumulative])) latencyRows(s);
  setFig("skew-ratio", s.skew.inversion_ratio, (100 * s.skew.inversion_ratio).toFixed(3) + " %");
  setFig("skew-late", s.skew.late_winners);
  setFig("skew-early", s.skew.early_losers);
  $("skew-n").textContent = fmt(s.skew.n);
  if (changed("scatter", [s.scatter_of, s.scatter.length])) drawScatter(s.scatter);
  $("scatter-of").textContent = s.scatter_of > s.scatter.length ? `${fmt(s.scatter.length)} of ${fmt(s.scatter_of)} shown` : "";
  if (changed("shares", [s.partitions, s.issuers])) shares(s);
  if (changed("config", [s.config, s.notes, s.event_id])) config(s);
  document.body.dataset.phase = s.phase;
}

if (window.COUPONRUSH_REPORT) {
  $("mode").textContent = "report";
  $("feed").textContent = "a report file: the whole run, as the live page showed it at the end";
  render(window.COUPONRUSH_REPORT);
} else {
  let updates = 0;
  const feed = new EventSource("events");
  feed.onmessage = (e) => {
    updates++;
    const s = JSON.parse(e.data);
    render(s);
    $("feed").textContent = `live, ${fmt(updates)} updates; ${fmt(s.tabs)} tab(s) watching, ${fmt(s.dropped_tabs)} dropped for falling behind`;
  };
  feed.onerror = () => { $("feed").textContent = `disconnected after ${fmt(updates)} updates (the run has ended, or the tab fell behind and will reconnect)`; };
}
