// The steering studio: the base and up to three mixtures side by side, on one prompt and one set of sampling
// settings. State lives in `state`; the DOM is built from it with `h()` (text is always set as text, never parsed
// as HTML). Every server call goes through api.js, with the API key.

import { ApiError, apiKey, getJson, postJson, postStream, serverRoot } from "./api.js";
import { openReport } from "./report.js";
import { curlSnippet, plainBody, pythonSnippet } from "./snippets.js";
import { componentsFromJson, specText } from "./spec.js";
import { makeTip, renderTokens, scoreAnswer } from "./tokens.js";

const MAX_MIXTURES = 3;
const LABELS = ["A", "B", "C", "D", "E", "F"];
const DESCRIBE_DELAY_MS = 200;
const DEFAULT_PROMPT = {
  chat: "What is the generic name of the drug \"Zoloft\"?",
  completion: "Question: What is the generic name of the drug \"Zoloft\"?\nAnswer:",
};

const $ = (id) => document.getElementById(id);

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

const state = {
  session: null,
  mixtures: [], // {id, label, components: [{vector, scope, layers, alpha}], describe, describeError, result}
  base: { result: null },
  nextId: 1,
  controller: null,
};
const tip = makeTip($("tip"));

// ----------------------------------------------------------------------------------------------- start-up, key

async function start() {
  setStatus("connecting…");
  try {
    // Whether this server wants a key is the one thing the page can learn without one; asking first means a
    // missing key is a form to fill, not a failed request.
    const info = await getJson("/tunevec/server.json");
    if (info.api_key_required && !apiKey.get()) {
      askForKey(null);
      return;
    }
  } catch (err) {
    setStatus(`Cannot reach the server: ${err.message}`, true);
    return;
  }
  try {
    state.session = await getJson("/v1/tunevec/studio");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      askForKey(apiKey.get() ? "The API key was not accepted. Give the server's API key." : null);
      return;
    }
    setStatus(`Cannot start: ${err.message}`, true);
    return;
  }
  $("key-form").hidden = true;
  $("key-button").hidden = !state.session.api_key_required;
  $("studio").hidden = false;
  const s = state.session;
  setStatus(
    `model ${s.served_model_name} · ${s.vectors.length} vector${s.vectors.length === 1 ? "" : "s"} · ` +
      `${s.num_layers ?? "?"} layers · |α| ≤ ${s.limits.max_abs_alpha} · ` +
      `${s.api_key_required ? "API key in use" : "no API key"}`,
  );
  if (!state.mixtures.length && s.vectors.length) {
    addMixture([{ vector: s.vectors[0].name, scope: "all", layers: null, alpha: 1 }]);
  }
  renderColumns();
  renderLibrary();
}

function askForKey(message) {
  $("studio").hidden = true;
  $("key-form").hidden = false;
  if (message) $("key-message").textContent = message;
  setStatus("waiting for the API key");
  $("key-input").focus();
}

function setStatus(text, error = false) {
  const el = $("server-status");
  el.textContent = text;
  el.classList.toggle("error", error);
}

// ---------------------------------------------------------------------------------------------------- mixtures

function addMixture(components) {
  const used = new Set(state.mixtures.map((m) => m.label));
  const label = LABELS.find((l) => !used.has(l));
  const mixture = { id: state.nextId++, label, components, describe: null, describeError: null, result: null };
  state.mixtures.push(mixture);
  scheduleDescribe(mixture);
  return mixture;
}

function cardOf(name) {
  return state.session.vectors.find((v) => v.name === name);
}

function mixtureSpec(m) {
  return specText(m.components.filter((c) => Number.isFinite(c.alpha)));
}

function invalidAlpha(m) {
  return m.components.find((c) => !Number.isFinite(c.alpha));
}

function scheduleDescribe(m) {
  clearTimeout(m.timer);
  m.timer = setTimeout(() => describe(m), DESCRIBE_DELAY_MS);
}

