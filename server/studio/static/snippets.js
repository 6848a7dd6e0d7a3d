// A column's request as code a person can paste: curl and the openai Python client. They send exactly the
// request the column sent, minus what only the page needs (streaming, token ids), so they print the same text.
// The API key is never written into them: they read $TUNEVEC_API_KEY.

// The body of the request, as the snippets send it.
export function plainBody(req) {
  const body = { model: req.model };
  if (req.mode === "chat") body.messages = req.messages;
  else body.prompt = req.prompt;
  Object.assign(body, req.sampling);
  return body;
}

// A JSON text inside a single-quoted shell heredoc needs no escaping at all.
export function curlSnippet(req, root, keyed) {
  const path = req.mode === "chat" ? "/v1/chat/completions" : "/v1/completions";
  const lines = [`curl -sS ${root}${path} \\`, `  -H "Content-Type: application/json" \\`];
  if (keyed) lines.push(`  -H "Authorization: Bearer $TUNEVEC_API_KEY" \\`);
  lines.push("  -d @- <<'JSON'", JSON.stringify(plainBody(req), null, 2), "JSON");
  return lines.join("\n");
}

// Python literals: JSON strings and numbers are valid Python literals (\uXXXX and \n escapes included).
function py(value, indent) {
  if (Array.isArray(value)) {
    const pad = " ".repeat(indent + 4);
    return `[\n${value.map((v) => pad + py(v, indent + 4)).join(",\n")},\n${" ".repeat(indent)}]`;
  }
  if (value && typeof value === "object") {
    const items = Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${py(v, indent)}`);
    return `{${items.join(", ")}}`;
  }
  if (typeof value === "boolean") return value ? "True" : "False";
  if (value === null) return "None";
  return JSON.stringify(value);
}

export function pythonSnippet(req, root, keyed) {
  const body = plainBody(req);
  const args = Object.entries(body).map(([k, v]) => `    ${k}=${py(v, 4)},`);
  const call = req.mode === "chat" ? "client.chat.completions.create" : "client.completions.create";
  const out = req.mode === "chat" ? "response.choices[0].message.content" : "response.choices[0].text";
  const key = keyed ? 'os.environ["TUNEVEC_API_KEY"]' : '"-"';
  return [
    ...(keyed ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(root + "/v1")}, api_key=${key})`,
    `response = ${call}(`,
    ...args,
    ")",
    `print(${out})`,
  ].join("\n");
}
