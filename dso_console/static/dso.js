// The DSO's console: post a request and follow it live, the platform now, feeder plots, the client registry.
// Everything shown comes from the hub through the console's server (which holds the DSO's token) and is set as
// text, never as markup. Live: the server relays the hub's change feed (server-sent events).
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["completed", "partially_completed", "failed", "expired", "cancelled"]);
const KIND_TEXT = {emergency: "Emergency", load_shift: "Load shift", load_reduction: "Load reduction",
                   billing: "Billing data", tariff: "Network tariff", customers: "Customer list"};
const TRACE = [["hub_ms", null, "hub (until stored)"], ["storage_ms", null, "storage"],
               ["dispatch_ms", null, "dispatch (stored to first publish)"], ["retailer_ms", "retailer_max_ms", "retailer"],
               ["gateway_ms", "gateway_max_ms", "gateway"], ["total_ms", "total_max_ms", "total (per client)"],
               ["completion_ms", null, "completion (request)"]];
const tz = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
let csrf = "";
let source = null;
let following = null;
let pendingKey = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells, numeric) {
  const tr = document.createElement("tr");
  cells.forEach((c, i) => {
    const td = c instanceof Node ? (() => { const t = el("td"); t.append(c); return t; })()
                                  : el("td", c, numeric && numeric.includes(i) ? "num" : undefined);
    tr.append(td);
  });
  return tr;
}

function badge(state) {
  const b = el("span", state, "badge " + state);
  b.dataset.state = state;
  return b;
}

function ms(v) { return typeof v === "number" ? v.toFixed(1) : ""; }
function clock(iso) { return iso ? new Date(iso).toLocaleTimeString() : ""; }

