"""Low-rank adapters from vectors and exact mixtures of them, in the PEFT layout vLLM loads."""

from __future__ import annotations

import json

import pytest
import torch
from synthetic import llama_like, perturbed, write_model

from tunevec.core.errors import TunevecError
from tunevec.core.extract import extract
from tunevec.steering.library import VectorLibrary
from tunevec.steering.lora import LoraAdapter, adapter_from_vector, compose, truncate, vllm_rank
from tunevec.steering.spec import Spec

UP = "model.layers.1.mlp.up_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def library(tmp_path):
    base = llama_like(0, hidden=16)
    write_model(tmp_path / "b", base)
    for i, name in enumerate(("medical", "math")):
        write_model(tmp_path / name, perturbed(base, seed=10 + i, scale=0.1))
        extract(tmp_path / "b", tmp_path / name, tmp_path / "vectors" / name, progress=False)
    return VectorLibrary.from_dir(tmp_path / "vectors")


def test_full_rank_adapter_reproduces_every_carried_tau(library):
    vec = library["medical"]
    adapter = adapter_from_vector(vec, rank=16, method="full")
    for name, tau in vec.stream():
        if tau.dim() == 2:  # every projection and the embedding table
            torch.testing.assert_close(adapter.delta(name), tau, atol=1e-4, rtol=1e-4)
    # The norms have no LoRA slot: they are kept whole, so nothing is left out.
    assert adapter.meta["dropped"] == {}
    norms = {name: tau for name, tau in vec.stream() if tau.dim() == 1}
    assert norms and set(adapter.deltas) == set(norms) == set(adapter.meta["deltas"])
    for name, tau in norms.items():
        assert torch.equal(adapter.deltas[name], tau.float())


def test_tied_embeddings_give_the_head_the_embedding_factors(library):
    vec = library["medical"]
    assert vec.manifest.policies["tied_embeddings"]
    adapter = adapter_from_vector(vec, rank=4)
    head, emb = adapter.factors["lm_head.weight"], adapter.factors["model.embed_tokens.weight"]
    assert head[0] is emb[0] and head[1] is emb[1]
    assert adapter.meta["modules"]["lm_head.weight"]["tied_to"] == "model.embed_tokens.weight"


def test_tensors_whose_tau_is_zero_are_left_out(tmp_path):
    base = llama_like(0, hidden=16)
    tuned = dict(base)
    tuned[UP] = base[UP] + 0.1  # only one module changes
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", tuned)
    vec = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    adapter = adapter_from_vector(vec, rank=4)
    assert set(adapter.factors) == {UP}
    assert adapter.meta["dropped"] == {}


def test_energy_target_picks_per_module_ranks_that_reach_it(library):
    adapter = adapter_from_vector(library["medical"], energy=0.8, method="full")
    for info in adapter.meta["modules"].values():
        assert info["energy"] >= 0.8 - 1e-6
    assert max(i["rank"] for i in adapter.meta["modules"].values()) < 16


def test_mixture_adapter_equals_weighted_sum_of_component_adapters(library):
    adapters = {n: adapter_from_vector(library[n], rank=4) for n in ("medical", "math")}
    spec = Spec.parse("medical:0.8+math:-0.4")
    mix = compose(spec, adapters, max_rank=64)
    for name in adapters["medical"].factors:
        want = 0.8 * adapters["medical"].delta(name) - 0.4 * adapters["math"].delta(name)
        torch.testing.assert_close(mix.delta(name), want, atol=1e-5, rtol=1e-5)
        assert mix.factors[name][0].shape[1] == 8  # ranks stack: exact, no re-truncation
    assert mix.meta["truncated"] == {}


