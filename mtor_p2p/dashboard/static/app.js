// The MTOR peer's dashboard: logs in with the one-use ticket in the URL's fragment, then
// renders the node's snapshots as they stream in (server-sent events over fetch, since
// EventSource cannot send the Authorization header). Everything a remote peer wrote (GPU
// names, regions, peer IDs) reaches the page as text nodes only, never as HTML.
"use strict";

const SESSION_KEY = "mtor-dashboard-session";
// The 14 regions of simulations/data/regions.csv: code -> [lat, lon, name].
const REGIONS = {
  WUS: [37.8, -122.4, "West US"], CUS: [41.6, -93.6, "Central US"], EUS: [37.5, -77.4, "East US"],
  BRS: [-23.6, -46.6, "Brazil South"], UKS: [51.5, -0.1, "UK South"], WEU: [52.4, 4.9, "West Europe"],
  GWC: [50.1, 8.7, "Germany West Central"], UAEN: [25.2, 55.3, "UAE North"],
  SAN: [-26.2, 28.0, "South Africa North"], CIN: [18.5, 73.9, "Central India"],
  SEA: [1.3, 103.8, "Southeast Asia"], EAS: [22.3, 114.2, "East Asia"],
  JPE: [35.7, 139.7, "Japan East"], AUE: [-33.9, 151.2, "Australia East"],
};

// What the browser test reads: when the first snapshot was painted, and each snapshot's
// delay from the node's send to this page's paint (milliseconds).
const stats = { firstPaint: null, latencies: [], snapshots: 0, lastSeq: null, errors: [] };
window.mtorDashboard = stats;

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") el.className = v;
    else el.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

const short = (id) => (id ? `…${String(id).slice(-8)}` : "–");
const num = (x, digits = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const pct = (x) => (x === null || x === undefined ? "–" : `${Math.round(x * 100)}%`);
const gib = (bytes) => `${(bytes / 2 ** 30).toFixed(1)} GiB`;
// Credits, one way everywhere: shards on a devnet cost millionths of a credit, so small
// amounts keep three significant digits instead of rounding to 0.0000.
function credits(x) {
  if (x === null || x === undefined) return "–";
  const a = Math.abs(x);
  if (a === 0 || a >= 1) return a.toFixed(4);
  if (a >= 0.001) return a.toFixed(6);
  return a.toPrecision(3);
}
// A speed given in TFLOP/s, in the unit that shows it (a CPU shard is MFLOP/s-GFLOP/s).
function speed(tflops) {
  if (tflops === null || tflops === undefined) return "–";
  const units = [[1, "TFLOP/s"], [1e-3, "GFLOP/s"], [1e-6, "MFLOP/s"]];
  for (const [scale, unit] of units) {
    if (Math.abs(tflops) >= scale || scale === 1e-6) return `${(tflops / scale).toPrecision(3)} ${unit}`;
  }
  return "–";
}
// The scheduler's job IDs as the CLI prints them (the first 16 hex digits).
const jobShort = (id) => (id ? `${String(id).slice(0, 16)}…` : "–");
// Label offsets (dx, dy) for regions whose circles sit close together.
const LABEL_AT = { UKS: [-22, -3], WEU: [4, -4], GWC: [4, 5], CUS: [-4, -6], EUS: [4, 5], WUS: [-22, 2], EAS: [4, 5], JPE: [4, -2] };

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

// Colour of a worker, stable across snapshots.
function hue(text) {
  let x = 0;
  for (const ch of String(text)) x = (x * 31 + ch.charCodeAt(0)) >>> 0;
  return `hsl(${x % 360}, 60%, 50%)`;
}

function fill(el, ...children) {
  el.replaceChildren(...children.filter((c) => c !== null && c !== undefined));
}

// -- login ---------------------------------------------------------------------------------

function showLogin(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-message").textContent = message;
  setLive(false, "logged out");
}

function notice(message) {
  $("notice").textContent = message || "";
  $("notice").hidden = !message;
}

async function login() {
  notice(null);
  const match = /(?:^#|&)ticket=([^&]*)/.exec(location.hash);
  if (match) {
    // The ticket leaves the address bar (and the history) at once; it works only once anyway.
    history.replaceState(null, "", location.pathname);
    let answer;
    try {
      const r = await fetch("/v1/dashboard/login", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ ticket: match[1] }),
      });
      answer = { ok: r.ok, status: r.status, body: await r.json().catch(() => ({})) };
    } catch (err) {
      showLogin(`the node does not answer: ${err}`);
      return null;
    }
    if (!answer.ok) {
      const message = answer.body.error || `login refused (${answer.status})`;
      if (sessionStorage.getItem(SESSION_KEY)) {
        // A used link pasted again into a tab that is logged in: keep the session.
        notice(`${message.replaceAll("`", "")}. Still showing this tab's session.`);
        return sessionStorage.getItem(SESSION_KEY);
      }
      showLogin(message.replaceAll("`", ""));
      return null;
    }
    sessionStorage.setItem(SESSION_KEY, answer.body.session);
  }
  const session = sessionStorage.getItem(SESSION_KEY);
  if (!session) {
    showLogin("This page needs the link that mtor-peer dashboard prints.");
    return null;
  }
  return session;
}

