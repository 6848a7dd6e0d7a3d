"""Attribution patching: which components' change from base to tuned carries the tuned model's domain gain.

A *component* is one block of one decoder layer: the attention block (its output is what it adds to the residual
stream, i.e. o_proj's output) or the MLP block (down_proj's output), with the tensors of τ that live in it. The
tuned model is base + τ (every tensor of the vector); L is the mean next-token loss over the scored tokens of
held-out domain examples.

**Linear estimate** (attribution patching, Nanda 2023). With a_c the output of component c and g_c = ∂L/∂a_c,

    gain_c ≈ Σ (a_c^base − a_c^tuned) · g_c^tuned

summed over positions and hidden units: the first-order change of the tuned model's loss when c's output is
reverted to the base's, i.e. how much c's change lowers the tuned model's domain loss (positive = helps). It
costs one forward and backward pass of each model. The same product with the base's gradient,
Σ (a^base − a^tuned) · g^base, linearises the other end (patching c's tuned output into the base); both are
reported, with their mean (the trapezoid rule along the straight path between the two activations).

**Validation by real patching.** The model is set to base + τ on the top-k components' tensors only (exact: the
base's weights plus the vector's tensors, in process), and the recovered share of the gain is

    recovered(k) = (L_base − L_k) / (L_base − L_tuned)

against k, next to the same for k components drawn at random (several seeds), and next to what the estimate
predicted (the sum of the top-k estimates over the gain). Each component is also patched alone, into the base and
out of the tuned model, to compare every estimate with the loss change it approximates. For each k the spec that
selects those components (``medical@mlp[24:26]+medical@attention[27:28]``) is written out, so a server can
serve the same variant per request.

Only the layers from the first one τ changes run for each patched model (``analysis/suffix.py``): the layers below
compute the same activations in all of them.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunevec.analysis.options import add_device_arguments, parse_layers
from tunevec.analysis.suffix import IGNORE, Example, advance_states, prefix_states, suffix_batch, suffix_loss
from tunevec.core.errors import TunevecError
from tunevec.core.roles import classify

FORMAT = "tunevec.attribution"
VERSION = 1
BLOCKS = ("attention", "mlp")
DATA_FILES = ("heldout.jsonl", "probe.jsonl")  # looked for beside the base folder, in this order


@dataclass(frozen=True)
class Component:
    layer: int
    block: str  # "attention" | "mlp"
    tensors: tuple[str, ...]  # the vector's tensors inside this block
    module: str  # the block's module path, whose output is the component's activation
    tau_norm: float

    @property
    def name(self) -> str:
        return f"L{self.layer}.{self.block}"


# ----------------------------------------------------------------------------- components and specs


def _common_module(names: Sequence[str]) -> str:
    """The deepest module path shared by ``names`` (``model.layers.5.self_attn`` for q/k/v/o_proj.weight)."""
    parts = [n.split(".")[:-2] for n in names]  # drop "<linear>.weight"
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def in_range(layer: int | None, layers: tuple[int, int] | None) -> bool:
    """Whether decoder layer ``layer`` is inside ``layers`` = (start, end); tensors outside any layer are not."""
    return layers is None or (layer is not None and layers[0] <= layer < layers[1])


def changed_tensors(
    vector: Any, architecture: str | None = None, layers: tuple[int, int] | None = None
) -> list[str]:
    """The vector's tensors with τ ≠ 0 (inside ``layers`` when given): what "tuned" means for attribution."""
    return [
        n
        for n, e in vector.manifest.tensors.items()
        if e.norm > 0 and in_range(classify(n, architecture).layer, layers)
    ]


def components_of(
    vector: Any, architecture: str | None = None, layers: tuple[int, int] | None = None
) -> list[Component]:
    """The attention and MLP blocks in which τ is not zero (inside ``layers`` = (start, end) when given), in
    layer order (from the manifest; no tensor read)."""
    groups: dict[tuple[int, str], list[str]] = {}
    norms: dict[tuple[int, str], float] = {}
    for name, entry in vector.manifest.tensors.items():
        role = classify(name, architecture)
        if (
            role.role not in BLOCKS
            or role.layer is None
            or entry.norm == 0
            or not in_range(role.layer, layers)
        ):
            continue
        key = (role.layer, role.role)
        groups.setdefault(key, []).append(name)
        norms[key] = norms.get(key, 0.0) + entry.norm**2
    if not groups:
        where = "" if layers is None else f" in layers {layers[0]}..{layers[1] - 1}"
        raise TunevecError(
            f"vector {vector.name!r} ({vector.path}) changes no attention or MLP weight{where}"
        )
    out = []
    for (layer, block), names in sorted(groups.items()):
        names = sorted(names)
        out.append(
            Component(layer, block, tuple(names), _common_module(names), math.sqrt(norms[(layer, block)]))
        )
    return out


