// mpsd status page: polls /api/status and /api/history about once a second and redraws in place.
// Read-only by design: nothing here can change the fleet (the admin plane is the unix socket).
// Where the daemon has a token, /api/* answers 401 without it: the page asks for it once per tab and keeps it in
// sessionStorage only (never a URL, never localStorage), sent as "Authorization: Bearer" on every /api/* fetch.
"use strict";

const POLL_MS = 1000;
const TOKEN_KEY = "mpsd-token";
const ASK = "This mpsd requires its bearer token (the one in its token_file) to show its status.";
const REFUSED = "That token was not accepted: enter the one in the daemon's token_file.";
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"];
const LIVE_STATES = new Set(["STARTING", "READY", "DRAINING"]);  // what admission counts as held
const WAITING_STATES = new Set(["REFUSED", "PENDING"]);
const modelColours = new Map();

function colourOf(model) {
  if (!modelColours.has(model)) modelColours.set(model, PALETTE[modelColours.size % PALETTE.length]);
  return modelColours.get(model);
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  n = Number(n) || 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + units[i];
}

function duration(s) {
  s = Math.floor(Number(s) || 0);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// One memory bar: other use, each live worker's footprint, headroom, free, then what waits and does not fit.
function drawBar(bar, status, mem, workers) {
  const footprints = new Map(status.models.map(m => [m.name, Number(m.footprint_bytes)]));
  const budget = Number(mem.budget_bytes);
  const live = workers.filter(w => LIVE_STATES.has(w.state));
  const waiting = workers.filter(w => WAITING_STATES.has(w.state));
  const liveBytes = live.reduce((sum, w) => sum + (footprints.get(w.model) || 0), 0);
  const other = Math.max(0, Number(mem.used_bytes) - liveBytes);
  const segments = [{cls: "other", bytes: other, label: "other use", title: "other use: " + bytes(other)}];
  for (const w of live) {
    const fp = footprints.get(w.model) || 0;
    segments.push({cls: "live", bytes: fp, colour: colourOf(w.model), label: w.id, worker: w.id,
                   title: `${w.id} (${w.model}, ${w.state}): footprint ${bytes(fp)}, measured ${bytes(w.memory_bytes)}`});
  }
  segments.push({cls: "headroom", bytes: Number(mem.headroom_bytes), label: "headroom",
                 title: "headroom: " + bytes(mem.headroom_bytes)});
  segments.push({cls: "free", bytes: Number(mem.free_for_workers_bytes), label: "free",
                 title: "free for workers: " + bytes(mem.free_for_workers_bytes)});
  for (const w of waiting) {
    const fp = footprints.get(w.model) || 0;
    segments.push({cls: "nofit", bytes: fp, label: `${w.id} does not fit`, worker: w.id,
                   title: `${w.id} (${w.model}) ${w.state}: ${w.reason}`});
  }
  const drawn = segments.reduce((sum, s) => sum + s.bytes, 0);
  const scale = Math.max(budget, drawn, 1);
  bar.replaceChildren();
  for (const s of segments) {
    if (s.bytes <= 0) continue;
    const seg = el("div", {class: "seg " + s.cls, title: s.title}, s.label);
    seg.style.width = (100 * s.bytes / scale) + "%";
    if (s.colour) seg.style.background = s.colour;
    if (s.worker) seg.dataset.worker = s.worker;
    bar.appendChild(seg);
  }
  if (budget > 0 && budget < scale) {
    const mark = el("div", {class: "budget-mark", title: "budget " + bytes(budget)});
    mark.style.left = (100 * budget / scale) + "%";
    bar.appendChild(mark);
  }
}

// The memory: one bar, or one bar per device where the probe sees several.
function renderMemory(status) {
  const mem = status.memory, devices = mem.devices || [];
  const several = devices.length > 1;  // then one bar per device, each with the workers placed on it
  const budget = Number(mem.budget_bytes);
  const bar = document.getElementById("memory-bar");
  bar.hidden = several;
  if (!several) drawBar(bar, status, mem, status.workers);
  const rows = document.getElementById("device-bars");
  rows.replaceChildren();
  for (const d of several ? devices : []) {
    const gpu = [d.utilization_percent != null ? d.utilization_percent + "% busy" : "",
                 d.temperature_c != null ? d.temperature_c + "°C" : ""].filter(Boolean).join(" ");
    rows.appendChild(el("div", {class: "muted"}, `${d.device}: budget ${bytes(d.budget_bytes)} · used ` +
      `${bytes(d.used_bytes)} · free for workers ${bytes(d.free_for_workers_bytes)}${gpu ? " · " + gpu : ""}`));
    const deviceBar = el("div", {class: "bar", role: "img", "aria-label": "memory of " + d.device,
                                 "data-device": d.device});
    drawBar(deviceBar, status, d, status.workers.filter(w => w.placed_device === d.device));
    rows.appendChild(deviceBar);
  }
  document.getElementById("memory-line").textContent = budget
    ? `budget ${bytes(budget)} (${mem.probe}) · used ${bytes(mem.used_bytes)} · headroom ${bytes(mem.headroom_bytes)}` +
      ` · free for workers ${bytes(mem.free_for_workers_bytes)}`
    : `memory probe: ${mem.probe}`;
  const legend = document.getElementById("memory-legend");
  legend.replaceChildren();
  for (const m of status.models) {
    // Clean pages its workers map (mostly the weights), shown once: replicas of one file share them.
    const shared = Number(m.shared_bytes) ? `; clean shared pages ${bytes(m.shared_bytes)}, mapped by ` +
      `${m.shared_by} worker${m.shared_by == 1 ? "" : "s"}, counted once` : "";
    const item = el("span", {}, `${m.name} (${bytes(m.footprint_bytes)} each, ${m.footprint_source}${shared})`);
    const swatch = el("i");
    swatch.style.background = colourOf(m.name);
    item.prepend(swatch);
    legend.appendChild(item);
  }
}

// A worker's prefix cache as status reports it: [held/budget, hit rate, tooltip]; "-" where it keeps none.
function prefixCache(w) {
  const c = w.prefix_cache || {};
  if (!Number(c.configured_bytes) && !Number(c.budget_bytes)) return ["-", "-", "no prefix cache"];
  const hit = Number(c.hit_tokens), seen = hit + Number(c.miss_tokens);
  return [`${bytes(c.bytes)}/${bytes(c.budget_bytes)}`, seen ? Math.round(100 * hit / seen) + "%" : "-",
          `${c.entries} entries, configured ${bytes(c.configured_bytes)}, ${hit} of ${seen} prompt tokens reused, ` +
          `${c.evictions} evictions`];
}

function renderWorkers(status) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  for (const w of status.workers) {
    const row = el("tr", {"data-worker": w.id, "data-state": w.state});
    const [cache, hits, cacheTitle] = prefixCache(w);
    const note = w.prefix_cache_note ? "prefix cache: " + w.prefix_cache_note : "";
    const cells = [
      [w.id], [w.model], [w.state, "state state-" + w.state], [w.pid ? duration(w.uptime_s) : "-", "num"],
      [String(w.restarts), "num"], [String(w.inflight), "num"], [String(w.tokens), "num"],
      [w.memory_bytes ? bytes(w.memory_bytes) : "-", "num memory"], [cache, "num cache"], [hits, "num hits"],
      [[w.reason, note].filter(Boolean).join(" · "), "reason"],
    ];
    for (const [text, cls] of cells) row.appendChild(el("td", cls ? {class: cls} : {}, text));
    row.querySelector("td.cache").title = cacheTitle;
    const pm = w.process_memory || {};
    if (Number(pm.processes)) row.querySelector("td.memory").title =
      `footprint ${bytes(pm.footprint_bytes)} (${pm.processes} process${pm.processes == 1 ? "" : "es"}): ` +
      `rss ${bytes(pm.rss_bytes)}, uss ${bytes(pm.uss_bytes)}, pss ${bytes(pm.pss_bytes)}, ` +
      `clean ${bytes(pm.clean_bytes)}`;
    if (w.last_exit) row.lastChild.title = "last exit: " + w.last_exit;
    row.children[1].style.borderLeft = "4px solid " + colourOf(w.model);
    body.appendChild(row);
  }
  const d = status.daemon;
  document.getElementById("daemon-line").textContent =
    `${d.version} · pid ${d.pid} · up ${duration(d.uptime_s)} · ${d.listen} · ${d.config_path}`;
}

