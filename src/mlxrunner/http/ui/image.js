// Image mode: /completion streams {"step", "total"} lines while denoising, then one line with the PNG.
// The progress bar follows the steps; Stop aborts the request and the runner cancels the job at its next step.
// FLUX.2 Klein takes reference images (dropped or chosen), sent as data: URLs.
import { clearError, isAbort, lines, numberField, postJSON, RunnerError, showError } from "./api.js";

const $ = (id) => document.getElementById(id);
const MAX_REFERENCES = 4; // the runner's limit (docs/protocol.md)

const references = []; // {name, dataUrl}
let running = null;

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function showReferences() {
  const list = $("reference-list");
  list.replaceChildren(
    ...references.map((reference, index) => {
      const item = document.createElement("li");
      const image = document.createElement("img");
      image.src = reference.dataUrl;
      image.alt = `reference image ${index + 1}: ${reference.name}`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `remove ${reference.name}`);
      remove.addEventListener("click", () => {
        references.splice(index, 1);
        showReferences();
      });
      item.append(image, remove);
      return item;
    }),
  );
}

async function addReferences(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    if (references.length >= MAX_REFERENCES) {
      showError(`at most ${MAX_REFERENCES} reference images`);
      break;
    }
    references.push({ name: file.name, dataUrl: await readAsDataUrl(file) });
  }
  showReferences();
}

function requestBody() {
  const fields = {
    prompt: $("image-prompt").value,
    negative_prompt: $("image-negative").value.trim() || undefined,
    width: numberField($("image-width")),
    height: numberField($("image-height")),
    steps: numberField($("image-steps")),
    seed: numberField($("image-seed")),
    images: references.length ? references.map((reference) => reference.dataUrl) : undefined,
  };
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined));
}

function pngUrl(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
}

function describe(done) {
  const t = done.timings ?? {};
  const ms = (value) => (value == null ? "?" : `${(value / 1000).toFixed(2)} s`);
  let text =
    `${done.width}×${done.height}, ${done.steps} steps, seed ${done.seed}; ` +
    `encode ${ms(t.encode_ms)}, denoise ${ms(t.denoise_ms)}, decode ${ms(t.decode_ms)}, total ${ms(t.total_ms)}`;
  if (done.ignored?.length) text += `; ignored by this model: ${done.ignored.join(", ")}`;
  if (done.prompt_truncated) text += "; the prompt was cut to the text encoder's length";
  return text;
}

function addToGallery(url, done, prompt) {
  const item = document.createElement("li");
  const image = document.createElement("img");
  image.src = url;
  image.alt = prompt;
  image.title = `${prompt} (seed ${done.seed})`;
  const download = document.createElement("a");
  download.href = url;
  download.download = `mlxrunner-${done.seed}.png`;
  download.textContent = "Download";
  item.append(image, download);
  $("gallery").prepend(item);
}

function showImage(done, prompt) {
  const url = pngUrl(done.image);
  $("image-result").src = url;
  $("image-result").alt = prompt;
  $("image-caption").textContent = describe(done);
  $("image-current").hidden = false;
  addToGallery(url, done, prompt);
}

function setRunning(controller) {
  running = controller;
  $("image-generate").disabled = Boolean(controller);
  $("image-stop").disabled = !controller;
}

function showStep(step, total) {
  $("image-progress").max = total;
  $("image-progress").value = step;
  $("image-step").textContent = `step ${step} of ${total}`;
}

async function generate() {
  clearError();
  const body = requestBody();
  const controller = new AbortController();
  setRunning(controller);
  showStep(0, 1);
  $("image-step").textContent = "encoding the prompt…";
  try {
    const response = await postJSON("/completion", body, controller.signal);
    for await (const line of lines(response)) {
      const message = JSON.parse(line);
      if (message.error) throw new RunnerError(message.error);
      if (message.done) {
        showImage(message, body.prompt);
        $("image-step").textContent = "done";
      } else {
        showStep(message.step, message.total);
      }
    }
  } catch (error) {
    if (isAbort(error)) {
      $("image-step").textContent = "stopped";
    } else {
      $("image-step").textContent = "";
      showError(error.message);
    }
  } finally {
    setRunning(null);
  }
}

export function startImage(health) {
  if (health.architecture.startsWith("Flux2")) {
    // FLUX.2 Klein edits: drop images on the zone, or choose them with the file input inside it.
    $("image-references").hidden = false;
    const zone = $("drop-zone");
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      addReferences(event.dataTransfer.files);
    });
    $("image-files").addEventListener("change", (event) => {
      addReferences(event.target.files);
      event.target.value = "";
    });
  }
  $("image-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!running) generate();
  });
  $("image-stop").addEventListener("click", () => running?.abort());
}