def spec_for(vector: str, components: Iterable[Component]) -> str:
    """The spec selecting exactly ``components``: one term per block and run of consecutive layers.

    ``medical@mlp[24:26]+medical@attention[27:28]``; parsed with ``Spec.parse`` (so it is valid grammar) and
    returned in canonical form.
    """
    from tunevec.steering.spec import Spec

    terms = []
    for block in BLOCKS:
        layers = sorted(c.layer for c in components if c.block == block)
        runs: list[list[int]] = []
        for layer in layers:
            if runs and layer == runs[-1][1]:
                runs[-1][1] = layer + 1
            else:
                runs.append([layer, layer + 1])
        terms += [f"{vector}@{block}[{a}:{b}]" for a, b in runs]
    if not terms:
        raise TunevecError("a spec needs at least one component")
    return Spec.parse("+".join(terms)).canonical()


# ----------------------------------------------------------------------------- data


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def example_from_row(row: dict[str, Any], tokenizer: Any, max_tokens: int) -> Example:
    """(input_ids, labels) for one JSONL row; which tokens are scored depends on the row's shape.

    ``{"messages": [...]}``: the chat template; the last message (an assistant turn) is scored.
    ``{"prompt": p, "completion": c}``: ``c`` is scored. ``{"text": t}``: every token after the first.
    """
    if "messages" in row:
        messages = row["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    elif "prompt" in row and "completion" in row:
        prompt, full = row["prompt"], row["prompt"] + row["completion"]
    elif "text" in row:
        ids = _encode(tokenizer, row["text"])[:max_tokens]
        return ids, list(ids)
    else:
        raise TunevecError(
            f"a data row needs 'messages', 'prompt' + 'completion', or 'text'; got keys {sorted(row)}"
        )
    p_ids, ids = _encode(tokenizer, prompt), _encode(tokenizer, full)
    if ids[: len(p_ids)] != p_ids:
        raise TunevecError(f"the prompt does not tokenize as a prefix of the full example: {prompt[-60:]!r}")
    labels = [IGNORE] * len(p_ids) + ids[len(p_ids) :]
    return ids[:max_tokens], labels[:max_tokens]


def load_examples(
    path: Path, tokenizer: Any, domain: str | None, max_examples: int, max_tokens: int
) -> list[Example]:
    """The first ``max_examples`` rows of ``domain`` (rows without a domain always count) with a scored token."""
    examples: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if domain is not None and row.get("domain", domain) != domain:
                continue
            ex = example_from_row(row, tokenizer, max_tokens)
            if any(label != IGNORE for label in ex[1][1:]):
                examples.append(ex)
            if len(examples) == max_examples:
                break
    if not examples:
        raise TunevecError(
            f"{path} has no rows for domain {domain!r}; pass --data FILE with such rows or --domain"
        )
    return examples


def default_data(base: Path) -> Path:
    for name in DATA_FILES:
        if (base.parent / name).is_file():
            return base.parent / name
    raise TunevecError(
        f"no {' or '.join(DATA_FILES)} beside {base}; pass --data FILE (JSONL rows with 'messages', "
        "'prompt' + 'completion', or 'text', and optionally 'domain')"
    )


# ----------------------------------------------------------------------------- weights


class WeightPatcher:
    """The model's weights set to base + τ on any subset of the vector's tensors (exact, in place).

    Kept on the model's device beside it: each changed tensor's base value, in the narrowest dtype that holds it
    exactly (bf16 for a bf16 checkpoint loaded as float32), and τ as the vector stores it. A patched weight is
    computed when it is switched on, base + τ in float32 rounded to the parameter's dtype, so memory is
    (b_base + b_τ) per changed entry beside the model, not two float32 copies.
    """

    def __init__(self, model: torch.nn.Module, vector: Any, names: Iterable[str]):
        params = dict(model.named_parameters())
        self.params: dict[str, torch.nn.Parameter] = {}
        self.base: dict[str, torch.Tensor] = {}
        self.tau: dict[str, torch.Tensor] = {}
        for name in names:
            if name not in params:
                raise TunevecError(f"vector tensor {name!r} is not a parameter of the model")
            p = self.params[name] = params[name]
            self.base[name] = _lossless_copy(p.detach())
            self.tau[name] = vector.read(name).to(p.device)
        self._on: set[str] = set()  # the tensors currently patched (the model holds the base on entry)

    def patched(self, name: str) -> torch.Tensor:
        """base + τ for one tensor, in the parameter's dtype (computed, not stored)."""
        p = self.params[name]
        return (self.base[name].float() + self.tau[name].float()).to(p.dtype)

    def delta(self, name: str) -> torch.Tensor:
        """What patching changes in the parameter: patched − base, in float32."""
        return self.patched(name).float() - self.base[name].float()

    @torch.no_grad()
    def set(self, names: Iterable[str]) -> None:
        on = set(names) & self.params.keys()
        for n in self._on ^ on:  # only the tensors whose state changes
            p = self.params[n]
            p.copy_(self.patched(n) if n in on else self.base[n])
        self._on = on


def _lossless_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in bfloat16 or float16 when that holds every value exactly, else in t's own dtype."""
    for narrow in (torch.bfloat16, torch.float16):
        if t.dtype.itemsize > narrow.itemsize:
            cand = t.to(narrow)
            if torch.equal(cand.to(t.dtype), t):
                return cand
    return t.clone()


# ----------------------------------------------------------------------------- losses and the estimate


class DomainLoss:
    """L over fixed examples, running only layers ``first..`` from cached inputs of layer ``first``.

    ``loss(start, states)`` runs layers ``start..`` from given inputs of layer ``start`` instead: exact for any
    weights that equal, below ``start``, those the inputs were computed with (``layer_inputs``).
    """

    def __init__(self, model: torch.nn.Module, examples: Sequence[Example], first: int, batch_size: int):
        self.model, self.first = model, first
        self.examples = list(examples)
        self.batch_size = batch_size
        self.tokens = sum(sum(1 for t in labels[1:] if t != IGNORE) for _, labels in self.examples)
        self.states = prefix_states(model, self.examples, first, batch_size)
        self.n_layers = len(model.model.layers)

    def batches(self, states: Sequence[torch.Tensor] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        states = self.states if states is None else states
        for i in range(0, len(self.examples), self.batch_size):
            yield suffix_batch(states[i : i + self.batch_size], self.examples[i : i + self.batch_size])

    @torch.no_grad()
    def __call__(self, start: int | None = None, states: Sequence[torch.Tensor] | None = None) -> float:
        self.model.eval()
        start = self.first if start is None else start
        total = sum(suffix_loss(self.model, start, b, reduction="sum").item() for b in self.batches(states))
        return total / self.tokens

    def layer_inputs(self) -> dict[int, list[torch.Tensor]]:
        """The inputs of every decoder layer first..L-1 under the model's current weights (one pass)."""
        out = {self.first: self.states}
        for layer in range(self.first + 1, self.n_layers):
            out[layer] = advance_states(
                self.model, out[layer - 1], self.examples, layer - 1, layer, self.batch_size
            )
        return out

    def backward(self, batch: dict[str, torch.Tensor], components: Sequence[Component]) -> dict[str, tuple]:
        """Backpropagate this batch's share of L; returns each component's (output, ∂L/∂output).

        L is the mean over all batches' scored tokens, so the per-batch products and parameter gradients sum to
        those of L.
        """
        modules = dict(self.model.named_modules())
        captured: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def record(_module, _inputs, output):
                out = output[0] if isinstance(output, tuple) else output
                out.retain_grad()
                captured[name] = out

            return record

        handles = [modules[c.module].register_forward_hook(hook(c.name)) for c in components]
        try:
            self.model.eval()
            hidden = (
                batch["hidden"].clone().requires_grad_(True)
            )  # a graph to every activation, frozen or not
            loss = (
                suffix_loss(self.model, self.first, {**batch, "hidden": hidden}, reduction="sum")
                / self.tokens
            )
            loss.backward()
        finally:
            for h in handles:
                h.remove()
        return {k: (v.detach(), v.grad.detach()) for k, v in captured.items()}


def linear_estimates(
    loss: DomainLoss, patcher: WeightPatcher, components: Sequence[Component], tuned_names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per component, the estimated loss gain (positive = the component's change lowers the loss):

    ``tuned``/``base``: Σ (a^base − a^tuned)·∂L/∂a at the tuned model / at the base; ``mean``: their mean;
    ``weight``: −½ (∇L(base) + ∇L(tuned)) · τ_c, the same trapezoid in weight space (what patching τ into the
    component's weights changes, to second order, without counting upstream changes again).

    Each parameter gradient is reduced to its product with τ as soon as backward has accumulated it, and then
    freed, so no gradient of the whole model is ever held (a float32 copy of every changed weight at 7B).
    """
    names = {c.name: c for c in components}
    params = {n: patcher.params[n] for c in components for n in c.tensors}
    trainable = {p: p.requires_grad for p in loss.model.parameters()}
    for p in loss.model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    act = {c: {"tuned": 0.0, "base": 0.0} for c in names}
    weight_dot = dict.fromkeys(params, 0.0)

    def reduce(name: str):
        def hook(p: torch.Tensor) -> None:
            weight_dot[name] += float((p.grad.float() * patcher.delta(name)).sum(dtype=torch.float64))
            p.grad = None

        return hook

    handles = [p.register_post_accumulate_grad_hook(reduce(n)) for n, p in params.items()]
    try:
        for batch in loss.batches():
            patcher.set(())
            at_base = loss.backward(batch, components)
            patcher.set(tuned_names)
            at_tuned = loss.backward(batch, components)
            for c in names:
                (a_b, g_b), (a_t, g_t) = at_base[c], at_tuned[c]
                act[c]["base"] += float(((a_b - a_t) * g_b).sum())
                act[c]["tuned"] += float(((a_b - a_t) * g_t).sum())
    finally:
        for h in handles:
            h.remove()
        patcher.set(())
        for p, flag in trainable.items():
            p.requires_grad_(flag)
            p.grad = None
    out = {}
    for name, c in names.items():
        a = act[name]
        out[name] = {
            "tuned": a["tuned"],
            "base": a["base"],
            "mean": 0.5 * (a["tuned"] + a["base"]),
            "weight": -0.5 * sum(weight_dot[n] for n in c.tensors),
        }
    return out


# ----------------------------------------------------------------------------- validation by patching


def _recovered(loss: float, base: float, tuned: float) -> float:
    return (base - loss) / (base - tuned) if base != tuned else math.nan


def default_ks(n: int) -> list[int]:
    """Every k up to 16 components; beyond, powers of two and n."""
    if n <= 16:
        return list(range(1, n + 1))
    ks = [1 << i for i in range(n.bit_length()) if 1 << i < n]
    return ks + [n]


def log(message: str) -> None:
    print(f"[tunevec attribute] {message}", flush=True)


def attribute_vector(
    model: torch.nn.Module,
    vector: Any,
    examples: Sequence[Example],
    *,
    ks: Sequence[int] | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    batch_size: int = 16,
    architecture: str | None = None,
    layers: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Estimates, single-component patches, the top-k and random-k curves and their specs, for one vector.

    ``model`` holds the base weights on entry and on return; everything runs on its device. ``layers`` = (start,
    end) restricts the vector to decoder layers start..end-1: the tuned model is then base + τ on those layers.
    """
    components = components_of(vector, architecture, layers)
    by_name = {c.name: c for c in components}
    nonzero = changed_tensors(vector, architecture, layers)
    roles = {n: classify(n, architecture) for n in nonzero}
    first = min(r.layer for r in roles.values() if r.layer is not None)
    embedding_changed = any(r.role == "embedding" for r in roles.values())
    all_components = [t for c in components for t in c.tensors]
    timing = dict.fromkeys(("setup", "prefix", "estimates", "patched"), 0.0)
    clock = time.perf_counter()
    patcher = WeightPatcher(model, vector, nonzero)
    patcher.set(())
    timing["setup"] = time.perf_counter() - clock
    clock = time.perf_counter()
    loss = DomainLoss(model, examples, first, batch_size)
    timing["prefix"] = time.perf_counter() - clock
    cache: dict[frozenset[str], float] = {}
    # Two patched models are remembered layer by layer, the base and base + τ on every component: a patch set
    # that equals one of them below layer ℓ starts from that model's inputs of ℓ, not from layer `first`. Single
    # components (alone, or left out of all) then run only their own layer and those above: half the work.
    layer_of = {t: classify(t, architecture).layer for c in components for t in c.tensors}
    references: list[tuple[frozenset[str], dict[int, list[torch.Tensor]]]] = []
    work = {"evaluations": 0, "layers_run": 0, "n_layers": loss.n_layers}

    def loss_with(chosen: Iterable[Component]) -> float:
        key = frozenset(c.name for c in chosen)
        if key not in cache:
            t0 = time.perf_counter()
            on = frozenset(t for name in key for t in by_name[name].tensors)
            start, states = loss.first, None
            for ref_on, inputs in references:
                diff = on ^ ref_on
                lowest = min(layer_of[t] for t in diff) if diff else None
                if lowest is not None and lowest > start:
                    start, states = lowest, inputs[lowest]
            patcher.set(on)
            cache[key] = loss(start, states)  # .item() inside: the device's work is done when it returns
            work["evaluations"] += 1
            work["layers_run"] += loss.n_layers - start
            timing["patched"] += time.perf_counter() - t0
        return cache[key]

    def remember(chosen: Sequence[Component]) -> None:
        t0 = time.perf_counter()
        patcher.set(t for c in chosen for t in c.tensors)
        references.append((frozenset(t for c in chosen for t in c.tensors), loss.layer_inputs()))
        work["layers_run"] += loss.n_layers - 1 - loss.first
        timing["patched"] += time.perf_counter() - t0

    l_base = loss_with(())
    remember(())
    patcher.set(nonzero)
    # τ on the embeddings changes the input of layer `first` too, so the full tuned model needs its own prefix.
    clock = time.perf_counter()
    l_tuned = DomainLoss(model, examples, first, batch_size)() if embedding_changed else loss()
    timing["patched"] += time.perf_counter() - clock
    work["evaluations"] += 1
    work["layers_run"] += loss.n_layers - first
    l_components = loss_with(components)
    remember(components)
    log(
        f"{vector.name}: {len(components)} components in layers {components[0].layer}-{components[-1].layer}, "
        f"{len(examples)} examples, {loss.tokens} scored tokens; loss base {l_base:.4f}, tuned {l_tuned:.4f}"
    )
    clock = time.perf_counter()
    estimates = linear_estimates(loss, patcher, components, all_components)
    timing["estimates"] = time.perf_counter() - clock
    gain = l_base - l_tuned

    rows = []
    for c in components:
        alone = loss_with([c])
        without = loss_with([x for x in components if x is not c])
        rows.append(
            {
                "name": c.name,
                "layer": c.layer,
                "block": c.block,
                "module": c.module,
                "tensors": list(c.tensors),
                "tau_norm": c.tau_norm,
                "estimate": estimates[c.name],
                # the loss changes the two estimates approximate (positive = the component's τ lowers the loss)
                "patched_alone_gain": l_base - alone,
                "removed_from_tuned_gain": without - l_components,
            }
        )
    n = len(components)
    ks = sorted({k for k in (ks or default_ks(n)) if 1 <= k <= n})
    rankings = {
        kind: sorted(components, key=lambda c, kind=kind: -estimates[c.name][kind])
        for kind in ("mean", "tuned", "weight")
    }
    curve = []
    for k in ks:
        top = rankings["mean"][:k]
        l_top = loss_with(top)
        randoms = []
        for seed in seeds:
            pick = random.Random(f"attribution:{seed}").sample(components, n)[:k]
            randoms.append(_recovered(loss_with(pick), l_base, l_tuned))
        mean = sum(randoms) / len(randoms) if randoms else math.nan
        std = math.sqrt(sum((r - mean) ** 2 for r in randoms) / len(randoms)) if randoms else math.nan
        spec = spec_for(vector.name, top)
        curve.append(
            {
                "k": k,
                "components": [c.name for c in top],
                "spec": spec,
                "spec_terms": spec.count("+") + 1,
                "loss": l_top,
                "recovered": _recovered(l_top, l_base, l_tuned),
                "predicted": sum(estimates[c.name]["mean"] for c in top) / gain if gain else math.nan,
                "recovered_tuned_ranking": _recovered(loss_with(rankings["tuned"][:k]), l_base, l_tuned),
                "recovered_weight_ranking": _recovered(loss_with(rankings["weight"][:k]), l_base, l_tuned),
                "random": {
                    "mean": mean,
                    "std": std,
                    "min": min(randoms, default=math.nan),
                    "max": max(randoms, default=math.nan),
                    "values": randoms,
                },
            }
        )
        log(
            f"{vector.name}: k={k:<3d} top-k recovers {curve[-1]['recovered']:6.1%} of the gain, random-k "
            f"{mean:6.1%} (min {curve[-1]['random']['min']:.1%}, max {curve[-1]['random']['max']:.1%})"
        )
    patcher.set(())
    return {
        "vector": str(vector.path),
        "first_layer": first,
        "examples": len(examples),
        "scored_tokens": loss.tokens,
        "loss": {"base": l_base, "tuned": l_tuned, "all_components": l_components},
        "gain": gain,
        "all_components_recovered": _recovered(l_components, l_base, l_tuned),
        "other_tensors": sorted(set(nonzero) - set(all_components)),
        "components": rows,
        "ranking": [c.name for c in rankings["mean"]],
        "ranking_tuned": [c.name for c in rankings["tuned"]],
        "ranking_weight": [c.name for c in rankings["weight"]],
        "seeds": list(seeds),
        "curve": curve,
        "patched_models_evaluated": len(cache),
        "timing_seconds": {k: round(v, 3) for k, v in timing.items()},
        "work": work,
    }


DEFINITIONS = {
    "component": "one decoder layer's attention block (output: o_proj's output) or MLP block (down_proj's output)",
    "loss": "mean next-token cross-entropy over the scored tokens of the domain examples (float32)",
    "gain": "loss(base) - loss(tuned), tuned = base + every tensor of the vector",
    "estimate.tuned": "sum over positions of (a_base - a_tuned) . dL/da at the tuned model: first-order loss "
    "increase of the tuned model when the component's output is reverted to the base's",
    "estimate.base": "the same product with dL/da at the base: first-order loss decrease of the base when the "
    "component's tuned output is patched in",
    "estimate.mean": "the mean of the two (trapezoid rule along the straight path between the two activations); "
    "the ranking",
    "estimate.weight": "-(grad L(base) + grad L(tuned))/2 . tau_c: the trapezoid in weight space",
    "recovered_tuned_ranking": "recovered when ranking by estimate.tuned alone",
    "recovered_weight_ranking": "recovered when ranking by estimate.weight",
    "tuned (in estimates)": "base + tau on every component (equal to the tuned model when tau is zero outside them)",
    "patched_alone_gain": "loss(base) - loss(base + tau on this component only)",
    "removed_from_tuned_gain": "loss(base + tau on every other component) - loss(base + tau on all components)",
    "recovered": "(loss(base) - loss(base + tau on the chosen components)) / gain",
    "predicted": "sum of estimate.mean over the chosen components / gain",
    "random": "recovered for k components drawn at random (one draw per seed)",
    "spec": "the tunevec spec selecting exactly the chosen components (steering/spec.py grammar)",
}


def markdown(result: dict[str, Any]) -> str:
    """The report section: per vector, losses, then recovered share against k, top-k vs random."""
    lines = ["## Attribution patching", ""]
    lines.append(
        "Which components (attention or MLP block of a layer) carry the tuned model's gain on its domain loss: ranked "
        "by the linear estimate (activation difference x gradient, the mean of its values at the tuned model and at the "
        "base), then validated by applying τ to the top-k components only (exact, in process) against k components "
        "drawn at random."
    )
    for name, v in result["vectors"].items():
        lo = v["loss"]
        lines += [
            "",
            f"### {name}",
            "",
            f"Domain loss on {v['examples']} held-out examples ({v['scored_tokens']} scored tokens, domain "
            f"`{v['domain']}`): base {lo['base']:.4f}, tuned {lo['tuned']:.4f} (gain {v['gain']:.4f}); τ on all "
            f"{len(v['components'])} components recovers {v['all_components_recovered']:.1%}.",
            "",
            "| k | top-k recovered | predicted | random-k mean [min, max] | spec |",
            "|---:|---:|---:|---:|---|",
        ]
        for row in v["curve"]:
            r = row["random"]
            lines.append(
                f"| {row['k']} | {row['recovered']:.1%} | {row['predicted']:.1%} | {r['mean']:.1%} "
                f"[{r['min']:.1%}, {r['max']:.1%}] | `{row['spec']}` |"
            )
        top = v["components"]
        est = {c["name"]: c for c in top}
        first = est[v["ranking"][0]]
        lines += [
            "",
            f"Top component: {first['name']} (estimate {first['estimate']['mean']:.4f}; patched alone it lowers the "
            f"base's loss by {first['patched_alone_gain']:.4f}, removed from the tuned model it raises the loss by "
            f"{first['removed_from_tuned_gain']:.4f}). Random control: {len(v['seeds'])} seeds.",
        ]
    return "\n".join(lines) + "\n"


def attribute(
    vectors: Sequence[Path],
    base: Path,
    out: Path,
    *,
    data: Path | None = None,
    domains: Sequence[str | None] | None = None,
    max_examples: int = 64,
    max_tokens: int = 128,
    ks: Sequence[int] | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    batch_size: int = 16,
    device: torch.device | None = None,
    layers: tuple[int, int] | None = None,
    max_memory: int | None = None,
    tf32: bool = False,
) -> dict[str, Any]:
    """Attribute each vector on its domain's examples; write attribution.json, .png and .md into ``out``.

    ``tf32`` lets CUDA run float32 matrix products on TF32 tensor cores (recorded as ``matmul_precision``).

    The cost is estimated (and printed) before the model is loaded; a run whose memory would not fit
    ``max_memory`` (default: what ``device`` reports free) is refused with the options that would make it fit.
    """
    from transformers import AutoTokenizer

    from tunevec.analysis.estimate import ModelShape, check, estimate_attribute
    from tunevec.analysis.meter import Meter
    from tunevec.analysis.plots import plot_attribution
    from tunevec.analysis.resident import load_model
    from tunevec.core.checkpoint import Checkpoint
    from tunevec.core.vector import TuningVector

    device = device if device is not None else torch.device("cpu")
    meter = Meter(device)
    base = Path(base)
    checkpoint = Checkpoint(base)
    data = Path(data) if data is not None else default_data(base)
    loaded = [TuningVector(v) for v in vectors]
    for v in loaded:
        v.check_base(checkpoint)
    domains = list(domains) if domains else [v.name for v in loaded]
    if len(domains) != len(loaded):
        raise TunevecError(f"give one --domain per vector ({len(loaded)}), or none (each vector's name)")
    tokenizer = AutoTokenizer.from_pretrained(base)
    jobs = []
    for vector, domain in zip(loaded, domains, strict=True):
        examples = load_examples(data, tokenizer, domain, max_examples, max_tokens)
        jobs.append((vector, domain, examples))
    arch = checkpoint.architecture
    estimate = estimate_attribute(
        ModelShape.of(checkpoint),
        [_work(v, ex, arch, ks, len(seeds), batch_size, layers) for v, _, ex in jobs],
        device,
        tf32=tf32,
    )
    check(estimate, max_memory, _fit_options(device, max_examples, max_tokens, batch_size))
    with meter.stage("load"):
        model = load_model(base, device)
    result: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "base": str(base.resolve()),
        "data": str(data.resolve()),
        "device": str(device),
        "matmul_precision": "tf32" if tf32 else "float32",
        "definitions": DEFINITIONS,
        "vectors": {},
    }
    precision = torch.get_float32_matmul_precision()
    if tf32:
        torch.set_float32_matmul_precision("high")  # TF32 for float32 products on CUDA
    try:
        for vector, domain, examples in jobs:
            with meter.stage(f"attribute {vector.name}"):
                entry = attribute_vector(
                    model,
                    vector,
                    examples,
                    ks=ks,
                    seeds=seeds,
                    batch_size=batch_size,
                    architecture=arch,
                    layers=layers,
                )
            result["vectors"][vector.name] = {"domain": domain, **entry}
    finally:
        torch.set_float32_matmul_precision(precision)
    result["resources"] = meter.as_dict()
    result["estimate"] = estimate.as_dict()
    out.mkdir(parents=True, exist_ok=True)
    (out / "attribution.json").write_text(json.dumps(_clean(result), indent=1, allow_nan=False) + "\n")
    (out / "attribution.md").write_text(markdown(result), encoding="utf-8")
    plot_attribution(result, out / "attribution.png")
    log(f"wrote {out / 'attribution.json'}, attribution.md and attribution.png")
    for line in meter.lines("measured "):
        log(line)
    return result


def _work(
    vector: Any,
    examples: Sequence[Example],
    architecture: str,
    ks: Sequence[int] | None,
    seeds: int,
    batch_size: int,
    layers: tuple[int, int] | None,
) -> Any:
    """One vector's size for the cost estimate (``analysis/estimate.py:AttributionWork``)."""
    from tunevec.analysis.estimate import AttributionWork
    from tunevec.core.vector import DTYPES

    components = components_of(vector, architecture, layers)
    changed = changed_tensors(vector, architecture, layers)
    n = len(components)
    n_params = sum(math.prod(vector.manifest.tensors[t].shape) for t in changed)
    chosen = sorted({k for k in (ks or default_ks(n)) if 1 <= k <= n})
    first = min(r for r in (classify(t, architecture).layer for t in changed) if r is not None)
    return AttributionWork(
        first_layer=first,
        components=n,
        changed_params=n_params,
        changed_bytes=n_params * DTYPES[vector.manifest.dtype].itemsize,
        examples=len(examples),
        tokens=sum(len(ids) for ids, _ in examples),
        max_length=max(len(ids) for ids, _ in examples),
        scored=sum(sum(1 for t in labels[1:] if t != IGNORE) for _, labels in examples),
        ks=len(chosen),
        seeds=seeds,
        batch_size=batch_size,
    )


def _fit_options(device: torch.device, max_examples: int, max_tokens: int, batch_size: int) -> list[str]:
    """What would make an attribution run fit, for the refusal message (each a real option of the command)."""
    out = []
    if device.type == "cpu":
        out.append("a GPU (--device cuda)")
    out += [
        f"fewer or shorter examples per batch (--batch-size, now {batch_size}; --max-tokens, now {max_tokens}): "
        "activations kept for backward shrink with them",
        "fewer layers (--layers START:END: the vector restricted to them, and only their tensors kept beside "
        "the model)",
        "--max-memory SIZE if more memory is available than reported",
    ]
    return out


def _clean(obj: Any) -> Any:
    """NaN -> None, so the JSON is strict (as report.json)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- command line


def configure(parser: Any) -> None:
    """``tunevec attribute``: arguments; the work is ``attribute``."""
    parser.add_argument("vectors", nargs="+", type=Path, help="tuning-vector artifacts (tunevec extract)")
    parser.add_argument(
        "--base", required=True, type=Path, help="the base model folder the vectors belong to"
    )
    parser.add_argument("--out", required=True, type=Path, help="report folder (attribution.json/.png/.md)")
    parser.add_argument(
        "--data",
        type=Path,
        help="JSONL of domain examples: {'domain', 'messages'} (last turn scored), {'prompt', 'completion'} or "
        f"{{'text'}}; default: {' or '.join(DATA_FILES)} beside the base folder",
    )
    parser.add_argument(
        "--domain",
        action="append",
        help="domain of each vector's examples, in order (default: the vector's name)",
    )
    parser.add_argument("--max-examples", type=int, default=64, help="examples per vector (default 64)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per example (default 128)")
    parser.add_argument(
        "--k", type=int, action="append", help="k values for the curve (default: 1..n up to 16)"
    )
    parser.add_argument("--seeds", type=int, default=5, help="random-k draws per k (default 5)")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="examples per forward/backward (default 16)"
    )
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="CUDA only: float32 matrix products on TF32 tensor cores (inputs rounded to 10 mantissa bits, float32 "
        "sums): several times faster on Ampere and later GPUs; default exact float32 (docs/scaling.md compares them)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--layers",
        type=parse_layers,
        metavar="START:END",
        help="only decoder layers START..END-1: components there, and the tuned model is base + tau on them",
    )
    add_device_arguments(parser)
    parser.set_defaults(run=_run)


def _run(args: Any) -> int:
    from tunevec.analysis.device import limit_memory, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seeds < 1:
        raise TunevecError("--seeds must be at least 1 (the random-k control)")
    if args.batch_size < 1:
        raise TunevecError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = resolve_device(args.device)
    limit_memory(device, args.max_memory)
    if args.tf32 and device.type != "cuda":
        raise TunevecError(f"--tf32 applies to CUDA devices; this run is on {device} (leave --tf32 out)")
    attribute(
        args.vectors,
        args.base,
        args.out,
        data=args.data,
        domains=args.domain,
        max_examples=args.max_examples,
        max_tokens=args.max_tokens,
        ks=args.k,
        seeds=tuple(range(args.seeds)),
        batch_size=args.batch_size,
        device=device,
        layers=args.layers,
        max_memory=args.max_memory,
        tf32=args.tf32,
    )
    return 0
