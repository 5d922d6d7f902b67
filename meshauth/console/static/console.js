// meshauth console: every value from the logs is put on the page as text (textContent),
// never parsed as HTML; control and bidirectional characters are shown as \u{..} escapes.
"use strict";

const COLUMNS = ["time", "outcome", "reason", "caller", "subject", "audience", "method", "path", "rule", "trace_id", "transaction"];
const TXN_COLUMNS = ["time", "log", "event", "outcome", "reason", "caller", "subject", "audience", "method", "path", "detail"];
const FILTER_NAMES = ["outcome", "reason", "caller", "subject", "audience", "method", "path", "rule", "trace", "transaction"];
const OUTCOME_HUES = { accepted: 130, rejected: 0, denied: 30, unavailable: 220 };
const POLL_MS = 1000;
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]/gu;

const state = { version: null, cursor: null, paged: false, logs: [], selected: null, seen: new Set(), filterTimer: 0 };

function shown(value) {
  if (value === null || value === undefined) return "";
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text.replace(UNSAFE, (ch) => "\\u{" + ch.codePointAt(0).toString(16).padStart(4, "0") + "}");
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = shown(text);
  if (className) node.className = className;
  return node;
}

function pad(n) { return String(n).padStart(2, "0"); }

function formatTime(seconds, withDate) {
  if (typeof seconds !== "number") return "";
  const d = new Date(seconds * 1000);
  if (withDate === undefined) withDate = d.toDateString() !== new Date().toDateString();
  const time = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()) + "." + String(d.getMilliseconds()).padStart(3, "0");
  return withDate ? d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + time : time;
}

function formatDuration(seconds) {
  if (typeof seconds !== "number") return "—";
  const sign = seconds < 0 ? "-" : "";
  let s = Math.abs(seconds);
  if (s < 120) return sign + Math.round(s) + " s";
  if (s < 7200) return sign + Math.round(s / 60) + " min";
  if (s < 172800) return sign + Math.round(s / 3600) + " h";
  s = s / 86400;
  return sign + Math.round(s) + " d";
}

async function getJson(path, params) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params || {})) if (value) query.set(name, value);
  const url = query.toString() ? path + "?" + query.toString() : path;
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// -- status line ------------------------------------------------------------------------------

function renderLogs(status) {
  const box = document.getElementById("logs");
  box.replaceChildren();
  state.logs = status.logs;
  for (const log of status.logs) {
    const part = el("span", undefined, "log");
    part.dataset.log = log.number;
    let text = log.path + ": " + log.state + ", " + log.lines + " lines";
    if (log.indexed < 1) text += ", indexing " + Math.floor(log.indexed * 100) + "%";
    if (log.rotations) text += ", rotated " + log.rotations + "x";
    part.append(el("span", text));
    if (log.malformed) part.append(el("span", log.malformed + " malformed lines skipped", "bad malformed"));
    if (log.state !== "ok") part.classList.add("bad");
    box.append(part);
  }
}

async function poll() {
  try {
    const status = await getJson("/api/status");
    renderLogs(status);
    if (status.version !== state.version) {
      const first = state.version === null;
      state.version = status.version;
      if (!state.paged) await loadDecisions(!first);
      await loadChart();
    }
    document.getElementById("live").textContent = state.paged ? "(paused while paging: clear or change a filter to resume)" : "(live)";
  } catch (error) {
    document.getElementById("live").textContent = "(console unreachable: " + shown(error.message) + ")";
  }
  setTimeout(poll, POLL_MS);
}

// -- decisions --------------------------------------------------------------------------------

function filters() {
  const form = document.getElementById("filters");
  const values = {};
  for (const name of FILTER_NAMES) values[name] = form.elements[name].value.trim();
  // Local date and time to the second (step=1); browsers leave out ":00" seconds, which mean :00.
  const before = form.elements.before.value;
  if (before) values.before = String(Math.floor(new Date(before).getTime() / 1000));
  return values;
}

function cell(row, key, value) {
  const td = el("td", value);
  if (key === "outcome") td.className = "outcome-" + shown(value);
  if (key === "trace_id" || key === "transaction") {
    td.className = "id";
    if (value) {
      td.replaceChildren();
      const link = el("a", value);
      link.href = "#transaction=" + encodeURIComponent(value);
      link.addEventListener("click", (event) => event.stopPropagation());
      td.append(link);
    }
  }
  td.title = shown(value);
  row.append(td);
}

