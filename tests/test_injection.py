"""Load-time injection through vLLM's model-loader plugin equals the same weights run by transformers."""

from __future__ import annotations

import httpx
import pytest
from servers import reference_prompt_logprobs, running_server, served_prompt_logprobs
from transformers import AutoTokenizer

from tunevec.core.checkpoint import Checkpoint
from tunevec.steering.inject import Injection
from tunevec.steering.library import VectorLibrary

pytestmark = pytest.mark.slow
SPEC = "ties(density=0.5)/math@mlp:0.7+medical:1.2"  # a non-linear merge: only full-rank injection serves it exactly
TOLERANCE = 2e-3
PROMPTS = ["The diagnosis typhoid meningitis is coded", "Question: What is 12 + 7?\nAnswer:"]


@pytest.fixture(scope="module")
def injected_server(tiny_fixtures, tiny_vectors, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inject")
    with running_server(
        tiny_fixtures / "base", tiny_vectors, "--inject", SPEC, log=tmp / "server.log"
    ) as url:
        yield url, tmp / "server.log"


def test_injected_engine_serves_base_plus_merged_delta(injected_server, tiny_fixtures, tiny_vectors):
    url, log = injected_server
    paths = VectorLibrary.from_dir(tiny_vectors).paths()
    injection = Injection.from_settings({"spec": SPEC, "vectors": paths, "base": str(tiny_fixtures / "base")})
    state = dict(injection.stream(Checkpoint(tiny_fixtures / "base")))
    tok = AutoTokenizer.from_pretrained(tiny_fixtures / "base")
    worst = 0.0
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        served = served_prompt_logprobs(url, "base", ids)
        reference = reference_prompt_logprobs(tiny_fixtures / "base", state, ids)
        plain = reference_prompt_logprobs(tiny_fixtures / "base", None, ids)
        worst = max(worst, max(abs(a - b) for a, b in zip(served, reference, strict=True)))
        assert max(abs(a - b) for a, b in zip(served, plain, strict=True)) > 10 * TOLERANCE  # it did change
    print(f"injection {SPEC}: max |logprob diff| vs transformers = {worst:.2e}")
    assert worst < TOLERANCE
    assert "tunevec: injected" in log.read_text()


def test_injected_server_still_mixes_per_request_on_top(injected_server):
    url, _ = injected_server
    body = {"model": "medical:0.5", "prompt": "The diagnosis", "max_tokens": 3, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
