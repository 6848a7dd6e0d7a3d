"""Steering costs, side by side in one run: vLLM serving the base vs an injected variant vs composed adapters.

    .venv/bin/python bench/bench_steering.py             # tiny fixtures, 4-8 minutes on 2 shared cores
    .venv/bin/python bench/bench_steering.py --quick     # servers L and I only, 3 rounds
    .venv/bin/python bench/bench_steering.py --model smol [--base B --vectors V]

What it measures (generation: token-id prompts, greedy, ``ignore_eos`` so every variant generates exactly
``--max-tokens`` tokens; ``--concurrency`` requests in flight):

- wave 1, servers started together and measured interleaved:
    P  plain vLLM on the base (no ``--enable-lora``): the ceiling
    L  ``tunevec serve --adapter-rank 32 --max-lora-rank 64``: the base, ``medical:0.8`` (rank 32) and
       ``medical:0.8+math:0.4`` (rank 64, i.e. a two-vector composed adapter)
    I  ``tunevec serve --inject medical:1`` with L's LoRA settings (its base *is* the variant)
    T  L plus vLLM's ``--lora-target-modules`` naming the seven projections (lm_head not LoRA-wrapped; tunevec
       adapters never carry lm_head): how much of the LoRA-enabled server's cost is the lm_head LoRA path
- wave 2 (not with --quick): one server per ``--max-lora-rank`` 8, 16, 32 (``--adapter-rank`` half of it),
  each measuring its base and ``medical:0.8+math:0.4`` (rank = the server's max): the adapter cost vs rank;
- compose and load time of a two-vector adapter: in process (``MixtureRegistry`` / ``steering.lora.compose``)
  and over HTTP on L (first request of a new mixture; first request of a mixture already composed on disk;
  warm request).

Each round sends the same fresh prompts to every cell, in a rotated order, each cell sandwiched between two
runs of its reference (ref, cell, ref); a cell's ratio is the median over rounds of cell / geometric mean of
the two reference runs, and "best" divides the fastest runs (interference only ever slows a run down). The CPU
is shared, so every cell also reports tokens per CPU-second (user+system from /proc) of the server's model
worker (``VLLM::Worker``), and "busy" = worker CPU-s / wall s (100%: the worker had its core to itself). On a
busy box that too varies (every vLLM CPU worker on a box is pinned to core 0, and a waiting worker spins).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import math
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
    random_prompts,
    request_once,
    run_load,
)
from _servers import (  # noqa: E402
    ServerSpec,
    cache_dir,
    group_cpu_seconds,
    remove_caches,
    running_servers,
)

MIX = "medical:0.8+math:0.4"
TARGET = 0.98
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Cell:
    label: str
    server: str
    model: str
    ref: str | None = None  # label of the cell this one is divided by
    wall_tps: list[float] = field(default_factory=list)
    worker_tps: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)  # worker CPU-s / wall s: 1.0 = core 0 all to itself
    pair_ratio: list[float] = field(default_factory=list)  # per round: tok/s / its sandwiching reference's
    pair_ratio_worker: list[float] = field(default_factory=list)  # the same for tokens per worker CPU-s
    failures: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)


def lora_args(adapter_rank: int, max_rank: int) -> list[str]:
    return ["--adapter-rank", str(adapter_rank), "--max-lora-rank", str(max_rank), "--max-loras", "2"]


def wave_one(quick: bool) -> tuple[list[ServerSpec], list[Cell]]:
    specs = [
        ServerSpec("L", lora_args(32, 64)),
        ServerSpec("I", [*lora_args(32, 64), "--inject", "medical:1"]),
    ]
    cells = [
        Cell("L base", "L", "base"),
        Cell("I injected medical:1", "I", "base", "L base"),
        Cell("L medical:0.8 (rank 32)", "L", "medical:0.8", "L base"),
        Cell(f"L {MIX} (rank 64)", "L", MIX, "L base"),
    ]
    if not quick:
        specs += [
            ServerSpec("P", plain=True),
            ServerSpec("T", lora_args(32, 64), ["--lora-target-modules", *PROJECTIONS]),
        ]
        cells += [
            Cell("P plain vLLM base (no LoRA)", "P", "base", "L base"),
            Cell("T base (lm_head not wrapped)", "T", "base", "L base"),
            Cell(f"T {MIX} (rank 64)", "T", MIX, "T base (lm_head not wrapped)"),
        ]
    return specs, cells


def wave_two(ranks: list[int]) -> tuple[list[ServerSpec], list[Cell]]:
    specs, cells = [], []
    for r in ranks:
        name = f"R{r}"
        specs.append(ServerSpec(name, lora_args(max(r // 2, 1), r)))
        cells += [
            Cell(f"{name} base", name, "base"),
            Cell(f"{name} {MIX} (rank {r})", name, MIX, f"{name} base"),
        ]
    return specs, cells


def measure_once(cell: Cell, servers: dict, prompts: list[list[int]], args: argparse.Namespace) -> tuple:
    """One batch of requests for ``cell``: (tokens/s, tokens per worker CPU-s), also recorded on the cell."""
    server = servers[cell.server]
    jobs = [("gen", gen_body(cell.model, p, args.max_tokens)) for p in prompts]
    worker0 = group_cpu_seconds(server.proc.pid)[1]
    results, wall = asyncio.run(run_load(server.url, jobs, args.concurrency))
    worker = group_cpu_seconds(server.proc.pid)[1] - worker0
    tokens = sum(r.tokens for r in results)
    cell.requests += len(results)
    cell.failures += sum(r.status != 200 for r in results)
    cell.errors += [f"{r.status} {r.error}" for r in results if r.status != 200][:3]
    tps, wtps = tokens / wall, (tokens / worker if worker > 0 else float("nan"))
    cell.wall_tps.append(tps)
    cell.worker_tps.append(wtps)
    cell.busy.append(worker / wall)
    return tps, wtps


def measure(cells: list[Cell], servers: dict, args: argparse.Namespace, vocab: int, seed0: int) -> None:
    """Warm every cell up (loads its adapter), then ``args.rounds`` rounds.

    A round visits every cell that has a reference in rotated order, sandwiched between two measurements of
    its reference on the same prompts (ref, cell, ref): its ratio for the round is cell / geometric mean of
    the two, which cancels load that drifts over the few seconds the three take.
    """
    by = {c.label: c for c in cells}
    warm = random_prompts(vocab, args.concurrency, args.prompt_len, seed=seed0 - 1)
    for cell in cells:
        jobs = [("gen", gen_body(cell.model, p, args.max_tokens)) for p in warm]
        results, _ = asyncio.run(run_load(servers[cell.server].url, jobs, args.concurrency))
        bad = [r for r in results if r.status != 200]
        if bad:
            sys.exit(f"warm-up of {cell.label} failed: {bad[0].status} {bad[0].error}")
    measured = [c for c in cells if c.ref]
    for rnd in range(args.rounds):
        prompts = random_prompts(vocab, args.requests, args.prompt_len, seed=seed0 + rnd)
        k = rnd % len(measured)
        for cell in measured[k:] + measured[:k]:
            ref = by[cell.ref]
            before = measure_once(ref, servers, prompts, args)
            tps, wtps = measure_once(cell, servers, prompts, args)
            after = measure_once(ref, servers, prompts, args)
            cell.pair_ratio.append(tps / math.sqrt(before[0] * after[0]))
            cell.pair_ratio_worker.append(wtps / math.sqrt(before[1] * after[1]))
        print(f"  round {rnd + 1}/{args.rounds} done, load average {loadavg()}", flush=True)


def ratio(cell: Cell, attr: str = "pair_ratio") -> float:
    """Median over rounds of cell / reference (the reference measured right before and right after)."""
    return 1.0 if cell.ref is None else median(getattr(cell, attr))


def best_ratio(cell: Cell, by: dict[str, Cell]) -> float:
    """Fastest run / fastest run of the reference: interference only ever slows a run down."""
    return 1.0 if cell.ref is None else max(cell.wall_tps) / max(by[cell.ref].wall_tps)


def report(cells: list[Cell], by: dict[str, Cell]) -> str:
    rows = []
    for c in cells:
        wall = sorted(c.wall_tps)
        rows.append(
            [
                c.label,
                f"{median(c.wall_tps):.0f}",
                f"{wall[0]:.0f}..{wall[-1]:.0f}",
                f"{ratio(c):.3f}",
                f"{best_ratio(c, by):.3f}",
                f"{median(c.worker_tps):.0f}",
                f"{ratio(c, 'pair_ratio_worker'):.3f}",
                f"{median(c.busy):.0%}",
                f"{c.failures}/{c.requests}",
                c.ref or "-",
            ]
        )
    head = ["cell", "tok/s", "min..max", "ratio", "best/best", "tok/worker-CPU-s", "ratio", "busy", "failed",
            "ratios are to"]  # fmt: skip
    return table(rows, head)


# ------------------------------------------------------------------------------------------- compose / load


def compose_in_process(base: Path, vectors: Path, workdir: Path, repeats: int) -> list[str]:
    """Factorise both vectors, compose the two-vector adapter, write it: a mixture's first use, in steps."""
    import torch

    from tunevec.core.checkpoint import Checkpoint
    from tunevec.server.config import ServerConfig
    from tunevec.server.mixtures import MixtureRegistry
    from tunevec.steering.library import VectorLibrary
    from tunevec.steering.lora import compose

    torch.set_num_threads(1)  # as the server's build thread competes with the engine
    config = ServerConfig(
        base=str(base), vectors=str(vectors), adapter_rank=32, max_lora_rank=64, cache_dir=str(workdir / "ip")
    )
    config.num_layers = num_layers(base)
    t0 = time.perf_counter()
    registry = MixtureRegistry(config, VectorLibrary.from_dir(str(vectors), Checkpoint(str(base))))
    factorise = time.perf_counter() - t0
    spec = registry.parse(MIX)
    compose_s, save_s = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        adapter = compose(spec, registry.adapters, max_rank=config.max_lora_rank)
        compose_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        adapter.save(workdir / "ip" / f"save-{i}", base_model="base")
        save_s.append(time.perf_counter() - t0)
    build_s = []
    for i in range(repeats):
        fresh = registry.parse(f"medical:0.8+math:{0.41 + i / 100:.2f}")
        t0 = time.perf_counter()
        asyncio.run(registry.resolve(fresh))
        build_s.append(time.perf_counter() - t0)
    size = sum(f.stat().st_size for f in (workdir / "ip" / "save-0").iterdir())
    return [
        f"  factorise medical + math at rank 32 (once per server start) {factorise:8.3f} s",
        f"  compose {MIX} (rank 64), median of {repeats}   {median(compose_s) * 1e3:8.1f} ms",
        f"  write it (PEFT safetensors, {size / 2**20:.1f} MiB), median of {repeats}         "
        f"{median(save_s) * 1e3:8.1f} ms",
        f"  MixtureRegistry.resolve of a new two-vector spec, median of {repeats}  "
        f"{median(build_s) * 1e3:8.1f} ms  (compose + write + re-read meta)",
    ]