// -- live updates --------------------------------------------------------------------------

function setLive(on, why) {
  const badge = $("live");
  badge.className = `badge ${on ? "on" : "off"}`;
  badge.textContent = on ? "live" : why || "reconnecting";
}

async function get(path, session) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${session}` }, cache: "no-store" });
  if (r.status === 401) throw Object.assign(new Error("session refused"), { status: 401 });
  if (!r.ok) throw new Error(`${path}: ${r.status}`);
  return r;
}

function loggedOut(err) {
  if (err && err.status === 401) {
    sessionStorage.removeItem(SESSION_KEY);
    showLogin("The dashboard session has expired or the node restarted: run mtor-peer dashboard again.");
    return true;
  }
  return false;
}

// Each login starts a new generation; the stream of an older one stops.
let generation = 0;

async function follow(session, mine) {
  let retry = 1000;
  while (mine === generation) {
    try {
      const r = await get("/v1/dashboard/events", session);
      setLive(true);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        if (mine !== generation) {
          reader.cancel();
          return;
        }
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          retry = onEvent(block, retry);
        }
      }
    } catch (err) {
      if (loggedOut(err)) return;
      stats.errors.push(String(err));
    }
    setLive(false);
    await sleep(retry);
  }
}

function onEvent(block, retry) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("retry:")) retry = Number(line.slice(6)) || retry;
    else if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (event === "snapshot" && data.length) render(JSON.parse(data.join("\n")));
  return retry;
}

// -- rendering -----------------------------------------------------------------------------

function render(s) {
  if (stats.lastSeq !== null && s.seq <= stats.lastSeq) return;
  stats.lastSeq = s.seq;
  $("login").hidden = true;
  $("main").hidden = false;
  renderNode(s.node);
  renderDevices(s.devices);
  renderMoney(s);
  renderWhy(s.why_no_work);
  renderJobs(s.jobs);
  renderMap(s.regions);
  renderPeers(s.peers);
  $("peers-shown").textContent = s.peers_total > s.peers.length
    ? `${s.peers.length} of ${s.peers_total} peers shown: those connected, measured here or with this node's GPU first (the map counts them all).`
    : "";
  renderReceipts(s.receipts, s.jobs);
  renderWarnings(s.warnings);
  $("updated").textContent = new Date().toLocaleTimeString();
  stats.snapshots += 1;
  // Measured once the browser has laid the page out, on its next frame.
  requestAnimationFrame(() => {
    const now = performance.timeOrigin + performance.now();
    if (stats.firstPaint === null) stats.firstPaint = performance.now();
    stats.latencies.push(now - s.sent_at);
    if (stats.latencies.length > 1000) stats.latencies.shift();
    $("latency").textContent = `update ${Math.max(0, Math.round(now - s.sent_at))} ms after the node sent it`;
  });
}

function renderNode(n) {
  $("node-id").textContent = n.peer_id;
  $("node-version").textContent = n.version;
  $("node-region").textContent = `${n.region}${REGIONS[n.region] ? ` (${REGIONS[n.region][2]})` : ""}`;
  $("node-uptime").textContent = duration(n.uptime_s);
  $("node-reachability").textContent = n.reachability || (n.tunnel ? `via tunnel ${n.tunnel}` : "not measured (loopback)");
  $("node-connected").textContent = n.connected_peers;
  $("peer-count").textContent = n.view_size;
  $("node-serving").textContent = n.serving
    ? `${n.kernels.join(", ")} on ${n.backend}; ${n.shards_run} shards run, ${n.shards_failed} failed` +
      (n.operands_shared
        ? `; ${n.operands_shared} operands from shared memory (${(n.bytes_shared / 1048576).toFixed(0)} MiB)`
        : "") +
      (n.outputs_shared
        ? `; ${n.outputs_shared} outputs to it (${(n.output_bytes_shared / 1048576).toFixed(0)} MiB)`
        : "")
    : "no (requester only)";
  $("node-addr-count").textContent = `${n.addrs.length} address${n.addrs.length === 1 ? "" : "es"}`;
  fill($("node-addrs"), ...n.addrs.map((a) => h("li", {}, a)));
}

