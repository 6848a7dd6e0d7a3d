"""The adapter to lm-eval (the evaluation harness): one ``simple_evaluate`` per cell, and the cell file it leaves.

lm-eval builds the requests, talks to the server (``local-completions``, or ``local-chat-completions`` for
``chat: server`` tasks), scores and computes standard errors; its own results and per-sample logs are kept under
``OUT/lm-eval/<cell>/``. tunevec adds the cell file, ``OUT/cells/<cell>.json``: the metrics in one shape
(value and stderr per metric), the task's primary metric, and the hash of everything that determines the scores.
It is written last and atomically, so a cell whose file exists with the current hash is finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunevec.core.errors import TunevecError
from tunevec.core.files import write_file_atomically
from tunevec.eval.grid import Grid, TaskSpec, Variant

if TYPE_CHECKING:
    from tunevec.eval.plan import GridRun, PlannedCell

CELL_FORMAT = "tunevec.eval-cell"
CELL_VERSION = 1


def run_cell(run: GridRun, planned: PlannedCell, url: str, model: str, concurrency: int) -> dict[str, Any]:
    """One lm-eval run for one cell against the server at ``url`` (``model``: the request's model field, with
    ``concurrency`` requests in flight); writes lm-eval's own output and then the cell file. Returns the cell."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    grid, cell = run.grid, planned.cell
    v, t = cell.variant, cell.task
    settings = grid.lm_eval
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
    grid: Grid, v: Variant, t: TaskSpec, url: str, concurrency: int, model: str
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


# ---------------------------------------------------------------------- cell files


def _write_json(path: Path, obj: Any) -> None:
    write_file_atomically(path, json.dumps(obj, indent=2, default=str) + "\n")


def is_finished(path: Path, config_hash: str) -> bool:
    """Whether the cell file at ``path`` holds scores for this very configuration."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return data.get("config_hash") == config_hash and "metrics" in data


def load_cells(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished cell file under OUT/cells, by cell key."""
    cells = {}
    for path in sorted((Path(out) / "cells").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") == CELL_FORMAT:
                cells[path.stem] = data
    return cells