// What the server would run for this mixture: its canonical form, rank, and what it leaves out; or its refusal.
async function describe(m) {
  const spec = mixtureSpec(m);
  const seq = (m.describeSeq = (m.describeSeq || 0) + 1);
  if (invalidAlpha(m)) {
    m.describe = null;
    m.describeError = "α must be a number";
  } else if (!spec) {
    m.describe = null;
    m.describeError = "empty mixture: give some vector an α other than 0";
  } else {
    try {
      const { json } = await postJson("/v1/tunevec/describe", { spec });
      if (seq !== m.describeSeq) return; // a newer edit is on its way
      m.describe = json;
      m.describeError = null;
    } catch (err) {
      if (seq !== m.describeSeq) return;
      m.describe = null;
      m.describeError = err.message;
    }
  }
  renderDescribe(m);
}

// ----------------------------------------------------------------------------------------------------- columns

function renderColumns() {
  const columns = $("columns");
  columns.replaceChildren(baseColumn(), ...state.mixtures.map(mixtureColumn));
  columns.style.setProperty("--count", String(1 + state.mixtures.length));
  $("add-mixture").disabled = state.mixtures.length >= MAX_MIXTURES || !state.session.vectors.length;
  for (const m of state.mixtures) renderDescribe(m);
  if (state.base.result) renderResult("base", state.base.result);
  for (const m of state.mixtures) if (m.result) renderResult(`mix-${m.id}`, m.result);
  renderSnippets();
}

function baseColumn() {
  const name = state.session.served_model_name;
  const col = h(
    "article",
    { class: "column", id: "column-base", "aria-labelledby": "title-base" },
    h("header", { class: "column-head" }, h("h3", { id: "title-base", text: "Base" })),
    h("p", { class: "spec-line" }, h("span", { class: "spec-label", text: "model" }), h("code", { text: name })),
    h("p", { class: "note", text: "The base model, no vector: what every mixture is compared with." }),
    outputBlock("base"),
    snippetBlock("base"),
  );
  return col;
}

function mixtureColumn(m) {
  const id = `mix-${m.id}`;
  const vectors = state.session.vectors;
  const variants = Object.entries(state.session.variants || {});
  const col = h(
    "article",
    { class: "column", id: `column-${id}`, "aria-labelledby": `title-${id}`, dataset: { mixture: m.label } },
    h(
      "header",
      { class: "column-head" },
      h("h3", { id: `title-${id}`, text: `Mixture ${m.label}` }),
      h("button", {
        type: "button",
        class: "quiet",
        text: "Remove",
        "aria-label": `Remove mixture ${m.label}`,
        onclick: () => {
          state.mixtures = state.mixtures.filter((x) => x !== m);
          renderColumns();
          $("add-mixture").focus();
        },
      }),
    ),
    h(
      "div",
      { class: "spec-line" },
      h("span", { class: "spec-label", id: `spec-label-${id}`, text: "spec" }),
      h("code", { class: "spec-text", id: `spec-${id}`, "aria-labelledby": `spec-label-${id}`, "aria-live": "polite" }),
      copyButton(() => mixtureSpec(m), `Copy the spec of mixture ${m.label}`),
    ),
    variants.length
      ? h(
          "label",
          { class: "variant-pick" },
          "named variant ",
          h(
            "select",
            {
              onchange: (event) => {
                const v = state.session.variants[event.target.value];
                if (!v) return;
                m.variant = event.target.value;
                m.components = componentsFromJson(v.json);
                renderColumns();
                scheduleDescribe(m);
              },
            },
            h("option", { value: "", text: "—" }),
            variants.map(([name, v]) =>
              h("option", {
                value: name,
                text: `${name} (${v.canonical})`,
                // still that variant while the spec is unchanged
                selected: m.variant === name && mixtureSpec(m) === v.canonical,
              }),
            ),
          ),
        )
      : null,
    h(
      "ol",
      { class: "components", "aria-label": `Components of mixture ${m.label}` },
      m.components.map((c, i) => componentRow(m, c, i)),
    ),
    h("button", {
      type: "button",
      class: "quiet add-component",
      text: "Add vector",
      disabled: m.components.length >= state.session.limits.max_components || !vectors.length,
      onclick: () => {
        const unused = vectors.find((v) => !m.components.some((c) => c.vector === v.name)) || vectors[0];
        m.components.push({ vector: unused.name, scope: "all", layers: null, alpha: 1 });
        renderColumns();
        scheduleDescribe(m);
        const rows = document.querySelectorAll(`#column-${id} .component`);
        rows[rows.length - 1]?.querySelector("select")?.focus();
      },
    }),
    h("div", { class: "describe", id: `describe-${id}`, "aria-live": "polite" }),
    outputBlock(id),
    snippetBlock(id),
  );
  updateSpecText(m, col);
  return col;
}

