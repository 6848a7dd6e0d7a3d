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
