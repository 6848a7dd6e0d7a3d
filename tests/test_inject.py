"""Full-rank injection: the merged checkpoint equals base + spec delta, and foreign vectors are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from synthetic import llama_like, perturbed, write_model
from tunevec.steering.inject import Injection, merge_to_checkpoint
from tunevec.steering.library import VectorLibrary

from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import TunevecError
from tunevec.core.extract import extract


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
