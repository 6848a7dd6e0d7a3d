"""Start and stop the servers an evaluation needs, on loopback, one at a time: their command lines and processes.

Three kinds, each built from the grid's ``server:`` settings (``eval/schema.py``):

- the *steering server*: ``tunevec serve --base B --vectors V`` -- the base and every spec variant, as LoRA
  mixtures composed per request; ``serve_options`` turns the settings into its options;
- a *checkpoint server*: vLLM's own OpenAI server on one model folder (a tuned checkpoint as the reference), no
  LoRA, served under the variant's name;
- an *injected server*: the same plain vLLM server on the base, whose weights tunevec's model loader replaces
  with base + delta(spec) while vLLM loads them.

The plain vLLM servers' arguments and environment come from ``server/config.py`` (``vllm_serve_command``,
``engine_env``), the one place that spells them. Every server runs in its own process group with its output in a
log file, and is stopped (SIGTERM to the group, SIGKILL after a grace period) however the block that started it
ends. ``tests/servers.py`` starts its servers through ``start_server`` too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunevec.core.errors import TunevecError
from tunevec.server.config import EngineSettings, LoraSettings, engine_env, vllm_serve_command

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_env(settings: EngineSettings | None = None, plugins: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment of a server started here: ``engine_env``, offline (every model is a local folder)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return engine_env(settings or EngineSettings(), plugins, env=env)


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
    return ServerProcess(proc, f"http://{HOST}:{port}", log, what)


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


# Not options of `tunevec serve`: reserved_cpus reaches it in the environment (engine_env), extra_args after `--`.
_NOT_OPTIONS = ("reserved_cpus", "extra_args")


def serve_options(settings: EngineSettings) -> list[str]:
    """``tunevec serve`` options that carry every engine (and, if ``settings`` has them, LoRA) setting: each field
    is ``--field-name VALUE``, a true flag is ``--flag`` (false, like None, is serve's own default), and
    ``extra_args`` follow ``--`` as vLLM arguments."""
    names = [*EngineSettings.model_fields]
    if isinstance(settings, LoraSettings):
        names = [*LoraSettings.model_fields, *names]
    options: list[str] = []
    for name in names:
        value = getattr(settings, name)
        if name in _NOT_OPTIONS or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        options += [flag] if value is True else [flag, str(value)]
    return options + (["--", *settings.extra_args] if settings.extra_args else [])


def steering_server(
    base: Path, vectors: Path, settings: EngineSettings, port: int
) -> tuple[list[str], dict[str, str]]:
    """``tunevec serve`` for the base and every spec: command line and environment."""
    command = [sys.executable, "-m", "tunevec.cli", "serve", "--base", str(base), "--vectors", str(vectors),
               "--host", HOST, "--port", str(port), *serve_options(settings)]  # fmt: skip
    return command, server_env(settings)


def checkpoint_server(
    model: Path, served_name: str, settings: EngineSettings, port: int
) -> tuple[list[str], dict[str, str]]:
    """Plain vLLM on a model folder (no LoRA, no tunevec plugin): command line and environment."""
    command = vllm_serve_command(str(model), served_name, settings, host=HOST, port=port)
    return command, server_env(settings)


def injected_server(
    base: Path, vectors: Path, spec: str, served_name: str, settings: EngineSettings, port: int
) -> tuple[list[str], dict[str, str]]:
    """Plain vLLM (no LoRA) whose weights are base + delta(spec), injected by tunevec's model loader, which acts
    only where ``VLLM_PLUGINS`` names it: command line and environment."""
    from tunevec.steering.library import VectorLibrary
    from tunevec.steering.vllm import LOADER

    loader = {"spec": spec, "vectors": VectorLibrary.from_dir(vectors).paths(), "base": str(base)}
    command = vllm_serve_command(str(base), served_name, settings, host=HOST, port=port, loader_config=loader)
    return command, server_env(settings, plugins=(LOADER,))


def lora_prompt_logprobs_safe(server: ServerProcess) -> bool:
    """Whether concurrent prompt-logprob traffic is safe on this steering server.

    vLLM's own CPU LoRA op crashes its engine when two requests with prompt logprobs share an engine step
    (docs/cpu-lora-logprobs.md); tunevec's grouped op replaces it. The server's ``/v1/tunevec/engine`` says whether
    every worker runs the grouped op (on other platforms the bug does not exist).
    """
    import httpx

    try:
        answer = httpx.get(server.url + "/v1/tunevec/engine", timeout=30).json()
    except (httpx.HTTPError, ValueError):
        return False
    workers = answer.get("workers", [])
    return bool(workers) and all(w.get("grouped_op") or w.get("platform") != "cpu" for w in workers)
