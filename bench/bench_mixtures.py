"""Per-request mixtures against the base on the same server: the targets of the mixtures issue, with an A/A control.

    .venv/bin/python bench/bench_mixtures.py --model smol [--adapter-rank 16|128] [--rounds 3] [--quick]

Two tunevec servers run side by side, the same but for ``--max-lora-rank``: "wide" (the smallest vLLM rank that
holds a two-vector mixture, 64 for per-vector adapters at rank 16, 256 at rank 128) and "narrow" (the adapter rank
itself); ``--max-loras 8``. Scenarios, each sending the same requests from ``--concurrency`` clients:

  base / base again     wide, model ``base`` twice: the second is the A/A control (what noise alone gives)
  1 mixture             wide, ``medical:0.8+math:0.4`` (two vectors)
  8 mixtures            wide, eight different mixtures in flight together (request i uses mixture i mod 8)
  one vector @ wide / @ narrow   ``medical:0.8`` on both servers; base on the narrow one normalises it
  with / without norms  ``medical`` against ``medical@attention+medical@mlp``: the same LoRA work, and the first
                        also moves the norms tau moves (per token, whole); on a vector that moves no norm the two
                        are the same model (a second A/A)

Two phases per scenario and round: generation (greedy, ``ignore_eos``) and prompt scoring (lm-eval's
``echo`` + ``logprobs`` loglikelihood request). Rounds rotate the scenario order. Throughput is summed tokens over
summed wall time. After the rounds: the added latency of a never-seen mixture's first request (fresh
coefficients each time, against the same request for a warm mixture, alternated), and the server's RSS and cache
folder before and after 50 distinct mixtures.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_model_args,
    header,
    loadavg,
    median,
    num_layers,
    resolve_model,
    table,
    vocab_size,
    workdir_for,
)
from _load import (  # noqa: E402
    gen_body,
    loglik_body,
    random_prompts,
    request_once,
    run_load,
)
from _servers import (  # noqa: E402
    ServerSpec,
    cache_dir,
    remove_caches,
    running_servers,
)

ONE = "medical:0.8+math:0.4"
RANK16 = "medical:0.8"
WITH_NORMS, WITHOUT_NORMS = "medical", "medical@attention+medical@mlp"
PHASES = ("gen", "loglik")
TARGETS = {  # scenario ratio -> the target
    "gen": 0.8,
    "loglik": 0.8,
    "eight": 0.9,
    "rank64": 0.95,
}


def eight_mixtures(layers: int) -> list[str]:
    half = max(layers // 2, 1)
    return [
        "medical:0.2",
        "medical:0.5+math:0.1",
        "math:0.3",
        "math:0.7+medical:0.2",
        ONE,
        "medical@mlp:0.6",
        "medical@attention:0.5+math@mlp:0.3",
        f"medical[0:{half}]:1+math[{half}:]:0.5",
    ]


@dataclass
class Scenario:
    name: str
    server: str
    models: list[str]
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    wall: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    failed: int = 0
    per_round: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})

    def rate(self, phase: str) -> float:
        return self.tokens[phase] / self.wall[phase] if self.wall[phase] else float("nan")


def jobs_for(
    phase: str, models: list[str], prompts: list[list[int]], max_tokens: int
) -> list[tuple[str, dict]]:
    make = (lambda m, p: gen_body(m, p, max_tokens)) if phase == "gen" else loglik_body
    return [(phase, make(models[i % len(models)], p)) for i, p in enumerate(prompts)]


def run_rounds(scenarios: list[Scenario], servers: dict, args: argparse.Namespace, vocab: int) -> None:
    import asyncio

    for sc in scenarios:  # warm-up: every mixture registered and used once
        prompts = random_prompts(vocab, 8, 16, seed=1)
        results, _ = asyncio.run(run_load(servers[sc.server].url, jobs_for("gen", sc.models, prompts, 4), 8))
        bad = [r for r in results if r.status != 200]
        if bad:
            sys.exit(f"warm-up of {sc.name} failed: {bad[0].status} {bad[0].error}")
    for rnd in range(args.rounds):
        for i, phase in enumerate(PHASES):
            length = args.gen_prompt_len if phase == "gen" else args.loglik_prompt_len
            prompts = random_prompts(vocab, args.requests, length, seed=100 * (rnd + 1) + i)
            k = (rnd * len(PHASES) + i) % len(scenarios)
            for sc in scenarios[k:] + scenarios[:k]:
                jobs = jobs_for(phase, sc.models, prompts, args.max_tokens)
                results, wall = asyncio.run(run_load(servers[sc.server].url, jobs, args.concurrency))
                tokens = sum(r.tokens for r in results if r.status == 200)
                sc.failed += sum(r.status != 200 for r in results)
                sc.tokens[phase] += tokens
                sc.wall[phase] += wall
                sc.per_round[phase].append(tokens / wall)
        print(f"  round {rnd + 1}/{args.rounds} done, load average {loadavg()}", flush=True)


def first_request_latency(url: str, vocab: int, n: int) -> tuple[float, float]:
    """Median latency (ms) of a one-token request for a never-seen mixture and for a warm one, alternated."""
    prompt = random_prompts(vocab, 1, 32, seed=7)[0]
    fresh, warm = [], []
    for i in range(n):
        r = request_once(url, loglik_body(f"medical:{0.3 + 0.0137 * (i + 1):.4f}+math:0.4", prompt), "loglik")
        w = request_once(url, loglik_body(ONE, prompt), "loglik")
        if r.status != 200 or w.status != 200:
            sys.exit(f"first-request probe failed: {r.status} {r.error} / {w.status} {w.error}")
        fresh.append(r.latency * 1e3)
        warm.append(w.latency * 1e3)
    return median(fresh), median(warm)


def group_rss_mib(pgid: int) -> float:
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            if os.getpgid(int(status.parent.name)) != pgid:
                continue
        except (OSError, ProcessLookupError):
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def distinct_mixtures(url: str, vocab: int, n: int) -> int:
    prompt = random_prompts(vocab, 1, 16, seed=9)[0]
    failed = 0
    for i in range(n):
        spec = f"medical:{0.11 + 0.01 * i:.2f}+math:{0.9 - 0.01 * i:.2f}"
        failed += request_once(url, gen_body(spec, prompt, 2)).status != 200
    return failed


def verdict(value: float, target: float, lower_is_better: bool = False) -> str:
    met = value <= target if lower_is_better else value >= target
    return "met" if met else "MISSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    parser.add_argument(
        "--requests", type=int, help="requests per scenario, phase and round (default 24, --quick 16)"
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--gen-prompt-len", type=int, default=64)
    parser.add_argument("--loglik-prompt-len", type=int, default=256)
    parser.add_argument("--probes", type=int, default=10, help="never-seen mixtures timed (default 10)")
    parser.add_argument("--adapter-rank", type=int, default=16, help="each vector's adapter rank (16 or 128)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.requests = args.requests or (16 if args.quick else 24)
    base, vectors, dtype = resolve_model(args)
    if args.dtype is None and args.model == "smol":
        dtype = "bfloat16"
    workdir = workdir_for(args, "tunevec-bench-mixtures-")
    atexit.register(remove_caches, workdir)
    vocab = vocab_size(base)
    from tunevec.steering.lora import vllm_rank

    rank = args.adapter_rank
    wide = vllm_rank(2 * rank)
    common = ["--adapter-rank", str(rank), "--max-loras", "8", "--max-dropped-share", "1"]
    specs = [
        ServerSpec("S64", [*common, "--max-lora-rank", str(wide)]),
        ServerSpec("S16", [*common, "--max-lora-rank", str(vllm_rank(rank))]),
    ]
    eight = eight_mixtures(num_layers(base))
    scenarios = [
        Scenario("base", "S64", ["base"]),
        Scenario("base again (A/A)", "S64", ["base"]),
        Scenario(f"1 mixture {ONE}", "S64", [ONE]),
        Scenario("8 mixtures", "S64", eight),
        Scenario(f"{RANK16} @ wide max rank", "S64", [RANK16]),
        Scenario(f"{RANK16} @ narrow max rank", "S16", [RANK16]),
        Scenario("base @ narrow max rank", "S16", ["base"]),
        Scenario(f"{WITH_NORMS} (norms whole)", "S64", [WITH_NORMS]),
        Scenario(WITHOUT_NORMS, "S64", [WITHOUT_NORMS]),
    ]
    print(
        header(
            "bench_mixtures: per-request mixtures against the base, same server",
            [
                f"model: {args.model} base={base} vectors={vectors} dtype={dtype}",
                "servers: " + "; ".join(f"{s.name}={' '.join(s.args)}" for s in specs),
                f"load: {args.concurrency} clients, {args.requests} requests per scenario, phase and round; gen: "
                f"{args.gen_prompt_len}-token prompt, {args.max_tokens} tokens; loglik: {args.loglik_prompt_len}-"
                f"token prompt, echo+logprobs; {args.rounds} round(s), scenario order rotated",
                "8 mixtures: " + ", ".join(eight),
                f"logs: {workdir}",
            ],
        ),
        flush=True,
    )
    t0 = time.monotonic()
    with running_servers(specs, base, vectors, dtype, workdir, 1024, per_server_gib=3.0) as servers:
        print(f"servers ready in {time.monotonic() - t0:.0f} s, load average {loadavg()}", flush=True)
        run_rounds(scenarios, servers, args, vocab)
        s64 = servers["S64"]
        fresh_ms, warm_ms = first_request_latency(s64.url, vocab, args.probes)
        rss0, disk0 = group_rss_mib(s64.proc.pid), folder_bytes(cache_dir("S64", workdir))
        failed50 = distinct_mixtures(s64.url, vocab, 50)
        rss1, disk1 = group_rss_mib(s64.proc.pid), folder_bytes(cache_dir("S64", workdir))
        alive = all(s.alive() for s in servers.values())

    by = {sc.name: sc for sc in scenarios}
    base_sc, one, eight_sc = by["base"], by[f"1 mixture {ONE}"], by["8 mixtures"]
    rows = []
    for sc in scenarios:
        ref = by["base @ narrow max rank"] if sc.server == "S16" else base_sc
        row = [sc.name, sc.server]
        for phase in PHASES:
            ratios = [a / b for a, b in zip(sc.per_round[phase], ref.per_round[phase], strict=True)]
            row += [f"{sc.rate(phase):.1f}", f"{sc.rate(phase) / ref.rate(phase):.3f}",
                    f"{min(ratios):.2f}-{max(ratios):.2f}"]  # fmt: skip
        rows.append(row + [str(sc.failed)])
    head = [
        "scenario",
        "server",
        "gen tok/s",
        "x base",
        "per round",
        "scored tok/s",
        "x base",
        "per round",
        "failed",
    ]
    print(f"\n-- results ({args.rounds} round(s); x base against the base on the same server) --")
    print(table(rows, head))

    def r(sc: Scenario, ref: Scenario, phase: str) -> float:
        return sc.rate(phase) / ref.rate(phase)

    aa = [r(by["base again (A/A)"], base_sc, p) for p in PHASES]
    lines = [
        ("generation, 1 mixture / base", r(one, base_sc, "gen"), TARGETS["gen"]),
        ("prompt scoring, 1 mixture / base", r(one, base_sc, "loglik"), TARGETS["loglik"]),
        ("generation, 8 mixtures / 1 mixture", r(eight_sc, one, "gen"), TARGETS["eight"]),
        ("prompt scoring, 8 mixtures / 1 mixture", r(eight_sc, one, "loglik"), TARGETS["eight"]),
    ]
    for phase in PHASES:
        at64 = r(by[f"{RANK16} @ wide max rank"], base_sc, phase)
        at16 = r(by[f"{RANK16} @ narrow max rank"], by["base @ narrow max rank"], phase)
        lines.append(
            (f"{phase}: one vector at the wide max rank / at the narrow one", at64 / at16, TARGETS["rank64"])
        )
    for phase in PHASES:
        lines.append(
            (
                f"{phase}: {WITH_NORMS} with its norms / without them",
                r(by[f"{WITH_NORMS} (norms whole)"], by[WITHOUT_NORMS], phase),
                0.9,
            )
        )
    print("\n-- targets --")
    print(f"A/A control (base again / base): generation {aa[0]:.3f}, scoring {aa[1]:.3f}")
    for what, value, target in lines:
        print(f"{what}: {value:.3f} (target >= {target}) {verdict(value, target)}")
    print(
        f"first request of a never-seen mixture: {fresh_ms:.0f} ms against {warm_ms:.0f} ms warm, "
        f"+{fresh_ms - warm_ms:.0f} ms (aim <= 50 ms) {verdict(fresh_ms - warm_ms, 50, lower_is_better=True)}"
    )
    print(
        f"50 distinct mixtures ({failed50} failed): server RSS {rss0:.0f} -> {rss1:.0f} MiB "
        f"({(rss1 / rss0 - 1) * 100:+.1f}%), cache folder {disk0} -> {disk1} bytes"
    )
    failures = sum(sc.failed for sc in scenarios) + failed50
    print(f"servers alive at the end: {alive}; failed requests: {failures}; load average {loadavg()}")
    return 1 if failures or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
