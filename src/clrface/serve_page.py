"""The one page of ``clrface serve``: a form, two images and a table of per-face identity scores; its script
POSTs the chosen file's raw bytes to /api/restore (see clrface.serve)."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clrface</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px system-ui,sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
fieldset{border:1px solid #ccc;display:flex;flex-wrap:wrap;gap:1em;align-items:end}
label{display:flex;flex-direction:column;font-size:13px;gap:.2em}
input[type=number]{width:6em} button{font-size:15px;padding:.4em 1.2em}
[hidden]{display:none !important}
#pair{display:grid;grid-template-columns:1fr 1fr;gap:1em;margin-top:1em}
@media (max-width:600px){#pair{grid-template-columns:1fr}}
#facebox{overflow-x:auto}
figure{margin:0} figure img{width:100%;max-height:70vh;object-fit:contain;background:#eee}
figcaption{font-size:13px;color:#555}
#error{color:#b00020;white-space:pre-wrap} #status{color:#555}
table{border-collapse:collapse;margin-top:1em} td,th{border:1px solid #ddd;padding:.3em .6em;text-align:center}
td img{width:96px;height:96px}
</style></head><body>
<h1>clrface &mdash; face restoration</h1>
<p id="model" class="small"></p>
<fieldset id="form"><legend>Photo and options</legend>
<label>Photo <input id="file" type="file" accept="image/*"></label>
<label title="clean photos of the same person: the face that matches them is guided toward their identity (mode full)">
Reference photos (optional) <input id="ref" type="file" accept="image/*" multiple></label>
<label>Fidelity <span><input id="fidelity" type="range" min="0" max="1" step="0.05" value="0.5">
 <output id="fidout">0.5</output></span></label>
<label>Steps <input id="steps" type="number" min="1" max="100" value="20"></label>
<label>Seed <input id="seed" type="number" value="0"></label>
<label>Mode <select id="mode"></select> <span id="modenote" hidden>reference photos: mode full</span></label>
<label title="the photo is already an FFHQ-aligned face crop: no detection">Aligned crop
 <input id="aligned" type="checkbox"></label>
<button id="restore" type="button">Restore</button>
</fieldset>
<p id="hint" style="font-size:13px;color:#555">Fidelity, steps and seed act in modes full and prior (the diffusion
sampler); irn and direct ignore them. High fidelity stays close to the input's identity, low lets the prior
regenerate more. Restores run one at a time on this machine, and each is bounded in work: faces &times;
network evaluations per face (1, plus the sampler's evaluations in modes full and prior: heun 2 &times; steps
&minus; 1) may not exceed <span id="maxeval">the server's limit</span>.</p>
<p id="status" aria-live="polite"></p><p id="error" role="alert"></p>
<div id="pair" hidden>
<figure><img id="before" alt="input"><figcaption>input (as the model read it)</figcaption></figure>
<figure><img id="after" alt="restored">
<figcaption>restored &mdash; <a id="download" download="restored.png">download PNG</a></figcaption></figure>
</div>
<div id="facebox"><table id="faces" hidden><thead><tr><th>face</th><th>input crop</th><th>restored</th>
<th title="cosine of face-recognition embeddings, restored vs input">identity vs input</th>
<th title="restored vs the Identity Recovery Network's output">identity vs IRN</th>
<th title="whether the reference photos guided this face, and its input's identity cosine to them">reference</th>
</tr></thead><tbody></tbody></table></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let info = null, lastUrl = null;
const DESCR = {full: "full: IRN + diffusion prior + identity guidance", prior: "prior: diffusion prior only",
  irn: "irn: Identity Recovery Network only", direct: "direct: VQGAN reconstruction"};
function b64blob(b64) {
  const s = atob(b64), a = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
  return new Blob([a], {type: "image/png"});
}
const png = (b64) => "data:image/png;base64," + b64;
$("fidelity").addEventListener("input", () => { $("fidout").textContent = $("fidelity").value; });
// reference photos guide the identity in mode full only: the request is made in that mode, and the menu says so
$("ref").addEventListener("change", () => {
  const refs = $("ref").files.length > 0;
  if (refs) $("mode").value = "full";
  $("mode").disabled = refs; $("modenote").hidden = !refs;
});
function clearResult() {
  $("pair").hidden = true; $("faces").hidden = true; $("status").textContent = ""; $("error").textContent = "";
}
fetch("api/info").then((r) => r.json()).then((j) => {
  info = j;
  const d = j.defaults;
  $("model").textContent = "model: " + j.model + " on " + j.device + "; uploads up to " +
    Math.round(j.limits.max_bytes / 1048576) + " MB and " + (j.limits.max_pixels / 1e6) + " MP";
  $("maxeval").textContent = String(j.limits.max_evaluations);
  for (const m of j.modes) {
    const o = document.createElement("option");
    o.value = m; o.textContent = DESCR[m] || m; o.selected = m === d.mode;
    o.disabled = m === "irn" && !j.has_irn;
    $("mode").append(o);
  }
  $("fidelity").value = d.fidelity; $("fidout").textContent = d.fidelity;
  $("steps").value = d.steps; $("steps").max = j.limits.max_steps; $("seed").value = d.seed;
}).catch((e) => { $("error").textContent = "cannot reach the server: " + e; });
$("restore").addEventListener("click", async () => {
  const f = $("file").files[0];
  clearResult();  // a new request: no earlier result stays on screen beside its status or error
  if (!f) { $("error").textContent = "choose a photo first"; return; }
  const refs = Array.from($("ref").files);
  const total = refs.reduce((n, r) => n + r.size, f.size);
  if (info && total > info.limits.max_bytes) {
    $("error").textContent = "files too large: " + (total / 1048576).toFixed(1) + " MB (limit " +
      Math.round(info.limits.max_bytes / 1048576) + " MB)";
    return;
  }
  const mode = refs.length ? "full" : $("mode").value;
  const q = new URLSearchParams({mode: mode, aligned: $("aligned").checked ? "1" : "0"});
  if (mode === "full" || mode === "prior") {  // the sampling modes read them; irn and direct would warn
    for (const k of ["fidelity", "steps", "seed"]) q.set(k, $(k).value);
  }
  let body = f, headers = {"Content-Type": "application/octet-stream"};
  if (refs.length) {  // photo and references as one multipart form (the browser sets its boundary)
    body = new FormData(); headers = {};
    body.append("photo", f);
    for (const r of refs) body.append("reference", r);
  }
  $("form").disabled = true;  // the options shown stay those of the restore under way
  $("status").textContent = "restoring…";
  const t0 = performance.now();
  const tick = setInterval(() => { $("status").textContent = "restoring… " +
    ((performance.now() - t0) / 1000).toFixed(0) + " s"; }, 250);
  try {
    const r = await fetch("api/restore?" + q, {method: "POST", body: body, headers: headers}).catch(() => {
      throw new Error("the server did not answer: is clrface serve still running?");
    });
    const j = await r.json().catch(() => ({error: "HTTP " + r.status}));
    if (!r.ok) throw new Error(j.error || ("HTTP " + r.status));
    $("before").src = png(j.input);
    if (lastUrl) URL.revokeObjectURL(lastUrl);
    lastUrl = URL.createObjectURL(b64blob(j.image));
    $("after").src = lastUrl; $("download").href = lastUrl;
    $("download").download = f.name.replace(/\\.[^.]*$/, "") + "_" + j.options.mode + ".png";
    $("pair").hidden = false;
    const tb = $("faces").tBodies[0];
    tb.replaceChildren();
    for (const fc of j.faces) {
      const tr = tb.insertRow();
      tr.insertCell().textContent = fc.index;
      for (const [b, what] of [[fc.crop_in, "input crop"], [fc.crop_out, "restored"]]) {
        const im = document.createElement("img"); im.src = png(b); im.alt = "face " + fc.index + ", " + what;
        tr.insertCell().append(im);
      }
      tr.insertCell().textContent = fc.id_vs_input.toFixed(3);
      tr.insertCell().textContent = fc.id_vs_irn.toFixed(3);
      const ref = fc.reference;
      tr.insertCell().textContent = ref ? (ref.used ? "used" : "not used") + " (input vs reference " +
        ref.cos_input_vs_reference.toFixed(3) + ")" : "–";
    }
    $("faces").hidden = j.faces.length === 0;
    const s = j.sampling, what = f.name + ": ";
    const how = j.no_face ? "" : "; mode " + j.options.mode + (s.nfe ? ", " + s.nfe + " network evaluations per face" +
      " (start noise " + Number(s.sigma_start).toFixed(2) + ", identity guidance " + s.guidance_scale + ")" : "");
    const warnings = j.warnings.filter((w) => !w.startsWith("no face found"));
    $("status").textContent = what + (j.no_face ? "no face found: the photo is returned unchanged" :
      j.faces.length + " face(s) restored") + " in " + j.seconds.toFixed(1) + " s" + how + "." +
      (warnings.length ? " Warning: " + warnings.join(" ") : "");
  } catch (e) {
    clearResult();
    $("error").textContent = String(e.message || e);
  } finally {
    clearInterval(tick);
    $("form").disabled = false;
    $("mode").disabled = $("ref").files.length > 0;
    $("restore").focus();  // keyboard users continue where they were
  }
});
</script></body></html>
"""
