// The llamas dashboard: signs in, follows /dashboard/events and redraws.
// Text from the server goes through textContent only (account and worker
// names are chosen by others).
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_POINTS = 300;
let source = null;
let charts = null;

function fmtInt(n) { return n === null || n === undefined ? "—" : Number(n).toLocaleString("en"); }
function fmtS(s) { return s === null || s === undefined ? "—" : (s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(1)} s`); }
function fmtX(m) { return m === null || m === undefined ? "—" : `${Number(m).toFixed(2)}×`; }
function clock(t) { return new Date(t * 1000).toLocaleTimeString("en-GB"); }

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(tableId, items, build, empty = "none yet") {
  const table = $(tableId);
  const rows = items.map((item) => { const tr = document.createElement("tr"); build(tr, item); return tr; });
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    cell(tr, empty).colSpan = table.querySelectorAll("thead th").length;
    rows.push(tr);
  }
  table.querySelector("tbody").replaceChildren(...rows);
}

function kpis(items) {
  $("kpis").replaceChildren(...items.map(([label, value, id]) => {
    const div = document.createElement("div");
    div.className = "kpi";
    div.id = `kpi-${id}`;
    const l = document.createElement("div"); l.className = "label"; l.textContent = label;
    const v = document.createElement("div"); v.className = "value"; v.textContent = value;
    div.append(l, v);
    return div;
  }));
}

function makeCharts() {
  if (typeof Chart === "undefined") return null;
  const base = { animation: false, responsive: true, maintainAspectRatio: false,
                 plugins: { legend: { labels: { boxWidth: 10 } } } };
  const time = { type: "category", ticks: { maxTicksLimit: 6 } };
  return {
    queue: new Chart($("chart-queue"), { type: "line", data: { labels: [], datasets: [] },
      options: { ...base, scales: { x: time, y: { beginAtZero: true, ticks: { precision: 0 } } } } }),
    bids: new Chart($("chart-bids"), { type: "bar", data: { labels: [], datasets: [{ label: "queued jobs", data: [], backgroundColor: "#3b5bdb" }] },
      options: { ...base, scales: { y: { beginAtZero: true, ticks: { precision: 0 } } } } }),
    multiplier: new Chart($("chart-multiplier"), { type: "line", data: { labels: [], datasets: [{ label: "multiplier", data: [], borderColor: "#b7791f", stepped: true, pointRadius: 0 }] },
      options: { ...base, scales: { x: time, y: { suggestedMin: 1 } } } }),
    money: new Chart($("chart-money"), { data: { labels: [], datasets: [
        { type: "bar", label: "charged", data: [], backgroundColor: "#1f8a4c" },
        { type: "bar", label: "refunded", data: [], backgroundColor: "#c0392b" }] },
      options: { ...base, scales: { y: { beginAtZero: true } } } }),
  };
}

const COLORS = ["#3b5bdb", "#1f8a4c", "#b7791f", "#c0392b", "#7048e8", "#0c8599"];

function push(chart, label, values) {
  chart.data.labels.push(label);
  if (chart.data.labels.length > MAX_POINTS) chart.data.labels.shift();
  chart.data.datasets.forEach((ds, i) => {
    ds.data.push(values[i] ?? null);
    if (ds.data.length > MAX_POINTS) ds.data.shift();
  });
}

function drawCharts(snap) {
  if (!charts) return;
  const t = clock(snap.now);
  const models = snap.market.models.map((m) => m.model);
  models.forEach((model, i) => {
    if (!charts.queue.data.datasets.find((d) => d.label === model)) {
      charts.queue.data.datasets.push({ label: model, data: charts.queue.data.labels.map(() => null),
                                        borderColor: COLORS[i % COLORS.length], pointRadius: 0 });
    }
  });
  push(charts.queue, t, charts.queue.data.datasets.map((d) => {
    const m = snap.market.models.find((x) => x.model === d.label);
    return m ? m.queued : 0;
  }));
  charts.queue.update();
  charts.bids.data.labels = snap.market.bids.map((b) => fmtX(b.multiplier));
  charts.bids.data.datasets[0].data = snap.market.bids.map((b) => b.jobs);
  charts.bids.update();
  push(charts.multiplier, t, [snap.prices.last_multiplier]);
  charts.multiplier.update();
  const h = snap.money.history;
  charts.money.data.labels = h.map((p) => clock(p.minute).slice(0, 5));
  charts.money.data.datasets[0].data = h.map((p) => p.charged);
  charts.money.data.datasets[1].data = h.map((p) => p.refunded);
  charts.money.update();
}

function drawPrices(p) {
  $("prices").textContent = `base fee ${fmtInt(p.base_fee)} + ${fmtInt(p.fee_per_token)} per token ` +
    `(${fmtInt(p.fee_per_cached_token)} per cached prompt token); last accepted multiplier ${fmtX(p.last_multiplier)}`;
  fill("discovery", p.discovery, (tr, d) => {
    cell(tr, fmtX(d.multiplier)); cell(tr, fmtInt(d.position), "num"); cell(tr, fmtS(d.expected_wait_s), "num");
  });
}

function drawJobs(jobs, admin) {
  fill("jobs", jobs, (tr, j) => {
    tr.dataset.job = j.job_id;
    cell(tr, j.job_id.slice(0, 12), "mono").title = j.job_id;
    if (admin) cell(tr, j.account ?? "");
    cell(tr, j.model);
    cell(tr, j.state, `state state-${j.state}`);
    cell(tr, fmtX(j.multiplier), "num");
    cell(tr, fmtS(j.queue_wait_s), "num");
    cell(tr, fmtS(j.ttft_s), "num");
    cell(tr, `${fmtInt(j.prompt_tokens)} / ${fmtInt(j.completion_tokens)}`, "num");
    cell(tr, fmtInt(j.charged), "num");
    cell(tr, fmtInt(j.refunded), "num");
    cell(tr, j.worker ?? "");
  });
}

function drawOperator(snap) {
  const queued = snap.market.models.reduce((a, m) => a + m.queued, 0);
  const running = snap.market.models.reduce((a, m) => a + m.running, 0);
  const alive = snap.herd.filter((w) => w.alive);
  const books = snap.money.books;
  kpis([
    ["queued", fmtInt(queued), "queued"], ["running", fmtInt(running), "running"],
    ["workers alive", `${alive.length} / ${snap.herd.length}`, "workers"],
    ["slots busy", `${alive.reduce((a, w) => a + w.busy, 0)} / ${alive.reduce((a, w) => a + w.slots, 0)}`, "slots"],
    ["revenue (house)", fmtInt(snap.money.revenue), "revenue"], ["charged", fmtInt(snap.money.charged), "charged"],
    ["refunded", fmtInt(snap.money.refunded), "refunded"], ["in escrow", fmtInt(snap.money.escrow), "escrow"],
    ["books", books.balanced ? "balanced" : "NOT balanced", "books"],
  ]);
  $("kpi-books").classList.add(books.balanced ? "alive" : "dead");
  $("books").textContent = books.balanced
    ? `Ledger check at ${clock(books.checked_at)}: the books balance.`
    : `Ledger check at ${clock(books.checked_at)}: ${books.problems.join("; ")}`;
  fill("per-model", snap.money.per_model, (tr, m) => {
    cell(tr, m.model); cell(tr, fmtInt(m.jobs), "num"); cell(tr, fmtInt(m.charged), "num"); cell(tr, fmtInt(m.refunded), "num");
  });
  fill("herd", snap.herd, (tr, w) => {
    tr.dataset.worker = w.worker;
    tr.className = w.alive ? "alive-row" : "dead";
    cell(tr, w.worker);
    cell(tr, w.alive ? "alive" : "dead", `worker-state ${w.alive ? "alive" : "dead"}`);
    cell(tr, w.model ?? "");
    const moving = w.moving_to ? ` → ${w.moving_to}` : "";
    const since = w.since ? ` since ${clock(w.since)}` : "";
    cell(tr, w.alive ? `${w.state}${moving}${since}` : "", `model-state model-state-${w.state}`);
    cell(tr, w.gpus && w.gpus.length ? w.gpus.join(", ") : "CPU");
    cell(tr, fmtInt(w.slots), "num"); cell(tr, fmtInt(w.busy), "num");
    cell(tr, w.tokens_per_s.toFixed(1), "num");
    cell(tr, w.alive ? "now" : `${fmtS(w.last_seen_s_ago)} ago`, "num");
    cell(tr, w.operator ?? (w.operator_claimed ? `${w.operator_claimed}? (unverified: house)` : "house"), "operator");
  });
  drawPlacement(snap.placement);
  fill("operators", snap.operators, (tr, o) => {
    cell(tr, o.operator); cell(tr, fmtInt(o.jobs), "num"); cell(tr, fmtInt(o.earned), "num");
    cell(tr, fmtInt(o.paid_out), "num"); cell(tr, fmtInt(o.balance), "num");
  }, "no operators: every charge goes to the house (llamas operators add NAME)");
  drawPrices(snap.prices);
  drawJobs(snap.jobs, true);
  drawCharts(snap);
}

function drawPlacement(p) {
  $("placement-mode").textContent = p.mode === "demand"
    ? `Demand placement is on (LLAMAS_PLACEMENT=demand): a worker serves a model at least ${fmtS(p.dwell_s)} ` +
      `before it moves, and leaves another model for a queue only once its oldest job has waited ${fmtS(p.wait_s)}.`
    : "Demand placement is off (LLAMAS_PLACEMENT=off): each worker serves what it was started with or told to serve.";
  const waits = p.waiting.map((w) => `${w.model} waits: ${w.reason}`);
  $("placement-waiting").replaceChildren(...waits.map((text) => {
    const li = document.createElement("li"); li.textContent = text; return li;
  }));
  fill("placement", p.decisions, (tr, d) => {
    cell(tr, clock(d.at)); cell(tr, d.worker); cell(tr, d.from ?? "no model"); cell(tr, d.to);
    cell(tr, d.reason, "reason");
  }, "no decisions yet");
}

function drawRequester(snap) {
  kpis([["account", snap.account, "account"], ["balance", fmtInt(snap.balance), "balance"],
        ["base fee", fmtInt(snap.prices.base_fee), "base-fee"], ["fee per token", fmtInt(snap.prices.fee_per_token), "fee-per-token"],
        ["last multiplier", fmtX(snap.prices.last_multiplier), "last-multiplier"]]);
  $("jobs-title").textContent = "Your jobs";
  drawPrices(snap.prices);
  drawJobs(snap.jobs, false);
}

function draw(snap) {
  $("live").classList.remove("stale");
  document.body.classList.toggle("requester", snap.role === "requester");
  $("role").textContent = snap.role === "admin" ? "admin" : `requester · ${snap.account}`;
  if (snap.role === "admin") {
    if (!charts) charts = makeCharts();
    drawOperator(snap);
  } else {
    drawRequester(snap);
  }
  document.body.dataset.updated = String(snap.now);
}

function showSignIn(message) {
  if (source) { source.close(); source = null; }
  $("view").hidden = true; $("who").hidden = true; $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
}

function follow() {
  $("sign-in").hidden = true; $("view").hidden = false; $("who").hidden = false;
  source = new EventSource("/dashboard/events");
  source.onmessage = (e) => draw(JSON.parse(e.data));
  source.addEventListener("signed-out", () => showSignIn("Your key is no longer valid: sign in again."));
  source.onerror = async () => {
    $("live").classList.add("stale");
    // A dropped stream is reconnected by EventSource itself; a refused one (any status but
    // 200) closes it for good. Then: a refused session signs in again, anything else
    // (the gateway or the ledger down for now) is tried again shortly.
    if (!source || source.readyState !== EventSource.CLOSED) return;
    const reply = await fetch("/dashboard/snapshot", { credentials: "same-origin" }).catch(() => null);
    if (reply && reply.status === 401) { showSignIn("Sign in to see the dashboard."); return; }
    source = null;
    setTimeout(() => { if (!source && !$("view").hidden) follow(); }, 5000);
  };
}

async function start() {
  $("sign-in-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const reply = await fetch("/dashboard/session", { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ key: $("key").value }) });
    $("key").value = "";
    if (reply.ok) { follow(); return; }
    const body = await reply.json().catch(() => ({}));
    $("sign-in-error").textContent = (body.error && body.error.message) || `sign-in refused (HTTP ${reply.status})`;
  });
  $("sign-out").addEventListener("click", async () => {
    await fetch("/dashboard/session", { method: "DELETE", credentials: "same-origin" });
    charts = null;
    document.querySelectorAll("canvas").forEach((c) => { const ch = Chart.getChart(c); if (ch) ch.destroy(); });
    showSignIn("");
  });
  const reply = await fetch("/dashboard/snapshot", { credentials: "same-origin" }).catch(() => null);
  if (reply && reply.ok) { draw(await reply.json()); follow(); } else { showSignIn(""); }
}

start();