function componentRow(m, c, i) {
  const id = `mix-${m.id}-c${i}`;
  const card = cardOf(c.vector);
  const max = state.session.limits.max_abs_alpha;
  const layersMax = state.session.num_layers ?? "";
  const name = `Mixture ${m.label}, vector ${i + 1}`;
  const changed = () => {
    updateSpecText(m);
    renderSnippets();
    scheduleDescribe(m);
  };
  const slider = h("input", {
    type: "range",
    class: "alpha-slider",
    id: `${id}-slider`,
    min: -max,
    max,
    step: 0.05,
    value: Number.isFinite(c.alpha) ? c.alpha : 0,
    "aria-label": `${name}: α (slider)`,
  });
  const number = h("input", {
    type: "number",
    class: "alpha-number",
    id: `${id}-alpha`,
    step: 0.05,
    value: Number.isFinite(c.alpha) ? String(c.alpha) : "",
    "aria-label": `${name}: α`,
  });
  slider.addEventListener("input", () => {
    c.alpha = Number(slider.value);
    number.value = slider.value;
    changed();
  });
  number.addEventListener("input", () => {
    // The typed value is sent as typed (no clamping): the server's limits are the server's to state.
    c.alpha = number.value.trim() === "" ? NaN : Number(number.value);
    if (Number.isFinite(c.alpha)) slider.value = String(Math.max(-max, Math.min(max, c.alpha)));
    changed();
  });
  const layerInput = (which) => {
    const input = h("input", {
      type: "number",
      class: "layer",
      min: 0,
      max: layersMax,
      step: 1,
      placeholder: which === 0 ? "0" : "end",
      value: c.layers && c.layers[which] !== null ? String(c.layers[which]) : "",
      "aria-label": `${name}: layers ${which === 0 ? "from" : "to (exclusive)"}`,
    });
    input.addEventListener("input", () => {
      const row = input.closest(".component");
      const [from, to] = [...row.querySelectorAll("input.layer")].map((x) => x.value.trim());
      c.layers = from === "" && to === "" ? null : [from === "" ? 0 : Number(from), to === "" ? null : Number(to)];
      changed();
    });
    return input;
  };
  const scopeSelect = h(
    "select",
    { "aria-label": `${name}: scope`, class: "scope" },
    (card ? card.scopes : [{ name: "all", servable: true }]).map((s) =>
      h("option", {
        value: s.name,
        text: s.name === "all" ? "all tensors" : `@${s.name}`,
        selected: s.name === c.scope,
        disabled: !s.servable,
        title: s.why || null,
      }),
    ),
  );
  scopeSelect.addEventListener("change", () => {
    c.scope = scopeSelect.value;
    changed();
  });
  const vectorSelect = h(
    "select",
    { "aria-label": `${name}: vector`, class: "vector" },
    state.session.vectors.map((v) => h("option", { value: v.name, text: v.name, selected: v.name === c.vector })),
  );
  vectorSelect.addEventListener("change", () => {
    c.vector = vectorSelect.value;
    const offered = (cardOf(c.vector)?.scopes || []).filter((s) => s.servable).map((s) => s.name);
    if (!offered.includes(c.scope)) c.scope = "all"; // the new vector does not have that part
    renderColumns(); // the scopes on offer depend on the vector
    scheduleDescribe(m);
    document.getElementById(`${id}-alpha`)?.closest(".component")?.querySelector("select.vector")?.focus();
  });
  return h(
    "li",
    { class: "component" },
    h(
      "div",
      { class: "component-line" },
      vectorSelect,
      scopeSelect,
      h("span", { class: "layers", title: "decoder layers, half-open [from, to); empty: all" }, "layers ",
        layerInput(0), "–", layerInput(1)),
      h("button", {
        type: "button",
        class: "quiet remove",
        text: "✕",
        "aria-label": `Remove ${name}`,
        disabled: m.components.length <= 1,
        onclick: () => {
          m.components.splice(i, 1);
          renderColumns();
          scheduleDescribe(m);
        },
      }),
    ),
    h("div", { class: "component-line alpha" }, h("label", { for: `${id}-alpha`, text: "α" }), slider, number),
  );
}