def first_requests(server, vocab: int, base: Path, vectors: Path, workdir: Path, repeats: int) -> list[str]:
    """First-request latency of new mixtures (compose + load), of mixtures already on disk (load), warm."""
    from tunevec.core.checkpoint import Checkpoint
    from tunevec.server.config import ServerConfig
    from tunevec.server.mixtures import MixtureRegistry
    from tunevec.steering.library import VectorLibrary

    prompts = iter(random_prompts(vocab, 5 * repeats + 2, 16, seed=777))

    def one(model: str) -> float:
        r = request_once(
            server.url, {"model": model, "prompt": next(prompts), "max_tokens": 1, "temperature": 0}
        )
        if r.status != 200:
            sys.exit(f"{model}: HTTP {r.status} {r.error}")
        return r.latency

    # Pre-build specs into L's own cache folder, exactly as the server would (same settings -> same path).
    config = ServerConfig(
        base=str(base),
        vectors=str(vectors),
        adapter_rank=32,
        max_lora_rank=64,
        max_loras=2,
        cache_dir=str(cache_dir("L", workdir)),
    )
    config.num_layers = num_layers(base)
    registry = MixtureRegistry(config, VectorLibrary.from_dir(str(vectors), Checkpoint(str(base))))
    new = [f"medical:0.7+math:{0.31 + i / 100:.2f}" for i in range(repeats)]
    built = [f"medical:0.6+math:{0.21 + i / 100:.2f}" for i in range(repeats)]
    for spec in built:
        asyncio.run(registry.resolve(registry.parse(spec)))
    one("base")
    warm_base = [one("base") for _ in range(repeats)]
    new_delta, built_delta, first_new, first_built, warm = [], [], [], [], []
    for a, b in zip(new, built, strict=True):
        first_new.append(one(a))
        first_built.append(one(b))
        warm_a, warm_b = one(a), one(b)
        warm += [warm_a, warm_b]
        new_delta.append(first_new[-1] - warm_a)
        built_delta.append(first_built[-1] - warm_b)
    ms = 1e3
    return [
        f"  warm request, base (1 token, 16-token prompt)              {median(warm_base) * ms:8.1f} ms",
        f"  warm request, two-vector mixture                            {median(warm) * ms:8.1f} ms",
        f"  first request, mixture already composed on disk             {median(first_built) * ms:8.1f} ms"
        f"   first - warm (load): {median(built_delta) * ms:6.1f} ms",
        f"  first request, new mixture                                  {median(first_new) * ms:8.1f} ms"
        f"   first - warm (compose + write + load): {median(new_delta) * ms:6.1f} ms",
        f"  (medians over {repeats} mixtures each, first - warm paired per mixture; new: {new[0]}, ...;"
        f" on disk: {built[0]}, ...)",
    ]


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--rounds", type=int, help="measured rounds (default 5, --quick 3)")
    parser.add_argument("--requests", type=int, help="requests per cell and round (default 16)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument(
        "--max-tokens", type=int, default=32, help="tokens generated per request (default 32)"
    )
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (default 64)")
    parser.add_argument("--ranks", default="8,16,32", help="wave 2 max LoRA ranks (default 8,16,32)")
    parser.add_argument("--kv-cache-mib", type=int, help="KV cache per server (default 256 tiny, 1024 smol)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.requests = args.requests or 16
    kv_mib = args.kv_cache_mib or (256 if args.model == "tiny" else 1024)
    base, vectors, dtype = resolve_model(args)
    workdir = workdir_for(args, "tunevec-bench-steering-")
    atexit.register(remove_caches, workdir)  # logs stay
    vocab = vocab_size(base)
    ranks = [] if args.quick else [int(r) for r in args.ranks.split(",") if r]
    specs1, cells1 = wave_one(args.quick)
    specs2, cells2 = wave_two(ranks)
    t_start = time.monotonic()
    print(
        header(
            "bench_steering: base vs injected vs composed adapters (vLLM, tokens/s)",
            [
                f"model: {args.model} base={base} vectors={vectors} dtype={dtype} max-model-len 512, "
                f"KV cache {kv_mib} MiB/server",
                f"requests: generation, {args.prompt_len}-token random prompts, {args.max_tokens} tokens "
                f"each (greedy, ignore_eos), {args.concurrency} in flight; {args.requests} requests per cell "
                "per round, "
                f"{args.rounds} rounds after a warm-up; {len(cells1) + len(cells2)} cells",
                "servers: "
                + "; ".join(
                    f"{s.name}={'plain vLLM' if s.plain else ' '.join(s.args + s.vllm_args)}"
                    for s in specs1 + specs2
                ),
                f"logs: {workdir}",
            ],
        ),
        flush=True,
    )

    print("\n-- compose in process (no server running) --", flush=True)
    for line in compose_in_process(base, vectors, workdir, repeats=3 if args.quick else 5):
        print(line, flush=True)

    t0 = time.monotonic()
    print(f"\n-- wave 1: starting {', '.join(s.name for s in specs1)} --", flush=True)
    per_server = 2.5 if args.model == "tiny" else 4.0
    with running_servers(specs1, base, vectors, dtype, workdir, kv_mib, per_server_gib=per_server) as servers:
        print(f"  servers ready in {time.monotonic() - t0:.0f} s, load average {loadavg()}", flush=True)
        measure(cells1, servers, args, vocab, seed0=1000)
        print("\n-- compose + load over HTTP (server L, nothing else in flight) --", flush=True)
        http_lines = first_requests(
            servers["L"], vocab, base, vectors, workdir, repeats=3 if args.quick else 5
        )
        for line in http_lines:
            print(line, flush=True)
    if specs2:
        t0 = time.monotonic()
        print(f"\n-- wave 2: starting {', '.join(s.name for s in specs2)} --", flush=True)
        with running_servers(
            specs2, base, vectors, dtype, workdir, kv_mib, per_server_gib=per_server
        ) as servers:
            print(f"  servers ready in {time.monotonic() - t0:.0f} s, load average {loadavg()}", flush=True)
            measure(cells2, servers, args, vocab, seed0=2000)

    print(
        f"\n-- wave 1: generated tokens/s (median over runs) and ratios (median over {args.rounds} rounds) --"
    )
    by = {c.label: c for c in cells1 + cells2}
    print(report(cells1, by))
    if cells2:
        print(f"\n-- wave 2: adapter cost vs max LoRA rank ({args.rounds} rounds) --")
        print(report(cells2, by))
    inj = by["I injected medical:1"]
    inj_ratio = ratio(inj)
    print(
        "\n-- summary (ratio: median over rounds of cell / reference runs around it; best: fastest/fastest)"
    )
    verdict = "met" if inj_ratio >= TARGET else "NOT met"
    print(
        f"injected / base: {inj_ratio:.3f} (best {best_ratio(inj, by):.3f}, worker CPU "
        f"{ratio(inj, 'pair_ratio_worker'):.3f}); target >= {TARGET}: {verdict}"
    )
    sweep = [(r, by[f"R{r} {MIX} (rank {r})"]) for r in ranks] + [(64, by[f"L {MIX} (rank 64)"])]
    print(
        "two-vector adapter / its own server's base, by max LoRA rank: "
        + ", ".join(f"r{r} {ratio(c):.2f} (best {best_ratio(c, by):.2f})" for r, c in sweep)
    )
    if "P plain vLLM base (no LoRA)" in by:
        p, t = by["P plain vLLM base (no LoRA)"], by["T base (lm_head not wrapped)"]
        print(
            f"plain vLLM base / tunevec base: {ratio(p):.2f} (best {best_ratio(p, by):.2f}); "
            f"with lm_head left unwrapped (T): {ratio(t):.2f} (best {best_ratio(t, by):.2f})"
        )
    failures = sum(c.failures for c in cells1 + cells2)
    print(f"failed requests: {failures} of {sum(c.requests for c in cells1 + cells2)}")
    for c in cells1 + cells2:
        for e in c.errors[:2]:
            print(f"  {c.label}: {e}")
    print(f"total run time {time.monotonic() - t_start:.0f} s, load average at end {loadavg()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
