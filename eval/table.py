"""The results table: one row per variant, one column per task, the task's primary metric ± lm-eval's stderr.

Written three ways from the same rows: Markdown (printed, and in ``results.md``), CSV in long form (one line per
variant, task and metric, every metric lm-eval reported) and JSON.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunevec.eval.grid import Grid, cell_key


@dataclass
class Row:
    variant: str
    kind: str
    what: str
    spec: str | None
    checkpoint: str | None
    alphas: dict[str, float]
    cells: dict[str, dict[str, Any] | None]  # task -> cell file contents (None: not run or failed)


def build_rows(grid: Grid, cells: dict[str, dict[str, Any]]) -> list[Row]:
    """Rows in grid order. ``cells`` holds the finished cells of the current plan by cell key (the runner
    leaves out files written under another config), so stale results never reach the table."""
    rows = []
    for v in grid.variants:
        rows.append(
            Row(
                variant=v.name,
                kind=v.kind,
                what=v.describe(),
                spec=v.spec,
                checkpoint=str(v.checkpoint) if v.checkpoint else None,
                alphas=dict(v.alphas),
                cells={t.name: cells.get(cell_key(v.name, t.name)) for t in grid.tasks},
            )
        )
    return rows


def _primary(cell: dict[str, Any] | None) -> tuple[str | None, float | None, float | None]:
    if not cell or not cell.get("primary_metric"):
        return None, None, None
    m = cell["primary_metric"]
    value = cell["metrics"][m]
    return m, value["value"], value.get("stderr")


def task_metrics(rows: list[Row], tasks: list[str]) -> dict[str, str | None]:
    """The primary metric per task (as reported by its first finished cell)."""
    out: dict[str, str | None] = {}
    for t in tasks:
        out[t] = next((m for r in rows for m in [_primary(r.cells[t])[0]] if m), None)
    return out


def fmt(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}"


def to_markdown(rows: list[Row], tasks: list[str]) -> str:
    metrics = task_metrics(rows, tasks)
    header = ["variant", "model"] + [f"{t} ({metrics[t] or '?'})" for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * len(tasks)) + "|"]
    for r in rows:
        scores = [fmt(*_primary(r.cells[t])[1:]) for t in tasks]
        lines.append("| " + " | ".join([f"`{r.variant}`", r.what.replace("|", "\\|")] + scores) + " |")
    counts = {
        t: next((c["n_samples"] for r in rows if (c := r.cells[t]) and c.get("n_samples")), None)
        for t in tasks
    }
    docs = ", ".join(f"{t}: {c['effective']} docs" for t, c in counts.items() if c)
    lines.append("")
    lines.append(f"Scores ± lm-eval's standard error{'; ' + docs if docs else ''}. — = not run (or failed).")
    return "\n".join(lines)


def to_records(rows: list[Row], tasks: list[str]) -> list[dict[str, Any]]:
    """Long form: one record per (variant, task, metric)."""
    out = []
    for r in rows:
        for t in tasks:
            cell = r.cells[t]
            if not cell:
                continue
            n = cell.get("n_samples") or {}
            for metric, value in cell["metrics"].items():
                out.append(
                    {
                        "variant": r.variant,
                        "kind": r.kind,
                        "model": r.what,
                        "spec": r.spec or "",
                        "checkpoint": r.checkpoint or "",
                        "alphas": ";".join(f"{k}={a:g}" for k, a in r.alphas.items()),
                        "task": t,
                        "metric": metric,
                        "primary": metric == cell.get("primary_metric"),
                        "value": value["value"],
                        "stderr": value["stderr"],
                        "n": n.get("effective"),
                        "seconds": cell.get("seconds"),
                    }
                )
    return out


def write_tables(rows: list[Row], tasks: list[str], out: Path, grid: Grid) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "json": out / "results.json"}
    records = to_records(rows, tasks)
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        fields = ["variant", "kind", "model", "spec", "checkpoint", "alphas", "task", "metric", "primary",
                  "value", "stderr", "n", "seconds"]  # fmt: skip
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    doc = {
        "grid": grid.name,
        "source": grid.source,
        "tasks": tasks,
        "primary_metrics": task_metrics(rows, tasks),
        "variants": [
            {
                "name": r.variant,
                "kind": r.kind,
                "model": r.what,
                "spec": r.spec,
                "checkpoint": r.checkpoint,
                "alphas": r.alphas,
            }
            for r in rows
        ],
        "results": records,
    }
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(f"# {grid.name}\n\n" + to_markdown(rows, tasks) + "\n", encoding="utf-8")
    return paths
