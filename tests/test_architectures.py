"""The architecture matrix: every supported family through extract -> merge -> load-time injection served by vLLM.

Per family (tests/archs.py: small random models from transformers config classes, a "tuned" copy that moves every
floating-point tensor, biases and norms included):

1. ``tunevec extract`` gives a vector named after its folder whose tensors carry the family's roles;
2. ``tunevec merge`` of base + tau equals the tuned checkpoint tensor by tensor;
3. ``tunevec serve --inject`` serves base + alpha * tau (fp32) with prompt logprobs matching transformers run on
   base + alpha * (tuned - base) computed here from the two checkpoints (no tunevec code in the reference).

One server per family (module-scoped ``served``): it injects ``tuned:0.5``, so a per-request mixture
``tuned:0.5`` on the same server serves base + tau, the tuned model itself. A further per-family check is one
more function taking ``family`` and ``served``, e.g. ``served_max_error(served, "tuned:0.5", family,
family.tuned)``. Families vLLM on CPU cannot serve are listed in ``REFUSED`` with the reason (none today;
docs/architectures.md).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from archs import FAMILIES, PROMPTS, Family, pair
from safetensors.torch import load_file, save_file
from servers import reference_prompt_logprobs, running_server, served_prompt_logprobs

from tunevec.cli import main as tunevec_main
from tunevec.core.checkpoint import Checkpoint
from tunevec.core.extract import extract
from tunevec.core.roles import classify
from tunevec.core.vector import TuningVector

VECTOR = "tuned"  # the vector's folder, hence its name
INJECT_ALPHA = 0.5
TOLERANCE = 2e-3  # as tests/test_injection.py
# Gemma 2 soft-caps attention scores (50 * tanh(s / 50)); vLLM's CPU attention kernel does it less exactly than
# torch: the tuned checkpoint served as is, without tunevec, is 2.7e-3 from transformers, and 1.9e-6 with the cap
# removed from its config (measured, docs/architectures.md).
FAMILY_TOLERANCE = {"gemma2": 1e-2}
# family -> why vLLM on CPU cannot serve it (the served tests skip with this reason); empty: all are served.
REFUSED: dict[str, str] = {}


@dataclass(frozen=True)
class FamilyModels:
    family: Family
    base: Path
    tuned: Path
    vectors: Path  # holds one vector, VECTOR = tuned - base

    @property
    def name(self) -> str:
        return self.family.name


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory) -> FamilyModels:
    """A family's base and tuned checkpoints and the vectors folder with tau extracted (name from the folder)."""
    root = tmp_path_factory.getbasetemp() / "archs"
    base, tuned = pair(request.param, root)
    vectors = root / request.param / "vectors"
    if not (vectors / VECTOR).exists():
        extract(base, tuned, vectors / VECTOR, progress=False)
    return FamilyModels(FAMILIES[request.param], base, tuned, vectors)


@pytest.fixture(scope="module")
def served(family: FamilyModels, tmp_path_factory):
    """``tunevec serve`` of the family's base injecting ``tuned:0.5`` in fp32; yields its URL."""
    if family.name in REFUSED:
        pytest.skip(f"vLLM on CPU cannot serve {family.name}: {REFUSED[family.name]}")
    log = tmp_path_factory.mktemp(f"serve-{family.name}") / "server.log"
    # Eager mode: the matrix tests tunevec's weights per family, not vLLM's graph compilation, which would
    # double each start on a CPU. 900 s: on a 2-core machine shared with other jobs a start took up to 10 minutes.
    spec = f"{VECTOR}:{INJECT_ALPHA}"
    # Adapters at rank 64 (the models' hidden size) are exact, so the mixture check compares weights, not a
    # low-rank approximation; every tensor of these fine-tunes moves, norms and biases included, so a mixture
    # leaves out far more than the default 1% and is served here only because the limit is lifted.
    lora = ("--adapter-rank", "64", "--max-lora-rank", "64", "--max-dropped-share", "1")
    with running_server(
        family.base, family.vectors, "--inject", spec, "--enforce-eager", *lora, log=log, timeout=900
    ) as url:
        yield url


