// Spec text from the page's components, written as the server writes its canonical form
// (docs/spec-grammar.md): components sorted by (vector, scope, layer range), `@all` and `:1` omitted, numbers in
// Python's shortest round-trip form without `.0` and without `+` in exponents.

// Python's repr(float) for a finite number, then the grammar's tweaks (steering.spec.format_number).
export function formatNumber(x) {
  if (!Number.isFinite(x)) return String(x);
  if (x === 0) return "0"; // also -0
  // toExponential() without digits gives the shortest digits that round-trip, as repr does.
  const [mantissa, expText] = x.toExponential().split("e");
  const exp = Number(expText);
  const negative = mantissa.startsWith("-");
  const digits = mantissa.replace("-", "").replace(".", "");
  let text;
  if (exp < -4 || exp >= 16) {
    const frac = digits.slice(1);
    const e = Math.abs(exp) < 10 ? `0${Math.abs(exp)}` : `${Math.abs(exp)}`;
    text = `${digits[0]}${frac ? "." + frac : ""}e${exp < 0 ? "-" : ""}${e}`;
  } else if (exp < 0) {
    text = "0." + "0".repeat(-exp - 1) + digits;
  } else if (digits.length <= exp + 1) {
    text = digits + "0".repeat(exp + 1 - digits.length);
  } else {
    text = digits.slice(0, exp + 1) + "." + digits.slice(exp + 1);
  }
  return (negative ? "-" : "") + text;
}

export function selectorText(c) {
  let text = c.scope && c.scope !== "all" ? `${c.vector}@${c.scope}` : c.vector;
  if (c.layers) {
    const [start, stop] = c.layers;
    text += `[${start}:${stop === null ? "" : stop}]`;
  }
  return text;
}

export function componentText(c) {
  return c.alpha === 1 ? selectorText(c) : `${selectorText(c)}:${formatNumber(c.alpha)}`;
}

function sortKey(c) {
  const [start, stop] = c.layers ? [c.layers[0], c.layers[1] === null ? Infinity : c.layers[1]] : [-1, -1];
  return [c.vector, c.scope || "all", start, stop];
}

function compare(a, b) {
  const ka = sortKey(a);
  const kb = sortKey(b);
  for (let i = 0; i < ka.length; i++) {
    if (ka[i] < kb[i]) return -1;
    if (ka[i] > kb[i]) return 1;
  }
  return 0;
}

// Components -> spec text; components whose alpha is 0 add nothing and are left out of the text.
export function specText(components) {
  return components
    .filter((c) => c.alpha !== 0)
    .slice()
    .sort(compare)
    .map(componentText)
    .join("+");
}

// The server's full JSON form of a spec (named variants) -> the page's components.
export function componentsFromJson(json) {
  return (json.components || []).map((c) => ({
    vector: c.vector,
    scope: c.scope || "all",
    layers: c.layers ? [c.layers[0], c.layers[1] ?? null] : null,
    alpha: c.alpha ?? 1,
  }));
}
