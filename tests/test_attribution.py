"""Attribution patching (analysis/attribution.py) on the tiny fixtures: the estimate against true loss changes,
the top-k patch against random on a planted case, specs that select exactly the chosen components, the command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunevec.analysis.attribution import (
    Component,
    DomainLoss,
    WeightPatcher,
    attribute_vector,
    components_of,
    linear_estimates,
    load_examples,
    spec_for,
)
from tunevec.core.extract import extract
from tunevec.core.vector import TuningVector
from tunevec.steering.spec import Spec


@pytest.fixture(scope="module")
def tiny(tiny_fixtures: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_fixtures / "base")
    model = AutoModelForCausalLM.from_pretrained(tiny_fixtures / "base", dtype=torch.float32)
    return tokenizer, model


class _Scaled:
    """A vector view whose tensors are eps * tau on ``names`` and zero elsewhere (what WeightPatcher reads)."""

    def __init__(self, vector: TuningVector, names, eps: float):
        self.vector, self.names, self.eps = vector, set(names), eps

    def read(self, name: str) -> torch.Tensor:
        return self.vector.read(name) * (self.eps if name in self.names else 0.0)


@pytest.mark.parametrize("block", ["L0.attention", "L1.mlp"])
def test_linear_estimate_matches_the_true_loss_change_of_a_small_component_change(
    tiny, tiny_fixtures, tiny_vectors, block
):
    """With tau on one component only, reverting its activation *is* reverting its weights, so every estimate
    must converge to loss(base) - loss(base + eps tau_c): to ~1% at eps = 0.01, and closer than at eps = 0.1."""
    tokenizer, model = tiny
    vector = TuningVector(tiny_vectors / "medical")
    component = {c.name: c for c in components_of(vector)}[block]
    examples = load_examples(tiny_fixtures / "probe.jsonl", tokenizer, "medical", 16, 64)
    errors = {}
    for eps in (0.1, 0.01):
        patcher = WeightPatcher(model, _Scaled(vector, component.tensors, eps), component.tensors)
        loss = DomainLoss(model, examples, first=0, batch_size=8)
        l_base = loss()
        patcher.set(component.tensors)
        true_gain = l_base - loss()
        patcher.set(())
        est = linear_estimates(loss, patcher, [component], component.tensors)[component.name]
        assert loss() == l_base  # the estimate leaves the base weights in place
        assert abs(true_gain) > 1e-5
        for kind in ("tuned", "base", "mean", "weight"):
            assert est[kind] * true_gain > 0, (eps, kind, est, true_gain)
        errors[eps] = {kind: abs(est[kind] / true_gain - 1) for kind in est}
    # one-sided estimates are first-order: their error shrinks with eps (about 10x per 10x)
    for kind in ("tuned", "base"):
        assert errors[0.01][kind] < 0.02 and errors[0.01][kind] < errors[0.1][kind] / 4, (kind, errors)
    # the two-sided ones (trapezoid) are second-order: within 1% already at eps = 0.1 (at 0.01, float32 rounding
    # of the loss is what is left)
    for kind in ("mean", "weight"):
        assert errors[0.1][kind] < 0.01 and errors[0.01][kind] < 0.01, (kind, errors)


def _planted(tiny_fixtures: Path, tiny_vectors: Path, out: Path) -> TuningVector:
    """A tuned checkpoint = base + the real math tau on L1's MLP + random noise of the same norm on the other three
    components; its vector has one component that helps on math and three that do not."""
    base = tiny_fixtures / "base"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    math_tau = TuningVector(tiny_vectors / "math")
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for comp in components_of(math_tau):
            for name in comp.tensors:
                tau = math_tau.read(name).float()
                if comp.name == "L1.mlp":
                    params[name] += tau
                else:
                    noise = torch.randn(tau.shape, generator=gen)
                    params[name] += noise * (tau.norm() / noise.norm())
    tuned = out / "tuned"
    model.save_pretrained(tuned)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy2(f, tuned / f.name)
    return extract(base, tuned, out / "planted", name="planted", force=True, progress=False)


def test_top_patch_recovers_more_than_random_on_a_planted_component(
    tiny, tiny_fixtures, tiny_vectors, tmp_path
):
    tokenizer, model = tiny
    vector = _planted(tiny_fixtures, tiny_vectors, tmp_path)
    examples = load_examples(tiny_fixtures / "probe.jsonl", tokenizer, "math", 24, 64)
    result = attribute_vector(model, vector, examples, ks=[1, 2, 4], seeds=range(6), batch_size=8)
    assert result["ranking"][0] == "L1.mlp"
    curve = {row["k"]: row for row in result["curve"]}
    assert curve[1]["spec"] == "planted@mlp[1:2]"
    top1 = curve[1]["recovered"]
    alone = {c["name"]: c["patched_alone_gain"] for c in result["components"]}
    assert top1 == pytest.approx(alone["L1.mlp"] / result["gain"])
    assert top1 > curve[1]["random"]["mean"] + 0.1, curve[1]
    # the noise hurts: the planted component alone does better than the whole vector
    assert top1 > 1.0
    # all four components are the whole vector here (tau is zero elsewhere), so k = 4 recovers exactly 100%
    assert curve[4]["recovered"] == pytest.approx(1.0, abs=1e-6)
    assert result["loss"]["base"] == pytest.approx(DomainLoss(model, examples, 0, 8)(), abs=1e-6)  # restored


def test_spec_selects_exactly_the_chosen_components():
    comps = [
        Component(24, "mlp", ("model.layers.24.mlp.down_proj.weight",), "model.layers.24.mlp", 1.0),
        Component(25, "mlp", ("model.layers.25.mlp.up_proj.weight",), "model.layers.25.mlp", 1.0),
        Component(
            27, "attention", ("model.layers.27.self_attn.o_proj.weight",), "model.layers.27.self_attn", 1.0
        ),
    ]
    text = spec_for("medical", comps)
    assert text == "medical@attention[27:28]+medical@mlp[24:26]"
    spec = Spec.parse(text)
    names = [
        f"model.layers.{layer}.{mod}.weight"
        for layer in range(22, 30)
        for mod in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    chosen = {n for n in names if any(c.applies_to(n) for c in spec.components)}
    want = {n for n in names if (".mlp." in n and n.split(".")[2] in ("24", "25")) or ".27.self_attn." in n}
    assert chosen == want


def test_attribute_command_writes_json_plot_and_markdown(tiny_fixtures, tiny_vectors, tmp_path):
    from tunevec.cli import main

    out = tmp_path / "report"
    args = ["attribute", str(tiny_vectors / "medical"), str(tiny_vectors / "math"), "--base"]
    args += [str(tiny_fixtures / "base"), "--out", str(out), "--max-examples", "8", "--k", "1", "--k", "4"]
    assert main([*args, "--seeds", "2"]) == 0
    result = json.loads((out / "attribution.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert set(result["vectors"]) == {"medical", "math"}
    for name, vec in result["vectors"].items():
        assert [row["k"] for row in vec["curve"]] == [1, 4]
        assert len(vec["curve"][0]["random"]["values"]) == 2
        for row in vec["curve"]:
            Spec.parse(row["spec"])
            assert row["spec"].startswith(f"{name}@")
        # the tiny fine-tunes train embeddings and norms too, which no component holds
        assert vec["other_tensors"] and vec["all_components_recovered"] < 1.0
    assert (out / "attribution.png").stat().st_size > 10_000
    assert "| k | top-k recovered |" in (out / "attribution.md").read_text()
    assert main([*args[:-4], "--seeds", "0"]) == 2  # no random control is an error


def test_a_patch_run_from_remembered_layer_inputs_gives_the_loss_of_the_whole_suffix(
    tiny, tiny_fixtures, tiny_vectors
):
    """Patched evaluations start at the lowest layer where they differ from a remembered model (attribute_vector);
    from the base's inputs of layer 1, base + τ on layer 1's components has the loss computed from layer 0."""
    tokenizer, model = tiny
    vector = TuningVector(tiny_vectors / "math")
    components = components_of(vector)
    upper = [t for c in components if c.layer == 1 for t in c.tensors]
    patcher = WeightPatcher(model, vector, [t for c in components for t in c.tensors])
    loss = DomainLoss(model, load_examples(tiny_fixtures / "probe.jsonl", tokenizer, "math", 8, 48), 0, 4)
    inputs = loss.layer_inputs()
    assert set(inputs) == {0, 1} and loss(1, inputs[1]) == pytest.approx(loss(), rel=1e-6)
    patcher.set(upper)
    from_layer_1, whole = loss(1, inputs[1]), loss()
    patcher.set(())
    assert from_layer_1 == pytest.approx(whole, rel=1e-6) and abs(whole - loss()) > 1e-4


def test_suffix_loss_equals_the_full_models_loss(tiny, tiny_fixtures):
    """Running layers first.. from cached inputs of layer `first`, with the head on scored positions only, is the
    same loss as the whole model's (what the smol fine-tunes and the patch evaluations rely on)."""
    from tunevec.analysis.suffix import IGNORE, prefix_states, suffix_batch, suffix_loss

    tokenizer, model = tiny
    examples = load_examples(tiny_fixtures / "probe.jsonl", tokenizer, "math", 6, 40)
    examples[0] = (examples[0][0], [IGNORE] * 5 + examples[0][1][5:])  # a masked prompt, as in chat examples
    for first in (0, 1):
        states = prefix_states(model, examples, first, batch_size=4)
        batch = suffix_batch(states, examples)
        for i, (ids, labels) in enumerate(examples):
            full = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            one = suffix_batch(states[i : i + 1], examples[i : i + 1])
            assert suffix_loss(model, first, one).item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
        total = sum(
            model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
            * sum(t != IGNORE for t in labels[1:])
            for ids, labels in examples
        )
        assert suffix_loss(model, first, batch, reduction="sum").item() == pytest.approx(total, rel=1e-5)
    assert len(model.model.layers) == model.config.num_hidden_layers  # the model is restored
