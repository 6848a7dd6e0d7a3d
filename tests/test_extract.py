"""Extraction of tau = tuned - base: exact round trip, streaming over shards, and every mismatch policy."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic import llama_like, perturbed, write_model

from tunevec.cli import main as tunevec_main
from tunevec.core.checkpoint import Checkpoint, ResolvedModel, resolve_model
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


# --- names, tokenizers and configs that differ between base and tuned ------------------------------------------


def test_vector_is_named_after_the_out_folder_not_the_tuned_one(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "meditron-7b", perturbed(base))
    vec = extract(tmp_path / "b", tmp_path / "meditron-7b", tmp_path / "vectors" / "medical", progress=False)
    assert vec.name == "medical"
    named = extract(tmp_path / "b", tmp_path / "meditron-7b", tmp_path / "v2", name="med", progress=False)
    assert named.name == "med"


def test_cli_names_the_vector_after_out_even_with_a_trailing_slash(tmp_path, capsys):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "meditron-7b", perturbed(base))
    out = f"{tmp_path / 'vectors' / 'medical'}/"
    argv = ["extract", "--base", str(tmp_path / "b"), "--tuned", str(tmp_path / "meditron-7b"), "--out", out]
    assert tunevec_main(argv) == 0
    assert TuningVector(tmp_path / "vectors" / "medical").name == "medical"
    assert "vector 'medical'" in capsys.readouterr().out


def _tokenizer_json(path: Path, regular: list[str], special: dict[int, str]) -> None:
    """A minimal tokenizer.json: a WordLevel vocabulary plus added (special) tokens at the given ids."""
    data = {
        "model": {
            "type": "WordLevel",
            "vocab": {tok: i for i, tok in enumerate(regular)},
            "unk_token": regular[0],
        },
        "added_tokens": [{"id": i, "content": tok, "special": True} for i, tok in special.items()],
    }
    (path / "tokenizer.json").write_text(json.dumps(data))


_WORDS = [f"w{i}" for i in range(30)]
_SPECIALS = {30: "<|reserved_0|>", 31: "<|reserved_1|>"}


def test_grown_vocabulary_lists_the_tokens_beyond_the_base_rows(tmp_path):
    base = llama_like(0)
    tuned = perturbed(base)
    tuned["model.embed_tokens.weight"] = torch.cat([tuned["model.embed_tokens.weight"], torch.randn(2, 8)])
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", tuned)
    _tokenizer_json(tmp_path / "b", _WORDS, _SPECIALS)
    _tokenizer_json(tmp_path / "t", _WORDS, {**_SPECIALS, 32: "<think>", 33: "</think>"})
    tok = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False).manifest.policies[
        "tokenizer"
    ]
    assert tok["compared"] and not tok["same"]
    assert tok["beyond_base_rows"] == [{"id": 32, "token": "<think>"}, {"id": 33, "token": "</think>"}]
    assert tok["needs_tuned_tokenizer"] is False  # base + tau has no rows for them: nothing to read them with


def test_renamed_special_tokens_are_kept_and_flag_the_tuned_tokenizer(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base))
    _tokenizer_json(tmp_path / "b", _WORDS, _SPECIALS)
    _tokenizer_json(tmp_path / "t", _WORDS, {30: "<|im_start|>", 31: "<|reserved_1|>"})
    tok = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False).manifest.policies[
        "tokenizer"
    ]
    assert tok["renamed_special"] == [{"id": 30, "base": "<|reserved_0|>", "tuned": "<|im_start|>"}]
    assert tok["needs_tuned_tokenizer"] is True


def test_tokenizers_that_renumber_regular_tokens_are_refused(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base))
    _tokenizer_json(tmp_path / "b", _WORDS, _SPECIALS)
    _tokenizer_json(tmp_path / "t", [_WORDS[1], _WORDS[0], *_WORDS[2:]], _SPECIALS)
    with pytest.raises(TunevecError, match="tokenizers differ: 2 regular tokens"):
        extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)


def _set_config(path: Path, **values) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in values.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def test_other_rope_settings_are_refused_unless_allowed_and_then_recorded(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base))
    _set_config(tmp_path / "b", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    _set_config(tmp_path / "t", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with pytest.raises(TunevecError, match=r"other settings than the base \(rope: .*--allow-config-change"):
        extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    vec = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", allow_config_changes=True, progress=False)
    change = vec.manifest.policies["config_changes"]["rope"]
    assert (change["base"]["rope_theta"], change["tuned"]["rope_theta"]) == (10000.0, 500000.0)


def test_rope_scaling_and_norm_eps_changes_are_refused(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base))
    _set_config(tmp_path / "t", rope_scaling={"rope_type": "linear", "factor": 4.0})
    with pytest.raises(TunevecError, match="rope"):
        extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    _set_config(tmp_path / "t", rope_scaling=None, rms_norm_eps=1e-5)
    _set_config(tmp_path / "b", rms_norm_eps=1e-6)
    with pytest.raises(TunevecError, match="rms_norm_eps"):
        extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)


def test_the_same_rope_spelled_by_transformers_4_and_5_is_no_change(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base))
    _set_config(tmp_path / "b", rope_theta=10000.0, rope_scaling=None, transformers_version="4.46.0")
    _set_config(tmp_path / "t", rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    vec = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    assert "config_changes" not in vec.manifest.policies


def test_float32_fine_tune_of_a_bfloat16_base_gives_the_float32_difference(tmp_path):
    base = {n: t.to(torch.bfloat16) for n, t in llama_like(0).items()}
    tuned = perturbed(llama_like(0), seed=3)  # float32, as many trainers save
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", tuned)
    vec = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    assert vec.manifest.dtype == "float32"
    assert vec.manifest.policies["dtypes"] == {"base": ["BF16"], "tuned": ["F32"]}
    for name in base:
        torch.testing.assert_close(vec.read(name), tuned[name] - base[name].float(), rtol=0, atol=0)


# --- hub ids through the Hugging Face cache ----------------------------------------------------------------------


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _cache_snapshot(
    cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)
) -> None:
    """Put ``folder`` into ``cache`` as huggingface_hub stores a download: content-addressed blobs (LFS files by
    their sha256, others by their git blob id), a snapshot folder of symlinks per commit, refs naming commits."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else _git_blob_id(data)
        (repo / "blobs" / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under a temporary HF_HOME, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


def test_hub_ids_resolve_offline_from_the_cache_with_revisions_recorded(tmp_path, hub_cache):
    base = llama_like(0)
    v1, v2 = perturbed(base, seed=1), perturbed(base, seed=2)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t1", v1)
    write_model(tmp_path / "t2", v2, shards=2)
    c_base, c1, c2 = "a" * 40, "b" * 40, "c" * 40
    _cache_snapshot(hub_cache, "org/base", tmp_path / "b", c_base)
    _cache_snapshot(hub_cache, "org/tuned", tmp_path / "t1", c1, refs=("v1",))
    _cache_snapshot(hub_cache, "org/tuned", tmp_path / "t2", c2)

    vec = extract("org/base", "org/tuned", tmp_path / "vectors" / "latest", progress=False)
    assert vec.manifest.tuned["hub_id"] == "org/tuned" and vec.manifest.tuned["commit"] == c2
    assert vec.manifest.tuned["revision"] is None
    for name in base:
        torch.testing.assert_close(vec.read(name), v2[name] - base[name], rtol=0, atol=0)
    files = vec.manifest.base["files"]
    weights = (tmp_path / "b" / "model.safetensors").read_bytes()
    assert files["model.safetensors"] == {"size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    config = (tmp_path / "b" / "config.json").read_bytes()
    assert files["config.json"]["sha256"] == hashlib.sha256(config).hexdigest()
    assert len(vec.manifest.tuned["files"]) == 4  # config, index, two shards

    for revision in ("v1", c1):  # a tag, or the commit itself
        pinned = extract(
            "org/base", "org/tuned", tmp_path / "v1", tuned_revision=revision, force=True, progress=False
        )
        assert (pinned.manifest.tuned["revision"], pinned.manifest.tuned["commit"]) == (revision, c1)
        for name in base:
            torch.testing.assert_close(pinned.read(name), v1[name] - base[name], rtol=0, atol=0)


def test_local_folders_record_no_hub_id_and_hash_small_files_only(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base))
    resolved = resolve_model(tmp_path / "b")
    assert resolved == ResolvedModel(tmp_path / "b")
    vec = extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    assert vec.manifest.base["hub_id"] is None and vec.manifest.base["commit"] is None
    config = (tmp_path / "b" / "config.json").read_bytes()
    assert vec.manifest.base["files"]["config.json"]["sha256"] == hashlib.sha256(config).hexdigest()
    with pytest.raises(TunevecError, match="revision .* applies only to Hugging Face hub ids"):
        resolve_model(tmp_path / "b", revision="main")


def test_hub_id_missing_from_the_cache_offline_says_what_to_do(hub_cache):
    with pytest.raises(TunevecError, match=r"not in the hub cache .*HF_HUB_OFFLINE.*hf download org/absent"):
        resolve_model("org/absent")
    with pytest.raises(TunevecError, match="no such folder"):
        resolve_model("./not/a/folder")


def test_hf_hub_cache_overrides_hf_home_and_merge_takes_a_hub_id(tmp_path, hub_cache, monkeypatch):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base))
    other = tmp_path / "elsewhere"
    _cache_snapshot(other, "org/base", tmp_path / "b", "d" * 40)
    with pytest.raises(TunevecError, match="not in the hub cache"):
        resolve_model("org/base")
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert resolve_model("org/base").path == other / "models--org--base" / "snapshots" / ("d" * 40)
    extract("org/base", tmp_path / "t", tmp_path / "vectors" / "med", progress=False)
    out = tmp_path / "merged"
    argv = ["merge", "--base", "org/base", "--vectors", str(tmp_path / "vectors"), "--spec", "med"]
    assert tunevec_main([*argv, "--out", str(out)]) == 0
    merged = Checkpoint(out)
    tuned = Checkpoint(tmp_path / "t")
    for name in base:
        torch.testing.assert_close(merged.read(name), tuned.read(name), rtol=0, atol=1e-6)


