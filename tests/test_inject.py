"""Full-rank injection: the merged checkpoint equals base + spec delta, and foreign vectors are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from synthetic import llama_like, perturbed, write_model

from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import TunevecError
from tunevec.core.extract import extract
from tunevec.steering.inject import Injection, merge_to_checkpoint
from tunevec.steering.library import VectorLibrary


@pytest.fixture
def world(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    tuned = {n: perturbed(base, seed=s, scale=0.05) for n, s in (("medical", 1), ("math", 2))}
    for name, t in tuned.items():
        write_model(tmp_path / name, t)
        extract(tmp_path / "b", tmp_path / name, tmp_path / "vectors" / name, progress=False)
    return tmp_path, base, tuned


def settings(root, spec):
    lib = VectorLibrary.from_dir(root / "vectors")
    return {"spec": spec, "vectors": lib.paths(), "base": str(root / "b")}


def test_merged_checkpoint_is_base_plus_scaled_vectors(world):
    root, base, tuned = world
    inj = Injection.from_settings(settings(root, "medical:0.8+math:-0.5"))
    out = merge_to_checkpoint(root / "b", inj, root / "merged")
    merged = load_file(out / "model.safetensors")
    for name, w in base.items():
        want = w + 0.8 * (tuned["medical"][name] - w) - 0.5 * (tuned["math"][name] - w)
        torch.testing.assert_close(merged[name], want, atol=1e-5, rtol=1e-5)
    assert (out / "config.json").exists()


def test_alpha_one_recovers_the_tuned_model(world):
    root, _, tuned = world
    inj = Injection.from_settings(settings(root, "medical"))
    for name, w in Checkpoint(root / "b").stream():
        torch.testing.assert_close(inj.apply(name, w), tuned["medical"][name], atol=1e-6, rtol=1e-6)


def test_scoped_injection_leaves_other_roles_untouched(world):
    root, base, tuned = world
    inj = Injection.from_settings(settings(root, "medical@mlp"))
    for name, w in Checkpoint(root / "b").stream():
        got = inj.apply(name, w)
        if ".mlp." in name:
            torch.testing.assert_close(got, tuned["medical"][name], atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(got, base[name])


def test_vector_from_another_base_is_refused_before_loading(world):
    root, _, _ = world
    write_model(root / "other", llama_like(7))
    s = settings(root, "medical")
    s["base"] = str(root / "other")
    with pytest.raises(TunevecError, match="different base"):
        Injection.from_settings(s)


def test_spec_naming_an_unknown_vector_is_refused(world):
    root, _, _ = world
    with pytest.raises(TunevecError, match="unknown vector"):
        Injection.from_settings(settings(root, "surgery:0.5"))


def test_merge_refuses_to_overwrite_without_force(world):
    root, _, _ = world
    inj = Injection.from_settings(settings(root, "medical"))
    merge_to_checkpoint(root / "b", inj, root / "m")
    with pytest.raises(TunevecError, match="already exists"):
        merge_to_checkpoint(root / "b", inj, root / "m")


# --- dtypes (issue 13 point 7: one dtype table; `tunevec merge` on F64 and integer tensors) ------------------------


def test_merge_keeps_float64_wide_and_copies_integer_tensors_unchanged(tmp_path):
    from tunevec.core.checkpoint import read_safetensors_header
    from tunevec.core.vector import TuningVector

    wide = "model.layers.0.mlp.up_proj.weight"
    base = llama_like(0)
    base[wide] = base[wide].double() + 1e-12  # a value float32 cannot hold
    base["model.position_ids"] = torch.arange(16, dtype=torch.int64)
    base["model.layers.1.attn_mask"] = torch.tensor([True, False, True])
    tuned = perturbed({n: t for n, t in base.items() if t.is_floating_point()}, seed=1, scale=0.05)
    tuned |= {n: t for n, t in base.items() if not t.is_floating_point()}
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "medical", tuned)
    extract(tmp_path / "b", tmp_path / "medical", tmp_path / "vectors" / "medical", progress=False)
    inj = Injection.from_settings(settings(tmp_path, "medical:0.5"))
    out = merge_to_checkpoint(tmp_path / "b", inj, tmp_path / "merged")
    header = read_safetensors_header(out / "model.safetensors")
    assert header[wide].dtype == "F64"
    assert header["model.position_ids"].dtype == "I64"
    assert header["model.layers.1.attn_mask"].dtype == "BOOL"
    merged = load_file(out / "model.safetensors")
    tau = TuningVector(tmp_path / "vectors" / "medical").read(wide)
    assert torch.equal(merged[wide], base[wide] + 0.5 * tau.double())  # summed in float64, not narrowed
    assert torch.equal(merged["model.position_ids"], base["model.position_ids"])
    assert torch.equal(merged["model.layers.1.attn_mask"], base["model.layers.1.attn_mask"])


# --- integrity and atomicity (issue 12 findings 8 and 9) -----------------------------------------------------------


def test_injection_refuses_a_vector_whose_bytes_were_flipped(world):
    root, _, _ = world
    f = root / "vectors" / "medical" / "vector.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(TunevecError, match="checksum mismatch"):
        Injection.from_settings(settings(root, "medical"))


def test_merge_with_force_never_leaves_the_output_missing(world, monkeypatch):
    import os
    import shutil
    from pathlib import Path

    from tunevec.core import files

    root, _, _ = world
    probe = [root / "probe-a", root / "probe-b"]
    for p in probe:
        p.mkdir()
    supported = files.exchange(*probe)
    for p in probe:
        p.rmdir()
    if not supported:
        pytest.skip("no renameat2(RENAME_EXCHANGE) here: the documented fallback has a missing instant")
    out = root / "m"
    merge_to_checkpoint(root / "b", Injection.from_settings(settings(root, "medical")), out)
    steps: list[str] = []

    def checked(name, fn):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            steps.append(name)
            assert (out / "model.safetensors").exists() and (out / "config.json").exists(), f"after {name}"
            return result

        return wrapped

    monkeypatch.setattr(shutil, "rmtree", checked("rmtree", shutil.rmtree))
    monkeypatch.setattr(os, "rename", checked("os.rename", os.rename))
    monkeypatch.setattr(Path, "rename", checked("Path.rename", Path.rename))
    monkeypatch.setattr(files, "exchange", checked("exchange", files.exchange))
    inj = Injection.from_settings(settings(root, "math:0.5"))
    merge_to_checkpoint(root / "b", inj, out, force=True)
    assert steps, "the replacement went through none of the file operations watched"
    assert load_file(out / "model.safetensors").keys() == load_file(root / "b" / "model.safetensors").keys()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
