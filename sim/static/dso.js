// The DSO page: post a request through the page server and follow it live (server-sent events).
// Everything shown comes from the hub through the page server and is set as text, never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["completed", "partially_completed", "failed", "expired", "cancelled"]);
const KIND_TEXT = {emergency: "Emergency", load_shift: "Load shift", load_reduction: "Load reduction",
                   billing: "Billing data", tariff: "Network tariff"};
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
  await loadRecent();
  document.body.dataset.ready = "yes";
}

init();
