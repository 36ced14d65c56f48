// Search page: upload or drop a photo, POST it to /v1/search, show the top products.
"use strict";

const $ = (id) => document.getElementById(id);

function showMessage(text, isError) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

async function refreshStatus() {
  try {
    const r = await fetch("/readyz");
    const body = await r.json();
    $("index-status").textContent = body.ready
      ? `index ${body.version} · ${body.num_products} products · ${body.num_vectors} images`
      : "no index loaded yet";
    if (body.ready) fillGroupFields(body.fields || []);
  } catch (e) {
    $("index-status").textContent = "service unreachable";
  }
}

// Crowding: "at most N per <field>" (the index's metadata fields, from /readyz).
function fillGroupFields(fields) {
  const select = $("group-by");
  const chosen = select.value;
  select.replaceChildren();
  for (const name of ["", ...fields.filter((f) => f !== "product_id" && f !== "image_id")]) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name || "product";
    select.append(option);
  }
  select.value = chosen;
}

function renderResults(body) {
  const list = $("results");
  list.replaceChildren();
  for (const hit of body.results) {
    const item = document.createElement("li");
    item.className = "result";
    item.dataset.productId = hit.product_id;
    const img = document.createElement("img");
    img.src = hit.image_url;
    img.alt = hit.metadata.title || hit.product_id;
    img.loading = "lazy";
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `score ${hit.score.toFixed(3)}`;
    const details = document.createElement("dl");
    const fields = { product: hit.product_id, image: hit.image_id, ...hit.metadata };
    for (const [key, value] of Object.entries(fields)) {
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
      details.append(dt, dd);
    }
    item.append(img, score, details);
    list.append(item);
  }
  showMessage(`${body.results.length} results from index ${body.version} ` +
              `in ${Object.values(body.timings_ms).reduce((a, b) => a + b, 0).toFixed(0)} ms`);
  document.body.dataset.state = "results";
}

let lastFile = null;

async function search(file) {
  const text = $("text").value.trim();
  if (!file && !text) return;
  const preview = $("query-preview");
  if (file) {
    lastFile = file;
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
  } else {
    preview.hidden = true;
  }
  const form = new FormData();
  if (file) form.append("image", file, file.name || "query.jpg");
  if (text) form.append("text", text);
  form.append("k", $("k").value || "10");
  const category = $("category").value.trim();
  if (category) form.append("filters", JSON.stringify({ category }));
  const perGroup = $("max-per-group").value.trim();
  const groupBy = $("group-by").value;
  if (perGroup) form.append("max_per_group", perGroup);
  if (groupBy) form.append("group_by", groupBy);
  showMessage("searching…");
  document.body.dataset.state = "searching";
  try {
    const r = await fetch("/v1/search", { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) {
      const err = body.error || {};
      showMessage(`error ${r.status}: ${err.message || r.statusText}`, true);
      document.body.dataset.state = "error";
      return;
    }
    renderResults(body);
  } catch (e) {
    showMessage(`search failed: ${e}`, true);
    document.body.dataset.state = "error";
  }
}

$("file-input").addEventListener("change", (e) => search(e.target.files[0]));
// Words alone search the catalog's text; with a photo chosen they refine that photo.
$("text-search").addEventListener("click", () => search(lastFile));
$("text").addEventListener("keydown", (e) => { if (e.key === "Enter") search(lastFile); });
const zone = $("drop-zone");
zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  zone.classList.remove("dragging");
  search(e.dataTransfer.files[0]);
});
refreshStatus();