function chart(title, id, series, samples, across = samples) {
  // series: [{key, label, colour, value(sample), dots}]; plain SVG, x = the times of `across`, y from 0 to the largest.
  const width = 360, height = 110, left = 34, bottom = 14;
  const times = across.map(s => s.t);
  const t0 = times.length ? times[0] : 0, t1 = times.length ? times[times.length - 1] : 1;
  let top = 0;
  for (const s of series) for (const x of samples) top = Math.max(top, s.value(x) || 0);
  top = top || 1;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const axis = document.createElementNS(ns, "path");
  axis.setAttribute("d", `M${left} 2 V${height - bottom} H${width}`);
  axis.setAttribute("class", "axis");
  axis.setAttribute("fill", "none");
  svg.appendChild(axis);
  for (const [y, text] of [[10, top < 1 ? top.toPrecision(2) : top.toFixed(top < 10 ? 1 : 0)], [height - bottom, "0"]]) {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 2); label.setAttribute("y", y); label.textContent = text;
    svg.appendChild(label);
  }
  const span = Math.max(t1 - t0, 1);
  for (const s of series) {
    const points = samples.map(x => {
      const px = left + (width - left) * (x.t - t0) / span;
      const py = (height - bottom) - (height - bottom - 4) * (s.value(x) || 0) / top;
      return px.toFixed(1) + "," + py.toFixed(1);
    });
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", s.colour);
    line.setAttribute("stroke-width", "1.5");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    line.dataset.series = s.key;
    line.dataset.points = String(points.length);
    line.dataset.max = String(Math.max(0, ...samples.map(x => s.value(x) || 0)));
    svg.appendChild(line);
    if (s.dots) {
      for (const point of points) {
        const [cx, cy] = point.split(",");
        const dot = document.createElementNS(ns, "circle");
        dot.setAttribute("cx", cx); dot.setAttribute("cy", cy); dot.setAttribute("r", "2.5");
        dot.setAttribute("fill", s.colour);
        svg.appendChild(dot);
      }
    }
  }
  const box = el("div", {class: "chart", id: id});
  const heading = el("h3", {}, title + "  ");
  for (const s of series) {
    const key = el("span", {}, "— " + s.label + " ");
    key.style.color = s.colour;
    heading.appendChild(key);
  }
  box.append(heading, svg);
  return box;
}

