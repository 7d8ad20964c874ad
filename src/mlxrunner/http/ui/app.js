// The page's start: read /health until the model is ready, show what it says, then open the loaded mode's panel.
import { errorMessage, showError } from "./api.js";
import { startChat } from "./chat.js";
import { startEmbeddings } from "./embeddings.js";
import { startImage } from "./image.js";

const PANELS = { llm: ["chat", startChat], imagegen: ["image", startImage], embedding: ["embeddings", startEmbeddings] };
const LOADING_POLL_MS = 500;
const READY_POLL_MS = 5000; // memory changes as jobs run

function formatBytes(bytes) {
  if (bytes == null) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

function showHealth(health) {
  const set = (id, text) => (document.getElementById(id).textContent = text);
  // A folder path shows as its folder's name (the whole path on hover); an Ollama name shows whole.
  const isPath = /^[/.~]|^[A-Za-z]:\\/.test(health.model);
  set("status-model", isPath ? health.model.replace(/[/\\]+$/, "").split(/[/\\]/).pop() : health.model);
  document.getElementById("status-model").title = health.model;
  set("status-mode", health.mode);
  const backend = health.backend;
  set("status-backend", backend ? `${backend.name} (${backend.device})` : "?");
  const memory = health.memory;
  const device = backend && backend.memory_bytes ? ` of ${formatBytes(backend.memory_bytes)}` : "";
  set("status-memory", `${formatBytes(memory.active_bytes)}${device} in use, peak ${formatBytes(memory.peak_bytes)}`);
}

function openPanel(health) {
  const [id, start] = PANELS[health.mode];
  document.getElementById("loading").hidden = true;
  document.getElementById(id).hidden = false;
  document.title = `${document.getElementById("status-model").textContent} · mlxrunner`;
  start(health);
}

async function readHealth() {
  const response = await fetch("/health", { cache: "no-store" });
  const text = await response.text();
  if (response.status === 500) throw new Error(`the model failed to load: ${errorMessage(text, "no reason given")}`);
  return JSON.parse(text);
}

async function watchHealth() {
  let opened = false;
  for (;;) {
    let delay = READY_POLL_MS;
    try {
      const health = await readHealth();
      if (health.status === "loading") {
        document.getElementById("load-progress").value = health.progress;
        delay = LOADING_POLL_MS;
      } else {
        showHealth(health);
        if (!opened) openPanel(health);
        opened = true;
      }
    } catch (error) {
      showError(error.message);
      if (!opened) return; // a failed load stays failed; a runner that went away is shown once
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

watchHealth();
