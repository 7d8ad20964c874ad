// LLM mode: a chat through /v1/chat/completions (the model's own chat template), streamed as it is generated.
// The conversation lives in this page; Stop aborts the request, and the runner cancels the job when the
// connection closes.
import { clearError, isAbort, numberField, postJSON, RunnerError, showError, sseData } from "./api.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);

const conversation = []; // OpenAI messages: {role, content}
let running = null; // the AbortController of the request in flight

function addTurn(role) {
  const item = document.createElement("li");
  item.className = `turn ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : "model";
  const body = document.createElement("div");
  body.className = "body";
  item.append(who, body);
  const log = $("chat-log");
  log.append(item);
  log.scrollTop = log.scrollHeight; // a new turn is always shown
  return item;
}

function addUserTurn(text) {
  addTurn("user").querySelector(".body").textContent = text;
}

function isAtBottom(element) {
  return element.scrollHeight - element.scrollTop - element.clientHeight < 24; // px: within a line of the end
}

// The assistant's turn: its reasoning (Qwen3's <think>, in a fold) and its answer, re-rendered as text arrives:
// at most once a frame (`update`), since rendering the whole reply for each of thousands of tokens would keep
// the browser busy; `render` draws it now (the last time, once the reply has ended).
function addAssistantTurn() {
  const item = addTurn("assistant");
  const thinking = document.createElement("details");
  thinking.className = "thinking";
  thinking.hidden = true;
  thinking.innerHTML = "<summary>thinking</summary><div></div>";
  item.querySelector(".body").before(thinking);
  let frame = 0;
  return {
    item,
    content: "",
    reasoning: "",
    render() {
      cancelAnimationFrame(frame);
      frame = 0;
      const log = $("chat-log");
      const following = isAtBottom(log); // a reader who scrolled up to read is not pulled back down
      thinking.hidden = !this.reasoning;
      thinking.querySelector("div").textContent = this.reasoning;
      item.querySelector(".body").innerHTML = renderMarkdown(this.content);
      if (following) log.scrollTop = log.scrollHeight;
    },
    update() {
      frame ||= requestAnimationFrame(() => this.render());
    },
  };
}

function samplingFields() {
  const fields = {
    temperature: numberField($("chat-temperature")),
    top_p: numberField($("chat-top-p")),
    max_tokens: numberField($("chat-max-tokens")),
    seed: numberField($("chat-seed")),
  };
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined));
}

function requestMessages() {
  const system = $("chat-system").value.trim();
  return system ? [{ role: "system", content: system }, ...conversation] : [...conversation];
}

// The decode rate leaves out the first token, whose time is the prompt's processing.
function finalStats(usage, firstTokenMs, endMs) {
  const seconds = (endMs - firstTokenMs) / 1000;
  const rate = usage.completion_tokens > 1 && seconds > 0 ? (usage.completion_tokens - 1) / seconds : 0;
  return (
    `${usage.completion_tokens} tokens, ${rate.toFixed(1)} tokens/s, ` +
    `prompt ${usage.prompt_tokens} tokens, first token after ${Math.round(firstTokenMs)} ms`
  );
}

function setRunning(controller) {
  running = controller;
  $("chat-send").disabled = Boolean(controller);
  $("chat-stop").disabled = !controller;
  $("chat-clear").disabled = Boolean(controller);
}

async function send(text) {
  clearError();
  conversation.push({ role: "user", content: text });
  addUserTurn(text);
  const reply = addAssistantTurn();
  const controller = new AbortController();
  setRunning(controller);
  $("chat-stats").textContent = "…";
  const started = performance.now();
  let firstToken = null;
  let usage = null;
  let chunks = 0;
  try {
    const body = { messages: requestMessages(), stream: true, stream_options: { include_usage: true }, ...samplingFields() };
    const response = await postJSON("/v1/chat/completions", body, controller.signal);
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new RunnerError(event.error.message);
      if (event.usage) usage = event.usage;
      const delta = event.choices?.[0]?.delta ?? {};
      if (delta.content || delta.reasoning_content) {
        firstToken ??= performance.now() - started;
        chunks += 1;
        reply.content += delta.content ?? "";
        reply.reasoning += delta.reasoning_content ?? "";
        reply.update();
        const seconds = (performance.now() - started - firstToken) / 1000;
        if (seconds > 0) $("chat-stats").textContent = `≈${(chunks / seconds).toFixed(1)} tokens/s`;
      }
    }
    $("chat-stats").textContent = usage ? finalStats(usage, firstToken ?? 0, performance.now() - started) : "";
  } catch (error) {
    if (isAbort(error)) {
      reply.item.classList.add("stopped");
      $("chat-stats").textContent = "stopped";
    } else {
      reply.item.classList.add("failed");
      $("chat-stats").textContent = "";
      showError(error.message);
    }
  } finally {
    reply.render();
    // What was said stays in the conversation, a stopped answer too; a turn with no answer is taken back.
    if (reply.content || reply.reasoning) conversation.push({ role: "assistant", content: reply.content });
    else conversation.pop();
    setRunning(null);
  }
}

export function startChat() {
  const input = $("chat-input");
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || running) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { // not while an IME composes
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-stop").addEventListener("click", () => running?.abort());
  $("chat-clear").addEventListener("click", () => {
    conversation.length = 0;
    $("chat-log").replaceChildren();
    $("chat-stats").textContent = "";
    clearError();
  });
  input.focus();
}
