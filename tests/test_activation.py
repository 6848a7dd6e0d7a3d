"""Activation vectors: the artifact, control-vector GGUF import and export, `tunevec derive`, and how the library and
the server's registry treat them (served per request only; a layer range, never a scope)."""

from __future__ import annotations

import pytest
import torch

from tunevec.cli import main as tunevec_main
from tunevec.core.activation import ActivationVector, from_gguf, write_activation
from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import TunevecError
from tunevec.steering.library import VectorLibrary


def control_vector_gguf(path, directions: dict[int, torch.Tensor], arch: str = "controlvector") -> None:
    """A control vector as repeng's ``export_gguf`` writes one."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", "llama")
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer, direction in directions.items():
        writer.add_tensor(f"direction.{layer}", direction.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def base(tiny_fixtures) -> Checkpoint:
    return Checkpoint(tiny_fixtures / "base")


def test_a_control_vector_gguf_imports_and_exports_unchanged(base, tmp_path):
    gen = torch.Generator().manual_seed(0)
    hidden = base.config["hidden_size"]
    directions = {1: torch.randn(hidden, generator=gen), 0: torch.randn(hidden, generator=gen)}
    control_vector_gguf(tmp_path / "calm.gguf", directions)
    assert tunevec_main(["activation", "import", str(tmp_path / "calm.gguf"), "--base", str(base.path),
                         "--out", str(tmp_path / "calm")]) == 0  # fmt: skip
    vec = ActivationVector(tmp_path / "calm")
    assert vec.name == "calm" and vec.layers == [0, 1]
    got = vec.directions()
    for layer, direction in directions.items():
        assert torch.equal(got[layer], direction)
    assert vec.manifest["source"]["kind"] == "gguf" and vec.manifest["base"]["fingerprint"] is None
    vec.check_base(base)
    # out again, and in again: the same directions
    assert (
        tunevec_main(["activation", "export", str(tmp_path / "calm"), "--out", str(tmp_path / "again.gguf")])
        == 0
    )
    again = from_gguf(tmp_path / "again.gguf", tmp_path / "again", "again", base)
    assert all(torch.equal(again.directions()[k], d) for k, d in directions.items())


def test_a_gguf_for_another_model_is_refused_with_what_is_wrong(base, tmp_path):
    control_vector_gguf(tmp_path / "wide.gguf", {1: torch.zeros(base.config["hidden_size"] + 8)})
    with pytest.raises(TunevecError, match="hidden size"):
        from_gguf(tmp_path / "wide.gguf", tmp_path / "wide", "wide", base)
    control_vector_gguf(tmp_path / "deep.gguf", {99: torch.zeros(base.config["hidden_size"])})
    with pytest.raises(TunevecError, match="decoder layers"):
        from_gguf(tmp_path / "deep.gguf", tmp_path / "deep", "deep", base)
    assert not (tmp_path / "wide").exists() and not (tmp_path / "deep").exists()  # nothing half-written
    control_vector_gguf(tmp_path / "model.gguf", {1: torch.zeros(base.config["hidden_size"])}, arch="llama")
    with pytest.raises(TunevecError, match="controlvector"):
        from_gguf(tmp_path / "model.gguf", tmp_path / "model", "model", base)


def test_a_damaged_directions_file_is_refused(base, tmp_path):
    vec = write_activation(
        tmp_path / "a", "a", {0: torch.ones(base.config["hidden_size"])}, base, {"kind": "test"}
    )
    raw = bytearray((tmp_path / "a" / "directions.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "a" / "directions.safetensors").write_bytes(bytes(raw))
    with pytest.raises(TunevecError, match="sha256"):
        vec.directions()


@pytest.mark.parametrize("mode", ["layers", "one"])
def test_derive_writes_the_mean_residual_shift_tau_causes(tiny_fixtures, tiny_vectors, tmp_path, mode):
    """Per-layer increments add back up to each layer's mean shift; one layer holds the shift there."""
    from tunevec.analysis.derive import residual_shifts
    from tunevec.core.vector import TuningVector

    out = tmp_path / mode
    argv = ["derive", str(tiny_vectors / "medical"), "--base", str(tiny_fixtures / "base"), "--out", str(out),
            "--probe", str(tiny_fixtures / "probe.jsonl"), "--max-probe-texts", "12", "--mode", mode]  # fmt: skip
    assert tunevec_main(argv) == 0
    vec = ActivationVector(out)
    source = vec.manifest["source"]
    assert vec.name == "medical-act" and source["mode"] == mode and source["vector"] == "medical"
    from tunevec.analysis.derive import _probe_texts

    chosen, _ = _probe_texts(str(tiny_fixtures / "probe.jsonl"), 12, None, tiny_fixtures / "base")
    shifts = residual_shifts(TuningVector(tiny_vectors / "medical"), tiny_fixtures / "base", chosen, 128)
    got = vec.directions()
    if mode == "layers":
        total = torch.zeros_like(shifts[0])
        for k in sorted(shifts):
            total += got.get(k, torch.zeros_like(total))
            torch.testing.assert_close(total, shifts[k], atol=1e-5, rtol=1e-4)
    else:
        last = max(shifts)
        assert list(got) == [last]
        torch.testing.assert_close(got[last], shifts[last], atol=1e-5, rtol=1e-4)
    assert float(max(s.norm() for s in shifts.values())) > 0


def test_activation_vectors_are_served_per_request_only(tiny_fixtures, tiny_vectors, tmp_path):
    import shutil

    from tunevec.server.config import LoraSettings
    from tunevec.server.mixtures import MixtureRegistry
    from tunevec.steering.inject import Injection

    base = Checkpoint(tiny_fixtures / "base")
    vectors = tmp_path / "vectors"
    shutil.copytree(tiny_vectors / "medical", vectors / "medical")
    write_activation(
        vectors / "calm", "calm", {1: torch.ones(base.config["hidden_size"])}, base, {"kind": "test"}
    )
    library = VectorLibrary.from_dir(vectors, base)
    assert library.kind("calm") == "activation" and library.kind("medical") == "weights"
    registry = MixtureRegistry.prepare(
        library, str(tmp_path / "cache"), LoraSettings(adapter_rank=8, max_lora_rank=16), 2
    )
    described = registry.describe(registry.parse("calm[1:]:2+medical:0.5"))
    steered = [n for n in described["deltas"] if n.endswith(".residual.direction")]
    assert (
        steered == ["model.layers.1.residual.direction"] and len(described["deltas"]) > 1
    )  # medical's norms too
    assert registry.mixture(registry.parse("calm:3")).name == "calm:3"
    with pytest.raises(TunevecError, match="layer range.*not a scope"):
        registry.parse("calm@mlp:1")
    with pytest.raises(TunevecError, match="activation vector"):
        Injection.from_settings({"spec": "calm", "vectors": library.paths(), "base": str(base.path)})
