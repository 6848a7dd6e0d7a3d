// The token view: a mixture's answer, token by token, each coloured by how much the mixture changed that token's
// log-probability against the base. Both numbers come from the server's own logprobs: the prompt and the answer,
// as token ids, are scored once under the base and once under the mixture (an `echo` request), so the two
// log-probabilities of each token are computed the same way and Δ is exactly 0 where the mixture changes nothing.

import { ApiError, postJson } from "./api.js";

const TOP = 5; // alternatives shown per token
const FULL_SCALE = 3; // |Δ| in nats at which a token gets the strongest colour

async function score(model, ids, signal) {
  const body = { model, prompt: ids, max_tokens: 1, temperature: 0, echo: true, logprobs: TOP };
  const { json } = await postJson("/v1/completions", body, signal);
  const lp = json.choices[0].logprobs;
  if (!lp || lp.token_logprobs.length < ids.length) {
    throw new ApiError(500, "the server returned fewer prompt log-probabilities than tokens sent");
  }
  return lp;
}

// Scores the answer (`answerIds`, after `promptIds`) under both models; returns one record per answer token.
export async function scoreAnswer(baseModel, mixtureModel, promptIds, answerIds, maxModelLen, signal) {
  const ids = [...promptIds, ...answerIds];
  if (maxModelLen && ids.length + 1 > maxModelLen) {
    throw new ApiError(400, `prompt and answer are ${ids.length} tokens, too long to score within ${maxModelLen}`);
  }
  const [base, mix] = await Promise.all([score(baseModel, ids, signal), score(mixtureModel, ids, signal)]);
  const out = [];
  for (let i = promptIds.length; i < ids.length; i++) {
    const text = base.tokens[i];
    const lpBase = base.token_logprobs[i];
    const lpMix = mix.token_logprobs[i];
    out.push({
      id: ids[i],
      text,
      base: lpBase,
      mixture: lpMix,
      delta: lpMix - lpBase,
      baseTop: sortedTop(base.top_logprobs[i]),
      mixtureTop: sortedTop(mix.top_logprobs[i]),
    });
  }
  return out;
}

function sortedTop(top) {
  return Object.entries(top || {})
    .sort((a, b) => b[1] - a[1])
    .slice(0, TOP);
}

// rgba() of a token's background: blue where the mixture raised the token, red where it lowered it.
export function colourFor(delta) {
  const strength = Math.min(Math.abs(delta) / FULL_SCALE, 1);
  if (strength < 0.02) return "transparent";
  const alpha = (0.12 + 0.68 * strength).toFixed(3);
  return delta > 0 ? `rgba(37, 99, 235, ${alpha})` : `rgba(220, 38, 38, ${alpha})`;
}

function visible(text) {
  if (text === "") return "∅";
  if (/^<\|.*\|>$/.test(text) || text === "</s>") return `⟨${text.replace(/^<\|?|\|?>$/g, "")}⟩`;
  return text.replace(/\n/g, "⏎\n");
}

function fmt(x) {
  return x === null || x === undefined || Number.isNaN(x) ? "—" : x.toFixed(3);
}

// Fills `container` with one focusable span per token (roving tab stop: arrow keys move between tokens).
export function renderTokens(container, records, tip) {
  container.replaceChildren();
  container.classList.add("token-view");
  container.setAttribute("role", "group");
  records.forEach((r, i) => {
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = visible(r.text);
    span.style.backgroundColor = colourFor(r.delta);
    span.dataset.delta = r.delta.toFixed(4);
    span.dataset.index = String(i);
    span.tabIndex = i === 0 ? 0 : -1;
    span.setAttribute(
      "aria-label",
      `token ${JSON.stringify(r.text)}: log p under the mixture ${fmt(r.mixture)}, under the base ${fmt(r.base)}, ` +
        `change ${r.delta >= 0 ? "+" : ""}${fmt(r.delta)}`,
    );
    const show = () => tip.show(span, r);
    span.addEventListener("mouseenter", show);
    span.addEventListener("focus", show);
    span.addEventListener("mouseleave", () => tip.hide(span));
    span.addEventListener("blur", () => tip.hide(span));
    container.append(span);
  });
  container.addEventListener("keydown", (event) => {
    const current = document.activeElement;
    if (!current || !current.classList.contains("tok")) return;
    const spans = [...container.querySelectorAll(".tok")];
    let next = Number(current.dataset.index);
    if (event.key === "ArrowRight" || event.key === "ArrowDown") next += 1;
    else if (event.key === "ArrowLeft" || event.key === "ArrowUp") next -= 1;
    else if (event.key === "Home") next = 0;
    else if (event.key === "End") next = spans.length - 1;
    else if (event.key === "Escape") {
      tip.hide(current);
      return;
    } else return;
    event.preventDefault();
    next = Math.max(0, Math.min(spans.length - 1, next));
    current.tabIndex = -1;
    spans[next].tabIndex = 0;
    spans[next].focus();
  });
}

// The one tooltip element of the page, placed under the token it describes.
export function makeTip(element) {
  let owner = null;
  function row(table, cells, head) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const cell = document.createElement(head ? "th" : "td");
      cell.textContent = c;
      tr.append(cell);
    }
    table.append(tr);
  }
  function alternatives(title, top, chosen) {
    const table = document.createElement("table");
    const caption = document.createElement("caption");
    caption.textContent = title;
    table.append(caption);
    row(table, ["token", "p", "log p"], true);
    for (const [tok, lp] of top) {
      row(table, [(tok === chosen ? "▸ " : "") + JSON.stringify(tok), Math.exp(lp).toFixed(3), lp.toFixed(3)]);
    }
    return table;
  }
  return {
    show(span, r) {
      owner = span;
      element.replaceChildren();
      const head = document.createElement("p");
      head.className = "tip-head";
      head.textContent =
        `${JSON.stringify(r.text)}  Δ ${r.delta >= 0 ? "+" : ""}${fmt(r.delta)} nats ` +
        `(mixture ${fmt(r.mixture)}, base ${fmt(r.base)})`;
      const tables = document.createElement("div");
      tables.className = "tip-tables";
      tables.append(alternatives("base: top alternatives", r.baseTop, r.text));
      tables.append(alternatives("mixture: top alternatives", r.mixtureTop, r.text));
      element.append(head, tables);
      element.hidden = false;
      const box = span.getBoundingClientRect();
      const width = element.offsetWidth;
      const left = Math.max(8, Math.min(window.scrollX + box.left, window.scrollX + window.innerWidth - width - 8));
      element.style.left = `${left}px`;
      // below the token, or above it when the tooltip would run off the bottom of the window
      const below = box.bottom + 6 + element.offsetHeight <= window.innerHeight || box.top < element.offsetHeight + 6;
      element.style.top = `${window.scrollY + (below ? box.bottom + 6 : box.top - element.offsetHeight - 6)}px`;
      span.setAttribute("aria-describedby", element.id);
    },
    hide(span) {
      if (owner !== span) return;
      element.hidden = true;
      span.removeAttribute("aria-describedby");
      owner = null;
    },
  };
}
