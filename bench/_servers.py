"""Servers of the serving benchmarks: started side by side, measured, stopped.

A server is ``tunevec serve`` or plain vLLM, its command line built from the same settings and builders as every
other server tunevec starts (``vllm_serve_command``, ``eval.launch.serve_options``), and its process started and
stopped through ``tunevec.eval.launch`` (own process group, log file, SIGTERM then SIGKILL however the block
ends). Each tunevec server gets its own mixture cache folder (a YAML ``cache_dir``), so a run composes its
mixtures from scratch and writes nothing into the vectors folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import _common  # noqa: F401  (first: the offline environment, before tunevec and vLLM are imported)

from tunevec.eval.launch import ServerProcess, free_port, serve_options, server_env, spawn
from tunevec.server.config import EngineSettings, vllm_serve_command

MAX_MODEL_LEN = 512


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
    """The server's command line; its KV cache is ``kv_mib`` MiB (vLLM's --kv-cache-memory-bytes)."""
    engine = EngineSettings(
        dtype=dtype,
        max_model_len=MAX_MODEL_LEN,
        extra_args=[*spec.vllm_args, "--kv-cache-memory-bytes", str(kv_mib * 2**20)],
    )
    if spec.plain:
        return vllm_serve_command(str(base), "base", engine, port=port)
    return [sys.executable, "-m", "tunevec.cli", "serve", "--base", str(base), "--vectors", str(vectors),
            "--port", str(port), "--config", str(cache_config(spec, workdir)), *spec.args,
            *serve_options(engine)]  # fmt: skip


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
    """eval.launch's server environment, with the KV cache sized by --kv-cache-memory-bytes instead.

    vLLM's CPU backend lets VLLM_CPU_KVCACHE_SPACE (whole GiB) override --kv-cache-memory-bytes, and its workers
    refuse an empty value: the variable is left out here, and ``engine_env`` leaves it out for any server given
    --kv-cache-memory-bytes (``tunevec serve`` included).
    """
    env = server_env()
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
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