function decisionRow(item, highlight) {
  const row = document.createElement("tr");
  row.dataset.id = item.id;
  if (highlight) row.classList.add("new");
  if (item.id === state.selected) row.classList.add("selected");
  for (const key of COLUMNS) cell(row, key, key === "time" ? formatTime(item.time) : item.record[key]);
  row.addEventListener("click", () => showDetail(item, row));
  return row;
}

async function loadDecisions(highlight) {
  const page = await getJson("/api/decisions", { ...filters(), limit: "100" });
  const body = document.querySelector("#decisions tbody");
  const rows = page.decisions.map((item) => decisionRow(item, highlight && !state.seen.has(item.id)));
  state.seen = new Set(page.decisions.map((item) => item.id));
  body.replaceChildren(...rows);
  setPaging(page);
}

async function loadOlder() {
  const page = await getJson("/api/decisions", { ...filters(), limit: "100", cursor: state.cursor });
  state.paged = true;
  document.querySelector("#decisions tbody").append(...page.decisions.map((item) => decisionRow(item, false)));
  setPaging(page);
}

function setPaging(page) {
  state.cursor = page.next;
  document.getElementById("more").hidden = !page.next;
  const count = document.querySelectorAll("#decisions tbody tr").length;
  let note = count + " decisions shown";
  if (page.partial) note += "; the search stopped after a second: ask for older decisions to search further";
  else if (!page.next) note += " (all)";
  document.getElementById("page-note").textContent = note;
}

function showDetail(item, row) {
  document.querySelectorAll("#decisions tr.selected").forEach((r) => r.classList.remove("selected"));
  row.classList.add("selected");
  state.selected = item.id;
  const log = state.logs.find((l) => l.number === item.log);
  document.getElementById("detail-source").textContent = shown((log ? log.path : "log " + item.log) + " at " + formatTime(item.time, true));
  const body = document.querySelector("#detail-fields tbody");
  body.replaceChildren(...Object.entries(item.record).map(([key, value]) => {
    const tr = document.createElement("tr");
    tr.append(el("td", key), el("td", value));
    return tr;
  }));
  document.getElementById("detail").hidden = false;
}

function onFilterChange() {
  clearTimeout(state.filterTimer);
  state.filterTimer = setTimeout(() => { state.paged = false; loadDecisions(false).catch(showError); }, 250);
}

function showError(error) {
  document.getElementById("page-note").textContent = "error: " + shown(error.message);
}

// -- chart ------------------------------------------------------------------------------------

function svg(tag, attributes) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
  return node;
}

function reasonColors(minutes) {
  const reasons = new Map();
  for (const minute of minutes) for (const c of minute.counts) {
    const key = c.outcome + "/" + c.reason;
    if (!reasons.has(key)) reasons.set(key, c.outcome);
  }
  const colors = new Map();
  const perOutcome = {};
  for (const key of [...reasons.keys()].sort()) {
    const outcome = reasons.get(key);
    const n = (perOutcome[outcome] = (perOutcome[outcome] || 0) + 1) - 1;
    const hue = OUTCOME_HUES[outcome] ?? 270;
    colors.set(key, "hsl(" + hue + ", " + (outcome === "unavailable" ? 10 : 65) + "%, " + (38 + (n * 13) % 40) + "%)");
  }
  return colors;
}

async function loadChart() {
  const chart = await getJson("/api/chart");
  const canvas = document.getElementById("chart-svg");
  const width = 960, height = 160, left = 34, bottom = 18, top = 6;
  canvas.setAttribute("viewBox", "0 0 " + width + " " + height);
  const totals = chart.minutes.map((m) => m.counts.reduce((sum, c) => sum + c.count, 0));
  const peak = Math.max(1, ...totals);
  const step = (width - left) / chart.minutes.length;
  const scale = (height - bottom - top) / peak;
  const colors = reasonColors(chart.minutes);
  const parts = [svg("line", { class: "axis", x1: left, y1: height - bottom, x2: width, y2: height - bottom })];
  parts.push(Object.assign(svg("text", { x: 0, y: top + 8 }), { textContent: String(peak) }));
  chart.minutes.forEach((minute, i) => {
    let y = height - bottom;
    const group = svg("g", { class: "minute", "data-minute": minute.minute, "data-total": totals[i] });
    for (const c of minute.counts) {
      const h = Math.max(1, c.count * scale);
      y -= h;
      const bar = svg("rect", {
        class: "bar", x: (left + i * step + 1).toFixed(1), y: y.toFixed(1), width: Math.max(1, step - 2).toFixed(1), height: h.toFixed(1),
        fill: colors.get(c.outcome + "/" + c.reason), "data-outcome": c.outcome, "data-reason": c.reason, "data-count": c.count,
      });
      bar.append(Object.assign(svg("title"), { textContent: shown(formatTime(minute.minute, false).slice(0, 5) + " " + c.outcome + " " + c.reason + ": " + c.count) }));
      group.append(bar);
    }
    if (i % 10 === 0) group.append(Object.assign(svg("text", { x: left + i * step, y: height - 4 }), { textContent: formatTime(minute.minute, false).slice(0, 5) }));
    parts.push(group);
  });
  canvas.replaceChildren(...parts);
  const legend = document.getElementById("legend");
  legend.replaceChildren(...[...colors.entries()].map(([key, color]) => {
    const item = el("li", key);
    item.style.setProperty("--swatch", color);
    return item;
  }));
}