function updateSpecText(m, root = document) {
  const el = root.querySelector(`#spec-mix-${m.id}`);
  if (!el) return;
  const text = mixtureSpec(m);
  el.textContent = invalidAlpha(m) ? "(an α is not a number)" : text || "(empty: every α is 0)";
  el.classList.toggle("empty", !text || !!invalidAlpha(m));
}

function renderDescribe(m) {
  const el = document.getElementById(`describe-mix-${m.id}`);
  if (!el) return;
  el.replaceChildren();
  if (m.describeError) {
    el.append(h("p", { class: "error", role: "alert", text: m.describeError }));
    return;
  }
  const d = m.describe;
  if (!d) return;
  const facts = [
    `rank ${d.rank} (server max ${d.max_rank})`,
    `${Object.keys(d.modules).length} tensors carried`,
  ];
  el.append(h("p", { class: "facts", text: facts.join(" · ") }));
  if (d.needs_truncation) {
    el.append(
      h("p", {
        class: d.truncation_allowed ? "warn" : "error",
        role: d.truncation_allowed ? null : "alert",
        text: d.truncation_allowed
          ? `rank ${d.rank} is above ${d.max_rank}: served re-truncated by SVD (approximate)`
          : `rank ${d.rank} is above the server's max LoRA rank ${d.max_rank}: it will be refused`,
      }),
    );
  }
  const left = Object.entries(d.dropped_share).filter(([, share]) => share > 0);
  if (left.length) {
    el.append(
      h(
        "p",
        { class: "left-out" },
        "Left out (not carried by this engine): ",
        left.map(([comp, share], i) => {
          const kinds = Object.keys(d.vector_adapters[comp.split(/[@[:]/)[0]]?.dropped || {}).join(", ");
          const over = share > d.max_dropped_share;
          return h("span", {
            class: over ? "error" : null,
            text: `${i ? "; " : ""}${comp} ${(share * 100).toFixed(4)}% of its ‖τ‖²${kinds ? ` (${kinds})` : ""}` +
              (over ? ` — above the server's ${d.max_dropped_share * 100}%: refused` : ""),
          });
        }),
      ),
    );
  } else {
    el.append(h("p", { class: "left-out none", text: "Left out: nothing (every tensor it touches is carried)" }));
  }
}

// -------------------------------------------------------------------------------------------- output and code

function outputBlock(id) {
  return h(
    "section",
    { class: "output-block", "aria-label": "answer" },
    h("div", { class: "output", id: `output-${id}`, "aria-live": "polite" }),
    h("p", { class: "meta", id: `meta-${id}` }),
  );
}

function snippetBlock(id) {
  return h(
    "details",
    { class: "code", id: `code-${id}` },
    h("summary", { text: "Request as code" }),
    h("div", { class: "snippet" }, h("h4", { text: "curl" }), h("pre", { class: "curl", tabindex: 0 }),
      copyButton((btn) => btn.closest(".snippet").querySelector("pre").textContent, "Copy the curl command")),
    h("div", { class: "snippet" }, h("h4", { text: "Python (openai)" }), h("pre", { class: "python", tabindex: 0 }),
      copyButton((btn) => btn.closest(".snippet").querySelector("pre").textContent, "Copy the Python code")),
  );
}

function copyButton(textOf, label) {
  const btn = h("button", { type: "button", class: "copy quiet", text: "Copy", "aria-label": label });
  btn.addEventListener("click", async () => {
    const text = textOf(btn);
    let ok = false;
    try {
      await navigator.clipboard.writeText(text);
      ok = true;
    } catch {
      // no clipboard API (a page over plain http on another host): copy through a selected text area
      const area = h("textarea", { class: "visually-hidden" });
      area.value = text;
      document.body.append(area);
      area.select();
      ok = document.execCommand("copy");
      area.remove();
    }
    btn.textContent = ok ? "Copied" : "Select and copy";
    setTimeout(() => {
      btn.textContent = "Copy";
    }, 1500);
  });
  return btn;
}

function currentRequest(model) {
  const mode = document.querySelector('input[name="mode"]:checked').value;
  const prompt = $("prompt").value;
  const sampling = {
    max_tokens: Number($("max-tokens").value) || 48,
    temperature: Number($("temperature").value) || 0,
  };
  const topP = Number($("top-p").value);
  if (topP && topP !== 1) sampling.top_p = topP;
  // with sampling on, a seed makes the answer (and the pasted snippet's answer) reproducible
  if (sampling.temperature > 0) sampling.seed = Number($("seed").value) || 0;
  const req = { mode, model, sampling };
  if (mode === "chat") req.messages = [{ role: "user", content: prompt }];
  else req.prompt = prompt;
  return req;
}

function renderSnippets() {
  const keyed = !!state.session?.api_key_required;
  const columns = [["base", state.session.served_model_name]];
  for (const m of state.mixtures) columns.push([`mix-${m.id}`, mixtureSpec(m) || state.session.served_model_name]);
  for (const [id, model] of columns) {
    const block = document.getElementById(`code-${id}`);
    if (!block) continue;
    const req = currentRequest(model);
    block.querySelector("pre.curl").textContent = curlSnippet(req, serverRoot, keyed);
    block.querySelector("pre.python").textContent = pythonSnippet(req, serverRoot, keyed);
  }
}

function renderResult(id, r) {
  const out = document.getElementById(`output-${id}`);
  const meta = document.getElementById(`meta-${id}`);
  if (!out || !meta) return;
  out.replaceChildren();
  out.classList.remove("error-box");
  // streaming | done (final for the base) | scored (a mixture's token view is in) | error | stopped
  out.dataset.state = r.state || "";
  if (r.error) {
    out.classList.add("error-box");
    out.append(h("p", { role: "alert", text: `${r.refused === false ? "Failed" : "Refused"}: ${r.error}` }));
  } else if (r.tokens) {
    const view = h("div", { class: "answer", dataset: { text: r.text } });
    renderTokens(view, r.tokens, tip);
    out.append(view);
  } else {
    out.append(h("div", { class: "answer plain", text: r.text, dataset: { text: r.text } }));
  }
  const bits = [];
  if (r.status) bits.push(r.status);
  if (r.leftOut) bits.push(`x-tunevec-left-out: ${r.leftOut}`);
  if (r.scoreError) bits.push(`token view unavailable: ${r.scoreError}`);
  meta.textContent = bits.join(" · ");
}

// ---------------------------------------------------------------------------------------------------- generate

async function runColumn(id, model, target, signal, scoreAgainstBase) {
  const req = currentRequest(model);
  const body = { ...plainBody(req), stream: true, return_token_ids: true };
  const path = req.mode === "chat" ? "/v1/chat/completions" : "/v1/completions";
  const r = { text: "", promptIds: null, answerIds: [], status: "streaming…", state: "streaming", model };
  target.result = r;
  renderResult(id, r);
  const started = performance.now();
  try {
    const headers = await postStream(
      path,
      body,
      (event) => {
        if (event.prompt_token_ids) r.promptIds = event.prompt_token_ids; // chat: on the first chunk
        const choice = event.choices && event.choices[0];
        if (!choice) return;
        if (choice.prompt_token_ids) r.promptIds = choice.prompt_token_ids; // completions: on the first chunk
        if (choice.token_ids) r.answerIds.push(...choice.token_ids);
        const piece = req.mode === "chat" ? choice.delta?.content : choice.text;
        if (piece) {
          r.text += piece;
          const out = document.querySelector(`#output-${id} .answer`);
          if (out) {
            out.textContent = r.text;
            out.dataset.text = r.text;
          }
        }
        if (choice.finish_reason) r.finish = choice.finish_reason;
      },
      signal,
    );
    r.leftOut = headers.get("x-tunevec-left-out");
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    r.status = `${r.answerIds.length} tokens · ${seconds} s${r.finish ? ` · ${r.finish}` : ""}`;
  } catch (err) {
    if (err.name === "AbortError") {
      r.status = "stopped";
      r.state = "stopped";
    } else {
      r.error = err.message;
      r.refused = err.status >= 400 && err.status < 500;
      r.status = err.status ? `HTTP ${err.status}` : "no answer";
      r.state = "error";
    }
    renderResult(id, r);
    return;
  }
  r.state = scoreAgainstBase && r.promptIds && r.answerIds.length ? "scoring" : "done";
  renderResult(id, r);
  if (scoreAgainstBase && r.promptIds && r.answerIds.length) {
    try {
      r.tokens = await scoreAnswer(
        state.session.served_model_name,
        model,
        r.promptIds,
        r.answerIds,
        state.session.limits.max_model_len,
        signal,
      );
      const moved = r.tokens.filter((t) => Math.abs(t.delta) >= 0.1).length;
      r.status += ` · ${moved} of ${r.tokens.length} tokens moved ≥ 0.1 nats`;
    } catch (err) {
      if (err.name !== "AbortError") r.scoreError = err.message;
    }
    r.state = r.tokens ? "scored" : "done";
    renderResult(id, r);
  }
}

async function generate() {
  if (state.controller) return;
  const controller = new AbortController();
  state.controller = controller;
  $("generate").disabled = true;
  $("stop").disabled = false;
  tip.hide(document.activeElement);
  const jobs = [runColumn("base", state.session.served_model_name, state.base, controller.signal, false)];
  for (const m of state.mixtures) {
    const spec = mixtureSpec(m);
    const id = `mix-${m.id}`;
    if (!spec || invalidAlpha(m)) {
      m.result = {
        error: invalidAlpha(m) ? "α must be a number" : "empty mixture: give some vector an α other than 0",
        state: "error",
      };
      renderResult(id, m.result);
      continue;
    }
    jobs.push(runColumn(id, spec, m, controller.signal, true));
  }
  await Promise.allSettled(jobs);
  state.controller = null;
  $("generate").disabled = false;
  $("stop").disabled = true;
}

// ----------------------------------------------------------------------------------------------------- library

function renderLibrary() {
  const tbody = $("library-table").querySelector("tbody");
  tbody.replaceChildren(
    ...state.session.vectors.map((v) =>
      h(
        "tr",
        {},
        h("th", { scope: "row" }, h("code", { text: v.name })),
        h("td", { text: v.kind_label || v.kind }),
        h("td", { class: "num", text: v.norm === null || v.norm === undefined ? "—" : v.norm.toPrecision(4) }),
        h("td", {}, h("code", { title: v.base_fingerprint || "", text: (v.base_fingerprint || "—").slice(0, 12) })),
        h("td", { text: v.layers_text }),
        h("td", { class: "facts", text: (v.facts || []).map((f) => `${f.label} ${f.value}`).join(" · ") }),
        h(
          "td",
          {},
          v.report
            ? h("button", {
                type: "button",
                class: "quiet",
                text: "Open report",
                "aria-label": `Open the analysis report of ${v.name}`,
                onclick: () => openReport($("report-dialog"), $("report-body"), $("report-title"), v.name, v.report),
              })
            : h("span", { class: "muted", text: "none (tunevec analyze … --out VECTORS/reports/NAME)" }),
        ),
      ),
    ),
  );
}

// ------------------------------------------------------------------------------------------------------ wiring

function bind() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey.set($("key-input").value.trim());
    $("key-input").value = "";
    start();
  });
  $("key-button").addEventListener("click", () => askForKey("Give another API key for this server."));
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("add-mixture").addEventListener("click", () => {
    if (state.mixtures.length >= MAX_MIXTURES) return;
    const names = state.session.vectors.map((v) => v.name);
    const next = names[state.mixtures.length % names.length];
    addMixture([{ vector: next, scope: "all", layers: null, alpha: 1 }]);
    renderColumns();
    document.querySelector(".column:last-child select")?.focus();
  });
  $("prompt").value = DEFAULT_PROMPT.chat;
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      const mode = radio.value;
      const other = mode === "chat" ? "completion" : "chat";
      if ($("prompt").value === DEFAULT_PROMPT[other]) $("prompt").value = DEFAULT_PROMPT[mode];
      $("prompt-label").textContent = mode === "chat" ? "Message" : "Prompt";
      renderSnippets();
    });
  }
  for (const id of ["prompt", "max-tokens", "temperature", "top-p", "seed"]) {
    $(id).addEventListener("input", () => state.session && renderSnippets());
  }
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("studio").hidden) {
      event.preventDefault();
      generate();
    }
  });
  $("report-close").addEventListener("click", () => $("report-dialog").close());
}

bind();
start();
