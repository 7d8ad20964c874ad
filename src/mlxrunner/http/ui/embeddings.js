// Embedding mode: sentences in (one a line), /v1/embeddings, and their pairwise cosine similarities as a heat map.
import { clearError, postJSON, showError } from "./api.js";

const $ = (id) => document.getElementById(id);

function cosine(a, b) {
  let dot = 0;
  let aa = 0;
  let bb = 0;
  for (let i = 0; i < a.length; i += 1) {
    dot += a[i] * b[i];
    aa += a[i] * a[i];
    bb += b[i] * b[i];
  }
  return dot / Math.max(Math.sqrt(aa * bb), 1e-30);
}

// -1 (blue) through 0 (white) to 1 (red), readable in either colour scheme with dark text.
function colour(similarity) {
  const strength = Math.min(Math.abs(similarity), 1);
  const hue = similarity >= 0 ? 8 : 215;
  return `hsl(${hue} 80% ${Math.round(97 - strength * 45)}%)`;
}

// A row is labelled with its sentence, a column with its number (the whole sentence on hover).
function header(sentence, n, scope) {
  const cell = document.createElement("th");
  cell.scope = scope;
  cell.textContent = scope === "row" ? `${n}. ${sentence}` : String(n);
  cell.title = sentence;
  return cell;
}

function showHeatmap(sentences, vectors) {
  const table = document.createElement("table");
  table.className = "heatmap";
  const caption = document.createElement("caption");
  caption.textContent = "Cosine similarity of each pair of sentences";
  const head = document.createElement("tr");
  head.append(document.createElement("td"), ...sentences.map((s, i) => header(s, i + 1, "col")));
  table.append(caption, head);
  sentences.forEach((sentence, i) => {
    const row = document.createElement("tr");
    row.append(header(sentence, i + 1, "row"));
    vectors.forEach((vector, j) => {
      const similarity = cosine(vectors[i], vector);
      const cell = document.createElement("td");
      cell.className = "cell";
      cell.textContent = similarity.toFixed(2);
      cell.dataset.similarity = String(similarity);
      cell.style.background = colour(similarity);
      cell.title = `${sentence}\n${sentences[j]}\ncosine ${similarity.toFixed(4)}`;
      row.append(cell);
    });
    table.append(row);
  });
  $("heatmap").replaceChildren(table);
}

async function compare() {
  clearError();
  const sentences = $("embeddings-input").value.split("\n").map((s) => s.trim()).filter(Boolean);
  $("embeddings-compare").disabled = true;
  $("embeddings-stats").textContent = "…";
  const started = performance.now();
  try {
    const response = await postJSON("/v1/embeddings", { input: sentences });
    const answer = await response.json();
    const vectors = answer.data.map((item) => item.embedding);
    showHeatmap(sentences, vectors);
    $("embeddings-stats").textContent =
      `${vectors.length} vectors of ${vectors[0].length} dimensions, ${answer.usage.prompt_tokens} tokens, ` +
      `${Math.round(performance.now() - started)} ms`;
  } catch (error) {
    $("embeddings-stats").textContent = "";
    showError(error.message);
  } finally {
    $("embeddings-compare").disabled = false;
  }
}

export function startEmbeddings() {
  $("embeddings-form").addEventListener("submit", (event) => {
    event.preventDefault();
    compare();
  });
}
