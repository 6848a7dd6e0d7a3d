"""Injected variant vs base, one server at a time: the cost of load-time injection, without interference.

    .venv/bin/python bench/bench_inject.py                   # tiny fixtures, about 5 minutes
    .venv/bin/python bench/bench_inject.py --model smol      # SmolLM2 fixtures (bf16 by default)
    .venv/bin/python bench/bench_inject.py --model smol --control   # A/A: the same plain server twice

bench_steering.py runs its servers side by side, and on a 2-core box every vLLM CPU worker spins on the same
core, so its injected/base ratio scatters widely. Here only one server is alive at a time: plain vLLM on the
base (P) and plain vLLM whose weights tunevec's model loader injects while loading (I: base + delta(spec),
no LoRA), alternated P, I, I, P, ... over ``--rounds`` rounds so drift in the machine cancels. Each server
gets a warm-up and then the same requests (fresh random token-id prompts per round, shared by P and I): ``--gen``
generation requests (greedy, ``ignore_eos``, exactly ``--max-tokens`` tokens) and ``--loglik`` lm-eval-shaped
scoring requests, ``--concurrency`` in flight. Reported: tokens/s per server and round, the model worker's CPU
seconds, and I/P ratios (median over rounds). Target (steering issue): injected >= 0.98 x base.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from _common import (
    add_model_args,
    header,
    loadavg,
    resolve_model,
    vocab_size,
    workdir_for,
)
from _load import (
    gen_body,
    loglik_body,
    random_prompts,
    run_load,
)
from _servers import (
    group_cpu_seconds,
)

from tunevec.eval.launch import checkpoint_server, free_port, injected_server, spawn
from tunevec.server.config import EngineSettings

TARGET = 0.98


def measure(server_for, name: str, prompts: list[list[int]], args, workdir: Path, tag: str) -> dict:
    port = free_port()
    settings = EngineSettings(dtype=args.engine_dtype, max_model_len=512, enforce_eager=True, reserved_cpus=0)
    command, env = server_for(port, settings)
    server = spawn(command, port, workdir / f"{tag}.log", f"server {tag}", env)
    try:
        server.wait_ready(900)
        # Warm-up with the measured shapes (batch sizes, lengths): first steps of a shape pay one-off costs.
        warm_prompts = random_prompts(
            vocab_size(args.base_dir), 2 * args.concurrency, args.prompt_len, seed=-1
        )
        warm = [("gen", gen_body("base", p, args.max_tokens)) for p in warm_prompts]
        warm += [("loglik", loglik_body("base", p)) for p in warm_prompts]
        asyncio.run(run_load(server.url, warm, args.concurrency))
        cpu0 = group_cpu_seconds(server.proc.pid)[1]
        gen = [("gen", gen_body("base", p, args.max_tokens)) for p in prompts[: args.gen]]
        results, gen_wall = asyncio.run(run_load(server.url, gen, args.concurrency))
        loglik = [("loglik", loglik_body("base", p)) for p in prompts[: args.loglik]]
        scored, ll_wall = asyncio.run(run_load(server.url, loglik, args.concurrency))
        cpu = group_cpu_seconds(server.proc.pid)[1] - cpu0
    finally:
        server.stop(grace=30)
    failed = sum(r.status != 200 for r in results + scored)
    gen_tokens = sum(r.tokens for r in results)
    ll_tokens = sum(r.tokens for r in scored)
    return {
        "name": name,
        "gen_tps": gen_tokens / gen_wall,
        "ll_tps": ll_tokens / ll_wall,
        "tokens_per_cpu_s": (gen_tokens + ll_tokens) / cpu if cpu else float("nan"),
        "failed": failed,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--spec", default="medical:1", help="the injected variant (default medical:1)")
    ap.add_argument(
        "--control",
        action="store_true",
        help="A/A control: I is a second plain server on the base, so the ratios show this machine's noise",
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds of P, I (then I, P) (default 3)")
    ap.add_argument("--gen", type=int, default=192, help="generation requests per server (default 192)")
    ap.add_argument("--loglik", type=int, default=192, help="scoring requests per server (default 192)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    base, vectors, dtype = resolve_model(args)
    args.base_dir = base
    args.engine_dtype = "bfloat16" if dtype == "auto" else dtype
    if args.quick:
        args.rounds, args.gen, args.loglik = 1, 16, 16
    workdir = workdir_for(args, "tunevec-bench-inject-")
    print(
        header(
            "bench_inject: plain vLLM on the base (P) vs on base + delta(spec) injected at load (I), one at a time",
            [
                f"model: {args.model} base={base} vectors={vectors} dtype={args.engine_dtype}; injected spec "
                + ("none: A/A control, I is plain vLLM on the base too" if args.control else args.spec),
                f"requests per server: {args.gen} gen ({args.prompt_len}-token prompts, {args.max_tokens} tokens, "
                f"greedy, ignore_eos) then {args.loglik} loglik (echo+logprobs), {args.concurrency} in flight; "
                f"{args.rounds} round(s); logs {workdir}",
            ],
        ),
        flush=True,
    )
    servers = {
        "P": lambda port, s: checkpoint_server(base, "base", s, port),
        "I": lambda port, s: injected_server(base, vectors, args.spec, "base", s, port),
    }
    if args.control:
        servers["I"] = servers["P"]
    rows: list[tuple[int, dict]] = []
    for r in range(args.rounds):
        prompts = random_prompts(vocab_size(base), max(args.gen, args.loglik), args.prompt_len, seed=r)
        for tag in ("P", "I") if r % 2 == 0 else ("I", "P"):
            t0 = time.monotonic()
            res = measure(servers[tag], tag, prompts, args, workdir, f"{tag}{r}")
            rows.append((r, res))
            print(
                f"  round {r + 1} {tag}: gen {res['gen_tps']:7.1f} tok/s, loglik {res['ll_tps']:8.1f} tok/s, "
                f"{res['tokens_per_cpu_s']:7.1f} tok/worker-CPU-s, failed {res['failed']} "
                f"({time.monotonic() - t0:.0f} s with start-up; load {loadavg()})",
                flush=True,
            )

    def ratios(key: str) -> list[float]:
        by = {(r, res["name"]): res[key] for r, res in rows}
        return [by[r, "I"] / by[r, "P"] for r in range(args.rounds)]

    what_ratio = "second base / base (A/A control)" if args.control else "injected / base"
    print(f"\n{what_ratio} (median over rounds; per round in brackets):")
    ok = True
    for key, what in (
        ("gen_tps", "generation tok/s"),
        ("ll_tps", "scoring tok/s"),
        ("tokens_per_cpu_s", "tok per worker CPU-s"),
    ):
        rs = ratios(key)
        med = statistics.median(rs)
        ok &= key == "tokens_per_cpu_s" or med >= TARGET
        print(f"  {what:22s} {med:.3f}  [{', '.join(f'{x:.3f}' for x in rs)}]")
    failed = sum(res["failed"] for _, res in rows)
    verdict = "not applicable (control run)" if args.control else ("met" if ok else "NOT met")
    print(f"target injected >= {TARGET} x base on throughput: {verdict}; failed requests: {failed}")
    return 0 if (ok or args.control) and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
