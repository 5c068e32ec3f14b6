// edgeinspect inspector dashboard: plain JS, no build step. Talks to the REST API of the same server.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { token: null, models: [], model: null, test: null, uploads: [] };

function loadToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) { sessionStorage.setItem("edgeinspect-token", decodeURIComponent(m[1])); history.replaceState(null, "", "/"); }
  state.token = sessionStorage.getItem("edgeinspect-token");
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
  if (response.status === 401) { $("#auth").hidden = false; }
  if (!response.ok) { const err = new Error(body.error || response.statusText); err.status = response.status; throw err; }
  return body;
}

// what the browser opens by itself (<img>, links) cannot send the Authorization header: the token in the query
const withToken = (url) => state.token ? `${url}?access_token=${encodeURIComponent(state.token)}` : url;

function say(text) { $("#message").textContent = text || ""; }
const fmt = (x) => (x === null || x === undefined || Number.isNaN(x)) ? "-" : Number(x).toPrecision(4);
const isNok = (score, t) => (state.model && state.model.rule === ">=") ? score >= t : score > t;

// ------------------------------------------------------------------------------------------ model
async function refreshStatus(selectId) {
  const status = await api("/api/status");
  if (status.daemon && !state.stream) connectStream(status.daemon);
  $("#versions").textContent = `edgeinspect ${status.edgeinspect} · onnxruntime ${status.onnxruntime}`;
  state.models = status.models;
  const select = $("#model-select");
  select.innerHTML = "";
  for (const m of status.models) {
    const opt = document.createElement("option");
    opt.value = m.id; opt.textContent = `${m.id} (${m.family}, ${m.engine})`;
    select.appendChild(opt);
  }
  if (!status.models.length) { say("No model loaded: load a bundle by its path."); return; }
  const keep = selectId || (state.model && state.model.id) || status.models[0].id;
  select.value = status.models.some((m) => m.id === keep) ? keep : status.models[0].id;
  await selectModel(select.value);
}

async function selectModel(id) {
  state.model = state.models.find((m) => m.id === id);
  state.test = await api(`/api/models/${encodeURIComponent(id)}/test-scores`);
  showModel();
  setSliderRange(state.model.threshold);
  update();
}

function showModel() {
  const m = state.model;
  const metrics = Object.entries(m.metrics || {}).filter(([, v]) => typeof v === "number")
    .slice(0, 6).map(([k, v]) => `${k} ${fmt(v)}`).join(", ");
  const rows = [["bundle", m.bundle_id], ["family", m.family], ["task", m.task], ["engine", m.engine],
    ["engines", m.engines.join(", ")], ["category", m.category], ["path", m.path], ["metrics", metrics || "-"],
    ["threshold", `${fmt(m.threshold)}${m.override ? " (session override)" : ""}`]];
  $("#model-info").innerHTML = "";
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v ?? "-";
    $("#model-info").append(dt, dd);
  }
  $("#bundle-threshold").textContent = fmt(m.bundle_threshold);
  $("#test-note").textContent = state.test.error ? state.test.error
    : `${state.test.scores.length} images (${state.test.labels.filter(Boolean).length} defective)`;
}

// ------------------------------------------------------------------------------------------ threshold
function setSliderRange(value) {
  const scores = [...state.test.scores, ...state.uploads.filter((u) => u.result && u.result.raw_score !== undefined)
    .map((u) => u.result.raw_score), state.model.bundle_threshold, value];
  let lo = Math.min(...scores), hi = Math.max(...scores);
  const pad = (hi - lo) * 0.1 || Math.abs(hi) * 0.5 || 1;
  lo = state.model.task === "detections" ? Math.max(0, lo - pad) : lo - pad;
  hi = state.model.task === "detections" ? Math.min(1, hi + pad) : hi + pad;
  const slider = $("#threshold");
  slider.min = lo; slider.max = hi; slider.step = (hi - lo) / 1000; slider.value = value;
}

const sliderValue = () => Number($("#threshold").value);

