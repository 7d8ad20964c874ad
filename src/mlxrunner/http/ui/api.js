// Talking to the runner: JSON requests, its error bodies in each of their shapes, streams read line by line.

// The message of an error body: ours ({"error": "..."}), OpenAI's ({"error": {"message": ...}}) or plain text.
export function errorMessage(text, fallback) {
  try {
    const error = JSON.parse(text).error;
    if (typeof error === "string") return error;
    if (error && typeof error.message === "string") return error.message;
  } catch {
    // not JSON: the body is the message
  }
  return text.trim() || fallback;
}

export class RunnerError extends Error {}

// POST a JSON body; the response if it is a 200, else a RunnerError with the server's message.
export async function postJSON(path, body, signal) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) {
    const text = await response.text();
    throw new RunnerError(errorMessage(text, `${response.status} ${response.statusText}`));
  }
  return response;
}

// Each line of a streamed body as it arrives (NDJSON lines, or server-sent event lines).
export async function* lines(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += value;
    const parts = pending.split("\n");
    pending = parts.pop();
    for (const line of parts) if (line.trim()) yield line;
  }
  if (pending.trim()) yield pending;
}

// The data of each server-sent event (OpenAI's streams), "[DONE]" included.
export async function* sseData(response) {
  for await (const line of lines(response)) {
    if (line.startsWith("data: ")) yield line.slice("data: ".length);
  }
}

// The value of a number field, or undefined when it is empty (the server then uses its default).
export function numberField(input) {
  return input.value.trim() === "" ? undefined : Number(input.value);
}

// An error box shared by the whole page: the server's message, as it said it.
const errorBox = () => document.getElementById("error");

export function showError(message) {
  errorBox().textContent = message;
  errorBox().hidden = false;
}

export function clearError() {
  errorBox().hidden = true;
  errorBox().textContent = "";
}

export const isAbort = (error) => error.name === "AbortError";
