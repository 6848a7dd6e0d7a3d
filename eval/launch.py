"""Start and stop the servers an evaluation needs, on loopback, one at a time.

Two kinds:

- the *steering server*: ``tunevec serve --base B --vectors V`` -- the base and every spec variant, as LoRA
  mixtures composed per request;
- a *checkpoint server*: vLLM's own OpenAI server on one model folder (a tuned checkpoint as the reference), no
  LoRA, served under the variant's name.

Every server runs in its own process group with its output in a log file, and is stopped (SIGTERM to the group,
SIGKILL after a grace period) however the block that started it ends. ``tests/servers.py`` starts its servers
through ``start_server`` too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunevec.eval.grid import ServerSettings

from tunevec.core.errors import TunevecError

REPO = Path(__file__).resolve().parents[1]
# Logged by steering/vllm_patches.py in each vLLM process once the CPU LoRA prompt-logprobs fix is in effect.
CPU_LORA_FIX_MARK = "apply_cpu_lora_logits_fix: patched"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(settings: ServerSettings | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if settings is not None and settings.reserved_cpus is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(settings.reserved_cpus)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # tunevec's model loader acts only where VLLM_PLUGINS names it (and only for --load-format tunevec).
    from tunevec.steering.vllm_plugin import LOADER, plugin_env

    return plugin_env(LOADER, env=env)


@dataclass
class ServerProcess:
    """A server subprocess in its own process group; ``url`` is ``http://127.0.0.1:PORT`` (no ``/v1``)."""

    proc: subprocess.Popen
    url: str
    log: Path
    what: str

    def alive(self) -> bool:
        return self.proc.poll() is None

    def healthy(self, timeout: float = 5) -> bool:
        import httpx

        if not self.alive():
            return False
        try:
            return httpx.get(self.url + "/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(timeout=2):
            if not self.alive():
                raise TunevecError(
                    f"{self.what} exited with status {self.proc.returncode} while starting; log {self.log}:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TunevecError(
                    f"{self.what} did not answer /health within {timeout:.0f}s; log {self.log}"
                )
            time.sleep(1)

    def stop(self, grace: float = 60) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def spawn(
    cmd: list[str], port: int, log: Path, what: str, env: dict[str, str] | None = None
) -> ServerProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env or server_env(),
            cwd=REPO,
            start_new_session=True,
        )
    return ServerProcess(proc, f"http://127.0.0.1:{port}", log, what)


@contextlib.contextmanager
def start_server(
    cmd: list[str],
    port: int,
    log: Path,
    *,
    what: str = "server",
    timeout: float = 900,
    env: dict | None = None,
) -> Iterator[ServerProcess]:
    """Run ``cmd`` (which must listen on ``port``) until the block ends; yields once /health answers."""
    server = spawn(cmd, port, log, what, env)
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()


def steering_command(base: Path, vectors: Path, settings: ServerSettings, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "tunevec.cli", "serve", "--base", str(base), "--vectors", str(vectors),
           "--port", str(port), "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len),
           "--max-lora-rank", str(settings.max_lora_rank), "--max-loras", str(settings.max_loras),
           "--max-components", str(settings.max_components), "--max-abs-alpha", str(settings.max_abs_alpha)]  # fmt: skip
    if settings.adapter_rank is not None:
        cmd += ["--adapter-rank", str(settings.adapter_rank)]
    else:
        cmd += ["--adapter-energy", str(settings.adapter_energy)]
    if settings.enforce_eager:
        cmd.append("--enforce-eager")
    if settings.extra_args:
        cmd += ["--", *settings.extra_args]
    return cmd


def checkpoint_command(model: Path, served_name: str, settings: ServerSettings, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len),
           "--enable-tokenizer-info-endpoint", "--disable-uvicorn-access-log"]  # fmt: skip
    if settings.enforce_eager:
        cmd.append("--enforce-eager")
    return cmd + list(settings.extra_args)


def inject_command(
    base: Path, vectors: Path, spec: str, served_name: str, settings: ServerSettings, port: int
) -> list[str]:
    """A plain vLLM server (no LoRA) whose weights are base + delta(spec), injected by tunevec's model loader."""
    from tunevec.steering.library import VectorLibrary
    from tunevec.steering.vllm_loader import LOAD_FORMAT, SETTINGS_KEY

    loader = {
        SETTINGS_KEY: {"spec": spec, "vectors": VectorLibrary.from_dir(vectors).paths(), "base": str(base)}
    }
    cmd = checkpoint_command(base, served_name, settings, port)
    return cmd + ["--load-format", LOAD_FORMAT, "--model-loader-extra-config", json.dumps(loader)]


def lora_prompt_logprobs_safe(server: ServerProcess) -> bool:
    """Whether concurrent prompt-logprob traffic is safe on this LoRA-enabled server.

    vllm-cpu 0.32 without tunevec's runtime fix crashes its engine when two requests with prompt logprobs share
    an engine step (docs/cpu-lora-logprobs.md). The fix logs CPU_LORA_FIX_MARK in each engine process; on other
    platforms the bug does not exist.
    """
    if CPU_LORA_FIX_MARK in server.log.read_text(errors="replace"):
        return True
    try:
        from vllm.platforms import current_platform
    except Exception:  # vLLM not importable in this process: be safe
        return False
    return not current_platform.is_cpu()