function update() {
  if (!state.model) return;
  const t = sliderValue(), applied = state.model.threshold;
  $("#threshold-value").textContent = fmt(t);
  // test split: confusion at the slider, which images flip against the threshold in effect
  const { scores, labels } = state.test;
  let tp = 0, fp = 0, fn = 0, tn = 0, testFlips = 0;
  const grid = $("#test-grid");
  if (grid.children.length !== scores.length) {
    grid.innerHTML = "";
    scores.forEach((s, i) => { const cell = document.createElement("span"); cell.title = state.test.names[i]; grid.appendChild(cell); });
  }
  scores.forEach((s, i) => {
    const nok = isNok(s, t), flipped = nok !== isNok(s, applied);
    if (nok && labels[i]) tp++; else if (nok) fp++; else if (labels[i]) fn++; else tn++;
    if (flipped) testFlips++;
    const cell = grid.children[i];
    cell.className = [nok ? "nok" : "ok", labels[i] ? "defect" : "", flipped ? "flipped" : ""].join(" ");
    cell.title = `${state.test.names[i]}: ${fmt(s)} ${nok ? "NOK" : "OK"}`;
  });
  $("#precision").textContent = scores.length ? (tp + fp ? fmt(tp / (tp + fp)) : "-") : "-";
  $("#recall").textContent = scores.length ? (tp + fn ? fmt(tp / (tp + fn)) : "-") : "-";
  $("#confusion").textContent = scores.length ? `TP ${tp} FP ${fp} FN ${fn} TN ${tn}` : "";
  // uploads: the verdict at the slider
  let uploadFlips = 0;
  for (const u of state.uploads) {
    if (!u.result || u.result.verdict === "ERROR") continue;
    const verdict = isNok(u.result.raw_score, t) ? "NOK" : "OK";
    const flipped = verdict !== u.result.verdict;
    if (flipped) uploadFlips++;
    const badge = u.card.querySelector(".verdict");
    badge.textContent = verdict; badge.className = `verdict ${verdict}`;
    u.card.classList.toggle("flipped", flipped);
    u.card.querySelector(".at").textContent = flipped ? `was ${u.result.verdict}` : "";
  }
  $("#flips").textContent = `at the slider: ${testFlips} test image(s) and ${uploadFlips} upload(s) flip against `
    + `the threshold in effect (${fmt(applied)})`;
}

