"""Shared helpers of the serving benchmarks (bench_steering.py, bench_server.py): model paths, servers, load.

Servers are ``tunevec serve`` (or plain vLLM) subprocesses started through ``tunevec.eval.launch`` (own process group,
log file, SIGTERM then SIGKILL however the block ends). Each gets its own mixture cache folder (a YAML
``cache_dir``), so a run composes its mixtures from scratch and writes nothing into the vectors folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tunevec.eval.launch import ServerProcess, free_port, server_env, spawn  # noqa: E402

TINY_BASE = REPO / "artifacts/test/fixtures-tiny/base"
TINY_VECTORS = REPO / "artifacts/test/vectors-tiny"
SMOL_FIXTURES = REPO / "artifacts/fixtures/smol"


# ----------------------------------------------------------------------------------------------- model paths


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", choices=("tiny", "smol"), default="tiny", help="fixture set (default tiny)"
    )
    parser.add_argument("--base", type=Path, help="base model folder (default: the --model fixture's base/)")
    parser.add_argument("--vectors", type=Path, help="folder with medical/ and math/ tuning vectors")
    parser.add_argument("--dtype", help="engine dtype (default float32 for tiny, auto for smol)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests (a smoke run)")
    parser.add_argument("--log-dir", type=Path, help="server logs and caches (default: a temp folder, kept)")


def _find_vectors(base: Path) -> Path | None:
    """A folder under artifacts/ with medical/ and math/ vectors extracted from ``base`` (by fingerprint)."""
    import json

    from tunevec.core.checkpoint import Checkpoint

    try:
        fingerprint = Checkpoint(base).fingerprint()
    except Exception:
        return None
    for manifest in sorted((REPO / "artifacts").rglob("medical/manifest.json")):
        folder = manifest.parent.parent
        if ".tunevec-cache" in folder.parts or not (folder / "math" / "manifest.json").exists():
            continue
        try:
            ok = all(
                json.loads((folder / v / "manifest.json").read_text()).get("base", {}).get("fingerprint")
                == fingerprint
                for v in ("medical", "math")
            )
        except (OSError, ValueError):
            continue
        if ok:
            return folder
    return None


def resolve_model(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """(base, vectors, dtype) for --model / --base / --vectors; exits with a message if one is missing."""
    if args.model == "tiny":
        base = args.base or TINY_BASE
        vectors = args.vectors or TINY_VECTORS
        dtype = args.dtype or "float32"
        hint = "run the test suite once (tests/conftest.py builds them: fixtures tiny_fixtures, tiny_vectors)"
    else:
        base = args.base or SMOL_FIXTURES / "base"
        vectors = args.vectors or _find_vectors(base)
        dtype = args.dtype or "auto"
        hint = "build them (make fixtures-smol / tunevec extract) or pass --base and --vectors"
    for what, path in (("base", base), ("vectors", vectors)):
        if path is None or not Path(path).exists():
            sys.exit(f"--model {args.model}: no {what} folder ({path}); {hint}")
    for v in ("medical", "math"):
        if not (Path(vectors) / v / "manifest.json").exists():
            sys.exit(f"{vectors}: no {v}/ vector; {hint}")
    return Path(base).resolve(), Path(vectors).resolve(), dtype


def vocab_size(base: Path) -> int:
    import json

    return int(json.loads((base / "config.json").read_text())["vocab_size"])


def num_layers(base: Path) -> int:
    import json

    return int(json.loads((base / "config.json").read_text())["num_hidden_layers"])


# ----------------------------------------------------------------------------------------------- header


def header(title: str, lines: list[str]) -> str:
    import torch
    import vllm

    load = os.getloadavg()
    out = [
        f"== {title} ==",
        f"machine: {platform.node() or '?'}, nproc={os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min) at start",
        f"software: python {platform.python_version()}, torch {torch.__version__}, vllm {vllm.__version__}",
    ]
    return "\n".join(out + lines)


def loadavg() -> str:
    a = os.getloadavg()
    return f"{a[0]:.2f} {a[1]:.2f} {a[2]:.2f}"


# ----------------------------------------------------------------------------------------------- servers


@dataclass
class ServerSpec:
    """One server to start: a tunevec server (``args`` after --base/--vectors) or plain vLLM (``plain``)."""

    name: str
    args: list[str] = field(default_factory=list)  # tunevec serve options
    vllm_args: list[str] = field(default_factory=list)  # vLLM engine options (after `--` for tunevec)
    plain: bool = False


def serve_command(
    spec: ServerSpec, base: Path, vectors: Path, dtype: str, port: int, workdir: Path, kv_mib: int
) -> list[str]:
    common = ["--dtype", dtype, "--max-model-len", "512"]
    engine = [*spec.vllm_args, "--kv-cache-memory-bytes", str(kv_mib * 2**20)]
    if spec.plain:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
                "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port), *common,
                "--disable-uvicorn-access-log", *engine]  # fmt: skip
    return [sys.executable, "-m", "tunevec.cli", "serve", "--base", str(base), "--vectors", str(vectors),
            "--port", str(port), "--config", str(cache_config(spec, workdir)), *common, *spec.args,
            "--", *engine]  # fmt: skip


def cache_config(spec: ServerSpec, workdir: Path) -> Path:
    """A tunevec.yaml that gives the server its own, initially empty, adapter cache folder."""
    config = workdir / f"{spec.name}.yaml"
    config.write_text(f"cache_dir: {cache_dir(spec.name, workdir)}\n")
    return config


def cache_dir(name: str, workdir: Path) -> Path:
    return workdir / f"cache-{name}"


@contextlib.contextmanager
def running_servers(
    specs: list[ServerSpec],
    base: Path,
    vectors: Path,
    dtype: str,
    workdir: Path,
    kv_mib: int = 256,
    timeout: float = 900,
    per_server_gib: float = 3.0,
) -> Iterator[dict[str, ServerProcess]]:
    """Start every server at once (they load in parallel), yield {name: server} once all answer /health.

    Each is stopped (SIGTERM to its process group, SIGKILL after a grace period) however the block ends.
    """
    check_memory(len(specs), per_server_gib)
    started: dict[str, ServerProcess] = {}
    try:
        for spec in specs:
            port = free_port()
            cmd = serve_command(spec, base, vectors, dtype, port, workdir, kv_mib)
            log = workdir / f"{spec.name}.log"
            started[spec.name] = spawn(cmd, port, log, f"server {spec.name}", bench_env())
        t0 = time.monotonic()
        for server in started.values():
            server.wait_ready(max(1.0, timeout - (time.monotonic() - t0)))
        yield started
    finally:
        for server in started.values():
            server.stop(grace=30)


def check_memory(servers: int, per_server_gib: float) -> None:
    """Refuse to start more servers than free memory holds (the box is shared; an OOM kill hits anyone)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) / 2**20
            need = servers * per_server_gib + 1.0
            if available < need:
                sys.exit(
                    f"only {available:.1f} GiB of memory available; {servers} servers need about "
                    f"{need:.0f} GiB (try --quick, or later)"
                )
            return