function renderHistory(history) {
  const samples = history.samples;
  const models = new Set();
  for (const s of samples) for (const name of Object.keys(s.models)) models.add(name);
  const boxes = [];
  for (const name of models) {
    const of = key => x => (x.models[name] || {})[key];
    boxes.push(chart(`${name}: tokens/s`, `chart-${name}-tokens`,
      [{key: "tokens_per_s", label: "tokens/s", colour: colourOf(name), value: of("tokens_per_s")}], samples));
    boxes.push(chart(`${name}: requests and workers`, `chart-${name}-load`, [
      {key: "queued", label: "queued", colour: "#e15759", value: of("queued")},
      {key: "inflight", label: "in-flight", colour: "#4e79a7", value: of("inflight")},
      {key: "ready", label: "READY workers", colour: "#59a14f", value: of("ready")}], samples));
    boxes.push(chart(`${name}: time to first token, median (s)`, `chart-${name}-ttft`,
      [{key: "ttft_p50_s", label: "p50 (bucket bound)", colour: "#b07aa1", value: of("ttft_p50_s"), dots: true}],
      samples.filter(x => (x.models[name] || {}).ttft_p50_s != null), samples));
  }
  boxes.push(chart("memory (GiB)", "chart-memory", [
    {key: "used", label: "used", colour: "#f28e2b", value: x => x.memory.used_bytes / 2 ** 30},
    {key: "budget", label: "budget", colour: "#8c959f", value: x => x.memory.budget_bytes / 2 ** 30}], samples));
  document.getElementById("charts").replaceChildren(...boxes);
  document.getElementById("transitions").textContent = history.transitions.join("\n") || "(none yet)";
}

class NeedsToken extends Error {}

function apiGet(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? {Authorization: "Bearer " + token} : {};
  return fetch(path, {cache: "no-store", headers}).then(r => {
    if (r.status === 401) throw new NeedsToken(path);
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return r.json();
  });
}

function askForToken() {
  const refused = sessionStorage.getItem(TOKEN_KEY) !== null;
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("login-why").textContent = refused ? REFUSED : ASK;
  document.getElementById("login").hidden = false;
  document.getElementById("updated").textContent = "token required";
  document.getElementById("token").focus();
}

document.getElementById("login").addEventListener("submit", event => {
  event.preventDefault();  // no navigation: the token goes nowhere but sessionStorage
  const input = document.getElementById("token");
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  document.getElementById("login").hidden = true;
  poll();
});

async function poll() {
  try {
    const [status, history] = await Promise.all(["/api/status", "/api/history"].map(apiGet));
    renderMemory(status);
    renderWorkers(status);
    renderHistory(history);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    if (err instanceof NeedsToken) return askForToken();  // polling resumes once a token is entered
    document.getElementById("updated").textContent = "daemon unreachable: " + err.message;
  }
  setTimeout(poll, POLL_MS);
}

poll();
