"""The steering oracle on the smol fixtures (SmolLM2-135M-Instruct, 30 layers, medical and math fine-tunes).

One real `tunevec serve` on the smol base with ``medical:0.8+math:0.4`` injected at load time; the injected model
itself, and a per-request adapter mixture on top of it, must give the prompt logprobs transformers computes from
the same weights (float32 on both sides). The tiny-fixture versions of these checks are in test_serving.py and
test_injection.py; this one shows they hold on a real 135M model with the domains it was tuned on.
"""

from __future__ import annotations

import json

import pytest
from servers import reference_prompt_logprobs, running_server, served_prompt_logprobs
from transformers import AutoTokenizer

from tunevec.core.checkpoint import Checkpoint
from tunevec.core.vector import TuningVector
from tunevec.steering.inject import Injection
from tunevec.steering.library import VectorLibrary
from tunevec.steering.lora import adapter_from_vector, compose
from tunevec.steering.spec import Spec

pytestmark = pytest.mark.slow
INJECT = "medical:0.8+math:0.4"  # full rank, at load time
MIXTURE = (
    "medical:1+math:-0.5"  # per request, a rank-RANK adapter of each vector, on top of the injected weights
)
RANK, MAX_LORA_RANK = 16, 32
TOLERANCE = 2e-3  # measured values are printed (-s) and quoted in docs/serving.md
TOKENS = 48  # per probe text; one medical, one math, one general


@pytest.fixture(scope="module")
def served(smol_fixtures, smol_vectors, tmp_path_factory):
    log = tmp_path_factory.mktemp("smol-serve") / "server.log"
    args = ["--inject", INJECT, "--adapter-rank", str(RANK), "--max-lora-rank", str(MAX_LORA_RANK)]
    with running_server(smol_fixtures / "base", smol_vectors, *args, log=log) as url:
        yield url


@pytest.fixture(scope="module")
def probes(smol_fixtures) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(smol_fixtures / "base")
    first: dict[str, str] = {}
    for line in (smol_fixtures / "probe.jsonl").read_text().splitlines():
        doc = json.loads(line)
        first.setdefault(doc["domain"], doc["text"])
    return [tok(first[d])["input_ids"][:TOKENS] for d in ("medical", "math", "general")]


@pytest.fixture(scope="module")
def injected_state(smol_fixtures, smol_vectors) -> dict:
    paths = VectorLibrary.from_dir(smol_vectors).paths()
    injection = Injection.from_settings(
        {"spec": INJECT, "vectors": paths, "base": str(smol_fixtures / "base")}
    )
    return dict(injection.stream(Checkpoint(smol_fixtures / "base")))


def worst_diff(served: list[float], reference: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(served, reference, strict=True))


def test_injected_smol_variant_matches_transformers(served, smol_fixtures, probes, injected_state):
    worst = 0.0
    for ids in probes:
        got = served_prompt_logprobs(served, "base", ids)
        worst = max(
            worst, worst_diff(got, reference_prompt_logprobs(smol_fixtures / "base", injected_state, ids))
        )
        # the injection really changed the model: far beyond the tolerance from the plain base
        assert worst_diff(got, reference_prompt_logprobs(smol_fixtures / "base", None, ids)) > 10 * TOLERANCE
    print(f"smol injected {INJECT}: max |logprob diff| vs transformers = {worst:.2e}")
    assert worst < TOLERANCE


def test_smol_adapter_mixture_matches_the_low_rank_reference(served, smol_fixtures, smol_vectors, probes,
                                                             injected_state):  # fmt: skip
    spec = Spec.parse(MIXTURE)
    adapters = {
        v: adapter_from_vector(TuningVector(smol_vectors / v), rank=RANK, max_rank=MAX_LORA_RANK)
        for v in spec.vectors
    }
    mixture = compose(spec, adapters, max_rank=MAX_LORA_RANK)
    state = {**injected_state, **{n: injected_state[n] + mixture.delta(n) for n in mixture.factors}}
    worst = 0.0
    for ids in probes:
        got = served_prompt_logprobs(served, MIXTURE, ids)
        worst = max(worst, worst_diff(got, reference_prompt_logprobs(smol_fixtures / "base", state, ids)))
        assert worst_diff(got, served_prompt_logprobs(served, "base", ids)) > 10 * TOLERANCE
    print(
        f"smol mixture {MIXTURE} (rank {RANK} each) over the injected base: max |logprob diff| = {worst:.2e}"
    )
    assert worst < TOLERANCE
