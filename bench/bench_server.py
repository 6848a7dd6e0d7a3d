"""Load generator for `tunevec serve` on loopback: throughput and latency of four scenarios, in one table.

    .venv/bin/python bench/bench_server.py               # tiny fixtures, about 5 minutes on 2 shared cores
    .venv/bin/python bench/bench_server.py --quick       # 1 round, 16 requests per slice
    .venv/bin/python bench/bench_server.py --model smol [--base B --vectors V] [--concurrency 16]

Two servers are started together and stay up for the whole run:
  S  ``tunevec serve --adapter-rank 16 --max-lora-rank 64 --max-loras 8`` (tunevec's defaults, but 8 mixtures
     per batch)
  I  the same with ``--inject medical:1`` (its base *is* the injected variant)
Scenarios, each sending the same requests:
  base           S, model ``base``
  injected       I, model ``base``
  1 mixture      S, ``medical:0.8+math:0.4``
  8 mixtures     S, eight different mixtures at once (request i uses mixture i mod 8), sharing batches
Requests (token-id prompts, random, fresh every round so no prefix-cache hit crosses rounds):
  gen     ``max_tokens`` 32, temperature 0, ``ignore_eos`` (every variant generates the same number of tokens)
  loglik  lm-eval's loglikelihood shape ``{"prompt": ids, "max_tokens": 1, "temperature": 0, "echo": true,
          "logprobs": 1}``; its tokens are the scored prompt tokens
Each round runs, for every scenario (order rotated), three phases from ``--concurrency`` clients (asyncio +
httpx): gen only, loglik only (as lm-eval sends them: one request type at a time), and mixed (half each,
shuffled, in flight together: prompt-logprob rows and decode rows in the same engine steps). A warm-up first
composes and loads every mixture. Throughput (tokens/s of the single-kind phases, requests/s of the mixed one)
is over summed wall time; latency percentiles pool all rounds. Every response must be HTTP 200: failures are
counted and make the exit status 1. Server CPU seconds (user+system from /proc, all processes of the server,
and its model worker alone) are reported as work done, less sensitive than wall time to other load on the box.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_model_args,
    header,
    loadavg,
    num_layers,
    percentile,
    resolve_model,
    table,
    vocab_size,
    workdir_for,
)
from _load import (  # noqa: E402
    Result,
    gen_body,
    loglik_body,
    random_prompts,
    run_load,
)
from _servers import (  # noqa: E402
    ServerSpec,
    group_cpu_seconds,
    remove_caches,
    running_servers,
)

ONE = "medical:0.8+math:0.4"


def eight_mixtures(layers: int) -> list[str]:
    half = max(layers // 2, 1)
    return [
        "medical:0.2",
        "medical:0.5",
        "math:0.3",
        "math:0.7",
        "medical:0.8+math:0.4",
        "medical@mlp:0.6",
        "medical@attention:0.5+math@mlp:0.3",
        f"medical[0:{half}]:1+math[{half}:]:0.5",
    ]


PHASES = ("gen", "loglik", "mixed")


@dataclass
class Scenario:
    name: str
    server: str
    models: list[str]
    results: dict[str, list[Result]] = field(default_factory=lambda: {p: [] for p in PHASES})
    wall: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    cpu: float = 0.0
    worker: float = 0.0

    def all_results(self) -> list[Result]:
        return [r for p in PHASES for r in self.results[p]]


def make_jobs(
    phase: str, models: list[str], vocab: int, args: argparse.Namespace, seed: int, n: int | None = None
) -> list[tuple[str, dict]]:
    """One phase's requests (gen, loglik, or half of each shuffled); the same for every scenario of a round.

    Request i names ``models[i % len(models)]``.
    """
    n = n or args.requests
    n_gen = {"gen": n, "loglik": 0, "mixed": n // 2}[phase]
    gen_prompts = random_prompts(vocab, n_gen, args.gen_prompt_len, seed)
    ll_prompts = random_prompts(vocab, n - n_gen, args.loglik_prompt_len, seed + 50_000)
    shapes = [("gen", p) for p in gen_prompts] + [("loglik", p) for p in ll_prompts]
    random.Random(seed).shuffle(shapes)
    jobs = []
    for i, (kind, prompt) in enumerate(shapes):
        model = models[i % len(models)]
        body = gen_body(model, prompt, args.max_tokens) if kind == "gen" else loglik_body(model, prompt)
        jobs.append((kind, body))
    return jobs


def run(scenarios: list[Scenario], servers: dict, args: argparse.Namespace, vocab: int) -> None:
    # Warm-up: every mixture composed, loaded and used once (not measured).
    for sc in scenarios:
        jobs = make_jobs("mixed", sc.models, vocab, args, seed=1, n=16)
        results, _ = asyncio.run(run_load(servers[sc.server].url, jobs, args.concurrency))
        bad = [r for r in results if r.status != 200]
        if bad:
            print(f"  warm-up of {sc.name}: {len(bad)} failed, e.g. {bad[0].status} {bad[0].error}")
    for rnd in range(args.rounds):
        for i, phase in enumerate(PHASES):
            k = (rnd + i) % len(scenarios)
            for sc in scenarios[k:] + scenarios[:k]:
                server = servers[sc.server]
                jobs = make_jobs(phase, sc.models, vocab, args, seed=100 * (rnd + 1) + i)
                cpu0, worker0 = group_cpu_seconds(server.proc.pid)
                results, wall = asyncio.run(
                    run_load(server.url, jobs, args.concurrency, time_limit=args.time_limit)
                )
                cpu1, worker1 = group_cpu_seconds(server.proc.pid)
                sc.results[phase] += results
                sc.wall[phase] += wall
                sc.cpu += cpu1 - cpu0
                sc.worker += worker1 - worker0
        print(f"  round {rnd + 1}/{args.rounds} done, load average {loadavg()}", flush=True)


def _ok(results: list[Result], kind: str) -> list[Result]:
    return [r for r in results if r.kind == kind and r.status == 200]


def _ms(results: list[Result], kind: str) -> list[float]:
    return [r.latency * 1e3 for r in _ok(results, kind)]


def report(scenarios: list[Scenario]) -> str:
    base = scenarios[0]

    def tps(sc: Scenario, phase: str) -> float:
        return sum(r.tokens for r in _ok(sc.results[phase], phase)) / sc.wall[phase]

    out = []
    for phase, what in (("gen", "generated tok/s"), ("loglik", "scored prompt tok/s")):
        rows = []
        for sc in scenarios:
            res = sc.results[phase]
            ms = _ms(res, phase)
            rows.append(
                [
                    sc.name,
                    str(len(ms)),
                    str(sum(r.status != 200 for r in res)),
                    f"{tps(sc, phase):.0f}",
                    f"{tps(sc, phase) / tps(base, phase):.3f}",
                    f"{percentile(ms, 50):.0f}",
                    f"{percentile(ms, 90):.0f}",
                    f"{percentile(ms, 99):.0f}",
                    f"{percentile(ms, 50) / percentile(_ms(base.results[phase], phase), 50):.2f}",
                ]
            )
        head = ["scenario", "ok", "failed", what, "x base", "p50 ms", "p90 ms", "p99 ms", "p50 x base"]
        out += [f"{phase} requests only:", table(rows, head), ""]
    rows = []
    for sc in scenarios:
        res = sc.results["mixed"]
        rate = sum(r.status == 200 for r in res) / sc.wall["mixed"]
        base_rate = sum(r.status == 200 for r in base.results["mixed"]) / base.wall["mixed"]
        row = [
            sc.name,
            str(len(res)),
            str(sum(r.status != 200 for r in res)),
            f"{rate:.2f}",
            f"{rate / base_rate:.3f}",
        ]
        for kind in ("gen", "loglik"):
            ms = _ms(res, kind)
            row += [f"{percentile(ms, 50):.0f}", f"{percentile(ms, 90):.0f}", f"{percentile(ms, 99):.0f}"]
        rows.append(row)
    head = [
        "scenario",
        "requests",
        "failed",
        "req/s",
        "x base",
        "gen p50",
        "p90",
        "p99",
        "loglik p50",
        "p90",
        "p99",
    ]
    out += ["mixed (half gen, half loglik, in flight together; latencies in ms):", table(rows, head), ""]
    rows = []
    for sc in scenarios:
        n, nb = len(sc.all_results()), len(base.all_results())
        rows.append(
            [
                sc.name,
                str(n),
                f"{sum(sc.wall.values()):.1f}",
                f"{sc.cpu:.1f}",
                f"{base.cpu / nb / (sc.cpu / n):.3f}",
                f"{sc.worker:.1f}",
                f"{base.worker / nb / (sc.worker / n):.3f}",
                f"{sc.worker / sum(sc.wall.values()):.0%}",
            ]
        )
    head = ["scenario", "requests", "wall s", "server CPU-s", "x base", "worker CPU-s", "x base", "busy"]
    out += [
        "work done, all phases (x base = base CPU-s per request / scenario CPU-s per request; busy = worker "
        "CPU-s / wall s, 100% = the model worker kept its core busy the whole time):",
        table(rows, head),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--rounds", type=int, help="rounds over scenarios and phases (default 2, --quick 1)")
    parser.add_argument(
        "--requests", type=int, help="requests per scenario, phase and round (default 24, --quick 16)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=60, help="seconds per scenario, phase and round (default 60)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=32, help="tokens per generation request (default 32)"
    )
    parser.add_argument(
        "--gen-prompt-len", type=int, default=64, help="generation prompt tokens (default 64)"
    )
    parser.add_argument(
        "--loglik-prompt-len", type=int, default=128, help="loglik prompt tokens (default 128)"
    )
    parser.add_argument("--adapter-rank", type=int, default=16, help="per-vector LoRA rank (default 16)")
    parser.add_argument("--max-lora-rank", type=int, default=64, help="engine max LoRA rank (default 64)")
    parser.add_argument("--kv-cache-mib", type=int, help="KV cache per server (default 256 tiny, 1024 smol)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.requests = args.requests or (16 if args.quick else 24)
    kv_mib = args.kv_cache_mib or (256 if args.model == "tiny" else 1024)
    base, vectors, dtype = resolve_model(args)
    workdir = workdir_for(args, "tunevec-bench-server-")
    atexit.register(remove_caches, workdir)  # logs stay
    vocab = vocab_size(base)
    lora = ["--adapter-rank", str(args.adapter_rank), "--max-lora-rank", str(args.max_lora_rank),
            "--max-loras", "8"]  # fmt: skip
    specs = [ServerSpec("S", lora), ServerSpec("I", [*lora, "--inject", "medical:1"])]
    eight = eight_mixtures(num_layers(base))
    scenarios = [
        Scenario("base", "S", ["base"]),
        Scenario("injected medical:1", "I", ["base"]),
        Scenario(f"1 mixture {ONE}", "S", [ONE]),
        Scenario("8 mixtures", "S", eight),
    ]
    t_start = time.monotonic()
    print(
        header(
            "bench_server: tunevec serve under concurrent load (loopback, asyncio + httpx)",
            [
                f"model: {args.model} base={base} vectors={vectors} dtype={dtype} max-model-len 512, "
                f"KV cache {kv_mib} MiB/server",
                "servers: " + "; ".join(f"{s.name}={' '.join(s.args)}" for s in specs),
                f"load: {args.concurrency} concurrent clients; per scenario, phase and round {args.requests} "
                f"requests; phases: gen only ({args.gen_prompt_len}-token prompt, {args.max_tokens} tokens, "
                f"greedy, ignore_eos), loglik only ({args.loglik_prompt_len}-token prompt, echo+logprobs, "
                f"max_tokens 1), mixed (half each); {args.rounds} round(s) after a warm-up, at most "
                f"{args.time_limit:.0f} s per slice; {len(scenarios)} scenarios x 3 phases x "
                f"{args.rounds} rounds x {args.requests} = "
                f"{len(scenarios) * 3 * args.rounds * args.requests} measured requests",
                "8 mixtures: " + ", ".join(eight),
                f"logs: {workdir}",
            ],
        ),
        flush=True,
    )
    t0 = time.monotonic()
    per_server = 2.5 if args.model == "tiny" else 4.0
    with running_servers(specs, base, vectors, dtype, workdir, kv_mib, per_server_gib=per_server) as servers:
        print(f"servers ready in {time.monotonic() - t0:.0f} s, load average {loadavg()}", flush=True)
        from tunevec.eval.launch import lora_prompt_logprobs_safe

        fixed = all(lora_prompt_logprobs_safe(s) for s in servers.values())
        print(f"grouped LoRA op in every steering server: {'yes' if fixed else 'NO'}", flush=True)
        run(scenarios, servers, args, vocab)
        import httpx

        listed = httpx.get(servers["S"].url + "/v1/models", timeout=30).json()["data"]
        loaded = sorted(m["id"] for m in listed if m.get("tunevec", {}).get("kind") == "mixture")
        alive = all(s.alive() for s in servers.values())
    print(f"\n-- results ({args.rounds} round(s), {args.concurrency} clients) --")
    print(report(scenarios))
    failures = sum(r.status != 200 for sc in scenarios for r in sc.all_results())
    total = sum(len(sc.all_results()) for sc in scenarios)
    print(f"\nmixtures registered on S at the end: {len(loaded)}; servers alive at the end: {alive}")
    print(f"failed requests (non-200 or transport error): {failures} of {total}")
    for sc in scenarios:
        for r in [r for r in sc.all_results() if r.status != 200][:2]:
            print(f"  {sc.name} {r.kind}: {r.status} {r.error}")
    print(f"total run time {time.monotonic() - t_start:.0f} s, load average at end {loadavg()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