function renderDevices(devices) {
  fill($("device-list"), ...devices.map((d) => {
    const used = d.mem_total ? 1 - d.mem_free / d.mem_total : 0;
    const bar = h("div", { class: "bar" }, h("span"));
    bar.firstChild.style.width = `${Math.round(used * 100)}%`;
    const util = h("div", { class: "bar" }, h("span"));
    util.firstChild.style.width = `${Math.round(d.utilization || 0)}%`;
    return h("div", { class: "card" },
      h("strong", {}, d.name), h("div", { class: "small" }, d.kind === "cpu" ? `CPU, ${d.cores} cores` : "GPU"),
      h("div", {}, `memory ${gib(d.mem_total - d.mem_free)} used of ${gib(d.mem_total)}`), bar,
      h("div", {}, `utilisation ${d.utilization === null ? "–" : `${Math.round(d.utilization)}%`}`), util,
      d.kind === "gpu" ? h("div", {}, `${num(d.temperature_c, 0)} °C · ${num(d.power_w, 0)} W`) : null);
  }));
}

function chart(el, range, t, ys, format) {
  el.replaceChildren();
  range.textContent = "";
  if (!ys.length) return;
  const lo = Math.min(...ys), hi = Math.max(...ys);
  const t0 = t[0], t1 = t[t.length - 1];
  const x = (v) => (t1 > t0 ? ((v - t0) / (t1 - t0)) * 300 : 300);
  const y = (v) => (hi > lo ? 85 - ((v - lo) / (hi - lo)) * 80 : 45);
  const points = ys.map((v, i) => `${x(t[i]).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  el.append(svg("polyline", { points: ys.length === 1 ? `0,${y(ys[0])} ${points}` : points }));
  const label = svg("title", {});
  label.textContent = `${format(lo)} … ${format(hi)} over ${duration(Math.max(0, t1 - t0))}`;
  el.append(label);
  // The scale in words: a fall of a millionth must not look like a crash.
  range.textContent = hi > lo
    ? `${format(lo)} – ${format(hi)} over ${duration(Math.max(0, t1 - t0))}`
    : `flat at ${format(lo)}`;
}

function renderMoney(s) {
  $("balance").textContent = credits(s.ledger.balance);
  $("stake").textContent = credits(s.ledger.stake);
  $("price").textContent = num(s.node.price, 4);
  $("receipt-count").textContent = s.receipts.count;
  const price = (x) => x.toFixed(4);
  chart($("chart-balance"), $("range-balance"), s.history.t, s.history.balance, credits);
  chart($("chart-stake"), $("range-stake"), s.history.t, s.history.stake, credits);
  chart($("chart-price"), $("range-price"), s.history.t, s.history.price, price);
}

function facts(el, pairs) {
  fill(el, ...pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function renderWhy(w) {
  if (!w) return;
  $("why-summary").textContent = w.summary;
  const p = w.price || {};
  facts($("why-price"), [
    ["GPU class", w.gpu_class],
    ["this node asks", num(p.own, 4)],
    ["other serving peers of the class", p.peers ?? 0],
    ["their prices", p.peers ? `lowest ${num(p.min, 4)}, median ${num(p.median, 4)}, highest ${num(p.max, 4)}` : "–"],
    ["this node's rank", p.rank ? `${p.rank} of ${p.of} (1 = cheapest; this node included)` : "–"],
    ["newcomers are not tried above", p.trial_ceiling === null ? "–" : `${num(p.trial_ceiling, 4)} (${p.trial_multiple}× the median ask of ${p.market_peers} sellers, when the requester sets no price limit)`],
  ]);
  const d = w.demand || {};
  const seen = w.seen_here || {};
  facts($("why-demand"), [
    ["shards asked of this node", `${num(d.requests_per_min, 1)} / min (${d.requests_received ?? 0} in the last ${duration(d.observed_s || 0)})`],
    ["shards this node's own jobs sent to the class", `${num(d.sent_per_min, 1)} / min`],
    ["mean load the class reports", pct(d.class_mean_load)],
    ["jobs submitted here", seen.jobs ? `${seen.jobs}: a peer of this class was chosen ${seen.chosen} times and passed over ${seen.passed_over} times` : "none yet"],
  ]);
  const reasons = (w.reasons || []).map((r) => h("li", { "data-reason": r.reason }, h("strong", {}, r.reason), ` ${r.detail}`));
  fill($("why-reasons"), ...(reasons.length ? reasons : [h("li", {}, "nothing seen here holds it back")]));
}

function renderJobs(jobs) {
  $("jobs-running").textContent = `${jobs.running} running`;
  fill($("job-list"), ...(jobs.list.length ? jobs.list.map(renderJob) : [h("p", { class: "small" }, "No jobs submitted through this node yet (mtor-peer submit).")]));
}

function renderJob(j) {
  const total = j.total || 0;
  const bar = h("div", { class: "bar" }, h("span"));
  bar.firstChild.style.width = `${total ? Math.round((j.done / total) * 100) : 0}%`;
  // Shards come as [index, worker number, seconds, attempts], the workers listed once.
  const ids = j.shard_workers || [];
  const accepted = new Map((j.shards || []).map(([index, w, seconds, attempts]) =>
    [index, { worker: ids[w], seconds, attempts }]));
  const cells = [];
  // Older jobs come without their shards (null): their progress bar says it all.
  for (let i = 0; j.shards && i < total; i += 1) {
    const shard = accepted.get(i);
    const cell = h("span", { class: "shard", title: shard ? `shard ${i}: ${short(shard.worker)}, ${shard.seconds} s, ${shard.attempts} attempt(s)` : `shard ${i}: waiting` });
    if (shard) cell.style.background = hue(shard.worker);
    cells.push(cell);
  }
  const legend = Object.entries(j.workers || {}).map(([w, n]) => {
    const swatch = h("span", { class: "swatch" });
    swatch.style.background = hue(w);
    return h("span", { title: w }, swatch, `${short(w)} ×${n}`);
  });
  return h("div", { class: "job", "data-job": j.id, "data-done": j.done, "data-total": total, "data-state": j.state },
    h("div", { class: "head" },
      h("strong", {}, j.id), h("span", { class: "mono small", title: j.job_id || "" }, jobShort(j.job_id)),
      h("span", {}, `${j.kernel || ""} ${(j.shape || []).join("×")}`),
      h("span", { class: `state-${j.state}` }, j.state),
      h("span", { class: "job-progress" }, `${j.done}/${total} shards`),
      h("span", {}, `${num(j.elapsed_s, 1)} s`),
      h("span", { class: "small" }, `verify ${j.verification || j.verify || "auto"}: ${j.verified} passed, ${j.rejected} rejected, ${j.reissued} re-issued`)),
    bar, h("div", { class: "shards" }, ...cells),
    legend.length ? h("div", { class: "legend small" }, "workers:", ...legend) : h("div", { class: "small" }, "no shard accepted yet"),
    j.error ? h("div", { class: "state-failed" }, j.error) : null);
}

function renderMap(regions) {
  const map = $("map");
  const parts = [];
  for (let lon = -150; lon <= 150; lon += 30) parts.push(svg("line", { x1: lon, y1: -62, x2: lon, y2: 80, class: "grid" }));
  for (let lat = -60; lat <= 60; lat += 30) parts.push(svg("line", { x1: -180, y1: -lat, x2: 180, y2: -lat, class: "grid" }));
  for (const [code, [lat, lon, name]] of Object.entries(REGIONS)) {
    const r = regions[code];
    const peers = r ? r.peers : 0;
    const circle = svg("circle", { cx: lon, cy: -lat, r: peers ? 2 + 2 * Math.sqrt(peers) : 1.2, class: r && r.self ? "self" : "" });
    const title = svg("title", {});
    title.textContent = r
      ? `${name}: ${peers} peer(s), ${speed(r.tflops)}, median price ${num(r.price_median, 4)}`
      : `${name}: no peers`;
    circle.append(title);
    const [dx, dy] = LABEL_AT[code] || [4, 2];
    const label = svg("text", { x: lon + dx, y: -lat + dy });
    label.textContent = peers ? `${code} ${peers}` : code;
    parts.push(circle, label);
  }
  map.replaceChildren(...parts);
  const elsewhere = Object.entries(regions).filter(([code]) => !REGIONS[code]);
  $("map-legend").textContent = "Circles: peers in view per region (the label gives the count); green: this node's region." +
    (elsewhere.length ? ` Elsewhere (regions not on the map): ${elsewhere.map(([c, r]) => `${c} ${r.peers}`).join(", ")}.` : "");
}

function standing(p) {
  if (p.other_ledger_rules) return `follows ledger rules ${p.ledger_rules}: another MTOR version, never scheduled here`;
  if (p.demoted) return `demoted ${duration(p.demoted_for_s)}: ${p.demoted_why}`;
  const here = p.jobs_here || {};
  if (here.passed_over && here.last) {
    return `passed over in ${here.passed_over} of ${here.jobs} jobs here (last: ${here.last.reason})`;
  }
  return here.chosen ? `chosen in ${here.chosen} of ${here.jobs} jobs here` : "ok";
}

function renderPeers(peers) {
  const rows = peers.map((p) => h("tr", { "data-peer": p.peer_id },
    h("td", { class: "mono", title: p.peer_id }, short(p.peer_id)),
    h("td", {}, p.region), h("td", {}, p.gpu_class),
    h("td", {}, p.connection === null ? "–" : p.connection),
    h("td", { class: "num", title: p.rtt_source || "" }, num(p.rtt_ms, 1)),
    h("td", { class: "num" }, speed(p.tflops_advertised)), h("td", { class: "num" }, speed(p.tflops_measured)),
    h("td", { class: "num", title: `${p.accepted} passed, ${p.rejected} failed` }, pct(p.verified_share)),
    h("td", { class: "num" }, num(p.price, 4)),
    h("td", { class: "num" }, pct(p.load)), h("td", {}, standing(p))));
  fill($("peer-table").tBodies[0], ...rows);
}

function renderReceipts(r, jobs) {
  // The board's name of a job (job-N) where this node submitted it.
  const names = new Map(jobs.list.filter((j) => j.job_id).map((j) => [j.job_id, j.id]));
  const rows = r.recent.map((x) => h("tr", {},
    h("td", {}, new Date(x.ended * 1000).toLocaleTimeString()),
    h("td", {}, x.role), h("td", { class: "mono", title: x.job_id }, names.get(x.job_id) || jobShort(x.job_id)),
    h("td", { class: "num" }, x.shard), h("td", { class: "mono", title: x.peer }, short(x.peer)),
    h("td", { class: "num" }, `${x.role === "earned" ? "+" : "−"}${credits(x.credits)}`),
    h("td", { class: "mono", title: x.entry || "" },
      !x.countersigned ? "not countersigned" : `${short(x.entry)}${x.in_ledger ? "" : " (not in the ledger yet)"}`)));
  fill($("receipt-table").tBodies[0], ...rows);
  const terms = r.terms.map((t) => `${t.item} ${t.credits >= 0 ? "+" : "−"}${credits(t.credits)}`);
  $("reconciliation").textContent = `Balance = ${terms.join(", ")}` +
    (Math.abs(r.unexplained) > 0 ? `; unexplained ${credits(r.unexplained)}` : "; nothing unexplained.");
}

function renderWarnings(warnings) {
  fill($("warning-list"), ...(warnings.length ? warnings.map((w) => h("li", { class: `warn-${w.level}` },
    `${new Date(w.at * 1000).toLocaleTimeString()} ${w.level} ${w.logger}: ${w.message}${w.count > 1 ? ` (×${w.count}, last at this time)` : ""}`)) : [h("li", {}, "none")]));
}

// -- start ---------------------------------------------------------------------------------

async function start() {
  generation += 1;
  const mine = generation;
  const session = await login();
  if (!session || mine !== generation) return;
  try {
    const r = await get("/v1/dashboard/state", session);
    stats.lastSeq = null; // a new session may be another node's (a new link, a restart)
    render(await r.json());
  } catch (err) {
    if (loggedOut(err)) return;
    stats.errors.push(String(err));
  }
  follow(session, mine);
}

// A new link pasted into the same tab changes only the fragment: log in again with it.
window.addEventListener("hashchange", () => {
  if (/ticket=/.test(location.hash)) start();
});
start();
