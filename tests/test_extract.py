"""Extraction of tau = tuned - base: exact round trip, streaming over shards, and every mismatch policy."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from synthetic import llama_like, perturbed, write_model

from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import TunevecError
from tunevec.core.extract import extract
from tunevec.core.vector import TuningVector


def test_extracted_tau_equals_tuned_minus_base_tensor_by_tensor(tmp_path):
    base = llama_like(0)
    tuned = perturbed(base)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", tuned, shards=3)  # the tuned side sharded, the base single-file
    vec = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "v", name="med", progress=False)
    assert vec.name == "med"
    stored = load_file(tmp_path / "v" / "vector.safetensors")
    assert set(stored) == set(base)
    for name in base:
        torch.testing.assert_close(stored[name], tuned[name] - base[name], rtol=0, atol=0)
        entry = vec.manifest.tensors[name]
        assert entry.norm == pytest.approx(float((tuned[name] - base[name]).norm()), rel=1e-6)
    assert vec.manifest.tensors["model.layers.1.mlp.up_proj.weight"].role == "mlp"
    assert vec.manifest.tensors["model.layers.1.self_attn.q_proj.weight"].layer == 1
    assert vec.manifest.base["fingerprint"] == Checkpoint(tmp_path / "base").fingerprint()
    vec.verify()


def test_bfloat16_artifact_stores_rounded_tau(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base))
    vec = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", dtype="bfloat16", progress=False)
    assert vec.read("model.norm.weight").dtype == torch.bfloat16


def test_bfloat16_checkpoints_give_the_exact_fp32_difference_and_read_into_converts_on_the_way(tmp_path):
    base = {n: t.to(torch.bfloat16) for n, t in llama_like(0).items()}
    tuned = {n: t.to(torch.bfloat16) for n, t in perturbed(llama_like(0), seed=2).items()}
    write_model(tmp_path / "b", base, shards=2)
    write_model(tmp_path / "t", tuned)
    wide = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v32", dtype="float32", progress=False)
    auto = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)  # the checkpoints' bf16
    assert (wide.manifest.dtype, auto.manifest.dtype) == ("float32", "bfloat16")
    moved, err_sq, tau_sq = 0, 0.0, 0.0
    for name in base:
        want = tuned[name].float() - base[name].float()
        torch.testing.assert_close(wide.read(name), want, rtol=0, atol=0)
        got = auto.read(name).float()
        moved += int((got != want).sum())
        err_sq += float((got - want).norm()) ** 2
        tau_sq += float(want.norm()) ** 2
    rounding = auto.manifest.policies["rounding"]
    assert rounding["entries_rounded"] == moved and rounding["entries"] == sum(
        t.numel() for t in base.values()
    )
    assert rounding["relative_error"] == pytest.approx((err_sq / tau_sq) ** 0.5, rel=1e-5)
    assert "rounding" not in wide.manifest.policies
    ckpt = Checkpoint(tmp_path / "b")
    for name, t in base.items():
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.full(t.shape, float("nan"), dtype=dtype)
            assert ckpt.read_into(name, out) is out
            torch.testing.assert_close(out, t.to(dtype), rtol=0, atol=0)
            torch.testing.assert_close(out, ckpt.read(name).to(dtype), rtol=0, atol=0)


def test_enlarged_vocabulary_keeps_shared_rows_and_reports_added_ones(tmp_path):
    base = llama_like(0)
    tuned = perturbed(base)
    extra = torch.randn(4, 8)
    tuned["model.embed_tokens.weight"] = torch.cat([tuned["model.embed_tokens.weight"], extra])
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", tuned)
    vec = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    (ext,) = vec.manifest.policies["vocab_extension"]
    assert ext["added_rows"] == 4 and ext["base_rows"] == 32
    assert ext["added_rows_norm"] == pytest.approx(float(extra.norm()), rel=1e-5)
    emb = vec.read("model.embed_tokens.weight")
    assert emb.shape == (32, 8)
    torch.testing.assert_close(
        emb, tuned["model.embed_tokens.weight"][:32] - base["model.embed_tokens.weight"]
    )


def test_tied_head_stored_twice_gets_one_tau_on_the_embedding(tmp_path):
    base = llama_like(0)
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    tuned = perturbed(base)
    tuned["lm_head.weight"] = tuned["model.embed_tokens.weight"].clone()
    write_model(tmp_path / "b", base, tied=True)
    write_model(tmp_path / "t", tuned, tied=True)
    vec = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    assert "lm_head.weight" not in vec.names()
    assert vec.manifest.policies["tied_embeddings"] is True


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "tensor names differ"),
        (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3)), "shape mismatch"),
        (
            lambda t: t.__setitem__("model.embed_tokens.weight", torch.zeros(16, 8)),
            "shape mismatch",  # a smaller vocabulary has no safe policy
        ),
    ],
)
def test_mismatched_tensors_are_refused_with_a_named_reason(tmp_path, mutate, message):
    base = llama_like(0)
    tuned = perturbed(base)
    mutate(tuned)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", tuned)
    with pytest.raises(TunevecError, match=message):
        extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    assert not (tmp_path / "v").exists()


def test_different_architectures_are_refused(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base), arch="MistralForCausalLM")
    with pytest.raises(TunevecError, match="architectures differ"):
        extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)


def test_untied_fine_tune_of_tied_base_is_refused(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base, tied=True)
    write_model(tmp_path / "t", perturbed(base), tied=False)
    with pytest.raises(TunevecError, match="tied embeddings differ"):
        extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)


def test_truncated_shard_fails_before_any_work(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base))
    f = tmp_path / "t" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(TunevecError, match="truncated"):
        extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    assert not any(p.name.startswith(".v") or p.name == "v" for p in tmp_path.iterdir())


def test_garbage_file_is_reported_as_corrupt(tmp_path):
    write_model(tmp_path / "b", llama_like(0))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "t" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(TunevecError, match="corrupt or truncated"):
        extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)


def test_interrupted_extraction_leaves_no_artifact(tmp_path, monkeypatch):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base))
    calls = {"n": 0}
    real_read = Checkpoint.read_into

    def failing_read(self, name, out):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_read(self, name, out)

    monkeypatch.setattr(Checkpoint, "read_into", failing_read)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "t"]


def test_existing_artifact_is_kept_unless_forced(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base, seed=1))
    write_model(tmp_path / "t2", perturbed(base, seed=2))
    first = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    with pytest.raises(TunevecError, match="already exists"):
        extract(tmp_path / "b", tmp_path / "t2", tmp_path / "v", progress=False)
    assert TuningVector(tmp_path / "v").manifest.tuned == first.manifest.tuned
    second = extract(tmp_path / "b", tmp_path / "t2", tmp_path / "v", force=True, progress=False)
    assert second.manifest.tuned["fingerprint"] != first.manifest.tuned["fingerprint"]


def test_vector_refuses_a_base_it_was_not_extracted_from(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "other", llama_like(5))
    write_model(tmp_path / "t", perturbed(base))
    vec = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    vec.check_base(Checkpoint(tmp_path / "b"))
    with pytest.raises(TunevecError, match="different base"):
        vec.check_base(Checkpoint(tmp_path / "other"))


def test_corrupted_artifact_fails_checksum_verification(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base))
    extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    f = tmp_path / "v" / "vector.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(TunevecError, match="checksum mismatch"):
        TuningVector(tmp_path / "v").verify()


def test_folder_without_manifest_is_not_a_vector(tmp_path):
    (tmp_path / "v").mkdir()
    with pytest.raises(TunevecError, match="no manifest.json"):
        TuningVector(tmp_path / "v")
