// Every data call of the page: the server root (the page may sit behind --root-path), the API key, OpenAI error
// bodies turned into readable messages, and server-sent event streams.

const KEY_STORAGE = "tunevec-studio-key";

// The server root is the page's own URL without its /tunevec/ part, so a proxy prefix is kept.
export const serverRoot = (() => {
  const path = window.location.pathname;
  const at = path.lastIndexOf("/tunevec/");
  return window.location.origin + (at >= 0 ? path.slice(0, at) : "");
})();

export const apiKey = {
  get() {
    return window.sessionStorage.getItem(KEY_STORAGE) || "";
  },
  set(key) {
    if (key) window.sessionStorage.setItem(KEY_STORAGE, key);
    else window.sessionStorage.removeItem(KEY_STORAGE);
  },
};

// An error the server (or the network) gave, with the status and the message a person should read.
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey.get();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
    else if (body && body.message) message = body.message;
    else if (body && body.detail) message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    // not JSON: the status line is all there is
  }
  if (response.status === 401) message += " — give the server's API key (button at the top)";
  return new ApiError(response.status, message);
}

async function send(path, options) {
  let response;
  try {
    response = await fetch(serverRoot + path, options);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `the server did not answer (${err.message}); is it still running?`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJson(path) {
  const response = await send(path, { headers: headers(false) });
  return response.json();
}

export async function postJson(path, body, signal) {
  const response = await send(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  return { json: await response.json(), headers: response.headers };
}

// POST a streaming request; calls onEvent(parsedJson) for each `data:` event until [DONE]. Returns the response
// headers (x-tunevec-left-out is among them).
export async function postStream(path, body, onEvent, signal) {
  const response = await send(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return response.headers;
        const parsed = JSON.parse(data);
        // vLLM reports an error that happens after the stream started as an event with an error body
        if (parsed.error) throw new ApiError(parsed.error.code || 500, parsed.error.message || "stream failed");
        onEvent(parsed);
      }
    }
  }
  return response.headers;
}

export async function getBlob(path) {
  const response = await send(path, { headers: headers(false) });
  return response.blob();
}

export async function getText(path) {
  const response = await send(path, { headers: headers(false) });
  return response.text();
}
