"""Run a grid: one lm-eval ``simple_evaluate`` per (variant, task) cell, against tunevec's OpenAI server.

The runner is a thin layer over lm-eval: lm-eval builds the requests, talks to the server (``local-completions``,
or ``local-chat-completions`` for ``chat: server`` tasks), scores and computes standard errors; its own results
and per-sample logs are kept under ``OUT/lm-eval/<cell>/``. What tunevec adds:

- servers: the steering server for the base and every spec, then one plain vLLM server per checkpoint variant,
  one at a time (``eval/launch.py``);
- resume: a finished cell is ``OUT/cells/<cell>.json``, written last and atomically, with a hash of everything
  that determines its scores; a cell whose file exists with the same hash is not run again;
- progress: one line per cell with its score, time and an estimate of the time left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunevec.eval.grid import Cell, Grid, Variant, digest, safe_name
from tunevec.eval.launch import (
    ServerProcess,
    checkpoint_command,
    free_port,
    inject_command,
    lora_prompt_logprobs_safe,
    server_env,
    spawn,
    steering_command,
)

from tunevec.core.errors import TunevecError
from tunevec.core.files import write_file_atomically

CELL_FORMAT = "tunevec.eval-cell"
CELL_VERSION = 1
MAX_RESTARTS = 2  # per server, when it dies mid-run


def say(message: str) -> None:
    print(f"[tunevec eval] {message}", flush=True)


# ---------------------------------------------------------------------- tasks


def task_manager(include_path: list[Path], names: list[str]) -> Any:
    """An lm-eval TaskManager that knows ``names``: the include paths alone when they suffice (a few seconds),
    else with lm-eval's ~15k bundled task configs as well (half a minute to index)."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path]
    if paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if all(n in tm.task_index for n in names):
            return tm
    return TaskManager(include_path=paths or None)


def default_include_path(grid: Grid) -> list[Path]:
    """The grid's include paths, plus ``tasks/`` beside the base folder when the base is a fixture model."""
    paths = list(grid.include_path)
    if grid.base is not None:
        fixture_tasks = grid.base.resolve().parent / "tasks"
        if fixture_tasks.is_dir() and any(fixture_tasks.glob("*.yaml")) and fixture_tasks not in paths:
            paths.append(fixture_tasks)
    return paths


def task_fingerprint(entry: Any) -> str:
    """Hash of a task's config with local data files replaced by their content hash (a moved folder keeps it)."""
    cfg = json.loads(
        json.dumps(getattr(entry, "cfg", None) or {"name": getattr(entry, "name", "?")}, default=str)
    )
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict | str | list):
        cfg["dataset_kwargs"]["data_files"] = _hash_files(files)
    return digest(cfg)