def test_base_plus_tau_of_a_resized_vocabulary_is_the_tuned_model_restricted_to_the_base_tokens(tmp_path):
    """The defined meaning of tau over shared rows: base + tau computes the tuned model's logits for every base
    token, so its log-probabilities are the tuned model's renormalised over the base vocabulary."""
    from archs import FAMILIES, build_pair
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, tuned_dir = build_pair(FAMILIES["mistral"], tmp_path)  # untied: embedding and head both grow
    tok = AutoTokenizer.from_pretrained(tuned_dir)
    vocab = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|a|>", "<|b|>", "<|c|>"]})
    model = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():  # trained rows for the new tokens, likely enough to take real probability mass
        model.get_input_embeddings().weight[vocab:] = torch.randn(3, model.config.hidden_size)
        model.get_output_embeddings().weight[vocab:] = torch.randn(3, model.config.hidden_size)
    model.save_pretrained(tuned_dir)
    tok.save_pretrained(tuned_dir)

    vec = extract(base_dir, tuned_dir, tmp_path / "vectors" / "v", progress=False)
    grown = {v["tensor"]: v["added_rows"] for v in vec.manifest.policies["vocab_extension"]}
    assert grown == {"model.embed_tokens.weight": 3, "lm_head.weight": 3}
    assert vec.manifest.policies["tokenizer"]["beyond_base_rows_count"] == 3
    argv = ["merge", "--base", str(base_dir), "--vectors", str(tmp_path / "vectors"), "--spec", "v"]
    assert tunevec_main([*argv, "--out", str(tmp_path / "merged")]) == 0

    ids = torch.tensor([AutoTokenizer.from_pretrained(base_dir)("The diagnosis is coded")["input_ids"]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(ids).logits[0]
        tuned = model(ids).logits[0]
    assert merged.shape[-1] == vocab
    restricted = torch.log_softmax(tuned[:, :vocab], dim=-1)
    torch.testing.assert_close(torch.log_softmax(merged, dim=-1), restricted, rtol=0, atol=1e-4)
    # ... and not the tuned model's own distribution: the added tokens hold probability mass there.
    added_mass = torch.softmax(tuned, dim=-1)[:, vocab:].sum(-1)
    assert float(added_mass.max()) > 1e-3


def test_serve_and_eval_take_hub_ids_for_the_base_and_tuned_models(tmp_path, hub_cache, monkeypatch):
    """`tunevec serve --base org/name` and an eval grid's `base:` / `tuned:` variants resolve through the cache."""
    from tunevec.eval.grid import Grid
    from tunevec.server.config import ServerConfig

    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base, seed=1))
    _cache_snapshot(hub_cache, "org/base", tmp_path / "b", "a" * 40)
    _cache_snapshot(hub_cache, "org/tuned", tmp_path / "t", "b" * 40)
    extract("org/base", "org/tuned", tmp_path / "vectors" / "medical", progress=False)
    # The vectors travel to another machine: its hub cache is elsewhere, the recorded paths do not exist there.
    shutil.move(tmp_path / "hf", tmp_path / "hf-elsewhere")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-elsewhere"))
    hub_cache = tmp_path / "hf-elsewhere" / "hub"
    snapshot = hub_cache / "models--org--base" / "snapshots" / ("a" * 40)

    config = ServerConfig.load(None, {"base": "org/base", "vectors": str(tmp_path / "vectors")})
    assert Path(config.base) == snapshot
    with pytest.raises(TunevecError, match="org/missing.*not in the hub cache"):
        ServerConfig.load(None, {"base": "org/missing", "vectors": str(tmp_path / "vectors")})

    grid = Grid.from_dict(
        {
            "tasks": ["t"],
            "variants": ["base", {"name": "medical-tuned", "tuned": "medical"}],
            "base": "org/base",
            "vectors": str(tmp_path / "vectors"),
        },  # fmt: skip
        root=tmp_path,
    )
    grid.check(task_index=None)
    assert grid.base == snapshot
    tuned = next(v for v in grid.variants if v.name == "medical-tuned")
    assert tuned.checkpoint == hub_cache / "models--org--tuned" / "snapshots" / ("b" * 40)