def test_scoped_component_only_touches_its_modules(library):
    adapters = {n: adapter_from_vector(library[n], rank=4) for n in ("medical", "math")}
    mix = compose(Spec.parse("medical@mlp+math@attention[1:2]"), adapters, max_rank=64)
    torch.testing.assert_close(mix.delta(UP), adapters["medical"].delta(UP))
    assert Q not in mix.factors  # attention of layer 0 is outside math's layer range, and medical is MLP-only
    assert "model.layers.1.self_attn.q_proj.weight" in mix.factors


def test_mixture_over_max_rank_is_retruncated_with_reported_error(library):
    adapters = {n: adapter_from_vector(library[n], rank=8) for n in ("medical", "math")}
    mix = compose(Spec.parse("medical+math"), adapters, max_rank=8)
    assert all(b.shape[1] == 8 for b, _ in mix.factors.values())
    assert 0 < mix.meta["max_rel_error"] < 1
    exact = adapters["medical"].delta(UP) + adapters["math"].delta(UP)
    err = float((mix.delta(UP) - exact).norm() / exact.norm())
    assert err == pytest.approx(mix.meta["truncated"][UP], rel=1e-3)


def test_truncate_is_the_optimal_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(20, 6, generator=g), torch.randn(6, 30, generator=g)
    b2, a2, err = truncate(b, a, 3)
    u, s, vh = torch.linalg.svd(b @ a)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(b2 @ a2, best, atol=1e-4, rtol=1e-4)
    assert err == pytest.approx(float((s[3:] ** 2).sum().sqrt() / (s**2).sum().sqrt()), rel=1e-4)


def test_saved_adapter_is_peft_layout_with_alpha_equal_rank_and_no_modules_to_save(library, tmp_path):
    adapter = adapter_from_vector(library["medical"], energy=0.7)
    path = adapter.save(tmp_path / "ad")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == vllm_rank(adapter.max_module_rank)
    assert cfg["modules_to_save"] is None and cfg["r"] in (1, 8, 16, 32, 64, 128, 256, 320, 512)
    assert set(cfg["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "embed_tokens",
        "lm_head",
    }
    back = LoraAdapter.load(path)
    for name in adapter.factors:  # zero padding to r changes nothing
        torch.testing.assert_close(back.delta(name), adapter.delta(name), atol=1e-6, rtol=1e-6)


def test_nonlinear_merges_are_refused_for_adapters(library):
    adapters = {n: adapter_from_vector(library[n], rank=4) for n in ("medical", "math")}
    with pytest.raises(TunevecError, match="exact only for linear"):
        compose(Spec.parse("ties(density=0.5)/medical+math"), adapters, max_rank=64)


def test_rank_outside_vllm_limits_is_refused():
    assert vllm_rank(9) == 16 and vllm_rank(1) == 1
    with pytest.raises(TunevecError, match="exceeds vLLM's maximum"):
        vllm_rank(513)


def test_reloaded_adapter_keeps_true_module_ranks_so_mixtures_do_not_inflate(library, tmp_path):
    adapter = adapter_from_vector(library["medical"], rank=3)
    back = LoraAdapter.load(adapter.save(tmp_path / "ad"))
    assert back.max_module_rank == 3  # saved zero-padded to r = 8 for vLLM, trimmed on load


def test_a_saved_adapter_with_flipped_bytes_is_refused_on_load(library, tmp_path):
    path = adapter_from_vector(library["medical"], rank=3).save(tmp_path / "ad")
    data = bytearray((path / "adapter_model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # same size, one value changed
    (path / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(TunevecError, match="checksum"):
        LoraAdapter.load(path)


def test_loaded_factors_own_their_memory(library, tmp_path):
    """A worker keeps factors for its lifetime: they must not be views of a file someone may truncate."""
    path = adapter_from_vector(library["medical"], rank=3).save(tmp_path / "ad")
    back = LoraAdapter.load(path)
    (path / "adapter_model.safetensors").write_bytes(b"")
    assert all(float(b.abs().sum()) > 0 and float(a.abs().sum()) > 0 for b, a in back.factors.values())