def _hash_files(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _hash_files(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hash_files(v) for v in value]
    if isinstance(value, str) and Path(value).is_file():
        return "sha256:" + hashlib.sha256(Path(value).read_bytes()).hexdigest()
    return value


# ---------------------------------------------------------------------- plan


@dataclass
class PlannedCell:
    cell: Cell
    path: Path
    config: dict[str, Any]
    config_hash: str
    done: bool = False

    @property
    def variant(self) -> Variant:
        return self.cell.variant


@dataclass
class GridRun:
    """A validated grid, its task manager and its cells with their resume state."""

    grid: Grid
    out: Path
    tm: Any
    cells: list[PlannedCell]
    server_url: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def todo(self) -> list[PlannedCell]:
        return [c for c in self.cells if not c.done]


def prepare(grid: Grid, out: Path, *, server_url: str | None = None, fresh: bool = False) -> GridRun:
    """Check everything that can be checked without a server; plan the cells and mark finished ones."""
    grid.include_path = default_include_path(grid)
    for p in grid.include_path:
        if not p.is_dir():
            raise TunevecError(f"grid {grid.source}: include_path {p} is not a folder")
    tm = task_manager(grid.include_path, [t.name for t in grid.tasks])
    grid.check(external_server=server_url is not None, task_index=tm.task_index)
    if server_url:
        server_url = server_url.rstrip("/").removesuffix("/v1").rstrip("/")
    remote = check_remote(server_url, grid) if server_url else None
    out = Path(out)
    shared = _shared_config(grid, remote)
    cells = []
    for cell in grid.cells():
        config = _cell_config(cell, grid, shared, tm.task_index[cell.task.name])
        h = digest(config)
        path = out / "cells" / f"{cell.key}.json"
        cells.append(PlannedCell(cell, path, config, h, done=not fresh and _finished(path, h)))
    return GridRun(grid, out, tm, cells, server_url)


def check_remote(url: str, grid: Grid) -> dict[str, Any]:
    """A running server: reachable, and every spec variant accepted by its /v1/tunevec/describe (which also
    says whether the mixture would exceed its LoRA rank). Returns its vectors as /v1/tunevec/vectors lists them
    (what the cells' config hash records of an external server)."""
    import httpx

    key = os.environ.get("OPENAI_API_KEY")  # what lm-eval's local-completions sends as the bearer token
    headers = {"Authorization": f"Bearer {key}"} if key else None
    try:
        if httpx.get(url + "/health", timeout=10).status_code != 200:
            raise TunevecError(f"--server-url {url}: /health did not answer 200")
        listed = httpx.get(url + "/v1/tunevec/vectors", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise TunevecError(f"--server-url {url}: cannot reach the server ({exc})") from exc
    specs = [v for v in grid.variants if v.kind == "spec"]
    if listed.status_code != 200:
        if specs:
            raise TunevecError(
                f"--server-url {url} is not a tunevec server (GET /v1/tunevec/vectors: {listed.status_code}); "
                f"it cannot serve spec variants such as {specs[0].name!r}"
            )
        return {"vectors": []}
    for v in specs:
        r = httpx.post(url + "/v1/tunevec/describe", json={"spec": v.spec}, headers=headers, timeout=60)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200:
            message = (body.get("error") or {}).get("message", r.text[:300])
            raise TunevecError(f"grid {grid.source}: variant {v.name!r}: the server refuses it: {message}")
        if body.get("needs_truncation") and not body.get("truncation_allowed"):
            raise TunevecError(
                f"grid {grid.source}: variant {v.name!r} has LoRA rank {body.get('rank')}, above the server's "
                f"max {body.get('max_rank')}; restart it with a larger --max-lora-rank or --allow-truncation"
            )
    vectors = [{k: x for k, x in vec.items() if k != "path"} for vec in listed.json().get("data", [])]
    return {"vectors": vectors}


def _shared_config(grid: Grid, remote: dict[str, Any] | None) -> dict[str, Any]:
    from importlib.metadata import version

    from tunevec.core.checkpoint import Checkpoint

    vectors = {}
    if remote is not None:
        vectors = {v["name"]: digest(v) for v in remote["vectors"]}
    elif grid.vectors is not None and any(v.kind == "spec" for v in grid.variants):
        from tunevec.steering.library import VectorLibrary

        for name, vec in VectorLibrary.from_dir(grid.vectors).vectors.items():
            vectors[name] = digest(sorted(e.sha256 for e in vec.manifest.tensors.values()))
    return {
        "base": Checkpoint(grid.base).fingerprint() if grid.base else None,
        "vectors": vectors,
        "server": {"external": True} if remote is not None else grid.server.result_key(),
        "lm_eval": {"version": version("lm_eval"), "seed": grid.lm_eval.seed},
    }


def _cell_config(cell: Cell, grid: Grid, shared: dict, task_entry: Any) -> dict[str, Any]:
    from tunevec.core.checkpoint import Checkpoint

    v, t = cell.variant, cell.task
    if v.kind == "checkpoint":
        variant = {"checkpoint": Checkpoint(v.checkpoint).fingerprint()}
        server = grid.server.result_key() | {"kind": "checkpoint"}
        server = {k: server[k] for k in ("kind", "dtype", "max_model_len", "extra_args")}
    else:
        from tunevec.steering.spec import Spec

        names = Spec.parse(v.spec).vectors if v.spec else ()
        variant = {
            "spec": v.spec,
            "base": shared["base"],
            "vectors": {n: shared["vectors"].get(n) for n in names},
        }
        server = shared["server"]
    return {
        "format": CELL_VERSION,
        "variant": variant,
        "task": {
            "name": t.name,
            "limit": t.limit,
            "num_fewshot": t.num_fewshot,
            "chat": t.chat,
            "config": task_fingerprint(task_entry),
        },
        "server": server,
        "lm_eval": shared["lm_eval"],
    }


def _finished(path: Path, config_hash: str) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return data.get("config_hash") == config_hash and "metrics" in data


# ---------------------------------------------------------------------- run


def run_grid(run: GridRun, *, log_dir: Path | None = None, on_cell: Callable | None = None) -> GridRun:
    """Run every unfinished cell; servers are started per group and stopped before the next group starts."""
    log_dir = log_dir or run.out / "logs"
    todo = run.todo
    total = len(run.cells)
    say(f"{total} cells ({len(run.grid.variants)} variants x {len(run.grid.tasks)} tasks): "
        f"{total - len(todo)} finished, {len(todo)} to run; output in {run.out}")  # fmt: skip
    if not todo:
        return run
    clock = _Clock(len(todo))

    def failed(planned: PlannedCell, reason: str) -> None:
        run.failures.append((planned.cell.key, reason))
        clock.tick(None)
        say(
            f"[{clock.done}/{clock.total}] FAILED {planned.variant.name} x {planned.cell.task.name}: {reason}"
        )

    for group, cells in _groups(todo, run.grid):
        try:
            with _server_for(run, group, log_dir) as server:
                for i, planned in enumerate(cells):
                    if server is not None and not server.healthy():
                        server.restart()
                    try:
                        url = server.url if server else run.server_url
                        model = planned.variant.model if group == "steering" else planned.variant.name
                        result = run_cell(run, planned, url, server, model)
                    except Exception as exc:  # one broken cell must not cost the rest of a long grid
                        failed(planned, _short(exc))
                        continue
                    finally:
                        cells[i] = None  # accounted for (done or failed)
                    planned.done = True
                    clock.tick(result["seconds"])
                    say(f"[{clock.done}/{clock.total}] {planned.variant.name} x {planned.cell.task.name}: "
                        f"{_score_text(result)} ({result['seconds']:.0f}s; {clock.eta()})")  # fmt: skip
                    if on_cell:
                        on_cell(result)
        except TunevecError as exc:  # the server would not start (or kept dying): skip its cells, go on
            say(f"{exc}")
            for planned in cells:
                if planned is not None:
                    failed(planned, f"server unavailable: {_short(exc)[:200]}")
    return run


def _groups(todo: list[PlannedCell], grid: Grid) -> list[tuple[str, list[PlannedCell]]]:
    """Cells by the server that serves them: the steering server first, then one server per variant (injected
    specs, then checkpoints), each in grid order."""
    order = {v.name: i for i, v in enumerate(grid.variants)}
    rank = {"steering": 0, "inject": 1, "checkpoint": 2}
    groups: dict[str, list[PlannedCell]] = {}
    for c in sorted(
        todo, key=lambda c: (rank[server_group(c.variant, grid).split(":")[0]], order[c.variant.name])
    ):
        groups.setdefault(server_group(c.variant, grid), []).append(c)
    return list(groups.items())


def server_group(v: Variant, grid: Grid) -> str:
    """``steering`` (shared steering server), ``inject:<name>`` or ``checkpoint:<name>`` (a server of its own)."""
    if v.kind == "checkpoint":
        return f"checkpoint:{v.name}"
    if grid.server.steering == "inject":
        return f"inject:{v.name}"
    return "steering"


class _ManagedServer:
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
def _server_for(run: GridRun, group: str, log_dir: Path) -> Iterator[_ManagedServer | None]:
    grid = run.grid
    settings = grid.server
    if group == "steering":
        if run.server_url:
            yield None
            return
        what = "steering server"

        def start() -> ServerProcess:
            port = free_port()
            cmd = steering_command(grid.base, grid.vectors, settings, port)
            return spawn(cmd, port, log_dir / "steering.log", what, server_env(settings))
    else:
        kind, name = group.split(":", 1)
        variant = next(v for v in grid.variants if v.name == name)
        what = f"{kind} server for {name!r}"

        def start() -> ServerProcess:
            port = free_port()
            if kind == "checkpoint" or variant.spec is None:  # a checkpoint, or the plain base
                cmd = checkpoint_command(variant.checkpoint or grid.base, variant.name, settings, port)
            else:
                cmd = inject_command(grid.base, grid.vectors, variant.spec, variant.name, settings, port)
            return spawn(cmd, port, log_dir / f"{kind}-{safe_name(name)}.log", what, server_env(settings))

    say(f"starting the {what} (log {log_dir})")
    t0 = time.monotonic()
    server = _ManagedServer(start, settings.startup_timeout)
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


def run_cell(
    run: GridRun, planned: PlannedCell, url: str, server: _ManagedServer | None, model: str
) -> dict[str, Any]:
    """One lm-eval run for one cell (``model``: the request's model field); writes lm-eval's own output and
    then the cell file. Returns the cell."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    grid, cell = run.grid, planned.cell
    v, t = cell.variant, cell.task
    settings = grid.lm_eval
    concurrency = settings.num_concurrent
    if server is not None and server.concurrency_cap:
        concurrency = min(concurrency, server.concurrency_cap)
    model_type, model_args = lm_eval_model(grid, v, t, url, concurrency, model)
    lm_dir = run.out / "lm-eval" / cell.key
    shutil.rmtree(lm_dir, ignore_errors=True)
    tracker = EvaluationTracker(output_path=str(lm_dir))
    started = time.monotonic()
    with _quiet_lm_eval():
        results = lm_eval.simple_evaluate(
            model=model_type,
            model_args=model_args,
            tasks=[t.name],
            task_manager=run.tm,
            num_fewshot=t.num_fewshot,
            limit=t.limit,
            batch_size=settings.batch_size,
            log_samples=True,
            evaluation_tracker=tracker,
            apply_chat_template=bool(t.chat),
            fewshot_as_multiturn=bool(t.chat),
            bootstrap_iters=settings.bootstrap_iters,
            random_seed=settings.seed,
        )
    seconds = time.monotonic() - started
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    res = results["results"].get(t.name)
    if res is None:
        raise TunevecError(f"lm-eval returned no results for {t.name!r} (got {sorted(results['results'])})")
    metrics = metrics_of(res)
    cell_doc = {
        "format": CELL_FORMAT,
        "version": CELL_VERSION,
        "variant": v.name,
        "task": t.name,
        "kind": v.kind,
        "spec": v.spec,
        "checkpoint": str(v.checkpoint) if v.checkpoint else None,
        "alphas": dict(v.alphas),
        "config_hash": planned.config_hash,
        "config": planned.config,
        "metrics": metrics,
        "primary_metric": primary_metric(results, t.name, metrics),
        "subtasks": {k: metrics_of(r) for k, r in results["results"].items() if k != t.name},
        "n_samples": results.get("n-samples", {}).get(t.name),
        "seconds": round(seconds, 2),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model_type,
        "model_args": {k: v for k, v in model_args.items() if k not in ("auth_token", "header")},
        "num_concurrent": concurrency,
        "lm_eval_output": str(lm_dir.relative_to(run.out)),
    }
    _write_json(planned.path, cell_doc)
    return cell_doc


def lm_eval_model(
    grid: Grid, v: Variant, t: Any, url: str, concurrency: int, model: str
) -> tuple[str, dict[str, Any]]:
    """lm-eval's model type and model_args for a cell (passed as a dict: no comma splitting of specs)."""
    args: dict[str, Any] = {
        "model": model,
        "num_concurrent": concurrency,
        "max_retries": grid.lm_eval.max_retries,
        "timeout": grid.lm_eval.timeout,
    }
    if t.chat == "server":
        return "local-chat-completions", args | {"base_url": url + "/v1/chat/completions"}
    tokenizer = v.checkpoint if v.kind == "checkpoint" else grid.base
    args |= {"base_url": url + "/v1/completions", "max_length": grid.server.max_model_len}
    if tokenizer is not None:
        args |= {"tokenizer": str(tokenizer), "tokenizer_backend": "huggingface"}
    else:  # an external server and no local base: use the server's /tokenize
        args |= {"tokenizer_backend": "remote"}
    return "local-completions", args


def metrics_of(res: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s}`` -> ``{"acc": {"value": x, "stderr": s}}``;
    a filter other than ``none`` stays in the name (``exact_match,strict-match``)."""
    out: dict[str, dict[str, float | None]] = {}
    for key, value in res.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        if metric.endswith("_stderr") or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        stderr = res.get(f"{metric}_stderr,{filt}")
        out[metric if filt == "none" else key] = {
            "value": float(value),
            "stderr": float(stderr)
            if isinstance(stderr, int | float) and not isinstance(stderr, bool)
            else None,
        }
    return out


def primary_metric(results: dict[str, Any], task: str, metrics: dict[str, Any]) -> str | None:
    """The task's first declared metric (with its first filter), else the first metric reported."""
    listed = (results.get("configs", {}).get(task) or {}).get("metric_list") or []
    first = listed[0].get("metric") if listed and isinstance(listed[0], dict) else None
    for name in metrics:
        if first is not None and name.split(",")[0] == first:
            return name
    return next(iter(metrics), None)


# ---------------------------------------------------------------------- helpers


class _Clock:
    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.seconds: list[float] = []
        self.started = time.monotonic()

    def tick(self, seconds: float | None) -> None:
        self.done += 1
        if seconds is not None:
            self.seconds.append(seconds)

    def eta(self) -> str:
        left = self.total - self.done
        if not left:
            return f"grid done in {_clock(time.monotonic() - self.started)}"
        per = sum(self.seconds) / len(self.seconds) if self.seconds else 0
        return f"~{_clock(per * left)} left for {left} cells"


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _score_text(cell: dict[str, Any]) -> str:
    m = cell.get("primary_metric")
    if not m:
        return "no metric"
    value = cell["metrics"][m]
    se = value.get("stderr")
    return f"{m} {value['value']:.4f}" + (f" ± {se:.4f}" if se is not None else "")


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:400] + ("..." if len(text) > 400 else "")


def _write_json(path: Path, obj: Any) -> None:
    write_file_atomically(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every request batch at INFO; keep its warnings, drop the rest for the cell's duration."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "httpx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def load_cells(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished cell file under OUT/cells, by cell key."""
    cells = {}
    for path in sorted((Path(out) / "cells").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") == CELL_FORMAT:
                cells[path.stem] = data
    return cells