// datetime-local value (local wall time, to the second) of a Date
function local(d) {
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:` +
         p(d.getSeconds());
}

function prefill() {
  const f = $("form").elements;
  const now = new Date();
  now.setMilliseconds(0);
  const plus = (s) => new Date(now.getTime() + s * 1000);
  f.start.value = local(plus(60));
  f.window_start.value = local(plus(600));
  f.window_end.value = local(plus(4200));
  const day = new Date(now); day.setHours(0, 0, 0, 0);
  const dayPlus = (h) => new Date(day.getTime() + h * 3600 * 1000);
  f.period_start.value = local(dayPlus(-24));
  f.period_end.value = local(day);
  f.valid_from.value = local(day);
  f.valid_to.value = local(dayPlus(24));
  f.periods.value = [`${local(day)}, ${local(dayPlus(7))}, 0.08`, `${local(dayPlus(7))}, ${local(dayPlus(22))}, 0.21`,
                     `${local(dayPlus(22))}, ${local(dayPlus(24))}, 0.08`].join("\n");
}

function showKind() {
  const kind = $("kind").value;
  for (const fs of document.querySelectorAll("fieldset[data-for]")) {
    fs.hidden = !fs.dataset.for.split(" ").includes(kind);
  }
  showTarget();
}

function showTarget() {
  const target = document.querySelector('input[name="target"]:checked').value;
  for (const l of document.querySelectorAll("label[data-target]")) l.hidden = l.dataset.target !== target;
}

function visibleFields() {
  const out = {};
  for (const fs of document.querySelectorAll("fieldset[data-for]")) {
    if (fs.hidden) continue;
    for (const input of fs.querySelectorAll("input, textarea, select")) {
      if (input.closest("label[hidden]")) continue;
      if (input.type === "radio") { if (input.checked) out[input.name] = input.value; continue; }
      out[input.name] = input.value;
    }
  }
  return out;
}

function clearError() {
  $("error").hidden = true;
  $("problems").replaceChildren();
  for (const i of document.querySelectorAll("[aria-invalid]")) i.removeAttribute("aria-invalid");
}

function showError(answer, status) {
  $("error").hidden = false;
  $("error").dataset.status = String(status);
  $("error-message").textContent = `${status}: ${answer.message || answer.error || "error"}`;
  const list = $("problems");
  list.replaceChildren();
  for (const p of answer.problems || []) {
    const li = el("li", `${p.field || "form"}: ${p.message}`);
    li.dataset.field = p.field || "";
    list.append(li);
    const name = (p.field || "").split(".")[0];
    for (const input of document.querySelectorAll(`fieldset:not([hidden]) [name="${CSS.escape(name)}"]`)) {
      input.setAttribute("aria-invalid", "true");
    }
  }
}

async function api(method, path, body) {
  const init = {method, headers: {"Accept": "application/json"}, credentials: "same-origin"};
  if (method !== "GET") {
    init.headers["X-CSRF-Token"] = csrf;
    if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  }
  let r;
  try { r = await fetch(path, init); } catch (e) {
    return {status: 0, answer: {error: "network", message: "the page server cannot be reached"}};
  }
  if (r.status === 401) { location.assign("/login"); }
  let answer = {};
  try { answer = await r.json(); } catch (e) { answer = {error: "error", message: r.statusText}; }
  return {status: r.status, answer};
}

function newKey() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function submit(event) {
  event.preventDefault();
  clearError();
  const form = {kind: $("kind").value, tz, ...visibleFields()};
  // A second click on the same form (or a retry after a lost answer) is the same request to the hub.
  const fingerprint = JSON.stringify(form);
  if (!pendingKey || pendingKey.form !== fingerprint) pendingKey = {form: fingerprint, key: newKey()};
  form.idempotency_key = pendingKey.key;
  $("submit").disabled = true;
  const {status, answer} = await api("POST", "/api/requests", form);
  $("submit").disabled = false;
  if (status === 0) { showError(answer, "network"); return; }
  pendingKey = null;
  if (status !== 202 && status !== 200) { showError(answer, status); return; }
  await loadRecent();
  follow(answer.request_id, answer.kind);
}

async function loadRecent() {
  const {status, answer} = await api("GET", "/api/requests");
  if (status !== 200) return;
  const body = $("recent").tBodies[0];
  body.replaceChildren();
  for (const r of answer.requests) {
    const tr = row([new Date(r.posted_at * 1000).toLocaleTimeString(), KIND_TEXT[r.kind] || r.kind, r.targets,
                    badge(r.state), el("span", r.request_id, "rid")]);
    tr.dataset.requestId = r.request_id;
    tr.dataset.kind = r.kind;
    if (r.request_id === following) tr.classList.add("selected");
    tr.addEventListener("click", () => follow(r.request_id, r.kind));
    body.append(tr);
  }
  $("recent-empty").hidden = answer.requests.length > 0;
}

function follow(id, kind) {
  if (source) source.close();
  following = id;
  for (const tr of $("recent").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.requestId === id);
  $("progress").hidden = false;
  $("req-kind").textContent = KIND_TEXT[kind] || kind || "";
  $("req-id").textContent = id;
  setState("");
  for (const t of ["retailers", "counts", "trace", "clients"]) $(t).tBodies[0].replaceChildren();
  $("cancel-info").hidden = true;
  $("selection").hidden = true;
  $("req-times").textContent = "";
  $("clients-note").textContent = "";
  $("cancel").disabled = false;
  $("revise-info").textContent = "";
  for (const l of $("revise-form").querySelectorAll("label[data-kinds]")) {
    l.hidden = !l.dataset.kinds.split(" ").includes(kind);
  }
  $("revise-form").hidden = !["emergency", "load_shift", "load_reduction"].includes(kind);
  conn("connecting…");
  source = new EventSource(`/api/requests/${encodeURIComponent(id)}/events`);
  source.onopen = () => conn("live");
  source.onmessage = (m) => {
    const e = JSON.parse(m.data);
    if (e.type === "request") render(e.request);
    else if (e.type === "error") conn(`hub: ${e.status} ${e.message}` + (e.retrying ? " (retrying)" : ""));
    else if (e.type === "end") { source.close(); source = null; conn(e.state ? "ended" : "stopped"); loadRecent(); }
  };
  source.onerror = () => { if (source) conn("reconnecting…"); };
}

function conn(text) { $("conn").textContent = text; $("conn").dataset.conn = text; }

function setState(state) {
  const s = $("state");
  s.textContent = state;
  s.className = "badge " + state;
  s.dataset.state = state;
}

function render(q) {
  if (q.request_id !== following) return;
  setState(q.state);
  $("cancel").disabled = TERMINAL.has(q.state);
  $("revise").disabled = q.state === "cancelled" || q.state === "expired";
  if (q.revision) $("revise-info").textContent = `revision ${q.revision}`;
  $("req-times").textContent = `created ${clock(q.created_at)}` +
    (q.completed_at ? ` · ended ${clock(q.completed_at)}` : "") + (q.deadline ? ` · deadline ${clock(q.deadline)}` : "");
  const rb = $("retailers").tBodies[0];
  rb.replaceChildren();
  for (const [rid, r] of Object.entries(q.retailers || {})) {
    const states = Object.entries(r.states || {}).map(([s, n]) => `${s} ${n}`).join(", ");
    const tr = row([rid, r.state ? badge(r.state) : "", r.clients ?? "", states], [2]);
    tr.dataset.retailer = rid;
    rb.append(tr);
  }
  const cb = $("counts").tBodies[0];
  cb.replaceChildren();
  for (const [s, n] of Object.entries(q.client_counts || {})) {
    const tr = row([badge(s), n], [1]);
    tr.dataset.state = s;
    cb.append(tr);
  }
  const tb = $("trace").tBodies[0];
  tb.replaceChildren();
  const trace = q.trace || {};
  for (const [k, max, label] of TRACE) {
    if (!(k in trace)) continue;
    const tr = row([label, ms(trace[k]), max ? ms(trace[max]) : ""], [1, 2]);
    tr.dataset.key = k;
    tb.append(tr);
  }
  const clients = $("clients").tBodies[0];
  clients.replaceChildren();
  for (const [cid, c] of Object.entries(q.clients || {})) {
    const d = c.detail || {};
    const detail = d.reason || (d.shed ? `shed ${d.shed.join(", ") || "nothing"}` : "") +
                   ("available_kw" in c ? `${c.available_kw} kW available` : "");
    const t = c.trace || {};
    const tr = row([cid, c.retailer_id, badge(c.state), detail, ms(t.retailer_ms), ms(t.gateway_ms), ms(t.total_ms),
                    clock(c.updated_at)], [4, 5, 6]);
    tr.dataset.clientId = cid;
    clients.append(tr);
  }
  $("clients-note").textContent = q.clients_total > Object.keys(q.clients || {}).length
    ? `(first ${Object.keys(q.clients).length} of ${q.clients_total})` : `(${q.clients_total || 0})`;
  if (q.cancel) {
    const acks = Object.entries(q.cancel.acknowledged_by || {}).map(([r, at]) => `${r} at ${clock(at)}`);
    $("cancel-info").hidden = false;
    $("cancel-info").textContent = `cancel requested ${clock(q.cancel.requested_at)}; acknowledged by ` +
                                   (acks.join(", ") || "no retailer yet");
  }
  if (q.selection) {
    const s = q.selection;
    $("selection").hidden = false;
    $("selection").textContent = `selected ${s.selected_kw} of ${s.reduction_kw} kW` +
      ` (${s.covered ? "covered" : "not covered"}): ${(s.chosen || []).join(", ") || "nobody"}`;
  }
  for (const tr of $("recent").tBodies[0].rows) {
    if (tr.dataset.requestId === q.request_id) tr.cells[3].replaceChildren(badge(q.state));
  }
}

async function cancelFollowed() {
  if (!following) return;
  $("cancel").disabled = true;
  clearError();
  const {status, answer} = await api("POST", `/api/requests/${encodeURIComponent(following)}/cancel`);
  if (status !== 200) { showError(answer, status); $("cancel").disabled = false; }
}

async function signOut() {
  await api("POST", "/logout");
  location.assign("/login");
}

async function reviseFollowed(event) {
  event.preventDefault();
  if (!following) return;
  clearError();
  const form = {tz};
  for (const input of $("revise-form").querySelectorAll("label:not([hidden]) input")) {
    if (input.value.trim()) form[input.name] = input.value;
  }
  $("revise").disabled = true;
  const {status, answer} = await api("POST", `/api/requests/${encodeURIComponent(following)}/revise`, form);
  $("revise").disabled = false;
  if (status !== 202) { showError(answer, status); return; }
  $("revise-info").textContent = `revision ${answer.revision} sent`;
  for (const input of $("revise-form").querySelectorAll("input")) input.value = "";
}

// -- screens ----------------------------------------------------------------------------------------------------

const SCREENS = ["requests", "platform", "plots", "clients"];
let screen = "requests";
const shown = {};  // what each screen last drew, for the tests and for a reviewer: window.consoleState

function showScreen() {
  const wanted = (location.hash || "#requests").slice(1);
  screen = SCREENS.includes(wanted) ? wanted : "requests";
  for (const m of document.querySelectorAll("main[data-screen]")) m.hidden = m.dataset.screen !== screen;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("current", a.dataset.screen === screen);
  refresh();
}

function refresh() {
  if (screen === "platform") loadPlatform();
  else if (screen === "plots") loadPlots();
  else if (screen === "clients") loadClients();
}

let refreshTimer = null;
function refreshSoon() {  // many changes at once: one refresh
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 300);
}

function feed() {  // the hub's change feed of the DSO's requests, relayed by the console's server
  const es = new EventSource("/api/events");
  const say = (t) => { $("feed").textContent = t; $("feed").dataset.feed = t; };
  es.onopen = () => say("· live");
  es.addEventListener("request", () => { shown.feedEvents = (shown.feedEvents || 0) + 1; refreshSoon(); });
  es.addEventListener("reset", refreshSoon);
  es.addEventListener("hub", () => say("· hub feed away (retrying)"));
  es.onerror = () => say("· reconnecting…");
}

function ago(iso) {
  return iso ? new Date(iso).toLocaleString([], {dateStyle: "short", timeStyle: "medium"}) : "";
}

async function loadPlatform() {
  const [st, list] = await Promise.all([api("GET", "/api/status"), api("GET", "/api/hub-requests?limit=20")]);
  if (st.status === 200) {
    const s = st.answer;
    $("platform-at").textContent = `at ${clock(s.at)}`;
    const ready = $("ready");
    ready.textContent = s.ready ? "ready" : "not ready";
    ready.className = "badge " + (s.ready ? "completed" : "failed");
    ready.dataset.state = s.ready ? "ready" : "not_ready";
    $("checks").textContent = Object.entries(s.checks || {}).map(([k, v]) => `${k} ${v}`).join(" · ");
    const rb = $("retailers-status").tBodies[0];
    rb.replaceChildren();
    for (const [rid, r] of Object.entries(s.retailers || {})) {
      const tr = row([rid, badge(r.state), r.heard ? ago(r.since) : "not heard since the hub started"]);
      tr.dataset.retailer = rid;
      tr.dataset.state = r.state;
      rb.append(tr);
    }
    const ob = $("open-requests").tBodies[0];
    ob.replaceChildren();
    for (const [type, states] of Object.entries((s.open_requests || {}).by_type || {})) {
      for (const [state, n] of Object.entries(states)) ob.append(row([KIND_TEXT[type] || type, badge(state), n], [2]));
    }
    $("open-total").textContent = `(${(s.open_requests || {}).total || 0})`;
    const hb = $("last-hour").tBodies[0];
    hb.replaceChildren();
    const lh = s.last_hour || {};
    const add = (what, kind, n) => { const tr = row([what, kind, n], [2]); tr.dataset.what = what; hb.append(tr); };
    add("refusals", "total", (lh.refusals || {}).total || 0);
    for (const [k, n] of Object.entries((lh.refusals || {}).http || {})) add("refusals", `HTTP ${k}`, n);
    for (const [k, n] of Object.entries((lh.refusals || {}).mqtt || {})) add("refusals", `MQTT ${k}`, n);
    add("errors", "total", (lh.errors || {}).total || 0);
    for (const [k, n] of Object.entries((lh.errors || {}).http || {})) add("errors", `HTTP ${k}`, n);
    if ((lh.errors || {}).relay_restarts) add("errors", "MQTT relay restarts", lh.errors.relay_restarts);
    for (const [type, states] of Object.entries((lh.errors || {}).requests || {})) {
      for (const [state, n] of Object.entries(states)) add("errors", `${KIND_TEXT[type] || type} ${state}`, n);
    }
    shown.status = s;
  }
  if (list.status === 200) {
    const tb = $("hub-requests").tBodies[0];
    tb.replaceChildren();
    for (const r of list.answer.requests) {
      const counts = Object.entries(r.counts || {}).map(([k, n]) => `${k} ${n}`).join(", ");
      const tr = row([clock(r.created_at), KIND_TEXT[r.type] || r.type, badge(r.state), r.targets ?? "", counts,
                      el("span", r.request_id, "rid")], [3]);
      tr.dataset.requestId = r.request_id;
      tr.addEventListener("click", () => { location.hash = "#requests"; follow(r.request_id, r.type); });
      tb.append(tr);
    }
    shown.requests = list.answer.requests;
  }
  document.body.dataset.platform = String((shown.platformLoads = (shown.platformLoads || 0) + 1));
}

// -- plots (uPlot, vendored: dso_console/static/vendor/) ------------------------------------------------------

const plots = {};
const BAND_COLORS = {emergency: "rgba(180, 35, 24, 0.16)", load_reduction: "rgba(181, 71, 8, 0.16)",
                     load_shift: "rgba(31, 95, 174, 0.14)"};

function bandsPlugin(get) {  // each request a band over its window on the time axis
  return {hooks: {drawClear: [(u) => {
    const ctx = u.ctx;
    ctx.save();
    for (const b of get()) {
      const x0 = Math.max(u.bbox.left, u.valToPos(b.start, "x", true));
      const x1 = Math.min(u.bbox.left + u.bbox.width, u.valToPos(b.end, "x", true));
      if (x1 <= x0) continue;
      ctx.fillStyle = BAND_COLORS[b.type] || "rgba(95, 107, 122, 0.15)";
      ctx.fillRect(x0, u.bbox.top, x1 - x0, u.bbox.height);
      ctx.fillStyle = "#5f6b7a";
      ctx.font = `${12 * devicePixelRatio}px system-ui, sans-serif`;
      ctx.fillText(`${KIND_TEXT[b.type] || b.type} ${b.request_id.slice(0, 6)}`, x0 + 4, u.bbox.top + 14 * devicePixelRatio);
    }
    ctx.restore();
  }]}};
}

function plotWidth(id) { return Math.max(400, $(id).clientWidth || 900); }

function drawPlot(id, opts, data) {
  if (plots[id]) { plots[id].setData(data); plots[id].redraw(false, true); return plots[id]; }
  plots[id] = new uPlot({width: plotWidth(id), height: 320, ...opts}, data, $(id));
  return plots[id];
}

async function loadFeeders() {
  if ($("feeder").options.length) return;
  const {status, answer} = await api("GET", "/api/clients?limit=1000");
  if (status !== 200) return;
  const feeders = [...new Set(answer.clients.map((c) => c.feeder_id).filter(Boolean))].sort();
  for (const f of feeders) { const o = el("option", f); o.value = f; $("feeder").append(o); }
}

async function loadPlots() {
  await loadFeeders();
  const feeder = $("feeder").value;
  const [power, lat] = await Promise.all([
    feeder ? api("GET", `/api/feeders/${encodeURIComponent(feeder)}/plot?hours=${$("hours").value}&step_s=${$("step").value}`)
           : Promise.resolve({status: 0, answer: {message: "no feeder registered"}}),
    api("GET", "/api/latency?limit=20")]);
  if (power.status === 200) {
    const p = power.answer;
    shown.power = p;
    $("plot-note").textContent = `${p.feeder_id}: ${p.clients} clients, step ${p.step_s} s`;
    drawPlot("power-plot", {
      title: `Feeder ${p.feeder_id}: measured active power (kW)`,
      scales: {x: {time: true}}, axes: [{}, {label: "kW"}],
      series: [{}, {label: "active power kW", stroke: "#1f5fae", width: 2, spanGaps: false,
                    points: {show: p.x.length < 120}}],
      plugins: [bandsPlugin(() => shown.power ? shown.power.bands : [])],
    }, [p.x, p.kw]);
    const bb = $("bands").tBodies[0];
    bb.replaceChildren();
    for (const b of p.bands) {
      const tr = row([el("span", b.request_id, "rid"), KIND_TEXT[b.type] || b.type, badge(b.state),
                      new Date(b.start * 1000).toLocaleTimeString(), new Date(b.end * 1000).toLocaleTimeString()]);
      tr.dataset.requestId = b.request_id;
      bb.append(tr);
    }
    $("power-plot").dataset.points = String(p.x.length);
  } else {
    $("plot-note").textContent = `: ${power.answer.message || power.status}`;
  }
  if (lat.status === 200) {
    const rs = lat.answer.requests;
    shown.latency = lat.answer;
    const colors = ["#1f5fae", "#17803d", "#b54708", "#6941c6", "#b42318", "#1d2430", "#5f6b7a"];
    const comps = lat.answer.components;
    // A log scale: hub and storage take a few ms, a request's completion seconds (nothing at or below 0 on it).
    drawPlot("latency-plot", {
      title: "Trace per component of the last requests (ms, log scale; x: request, oldest first)",
      scales: {x: {time: false}, y: {distr: 3}}, axes: [{label: "request"}, {label: "ms"}],
      series: [{label: "request"}, ...comps.map((c, i) => ({label: c, stroke: colors[i % colors.length], width: 2,
                                                            points: {show: true}}))],
    }, [rs.map((_, i) => i + 1), ...comps.map((c) => rs.map((r) => (r.trace[c] > 0 ? r.trace[c] : null)))]);
    $("latency-plot").dataset.points = String(rs.length);
  }
  document.body.dataset.plots = String((shown.plotLoads = (shown.plotLoads || 0) + 1));
}

// -- clients -----------------------------------------------------------------------------------------------------

async function loadClients() {
  const {status, answer} = await api("GET", "/api/clients?limit=1000");
  if (status !== 200) return;
  const tb = $("registry").tBodies[0];
  tb.replaceChildren();
  for (const c of answer.clients) {
    const history = (c.suppliers || []).map((s) => `${s.retailer_id} from ${ago(s.valid_from)}` +
                                                   (s.valid_to ? ` to ${ago(s.valid_to)}` : "")).join("; ");
    const tr = row([c.client_id, c.retailer_id ?? "", c.contracted_power_kw ?? "", c.feeder_id ?? "", history], [2]);
    tr.dataset.clientId = c.client_id;
    tr.addEventListener("click", () => loadAudit(c.client_id));
    tb.append(tr);
  }
  $("registry-note").textContent = `(${answer.count}${answer.next_after ? ", more on the hub" : ""})`;
  shown.clients = answer.clients;
  document.body.dataset.clients = String((shown.clientLoads = (shown.clientLoads || 0) + 1));
}

async function loadAudit(clientId) {
  for (const tr of $("registry").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.clientId === clientId);
  $("audit-client").textContent = clientId;
  const {status, answer} = await api("GET", `/api/audit?client_id=${encodeURIComponent(clientId)}&days=7`);
  const tb = $("audit").tBodies[0];
  tb.replaceChildren();
  if (status !== 200) { $("audit-empty").hidden = false; $("audit-empty").textContent = answer.message || ""; return; }
  for (const e of answer.entries.slice(-500).reverse()) {
    const tr = row([ago(e.at), e.principal, e.action, e.right, e.allowed ? "yes" : "refused", e.ref ?? ""]);
    tr.dataset.action = e.action;
    tb.append(tr);
  }
  $("audit-empty").hidden = answer.entries.length > 0;
  $("audit-empty").textContent = "Nothing logged for this client in the last 7 days.";
  shown.audit = answer;
  document.body.dataset.audit = clientId;
}

window.consoleState = shown;

async function init() {
  const {status, answer} = await api("GET", "/api/session");
  if (status !== 200) return;
  csrf = answer.csrf;
  $("hub-url").textContent = answer.hub_url;
  $("signout").hidden = !answer.login;
  $("tz").textContent = tz;
  prefill();
  showKind();
  $("kind").addEventListener("change", showKind);
  for (const r of document.querySelectorAll('input[name="target"]')) r.addEventListener("change", showTarget);
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancelFollowed);
  $("signout").addEventListener("click", signOut);
  $("revise-form").addEventListener("submit", reviseFollowed);
  for (const id of ["feeder", "hours", "step"]) $(id).addEventListener("change", loadPlots);
  window.addEventListener("hashchange", showScreen);
  // Measurements are not in the change feed: the plots ask again every 5 s while they are shown.
  setInterval(() => { if (screen === "plots" && !document.hidden) loadPlots(); }, 5000);
  await loadRecent();
  showScreen();
  feed();
  document.body.dataset.ready = "yes";
}

init();
