"""Load generation for the serving benchmarks: token-id prompts, request bodies, and clients sending them.

Requests go to ``/v1/completions`` as lm-eval sends them (generation, or prompt scoring with echo + logprobs);
``run_load`` keeps ``concurrency`` requests in flight and reports each one's status, latency and tokens.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass


def random_prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    """Token-id prompts (ids away from the low special ids), the same for every configuration of one round."""
    rng = random.Random(seed)
    return [[rng.randrange(16, vocab - 16) for _ in range(length)] for _ in range(n)]


def gen_body(model: str, prompt: list[int], max_tokens: int) -> dict:
    """A generation request: greedy, exactly ``max_tokens`` tokens (EOS ignored), the same work for all."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def loglik_body(model: str, prompt: list[int]) -> dict:
    """lm-eval's loglikelihood request shape: score the prompt's tokens, generate one."""
    return {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}


@dataclass
class Result:
    kind: str
    status: int
    latency: float  # seconds, request sent -> full response read
    tokens: int  # generated tokens (gen) or scored prompt tokens (loglik)
    error: str = ""


async def post(client, url: str, kind: str, body: dict) -> Result:
    import httpx

    t0 = time.perf_counter()
    try:
        r = await client.post(url + "/v1/completions", json=body)
        latency = time.perf_counter() - t0
        if r.status_code != 200:
            return Result(kind, r.status_code, latency, 0, r.text[:300])
        data = r.json()
        usage = data.get("usage") or {}
        if kind == "loglik":
            lp = data["choices"][0]["logprobs"]["token_logprobs"]
            tokens = sum(1 for x in lp[: len(body["prompt"])] if x is not None)
        else:
            tokens = int(usage.get("completion_tokens", 0))
        return Result(kind, 200, latency, tokens)
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
        return Result(kind, -1, time.perf_counter() - t0, 0, f"{type(exc).__name__}: {exc}")


async def run_load(
    url: str,
    jobs: list[tuple[str, dict]],
    concurrency: int,
    time_limit: float | None = None,
    timeout: float = 300,
) -> tuple[list[Result], float]:
    """Send ``jobs`` [(kind, body)] from ``concurrency`` clients; stop taking new jobs after ``time_limit`` s.

    Returns the results and the wall time from the first request to the last response.
    """
    import httpx

    queue = list(reversed(jobs))
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = None if time_limit is None else t0 + time_limit

        async def worker() -> None:
            while queue and (deadline is None or time.perf_counter() < deadline):
                kind, body = queue.pop()
                results.append(await post(client, url, kind, body))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


def request_once(url: str, body: dict, kind: str = "gen", timeout: float = 300) -> Result:
    import httpx

    async def one() -> Result:
        async with httpx.AsyncClient(timeout=timeout) as client:
            return await post(client, url, kind, body)

    return asyncio.run(one())