// -- keys -------------------------------------------------------------------------------------

async function loadKeys() {
  const keys = await getJson("/api/keys");
  document.getElementById("keys-source").textContent = keys.source ? "(" + shown(keys.source) + ")" : "(no --registry given)";
  const error = document.getElementById("keys-error");
  error.hidden = !keys.error;
  error.textContent = shown(keys.error || "");
  document.querySelector("#keys tbody").replaceChildren(...keys.keys.map((key) => {
    const tr = document.createElement("tr");
    tr.append(el("td", key.kid, "id"), el("td", key.owner), el("td", key.alg), el("td", formatDuration(key.age)));
    tr.append(el("td", key.expires_in === null ? "never" : formatDuration(key.expires_in)));
    tr.append(el("td", key.status, key.status === "valid" ? "" : "warn"));
    return tr;
  }));
  document.getElementById("keys-problems").replaceChildren(...keys.problems.map((p) => el("li", p)));
  document.getElementById("without-key").replaceChildren(...keys.without_key.map((s) => el("li", s.service + " (" + s.decisions + " decisions)", "warn")));
}

// -- transaction ------------------------------------------------------------------------------

async function loadTransaction(id) {
  const form = document.getElementById("txn-form");
  form.elements.id.value = id;
  const body = document.querySelector("#transaction tbody");
  body.replaceChildren();
  if (!id) return;
  const result = await getJson("/api/transaction", { id });
  body.replaceChildren(...result.decisions.map((item) => {
    const tr = document.createElement("tr");
    const log = state.logs.find((l) => l.number === item.log);
    for (const key of TXN_COLUMNS) {
      let value = item.record[key];
      if (key === "time") value = formatTime(item.time);
      if (key === "log") value = log ? log.path : item.log;
      const td = el("td", value);
      if (key === "outcome") td.className = "outcome-" + shown(value);
      td.title = shown(value);
      tr.append(td);
    }
    return tr;
  }));
  let note = result.decisions.length + " decisions across " + new Set(result.decisions.map((d) => d.log)).size + " logs";
  if (result.partial) note += " (search stopped early: more may exist)";
  document.getElementById("txn-note").textContent = note;
}

// -- navigation -------------------------------------------------------------------------------

function route() {
  const hash = location.hash.slice(1);
  const [view, value] = hash.includes("=") ? [hash.slice(0, hash.indexOf("=")), decodeURIComponent(hash.slice(hash.indexOf("=") + 1))] : [hash || "decisions", ""];
  const name = ["decisions", "keys", "transaction"].includes(view) ? view : "decisions";
  for (const other of ["decisions", "keys", "transaction"]) {
    document.getElementById("view-" + other).hidden = other !== name;
    document.getElementById("tab-" + other).classList.toggle("current", other === name);
  }
  if (name === "keys") loadKeys().catch((e) => { document.getElementById("keys-error").hidden = false; document.getElementById("keys-error").textContent = shown(e.message); });
  if (name === "transaction") loadTransaction(value).catch((e) => { document.getElementById("txn-note").textContent = "error: " + shown(e.message); });
}

function start() {
  const form = document.getElementById("filters");
  form.addEventListener("input", onFilterChange);
  form.addEventListener("change", onFilterChange);
  form.addEventListener("reset", () => setTimeout(onFilterChange, 0));
  form.addEventListener("submit", (event) => event.preventDefault());
  document.getElementById("more").addEventListener("click", () => loadOlder().catch(showError));
  document.getElementById("detail-close").addEventListener("click", () => { document.getElementById("detail").hidden = true; });
  document.getElementById("txn-form").addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = "transaction=" + encodeURIComponent(event.target.elements.id.value.trim());
  });
  window.addEventListener("hashchange", route);
  route();
  poll();
}

document.addEventListener("DOMContentLoaded", start);