def bench_env() -> dict[str, str]:
    """eval.launch's server environment, with the KV cache sized by --kv-cache-memory-bytes instead."""
    env = server_env()
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes (whole GiB only)
    return env


def group_cpu_seconds(pgid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of a server's process group: (all its processes, its model worker).

    A server is an API process, an engine core and a worker (``VLLM::Worker``, where the model runs).
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = worker = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, _, rest = text.rpartition(")")
        fields = rest.split()
        if int(fields[2]) == pgid:
            ticks = int(fields[11]) + int(fields[12])
            total += ticks
            if "Worker" in comm.partition("(")[2]:
                worker += ticks
    return total / tick, worker / tick


def remove_caches(workdir: Path) -> None:
    """Delete the run's adapter caches (a smol run writes about 1 GiB of them); the server logs stay."""
    for path in [*workdir.glob("cache-*"), workdir / "ip"]:
        shutil.rmtree(path, ignore_errors=True)


def workdir_for(args: argparse.Namespace, prefix: str) -> Path:
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        return args.log_dir.resolve()
    return Path(tempfile.mkdtemp(prefix=prefix))


# ----------------------------------------------------------------------------------------------- requests


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


# ----------------------------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(rows: list[list[str]], head: list[str]) -> str:
    """A plain-text table with right-aligned columns (the first left-aligned)."""
    cols = [head, *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])
