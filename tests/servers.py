"""Start a real `tunevec serve` on loopback for end-to-end tests, and compute reference logprobs in PyTorch."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

from tunevec.eval.launch import free_port, start_server  # noqa: F401  (free_port: used by tests)

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running_server(base: Path, vectors: Path, *extra: str, log: Path, timeout: float = 600) -> Iterator[str]:
    """A tunevec server subprocess; yields its base URL once /health answers, and always stops it."""
    port = free_port()
    cmd = [sys.executable, "-m", "tunevec.cli", "serve", "--base", str(base), "--vectors", str(vectors),
           "--port", str(port), "--dtype", "float32", "--max-model-len", "512", *extra]  # fmt: skip
    with start_server(cmd, port, log, what="tunevec server", timeout=timeout) as server:
        yield server.url


def served_prompt_logprobs(
    url: str, model: str, token_ids: list[int], headers: dict | None = None
) -> list[float]:
    """log p(token_i | tokens_<i) for i >= 1, as lm-eval asks for them (echo + logprobs, one generated token)."""
    body = {
        "model": model,
        "prompt": token_ids,
        "max_tokens": 1,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
    }
    r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=120)
    r.raise_for_status()
    lp = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert lp[0] is None and len(lp) == len(token_ids) + 1
    return lp[1 : len(token_ids)]


def reference_prompt_logprobs(
    model_dir: Path, state: dict[str, torch.Tensor] | None, token_ids: list[int]
) -> list[float]:
    """The same quantity from transformers, with ``state`` (if given) loaded over the model's weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if state:
        missing = model.load_state_dict(state, strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[i - 1, token_ids[i]]) for i in range(1, len(token_ids))]


def mixture_state(base_dir: Path, vectors_dir: Path, spec_text: str, rank: int, max_rank: int) -> dict:
    """The weights a per-request mixture serves: base + sum_i alpha_i B_i A_i of each vector's rank-``rank``
    factors (as the server builds them), and + sum_i alpha_i tau_i of the tensors carried whole (norms, biases)."""
    from tunevec.core.checkpoint import Checkpoint
    from tunevec.core.vector import TuningVector
    from tunevec.steering.lora import adapter_from_vector, compose
    from tunevec.steering.spec import Spec

    spec = Spec.parse(spec_text)
    adapters = {
        v: adapter_from_vector(TuningVector(vectors_dir / v), rank=rank, max_rank=max_rank)
        for v in spec.vectors
    }
    mixture = compose(spec, adapters, max_rank=max_rank)
    base = Checkpoint(base_dir)
    # A tied head is the embedding tensor itself: transformers ties it, so only the embedding is loaded.
    state = {name: base.read(name) + mixture.delta(name) for name in mixture.factors if name in base.tensors}
    for comp in spec.components:
        for name, delta in adapters[comp.vector].deltas.items():
            if comp.applies_to(name):
                state[name] = state.get(name, base.read(name)) + comp.alpha * delta
    return state