async function putThreshold(body) {
  try {
    const reply = await api(`/api/models/${encodeURIComponent(state.model.id)}/threshold`,
      { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    say(`threshold ${fmt(reply.threshold)}${reply.change.saved ? " saved to the bundle" : " for this session"}`
      + (reply.recorded ? " (recorded in the run registry)" : ""));
    Object.assign(state.model, reply);
    showModel();
    setSliderRange(reply.threshold);
    await Promise.all(state.uploads.map((u) => runUpload(u)));  // boxes and heatmaps at the new threshold
    update();
  } catch (e) { say(e.message); }
}

// ------------------------------------------------------------------------------------------ uploads
function addFiles(files) {
  for (const file of files) {
    const card = document.createElement("div");
    card.className = "card";
    card.innerHTML = `<div class="stage"><img class="photo" alt=""></div>
      <div class="line"><span class="name"></span><span class="at note"></span><span class="verdict">…</span></div>
      <div class="line note score"></div>`;
    card.querySelector(".name").textContent = file.name;
    card.querySelector(".photo").src = URL.createObjectURL(file);
    $("#results").prepend(card);
    const upload = { file, card, result: null };
    state.uploads.push(upload);
    runUpload(upload).then(() => { setSliderRange(sliderValue()); update(); });
  }
}

async function runUpload(upload) {
  const form = new FormData();
  form.append("image", upload.file, upload.file.name);
  form.append("model", state.model.id);
  const stage = upload.card.querySelector(".stage");
  stage.querySelectorAll(".heatmap, .box").forEach((el) => el.remove());
  try {
    upload.result = await api("/api/predict", { method: "POST", body: form });
  } catch (e) {
    upload.result = { verdict: "ERROR", error: e.message };
    const badge = upload.card.querySelector(".verdict");
    badge.textContent = "ERROR"; badge.className = "verdict ERROR";
    upload.card.querySelector(".score").textContent = e.message;
    return;
  }
  const r = upload.result, W = r.frame.width, H = r.frame.height;
  const place = (el, [x0, y0, x1, y1]) => Object.assign(el.style, {
    left: `${100 * x0 / W}%`, top: `${100 * y0 / H}%`, width: `${100 * (x1 - x0) / W}%`, height: `${100 * (y1 - y0) / H}%` });
  if (r.heatmap) {
    const heat = document.createElement("img");
    heat.className = "heatmap"; heat.alt = "anomaly heatmap";
    heat.src = "data:image/png;base64," + r.heatmap.png_base64;
    place(heat, r.heatmap.box);
    stage.appendChild(heat);
  }
  for (const region of r.regions) {
    const box = document.createElement("div");
    box.className = "box";
    box.innerHTML = "<span></span>";
    box.firstChild.textContent = `${region.label} ${fmt(region.score)}`;
    place(box, region.box);
    stage.appendChild(box);
  }
  upload.card.querySelector(".score").textContent =
    `score ${fmt(r.score)} · raw ${fmt(r.raw_score)} · ${r.regions.length} region(s) · ${fmt(r.latency_ms.inference)} ms`;
}

// ------------------------------------------------------------------------------------------ runs
async function refreshRuns() {
  const target = $("#runs");
  try {
    const { runs } = await api("/api/runs?limit=50");
    if (!runs.length) { target.textContent = "No runs recorded yet."; return; }
    const keys = ["image_auroc", "pixel_auroc", "f1", "pro"];
    const table = document.createElement("table");
    table.innerHTML = `<tr><th>run</th><th>command</th><th>family</th><th>category</th><th>status</th>`
      + `<th>started</th><th>s</th>${keys.map((k) => `<th>${k}</th>`).join("")}</tr>`;
    for (const run of runs) {
      const tr = document.createElement("tr");
      const metrics = run.metrics || {};
      const cells = [run.id, run.command, run.family, run.category, run.status,
        run.started && run.started.slice(0, 19).replace("T", " "),
        fmt(run.duration_s), ...keys.map((k) => fmt(metrics[k]))];
      for (const c of cells) { const td = document.createElement("td"); td.textContent = c ?? "-"; tr.appendChild(td); }
      if (run.error) tr.title = run.error;
      table.appendChild(tr);
      if (run.report_dir) table.appendChild(reportRow(run, 7 + keys.length));
    }
    target.innerHTML = ""; target.appendChild(table);
  } catch (e) { target.textContent = e.message; }
}

function reportRow(run, columns) {
  // a run's report (evaluate --report): its plots as thumbnails that open full size, and the HTML report
  const tr = document.createElement("tr"), td = document.createElement("td");
  tr.className = "report"; td.colSpan = columns; tr.appendChild(td);
  api(`/api/runs/${encodeURIComponent(run.id)}/report`).then((report) => {
    for (const file of report.files.filter((f) => f.name.endsWith(".png"))) {
      const link = document.createElement("a");
      link.href = withToken(file.url); link.target = "_blank"; link.rel = "noopener"; link.title = file.name;
      link.className = "plot";
      const img = document.createElement("img");
      img.src = link.href; img.alt = file.name; img.loading = "lazy";
      const caption = document.createElement("span"); caption.textContent = file.name.replace(/\.png$/, "");
      link.append(img, caption);
      td.appendChild(link);
    }
    if (report.html) {
      const link = document.createElement("a");
      link.href = withToken(report.html); link.target = "_blank"; link.rel = "noopener"; link.className = "html-report";
      link.textContent = "HTML report";
      td.appendChild(link);
    }
  }).catch((e) => { td.textContent = `report: ${e.message}`; td.className = "note"; });
  return tr;
}

// ------------------------------------------------------------------------------------------ live line
function connectStream(endpoint) {
  $("#live-panel").hidden = false;
  $("#live-source").textContent = endpoint;
  if (state.stream) state.stream.close();
  const query = state.token ? `?access_token=${encodeURIComponent(state.token)}` : "";
  const source = new EventSource("/api/stream" + query);
  state.stream = source;
  const counts = { OK: 0, NOK: 0, ERROR: 0 };
  const showNok = (list) => {
    const table = $("#live-nok");
    table.innerHTML = "<tr><th>camera</th><th>seq</th><th>score</th><th>regions</th><th>time</th></tr>";
    for (const v of list) {
      const tr = document.createElement("tr");
      for (const c of [v.camera, v.seq, fmt(v.score), (v.regions || []).length,
        v.publish_ts ? new Date(v.publish_ts * 1000).toLocaleTimeString() : "-"]) {
        const td = document.createElement("td"); td.textContent = c ?? "-"; tr.appendChild(td);
      }
      table.appendChild(tr);
    }
  };
  let noks = [];
  source.addEventListener("hello", (e) => {
    const hello = JSON.parse(e.data);
    noks = hello.last_nok; showNok(noks);
    $("#live-counts").textContent = `connected (${hello.received} message(s) before)`;
  });
  source.addEventListener("verdict", (e) => {
    const v = JSON.parse(e.data);
    counts[v.verdict] = (counts[v.verdict] || 0) + 1;
    $("#live-counts").textContent = `received OK ${counts.OK} · NOK ${counts.NOK} · ERROR ${counts.ERROR}`;
    const chip = document.createElement("span");
    chip.className = v.verdict; chip.textContent = `${v.camera}#${v.seq} ${v.verdict}`;
    $("#live-verdicts").prepend(chip);
    while ($("#live-verdicts").children.length > 40) $("#live-verdicts").lastChild.remove();
    if (v.verdict === "NOK") { noks = [v, ...noks].slice(0, 12); showNok(noks); }
  });
  source.addEventListener("status", (e) => {
    const st = JSON.parse(e.data);
    $("#live-source").textContent = `${endpoint} · ${st.state || ""}`;
  });
}

// ------------------------------------------------------------------------------------------ wiring
function wire() {
  $("#threshold").addEventListener("input", update);
  $("#apply").addEventListener("click", () => putThreshold({ threshold: sliderValue() }));
  $("#save").addEventListener("click", () => putThreshold({ threshold: sliderValue(), save: true }));
  $("#reset").addEventListener("click", () => putThreshold({ threshold: null }));
  $("#model-select").addEventListener("change", (e) => selectModel(e.target.value).catch((err) => say(err.message)));
  $("#file").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFiles(e.dataTransfer.files); });
  $("#load-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const m = await api("/api/models/load", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ path: $("#load-path").value }) });
      say(`loaded ${m.id}`); await refreshStatus(m.id);
    } catch (err) { say(err.message); }
  });
  $("#token-save").addEventListener("click", () => {
    sessionStorage.setItem("edgeinspect-token", $("#token").value); state.token = $("#token").value;
    $("#auth").hidden = true; start();
  });
}

async function start() {
  try { say(""); await refreshStatus(); } catch (e) { say(e.message); }
  refreshRuns();
}

loadToken();
wire();
start();
