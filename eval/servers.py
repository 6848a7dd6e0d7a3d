"""The servers of a grid run: one per group of cells, started when its group begins, restarted if it dies,
stopped before the next group starts.

A group is ``steering`` (the steering server: the base and every spec as LoRA mixtures; none is started when the
run uses ``--server-url``), ``inject:<variant>`` (plain vLLM with the spec injected) or ``checkpoint:<variant>``
(plain vLLM on a checkpoint). Command lines and processes are ``eval/launch.py``'s.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tunevec.core.errors import TunevecError
from tunevec.eval.grid import safe_name
from tunevec.eval.launch import (
    ServerProcess,
    checkpoint_server,
    free_port,
    injected_server,
    lora_prompt_logprobs_safe,
    spawn,
    steering_server,
)
from tunevec.eval.plan import GridRun
from tunevec.eval.progress import say

MAX_RESTARTS = 2  # per server, when it dies mid-run


class ManagedServer:
    """A server started for the run, restarted (at most MAX_RESTARTS times) if it dies."""

    def __init__(self, start: Callable[[], ServerProcess], timeout: float):
        self._start = start
        self.timeout = timeout
        self.restarts = 0
        self.concurrency_cap: int | None = None
        self.process = self._launch()

    def _launch(self) -> ServerProcess:
        process = self._start()
        try:
            process.wait_ready(self.timeout)
        except BaseException:
            process.stop()
            raise
        return process

    @property
    def url(self) -> str:
        return self.process.url

    def healthy(self) -> bool:
        return self.process.healthy()

    def restart(self) -> None:
        """Replace a dead server (the engine can die and take the API server down with it, exit status 0)."""
        if self.restarts >= MAX_RESTARTS:
            raise TunevecError(f"{self.process.what} died {self.restarts + 1} times; log {self.process.log}")
        self.restarts += 1
        say(f"{self.process.what} is down (exit status {self.process.proc.poll()}, log {self.process.log}); "
            f"restarting it ({self.restarts}/{MAX_RESTARTS})")  # fmt: skip
        self.process.stop()
        self.process.log.rename(self.process.log.with_suffix(f".died-{self.restarts}.log"))
        self.process = self._launch()

    def stop(self) -> None:
        self.process.stop()


@contextlib.contextmanager
def server_for(run: GridRun, group: str, log_dir: Path) -> Iterator[ManagedServer | None]:
    """The server of ``group`` while the block runs (None: the run's external ``--server-url`` serves it)."""
    grid = run.grid
    settings = grid.server
    if group == "steering":
        if run.server_url:
            yield None
            return
        what = "steering server"

        def start() -> ServerProcess:
            port = free_port()
            command, env = steering_server(grid.base, grid.vectors, settings, port)
            return spawn(command, port, log_dir / "steering.log", what, env)
    else:
        kind, name = group.split(":", 1)
        variant = next(v for v in grid.variants if v.name == name)
        what = f"{kind} server for {name!r}"

        def start() -> ServerProcess:
            port = free_port()
            if kind == "checkpoint" or variant.spec is None:  # a checkpoint, or the plain base
                command, env = checkpoint_server(
                    variant.checkpoint or grid.base, variant.name, settings, port
                )
            else:
                command, env = injected_server(
                    grid.base, grid.vectors, variant.spec, variant.name, settings, port
                )
            return spawn(command, port, log_dir / f"{kind}-{safe_name(name)}.log", what, env)

    say(f"starting the {what} (log {log_dir})")
    t0 = time.monotonic()
    server = ManagedServer(start, settings.startup_timeout)
    try:
        say(f"{what} ready in {time.monotonic() - t0:.0f}s at {server.url}")
        if (
            group == "steering"
            and grid.lm_eval.num_concurrent > 1
            and not lora_prompt_logprobs_safe(server.process)
        ):
            server.concurrency_cap = 1
            say("this vLLM build crashes on concurrent prompt-logprob requests with LoRA enabled and the runtime "
                "fix is not active (docs/cpu-lora-logprobs.md): running the steering server's cells with "
                "num_concurrent=1")  # fmt: skip
        yield server
    finally:
        server.stop()