def interpolated_checkpoint(family: FamilyModels, alpha: float, out: Path) -> Path:
    """A model folder holding base + alpha * (tuned - base) for every tensor, straight from the two checkpoints.

    Written as a checkpoint (the base's config and tokenizer, the checkpoint's own tensor names) rather than loaded
    as a state dict, because transformers renames some tensors on load (GPT-NeoX's embed_out is lm_head in memory).
    """
    if not out.exists():
        base, tuned = _load(family.base), _load(family.tuned)
        assert base.keys() == tuned.keys()
        out.mkdir(parents=True)
        for f in family.base.iterdir():
            if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                shutil.copy2(f, out / f.name)
        state = {n: base[n] + alpha * (tuned[n] - base[n]) for n in base}
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def served_max_error(url: str, model: str, family: FamilyModels, reference: Path) -> tuple[float, float]:
    """(max |served - reference| prompt logprob, max |reference - base|) over PROMPTS, in nats.

    The reference is transformers run on the model folder ``reference``; the second number shows how far that
    variant is from the base, so a test can check that the variant changed anything at all.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family.base)
    worst = moved = 0.0
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        served = served_prompt_logprobs(url, model, ids)
        want = reference_prompt_logprobs(reference, None, ids)
        plain = reference_prompt_logprobs(family.base, None, ids)
        worst = max(worst, max(abs(a - b) for a, b in zip(served, want, strict=True)))
        moved = max(moved, max(abs(a - b) for a, b in zip(want, plain, strict=True)))
    return worst, moved


def test_extracted_vector_is_named_after_its_folder_and_carries_the_family_roles(family):
    vec = TuningVector(family.vectors / VECTOR)
    assert vec.name == VECTOR
    base = Checkpoint(family.base)
    assert vec.manifest.base["architecture"] == family.family.architecture
    assert set(vec.names()) == {n for n in base.tensors if not (family.family.tied and "lm_head" in n)}
    for name, entry in vec.manifest.tensors.items():
        role = classify(name, family.family.architecture)
        assert (entry.role, entry.layer, entry.module) == (role.role, role.layer, role.module)
        assert entry.role != "other", name
        assert entry.norm > 0, f"{name}: the tuned copy moves every tensor"
    assert any(n.endswith(".bias") for n in vec.names()) == family.family.has_bias


def test_merge_of_base_and_tau_is_the_tuned_checkpoint_tensor_by_tensor(family, tmp_path):
    out = tmp_path / "merged"
    argv = ["merge", "--base", str(family.base), "--vectors", str(family.vectors), "--spec", VECTOR]
    assert tunevec_main([*argv, "--out", str(out)]) == 0
    merged, tuned = _load(out), _load(family.tuned)
    assert merged.keys() == tuned.keys()
    worst = 0.0
    for name, want in tuned.items():
        assert merged[name].dtype == want.dtype, name
        # base + (tuned - base) in float32 is tuned up to the rounding of the subtraction (half an ulp).
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)
        worst = max(worst, float((merged[name] - want).abs().max()))
    print(f"{family.name}: merge vs tuned max |diff| = {worst:.2e}")


@pytest.mark.slow
def test_injected_server_serves_base_plus_alpha_tau_like_transformers(family, served, tmp_path):
    reference = interpolated_checkpoint(family, INJECT_ALPHA, tmp_path / "reference")
    worst, moved = served_max_error(served, "base", family, reference)
    tolerance = FAMILY_TOLERANCE.get(family.name, TOLERANCE)
    print(
        f"{family.name}: injected {VECTOR}:{INJECT_ALPHA} max |logprob diff| vs transformers = {worst:.2e} "
        f"(variant vs base: {moved:.3g})"
    )
    assert moved > 10 * tolerance  # the variant is far from the base, so a no-op injection would fail
    assert worst < tolerance


@pytest.mark.slow
def test_per_request_mixture_adds_the_carried_part_of_tau_like_transformers(family, served, tmp_path):
    """``tuned:0.5`` per request on the server injecting ``tuned:0.5``: base + 0.5 tau + 0.5 tau's carried part.

    The reference is built from the two checkpoints and the server's own account of what its adapters carry
    (``/v1/tunevec/describe``): those tensors move by tau, the rest (norms, biases, and any module this engine's
    LoRA layers do not receive) by half of it. Every attention and MLP projection must be carried, fused ones
    included, and the left-out share the server reports must be exactly that of the tensors it does not carry.
    """
    import httpx

    from tunevec.steering.lora import carried

    described = httpx.post(served + "/v1/tunevec/describe", json={"spec": VECTOR}, timeout=60).json()
    served_modules = set(described["modules"])
    vec = TuningVector(family.vectors / VECTOR)
    if family.family.tied:
        # One tensor on disk is both the embedding and the head: a tied model can carry both or neither.
        embedding = {n for n in served_modules | set(vec.names()) if classify(n).role == "embedding"}
        head = served_modules & {"lm_head.weight"}
        assert bool(embedding & served_modules) == bool(head), (sorted(embedding), sorted(head))
        served_modules -= head
    by_name = {n for n, e in vec.manifest.tensors.items() if carried(n, e.shape)}
    assert served_modules <= by_name
    projections = {n for n in by_name if classify(n).role in ("attention", "mlp")}
    assert projections and projections <= served_modules, sorted(projections - served_modules)

    out = tmp_path / "reference"
    base, tuned = _load(family.base), _load(family.tuned)
    out.mkdir()
    for f in family.base.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    state = {}
    for n, b in base.items():
        tau = tuned[n] - b
        state[n] = b + INJECT_ALPHA * tau + (INJECT_ALPHA * tau if n in served_modules else 0)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    worst, moved = served_max_error(served, f"{VECTOR}:{INJECT_ALPHA}", family, out)
    tolerance = FAMILY_TOLERANCE.get(family.name, TOLERANCE)
    left = sorted(by_name - served_modules)
    print(
        f"{family.name}: mixture {VECTOR}:{INJECT_ALPHA} on top max |logprob diff| vs transformers = {worst:.2e}"
        f"; carried {len(served_modules)} tensors, not carried by this engine: {left or 'none'}"
    )
    assert moved > 10 * tolerance and worst < tolerance
    left_out = described["dropped_share"][VECTOR]
    total = sum(e.norm**2 for e in vec.manifest.tensors.values())
    want = sum(e.norm**2 for n, e in vec.manifest.tensors.items() if n not in served_modules) / total
    assert abs(left_out - want) < 1e-9, (left_out, want)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out
