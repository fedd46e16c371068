// The dashboard's script (served from this server: the page's CSP allows no inline script).
"use strict";
const $ = (id) => document.getElementById(id);

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
}
function size(n) {
  if (n == null) return "";
  const u = ["B","KiB","MiB","GiB","TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}
function when(iso) { return iso ? new Date(iso).toLocaleString() : ""; }

const KEY = "quantyard.apiKey";
function authHeaders(extra) {
  const key = sessionStorage.getItem(KEY);
  return Object.assign({}, extra || {}, key ? {"Authorization": "Bearer " + key} : {});
}
async function api(url, options) {
  options = options || {};
  const r = await fetch(url, Object.assign({}, options, {headers: authHeaders(options.headers)}));
  if (r.status === 401) { $("key").focus(); throw new Error("paste an API key (quantyard keys create) and press 'use key'"); }
  return r;
}
async function getJSON(url) {
  const r = await api(url, {headers: {"Accept": "application/json"}});
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
  return body;
}
// A link cannot carry the Authorization header: fetch the bytes (the redirect to a presigned
// URL on S3 is followed without it) and hand them to the browser as a file.
async function download(id, name) {
  const r = await api(`/v1/artifacts/${encodeURIComponent(id)}/download`);
  if (!r.ok) { const b = await r.json().catch(() => ({})); alert((b.error && b.error.message) || r.statusText); return; }
  const url = URL.createObjectURL(await r.blob());
  const a = document.createElement("a"); a.href = url; a.download = name || id; a.click();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

function jobRow(j) {
  const pct = Math.round((j.progress || 0) * 100);
  const targets = (j.targets || []).map((t) =>
    `<span title="${esc(t.status)}">${esc(t.format)}:${esc(t.quantization)} <span class="badge ${esc(t.status)}">${esc(t.status)}</span></span>`).join("<br>");
  let details = "";
  if (j.error) details += `<div class="err">${esc(j.error.code)}: ${esc(j.error.message)}</div>`;
  if (j.waiting_reason) details += `<div class="muted">${esc(j.waiting_reason)}</div>`;
  else if (j.progress_message && j.status === "running") details += `<div class="muted">${esc(j.progress_message)}</div>`;
  if ((j.artifact_ids || []).length) details += j.artifact_ids.map((a) =>
    `<a href="/v1/artifacts/${encodeURIComponent(a)}/download" data-download="${esc(a)}">download</a>`).join(" ");
  const cancel = (j.status === "queued" || j.status === "running") && !j.cancel_requested
    ? `<button data-cancel="${esc(j.id)}">cancel</button>` : (j.cancel_requested && j.status === "running" ? '<span class="muted">cancelling…</span>' : "");
  return `<tr class="${esc(j.status)}">
    <td><code>${esc(j.id)}</code></td>
    <td><span class="badge ${esc(j.status)}">${esc(j.status)}</span></td>
    <td><span class="bar ${j.status === "succeeded" ? "done" : ""}"><span data-pct="${pct}"></span></span> ${pct}%</td>
    <td>${targets}</td>
    <td>${esc(j.hardware_class)}</td>
    <td class="muted">${esc(when(j.created_at))}</td>
    <td class="wrap">${details}</td>
    <td>${cancel}</td></tr>`;
}

function artifactRow(a) {
  return `<tr>
    <td><code>${esc(a.id)}</code><div class="muted">${esc(a.filename)}</div></td>
    <td>${esc(a.format)}</td><td>${esc(a.quantization)}</td><td>${esc(size(a.size_bytes))}</td>
    <td><code title="${esc(a.sha256)}">${esc((a.sha256 || "").slice(0, 12))}…</code></td>
    <td><code>${esc(a.source_id)}</code></td>
    <td class="muted">${esc(when(a.created_at))}</td>
    <td><a href="/v1/artifacts/${encodeURIComponent(a.id)}/download" data-download="${esc(a.id)}" data-name="${esc(a.filename)}">download</a></td></tr>`;
}

async function refreshJobs() {
  const status = $("job-status").value;
  const q = new URLSearchParams({limit: "50"}); if (status) q.set("status", status);
  const data = await getJSON("/v1/jobs?" + q);
  $("jobs").innerHTML = data.items.length ? data.items.map(jobRow).join("")
    : '<tr><td colspan="8" class="muted">no jobs yet — submit one with <code>quantyard submit</code> or POST /v1/jobs</td></tr>';
  // Widths through the CSSOM: the page's CSP refuses inline style attributes.
  for (const bar of $("jobs").querySelectorAll("[data-pct]")) bar.style.width = bar.dataset.pct + "%";
}

async function refreshArtifacts() {
  const q = new URLSearchParams({limit: "50"}); const text = $("art-q").value.trim(); if (text) q.set("q", text);
  const data = await getJSON("/v1/artifacts?" + q);
  $("artifacts").innerHTML = data.items.length ? data.items.map(artifactRow).join("")
    : '<tr><td colspan="8" class="muted">no artifacts</td></tr>';
}

async function refreshCaps() {
  try {
    const c = await getJSON("/v1/capabilities");
    const hw = (c.hardware_classes || []).map((h) => typeof h === "string" ? h : `${h.name}: ${h.live_workers} worker(s)`).join(", ");
    $("caps").textContent = `${c.engine_version || ""} · ${hw}`;
  } catch (e) { /* capabilities are decoration */ }
}

async function tick() {
  try {
    await Promise.all([refreshJobs(), refreshArtifacts()]);
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("status").textContent = "error: " + e.message;
  }
}

document.addEventListener("click", async (ev) => {
  const dl = ev.target.getAttribute && ev.target.getAttribute("data-download");
  if (dl) { ev.preventDefault(); download(dl, ev.target.getAttribute("data-name")); return; }
  const id = ev.target.getAttribute && ev.target.getAttribute("data-cancel");
  if (!id) return;
  ev.target.disabled = true;
  try {
    const r = await api(`/v1/jobs/${encodeURIComponent(id)}/cancel`, {method: "POST"});
    if (!r.ok) { const b = await r.json().catch(() => ({})); alert((b.error && b.error.message) || r.statusText); }
  } finally { tick(); }
});
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("key").value.trim();
  if (key) sessionStorage.setItem(KEY, key);
  $("key").value = ""; $("key").placeholder = key ? "key set for this tab" : "API key (qy_…)";
  refreshCaps(); tick();
});
$("forget").addEventListener("click", () => { sessionStorage.removeItem(KEY); $("key").placeholder = "API key (qy_…)"; tick(); });
if (sessionStorage.getItem(KEY)) $("key").placeholder = "key set for this tab";
$("job-status").addEventListener("change", tick);
$("art-q").addEventListener("input", () => { clearTimeout(window._qt); window._qt = setTimeout(tick, 300); });

refreshCaps(); setInterval(refreshCaps, 15000);
tick(); setInterval(tick, 2000);
