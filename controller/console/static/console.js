// The operator console: one Server-Sent Events stream (/console/events) gives the whole picture, then the
// sections that changed; the page redraws those. Actions go to /console/api/actions with the session's CSRF
// token, each confirmed first. Plain module, no build step, no third-party code.

const state = { doc: null, csrf: "", keys: [] };
const $ = (id) => document.getElementById(id);

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
const dash = (v) => (v === null || v === undefined || v === "" ? "–" : esc(v));
const time = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–");
const pct = (r) => (r === null || r === undefined ? "–" : `${Math.round(r * 100)} %`);

function toast(text, bad = false) {
  const el = $("toast");
  el.textContent = text;
  el.className = bad ? "bad" : "good";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.textContent = ""; el.className = ""; }, 6000);
}

function confirmThen(text) {
  return new Promise((resolve) => {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    dialog.returnValue = "";
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

async function act(action, target, extra = {}, question = `${action} ${target}?`) {
  if (!(await confirmThen(question))) return null;
  const reply = await fetch("/console/api/actions", {
    method: "POST",
    headers: { "content-type": "application/json", "x-csrf-token": state.csrf },
    body: JSON.stringify({ action, target, ...extra }),
  });
  const body = await reply.json().catch(() => ({}));
  if (!reply.ok) {
    toast(body?.error?.message || `${action} failed (${reply.status})`, true);
    return null;
  }
  toast(body.message || "done");
  if (action.endsWith("_key")) loadKeys();
  return body;
}

// -- drawing ---------------------------------------------------------------------------------------------------

function drawWarnings(list) {
  const ul = $("warnings");
  ul.innerHTML = list.length
    ? list.map((w) => `<li class="warning ${esc(w.severity)}" data-code="${esc(w.code)}"><strong>${esc(w.code)}</strong> ${esc(w.message)}${w.runbook ? ` <span class="muted">runbook: ${esc(w.runbook)}</span>` : ""}</li>`).join("")
    : `<li class="none">No warnings.</li>`;
}

// The memory a worker's processes hold per GPU (NVML, through the agent), beside its estimate.
function measured(memory) {
  const per = memory && memory.measured_gib ? Object.values(memory.measured_gib) : [];
  if (!per.length) return "";
  const total = per.reduce((a, b) => a + b, 0);
  const miss = memory.miss_ratio != null ? ` (${memory.miss_ratio > 0 ? "+" : ""}${Math.round(memory.miss_ratio * 100)} %)` : "";
  return ` · measured ${esc(total.toFixed(2))} GiB${esc(miss)}`;
}

function drawWorkers(workers) {
  $("workers").innerHTML = workers.map((w) => {
    const gpus = w.gpus.length ? w.gpus.map((g) => `GPU ${esc(g.index)} <span class="muted">${esc(g.uuid)}</span>`).join(", ") : "CPU";
    const buttons = [`<button data-act="restart" data-target="${esc(w.name)}">Restart</button>`];
    if (w.on_demand) {
      buttons.push(`<button data-act="load" data-target="${esc(w.model)}">Load</button>`);
      buttons.push(`<button data-act="unload" data-target="${esc(w.model)}">Unload</button>`);
    }
    return `<article class="card health-${esc(w.health)}" data-worker="${esc(w.name)}">
      <h3>${esc(w.model)} <span class="muted">${esc(w.name)}</span></h3>
      <dl>
        <dt>health</dt><dd class="health">${esc(w.health)}${w.latency_ms != null ? ` · ${esc(w.latency_ms)} ms` : ""}</dd>
        <dt>host</dt><dd>${esc(w.host)}</dd>
        <dt>device</dt><dd>${gpus}</dd>
        <dt>backend</dt><dd>${esc(w.backend)}</dd>
        <dt>pinning</dt><dd>${esc(w.pinning)}</dd>
        <dt>residency</dt><dd class="residency">${dash(w.residency)}</dd>
        <dt>in flight</dt><dd class="in-flight">${dash(w.in_flight)}</dd>
        <dt>queued</dt><dd>${dash(w.queued)}</dd>
        <dt>version</dt><dd>${dash(w.version)} <span class="muted">${esc(w.image)}</span></dd>
        <dt>memory</dt><dd>estimate ${esc(w.estimate_gib)} GiB${measured(w.memory)}</dd>
      </dl>
      <div class="actions">${buttons.join(" ")}</div>
    </article>`;
  }).join("");
}

function drawGpus(hosts) {
  const withGpus = hosts.filter((h) => h.gpus.length);
  if (!withGpus.length) {
    $("gpus").innerHTML = `<p class="none" id="no-gpus">No GPUs: every worker of this fleet runs on the CPU.</p>`;
    return;
  }
  $("gpus").innerHTML = withGpus.map((h) => `<h3>${esc(h.name)} <span class="muted">agent: ${dash(h.agent)}</span></h3>
    <table class="gpus"><thead><tr><th>GPU</th><th>utilization</th><th>memory used / total</th><th>plan</th><th>power</th><th>temperature</th><th>throttle</th><th>processes</th></tr></thead><tbody>
    ${h.gpus.map((g) => `<tr data-gpu="${esc(g.uuid)}"><td>${dash(g.index)} ${esc(g.name)}<br><span class="muted">${esc(g.uuid)}</span></td>
      <td>${pct(g.utilization)}</td>
      <td>${dash(g.memory_used_gib)} / ${dash(g.memory_total_gib)} GiB</td>
      <td>${dash(g.planned_gib)} GiB ${g.workers.length ? `<span class="muted">(${esc(g.workers.join(", "))})</span>` : ""}</td>
      <td>${g.power_w != null ? `${esc(Math.round(g.power_w))} / ${dash(g.power_limit_w && Math.round(g.power_limit_w))} W` : "–"}</td>
      <td>${g.temperature_c != null ? `${esc(g.temperature_c)} °C` : "–"}</td>
      <td>${Array.isArray(g.throttle) && g.throttle.length ? esc(g.throttle.join(", ")) : (g.throttle && typeof g.throttle === "object" ? esc(Object.keys(g.throttle).filter((k) => g.throttle[k]).join(", ") || "none") : "–")}</td>
      <td>${g.processes === null ? "–" : g.processes.map((p) => `${esc(p.pid)}: ${esc(p.memory_gib)} GiB ${p.worker ? esc(p.worker) : "<strong>unmanaged</strong>"}`).join("<br>") || "none"}</td></tr>`).join("")}
    </tbody></table>`).join("");
}

function drawRequests(req) {
  $("in-flight").tBodies[0].innerHTML = req.in_flight.length
    ? req.in_flight.map((r) => `<tr data-request="${esc(r.request_id)}"><td>${dash(r.user)}</td><td>${dash(r.key_id)}</td><td>${dash(r.app)}</td><td>${dash(r.model)}</td><td>${dash(r.worker)}</td><td>${time(r.started)}</td><td class="phase">${esc(r.phase)}</td><td>${dash(r.tokens)}</td><td>${dash(r.tokens_per_s)}</td></tr>`).join("")
    : `<tr class="none"><td colspan="9">None right now.</td></tr>`;
  $("recent").tBodies[0].innerHTML = req.recent.length
    ? req.recent.map((r) => `<tr data-request="${esc(r.request_id)}"><td>${time(r.started + r.duration_s)}</td><td>${dash(r.user)}</td><td>${dash(r.app)}</td><td>${dash(r.model)}</td><td>${dash(r.worker)}</td><td>${dash(r.status)}</td><td>${esc(r.duration_s)} s</td><td>${dash((r.prompt_tokens ?? 0) + (r.completion_tokens ?? 0))}</td></tr>`).join("")
    : `<tr class="none"><td colspan="8">Nothing yet since the console started.</td></tr>`;
}

function drawSwap(swap) {
  $("swap-section").hidden = !swap;
  if (!swap) return;
  const rows = Object.entries(swap.workers || {});
  $("swap").tBodies[0].innerHTML = rows.map(([name, s]) => `<tr data-swap="${esc(s.model)}"><td>${esc(s.model)}</td><td>${esc(name)}</td><td class="state">${esc(s.state)}</td><td>${esc(s.waiting)}</td><td>${esc(s.in_flight)}</td><td>${esc(s.loads)}</td><td>${s.last_load ? `${esc(s.last_load.total_s)} s` : "–"}</td>
    <td><button data-act="load" data-target="${esc(s.model)}">Load</button> <button data-act="unload" data-target="${esc(s.model)}">Unload</button></td></tr>`).join("");
}

function usageRows(rows) {
  return (rows || []).length
    ? rows.map((u) => `<tr><td>${esc(u.user)}</td><td>${esc(u.model)}</td><td>${esc(u.requests)}</td><td>${esc(u.total_tokens)}</td></tr>`).join("")
    : `<tr class="none"><td colspan="4">No requests.</td></tr>`;
}

function drawUsage(usage) {
  $("usage-today").tBodies[0].innerHTML = usageRows(usage.today);
  $("usage-week").tBodies[0].innerHTML = usageRows(usage.week);
}

function drawAudit(audit) {
  $("audit").tBodies[0].innerHTML = (audit || []).filter((a) => a.phase === "done").map((a) => `<tr><td>${time(a.time)}</td><td>${esc(a.actor)} <span class="muted">${esc(a.via)}</span></td><td>${esc(a.action)}</td><td>${esc(a.target)}</td><td class="${a.ok ? "good" : "bad"}">${esc(a.message)}</td></tr>`).join("") || `<tr class="none"><td colspan="5">No actions yet.</td></tr>`;
}

function drawKeys() {
  $("keys").tBodies[0].innerHTML = state.keys.map((k) => `<tr data-key="${esc(k.id)}"><td><code>${esc(k.id)}</code></td><td>${esc(k.user)}</td><td>${dash(k.app)}</td><td>${dash(k.label)}</td><td>${time(k.created)}</td><td>${k.expires ? new Date(k.expires * 1000).toLocaleDateString() : "never"}</td><td class="state">${k.revoked ? "revoked" : k.active ? "active" : "expired"}</td>
    <td>${k.revoked ? "" : `<button data-act="revoke_key" data-target="${esc(k.id)}">Revoke</button>`}</td></tr>`).join("");
}

const DRAW = { warnings: drawWarnings, workers: drawWorkers, hosts: drawGpus, requests: drawRequests, swap: drawSwap, usage: drawUsage, audit: drawAudit };

function apply(sections) {
  state.doc = { ...(state.doc || {}), ...sections };
  for (const [name, draw] of Object.entries(DRAW)) {
    if (name in sections) draw(state.doc[name] ?? (name === "swap" ? null : []));
  }
  if (sections.fleet) $("fleet").textContent = sections.fleet;
  $("updated").textContent = `updated ${time(state.doc.time)}`;
}

// -- wiring ----------------------------------------------------------------------------------------------------

async function loadKeys() {
  const reply = await fetch("/console/api/keys");
  if (reply.ok) {
    state.keys = (await reply.json()).keys;
    drawKeys();
  }
}

function connect() {
  const source = new EventSource("/console/events");
  const link = $("link");
  source.addEventListener("open", () => { link.textContent = "live"; link.dataset.state = "live"; });
  source.addEventListener("error", () => { link.textContent = "reconnecting…"; link.dataset.state = "reconnecting"; });
  source.addEventListener("snapshot", (e) => { state.doc = null; apply(JSON.parse(e.data)); });
  source.addEventListener("patch", (e) => apply(JSON.parse(e.data)));
  source.addEventListener("end", () => { source.close(); window.location.href = "/console/login"; });
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-act]");
  if (!button) return;
  const { act: action, target } = button.dataset;
  const question = {
    restart: `Restart worker ${target}? Its requests in flight are cut.`,
    load: `Load model ${target}? Models on its GPUs may be evicted.`,
    unload: `Unload model ${target}? Its requests in flight finish first.`,
    revoke_key: `Revoke key ${target}? Clients using it are refused from now on.`,
  }[action];
  button.disabled = true;
  try { await act(action, target, {}, question); } finally { button.disabled = false; }
});

$("new-key").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const user = form.get("user");
  const extra = { label: form.get("label"), app: form.get("app"), expires_days: form.get("expires_days") };
  const body = await act("create_key", user, extra, `Create an API key for ${user}?`);
  if (body && body.key) {
    $("new-key-value").textContent = body.key;
    $("shown-once").showModal();
    event.target.reset();
  }
});

$("logout").addEventListener("click", async () => {
  await fetch("/console/logout", { method: "POST", headers: { "x-csrf-token": state.csrf } });
  window.location.href = "/console/login";
});

async function start() {
  const reply = await fetch("/console/api/session");
  if (!reply.ok) { window.location.href = "/console/login"; return; }
  const me = await reply.json();
  state.csrf = me.csrf;
  $("who").textContent = `${me.user} (${me.via})`;
  $("fleet").textContent = me.fleet;
  await loadKeys();
  connect();
}

start();
