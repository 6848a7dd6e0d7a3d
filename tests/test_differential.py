"""The differential harness's core matrix on real servers (tests/differential.py says what each row compares).

Four engines: float32; float32 with bfloat16 LoRA weights (the configuration that once served batched mixtures
13.6 nats away from the same mixtures alone) and no prefix caching; bfloat16; tensor parallel 2. Every engine
prefills long prompts in chunks. ``bench/bench_differential.py`` prints the whole matrix, more engines included.
"""

from __future__ import annotations

import pytest
from differential import (
    Config,
    activation_vectors,
    check_alone,
    engine_report,
    plant_fault,
    run_config,
    serve,
)
from transformers import AutoTokenizer

pytestmark = pytest.mark.slow

CONFIGS = {
    "float32": Config("float32", fault_extension=True),
    "float32, LoRA bfloat16, no prefix caching": Config(
        "float32/lora-bf16", lora_dtype="bfloat16", prefix_caching=False
    ),
    "bfloat16": Config("bfloat16", dtype="bfloat16"),
    "tensor parallel 2": Config("tp2", tensor_parallel=2),
}


@pytest.fixture(scope="module")
def prompts(tiny_fixtures) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tiny_fixtures / "base")
    long = " ".join(["The patient was given the brand name drug and its generic equivalent."] * 8)
    texts = ["The diagnosis typhoid meningitis is coded", long]
    ids = [tok(t)["input_ids"] for t in texts]
    assert len(ids[1]) > 64, "the long prompt must be prefilled in chunks (--max-num-batched-tokens 64)"
    return ids


@pytest.fixture(scope="module")
def vectors(tiny_fixtures, tiny_vectors, tmp_path_factory):
    """The tiny vectors and an activation vector derived from medical (steered per request on the same path)."""
    return activation_vectors(tiny_fixtures, tiny_vectors, tmp_path_factory.mktemp("vectors"))


@pytest.fixture(scope="module", params=list(CONFIGS))
def served(request, tiny_fixtures, vectors, tmp_path_factory):
    config = CONFIGS[request.param]
    log = tmp_path_factory.mktemp("differential") / "server.log"
    with serve(config, tiny_fixtures / "base", vectors, log) as url:
        yield config, url


def test_every_mixture_path_matches_the_reference_and_itself_alone(served, tiny_fixtures, vectors, prompts):
    config, url = served
    result = run_config(config, url, tiny_fixtures / "base", vectors, prompts)
    print(
        f"\n{result.table()}\nA/A {result.aa:.2e}, base vs reference {result.base_vs_reference:.2e}, {result.stats}"
    )
    assert result.ok, f"outside the bounds:\n{result.table()}"
    # The batched rows prove something only if the batches shared engine steps, and shared stacks ran where allowed.
    assert result.stats.get("steps with several slots", 0) > 0
    assert result.stats.get("steps with a slot of base tokens", 0) > 0
    assert result.stats.get("prompt-logprob logits calls routed", 0) > 0
    if config.tensor_parallel == 1:
        assert result.stats.get("steps with shared stacks", 0) > 0
    workers = engine_report(url)["workers"]
    assert len(workers) == config.tensor_parallel and all(w["mixtures"] is None for w in workers)

    if config.fault_extension:
        # One coefficient 2% off in one slot: the harness must see it.
        plant_fault(url, 1.02)
        spoiled = check_alone(config, url, tiny_fixtures / "base", vectors, prompts, ["medical:0.7+math:0.3"])
        print(f"planted fault:\n{spoiled.table()}")
        assert not spoiled.ok, "a wrong coefficient in one slot went unnoticed"
