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
    # low-rank approximation. Every tensor of these fine-tunes moves, norms and biases included, and the server's
    # default --max-dropped-share (0.1%) stands: a mixture must carry all of tau to be served at all.
    lora = ("--adapter-rank", "64", "--max-lora-rank", "64")
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


# Per request on the server injecting tuned:0.5, `tuned:alpha` serves base + (0.5 + alpha) tau: with alpha 0.5 the
# tuned checkpoint itself, with -0.25 base + 0.25 tau. Every tensor moves: norms, biases, embeddings, the head.
PER_REQUEST_ALPHAS = (0.5, -0.25)
# A per-request mixture must match transformers as closely as the engine serves plain weights (Gemma 2: its
# soft-cap, FAMILY_TOLERANCE).
EXACT = 1e-4


@pytest.mark.slow
def test_a_full_fine_tune_is_carried_whole_per_request_like_transformers(family, served, tmp_path):
    """A per-request mixture of a full fine-tune (every tensor changed) is base + alpha * tau, every tensor
    included, within 1e-4 of transformers in float32, with nothing left out and no x-tunevec-left-out header."""
    import httpx

    described = httpx.post(served + "/v1/tunevec/describe", json={"spec": VECTOR}, timeout=60).json()
    vec = TuningVector(family.vectors / VECTOR)
    carried = set(described["modules"]) | set(described["deltas"])
    if family.family.tied:
        carried.discard("lm_head.weight")  # the head is the embedding tensor, carried on both of its uses
    assert carried == set(vec.names()), sorted(set(vec.names()) ^ carried)
    assert described["dropped_share"][VECTOR] == 0
    tolerance = FAMILY_TOLERANCE.get(family.name, EXACT)
    for alpha in PER_REQUEST_ALPHAS:
        model = f"{VECTOR}:{alpha}"
        r = httpx.post(
            served + "/v1/completions",
            json={"model": model, "prompt": PROMPTS[0], "max_tokens": 1},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert "x-tunevec-left-out" not in r.headers, r.headers["x-tunevec-left-out"]
        reference = interpolated_checkpoint(family, INJECT_ALPHA + alpha, tmp_path / f"reference-{alpha}")
        worst, moved = served_max_error(served, model, family, reference)
        print(f"{family.name}: per request {model} on the injected {VECTOR}:{INJECT_ALPHA}: max |logprob diff| vs "
              f"transformers = {worst:.2e} (vs base: {moved:.3g})")  # fmt: skip
        assert moved > 10 * tolerance and worst < tolerance


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out
