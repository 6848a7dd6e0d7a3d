"""Start a real `tunevec serve` on loopback for end-to-end tests, and compute reference logprobs in PyTorch."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(base: Path, vectors: Path, *extra: str, log: Path, timeout: float = 600) -> Iterator[str]:
    """A tunevec server subprocess; yields its base URL once /health answers, and always stops it."""
    port = free_port()
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    )
    cmd = [sys.executable, "-m", "tunevec.cli", "serve", "--base", str(base), "--vectors", str(vectors),
           "--port", str(port), "--dtype", "float32", "--max-model-len", "512", *extra]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in {timeout}s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


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
