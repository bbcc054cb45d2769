// The playground: a form generated from GET /models/{name}/schema, a job on the Segmind v2 routes
// (submit, poll the status, read the result), and its outputs, fetched with the API key.

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "sam3-serve-api-key";
const POLL_MS = 300;
const FINISHED = new Set(["COMPLETED", "FAILED"]);

let fields = []; // the generated parameter inputs: {name, read: async () => value or undefined}
let objectUrls = []; // blob: URLs of the shown outputs, revoked when the next job starts

// -- API calls: same-origin requests carry the key (presigned S3 URLs must not) -----------------

async function call(url, options = {}) {
  const headers = { ...options.headers };
  const key = $("api-key").value.trim();
  if (key && new URL(url, location.href).origin === location.origin) headers["x-api-key"] = key;
  return fetch(url, { ...options, headers });
}

async function callJson(url, options) {
  const response = await call(url, options);
  const body = await response.json().catch(() => ({}));
  // A FAILED job is HTTP 422 with its body: the caller reads the status.
  if (!response.ok && response.status !== 422) throw new Error(body.error ?? `HTTP ${response.status}`);
  return body;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function dataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function element(tag, properties = {}, ...children) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

// -- the form ----------------------------------------------------------------------------------

async function loadModels() {
  const select = $("model");
  try {
    const { models } = await callJson("/models");
    const chosen = select.value;
    select.replaceChildren(
      ...models.map((m) => element("option", { value: m.name, title: m.summary }, m.available ? m.name : `${m.name} (no weights)`)),
    );
    if (models.some((m) => m.name === chosen)) select.value = chosen;
    select.dataset.summaries = JSON.stringify(Object.fromEntries(models.map((m) => [m.name, m.summary])));
    showError("");
    await loadSchema();
  } catch (error) {
    showError(`Models: ${error.message} (is the API key set?)`);
  }
}

async function loadSchema() {
  const name = $("model").value;
  $("model-summary").textContent = JSON.parse($("model").dataset.summaries)[name];
  const { schema, mask_params: maskParams } = await callJson(`/models/${name}/schema`);
  fields = Object.entries(schema.properties).map(([param, property]) =>
    parameterField(param, property, maskParams.includes(param)),
  );
  $("params").replaceChildren(element("legend", {}, "Parameters"), ...fields.map((f) => f.label));
  $("params").dataset.model = name;
}

function parameterField(name, property, isMask) {
  // An optional parameter is anyOf [its type, null]: read the bounds from its non-null branch.
  const p = { ...(property.anyOf ?? []).find((option) => option.type !== "null"), ...property };
  const id = `param-${name}`;
  let input;
  let read;
  if (isMask) {
    input = element("input", { type: "file", accept: "image/*" });
    read = async () => (input.files[0] ? dataUri(input.files[0]) : undefined);
  } else if (p.enum) {
    const options = p.default == null ? [element("option", { value: "" }, "(server default)")] : [];
    input = element("select", {}, ...options, ...p.enum.map((v) => element("option", { value: v }, v)));
    input.value = p.default ?? "";
    read = async () => input.value || undefined;
  } else if (p.type === "boolean") {
    input = element("input", { type: "checkbox", checked: Boolean(p.default) });
    read = async () => input.checked;
  } else if (p.type === "number" || p.type === "integer") {
    input = element("input", { type: "number", step: p.type === "integer" ? "1" : "any", value: p.default ?? "" });
    if (p.minimum !== undefined) input.min = p.minimum;
    if (p.maximum !== undefined) input.max = p.maximum;
    read = async () => (input.value === "" ? undefined : Number(input.value));
  } else {
    const example = p.maxItems === 4 ? "[x1, y1, x2, y2]" : "[[x, y]]"; // one box, or a list of pairs
    input = element("input", { type: "text", placeholder: p.type === "array" ? `JSON, e.g. ${example}` : "" });
    read = async () => input.value.trim() || undefined;
  }
  input.id = id;
  input.name = name;
  const label = element("label", { htmlFor: id }, name, " ", input, element("small", {}, p.description ?? ""));
  return { name, read, label };
}

// -- a job -------------------------------------------------------------------------------------

function setStatus(state, text = state) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function clearResult() {
  objectUrls.forEach((url) => URL.revokeObjectURL(url));
  objectUrls = [];
  showError("");
  const viewer = $("viewer");
  viewer.hidden = true;
  delete viewer.dataset.loaded;
  viewer.removeAttribute("src");
  for (const id of ["images", "summary", "downloads"]) $(id).replaceChildren();
  $("downloads-title").hidden = true;
  $("response-details").hidden = true;
}

async function submit(event) {
  event.preventDefault();
  clearResult();
  setStatus("SUBMITTING", "Submitting…");
  $("submit").disabled = true;
  const started = performance.now();
  const elapsed = () => `${((performance.now() - started) / 1000).toFixed(1)} s`;
  const model = $("model").value;
  try {
    const file = $("image-file").files[0];
    const body = { image: file ? await dataUri(file) : $("image-url").value.trim() };
    if (!body.image) throw new Error("Upload an image or give its URL.");
    for (const field of fields) {
      const value = await field.read();
      if (value !== undefined) body[field.name] = value;
    }
    const job = await callJson(`/v2/${model}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    let status = job;
    while (!FINISHED.has(status.status)) {
      setStatus(status.status, `${status.status} · ${elapsed()}`);
      await sleep(POLL_MS);
      status = await callJson(job.status_url);
    }
    setStatus(status.status, `${status.status} in ${elapsed()}`);
    if (status.status === "FAILED") return showError(status.error);
    await showResult(await callJson(job.response_url));
  } catch (error) {
    setStatus("ERROR", "Error");
    showError(error.message);
  } finally {
    $("submit").disabled = false;
  }
}

// -- the result --------------------------------------------------------------------------------

function outputFiles(result) {
  // Every File object ({url, file_name, ...}), single or in a list, plus `output` when it is only a URL.
  const files = [];
  for (const [key, value] of Object.entries(result)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item?.url && item.file_name) files.push({ key, single: !Array.isArray(value), ...item });
    }
  }
  if (result.output && !files.some((f) => f.url === result.output)) {
    const name = decodeURIComponent(new URL(result.output, location.href).pathname.split("/").pop());
    files.unshift({ key: "output", single: true, url: result.output, file_name: name });
  }
  return files;
}

async function showResult(result) {
  $("response").textContent = JSON.stringify(result, null, 2);
  $("response-details").hidden = false;
  const files = outputFiles(result);
  let viewerSet = false; // the first GLB is the scene (`output`); individual GLBs are downloads only
  for (const file of files) {
    const response = await call(file.url);
    if (!response.ok) throw new Error(`${file.file_name}: HTTP ${response.status}`);
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    objectUrls.push(url);
    $("downloads").append(element("li", {}, element("a", { href: url, download: file.file_name }, file.file_name)));
    if (blob.type === "model/gltf-binary" && !viewerSet) {
      viewerSet = true;
      $("viewer").hidden = false;
      $("viewer").src = url;
    } else if (file.single && file.key !== "output" && blob.type.startsWith("image/")) {
      const image = element("img", { id: file.key, src: url, alt: file.key });
      $("images").append(element("figure", {}, image, element("figcaption", {}, file.key)));
    }
  }
  $("downloads-title").hidden = files.length === 0;
  if ("num_masks" in result) showMasks(result);
  if (Array.isArray(result.metadata)) showObjects(result.metadata);
  else if (result.metadata) {
    const people = element("p", { id: "people-count" }, `People: ${result.metadata.num_people}`);
    $("summary").append(people, element("pre", { id: "metadata" }, JSON.stringify(result.metadata, null, 2)));
  }
}

function showObjects(metadata) {
  // sam-3d-objects: one row per object, its pose in the PyTorch3D camera frame (rotation as w, x, y, z).
  const numbers = (values) => values.map((v) => v.toFixed(3)).join(", ");
  const rows = metadata.map((m) =>
    element(
      "tr",
      {},
      ...[m.object_index, m.score == null ? "(mask)" : m.score.toFixed(3), numbers(m.translation), numbers(m.rotation),
        numbers(m.scale), m.num_gaussians, m.num_faces].map((v) => element("td", {}, String(v))),
    ),
  );
  const titles = ["#", "score", "translation", "rotation (w, x, y, z)", "scale", "gaussians", "faces"];
  const head = element("tr", {}, ...titles.map((h) => element("th", {}, h)));
  $("summary").append(
    element("p", { id: "objects-count" }, `Objects: ${metadata.length}`),
    element("table", { id: "objects" }, head, ...rows),
    element("pre", { id: "metadata" }, JSON.stringify(metadata, null, 2)),
  );
}

function showMasks(result) {
  const rows = result.boxes.map((box, i) =>
    element(
      "tr",
      {},
      ...[i, box.map((v) => Math.round(v)).join(", "), result.scores[i].toFixed(3), result.areas[i], result.sources[i]].map(
        (v) => element("td", {}, String(v)),
      ),
    ),
  );
  const head = element("tr", {}, ...["#", "box (x1, y1, x2, y2)", "score", "area", "source"].map((h) => element("th", {}, h)));
  $("summary").append(element("p", { id: "mask-count" }, `Masks: ${result.num_masks}`), element("table", {}, head, ...rows));
}

// -- wiring ------------------------------------------------------------------------------------

$("api-key").value = localStorage.getItem(KEY_STORAGE) ?? "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  loadModels();
});
$("model").addEventListener("change", () => loadSchema().catch((error) => showError(error.message)));
$("image-file").addEventListener("change", () => {
  const file = $("image-file").files[0];
  $("image-thumb").hidden = !file;
  if (file) $("image-thumb").src = URL.createObjectURL(file);
});
$("viewer").addEventListener("load", () => ($("viewer").dataset.loaded = "true"));
$("viewer").addEventListener("error", (event) => showError(`3D viewer: ${event.detail?.type ?? "could not load the GLB"}`));
$("job-form").addEventListener("submit", submit);
loadModels();
