"""Plots of a grid's results (matplotlib, Agg): score against alpha per sweep, and bars per variant and task.

Error bars are lm-eval's standard errors. In an alpha plot the base is the point at alpha = 0 (when the grid has
it) and a sweep over one vector draws that vector's tuned checkpoint, when the grid has it, as a dashed line.
"""

from __future__ import annotations

from pathlib import Path

from tunevec.eval.grid import Grid, safe_name
from tunevec.eval.table import Row, _primary, task_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_alpha(rows: list[Row], tasks: list[str], grid: Grid, out: Path) -> list[Path]:
    plt = _pyplot()
    metrics = task_metrics(rows, tasks)
    paths = []
    base = next((r for r in rows if r.kind == "base"), None)
    for sweep in grid.sweeps:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
        for ax, task, color in zip(axes[0], tasks, _colors(len(tasks)), strict=False):
            points = sorted(
                (r.alphas[sweep.name], *_primary(r.cells[task])[1:]) for r in rows if sweep.name in r.alphas
            )
            if base is not None and all(a != 0 for a, *_ in points):
                points = sorted([(0.0, *_primary(base.cells[task])[1:]), *points])
            points = [(a, v, s) for a, v, s in points if v is not None]
            if points:
                ax.errorbar(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    yerr=[p[2] or 0 for p in points],
                    marker="o",
                    capsize=3,
                    color=color,
                    label=f"base + {sweep.template.replace('{alpha}', 'α')}",
                )
            ref = next(
                (
                    r
                    for r in rows
                    if sweep.vector and r.kind == "checkpoint" and _tuned_of(r, grid) == sweep.vector
                ),
                None,
            )
            if ref is not None:
                _, v, s = _primary(ref.cells[task])
                if v is not None:
                    ax.axhline(v, ls="--", color="gray", label=f"{ref.variant} (checkpoint)")
                    if s:
                        ax.axhspan(v - s, v + s, color="gray", alpha=0.12)
            ax.set_title(task, fontsize=10)
            ax.set_xlabel("α")
            ax.set_ylabel(metrics[task] or "score")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        fig.suptitle(f"{grid.name}: score against α ({sweep.name})", fontsize=11)
        fig.tight_layout()
        path = out / f"alpha_{safe_name(sweep.name)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _tuned_of(row: Row, grid: Grid) -> str | None:
    return next((v.tuned for v in grid.variants if v.name == row.variant), None)


def plot_bars(rows: list[Row], tasks: list[str], grid: Grid, out: Path) -> Path:
    plt = _pyplot()
    metrics = task_metrics(rows, tasks)
    colors = {"base": "#4c72b0", "spec": "#55a868", "checkpoint": "#c44e52"}
    fig, axes = plt.subplots(
        len(tasks), 1, figsize=(max(6.0, 0.55 * len(rows) + 2), 2.9 * len(tasks)), squeeze=False
    )
    for ax, task in zip(axes[:, 0], tasks, strict=True):
        values = [_primary(r.cells[task])[1:] for r in rows]
        x = range(len(rows))
        ax.bar(
            x,
            [v if v is not None else 0 for v, _ in values],
            yerr=[s or 0 for _, s in values],
            capsize=3,
            color=[colors.get(r.kind, "gray") for r in rows],
        )
        base = next(
            (v for r, (v, _) in zip(rows, values, strict=True) if r.kind == "base" and v is not None), None
        )
        if base is not None:
            ax.axhline(base, ls=":", color="black", lw=1)
        for i, (v, _) in enumerate(values):
            if v is None:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x))
        ax.set_xticklabels([r.variant for r in rows], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(metrics[task] or "score")
        ax.set_title(task, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    axes[0, 0].legend(handles, ["base", "base + spec", "checkpoint"], fontsize=7, loc="upper right")
    fig.suptitle(f"{grid.name}: primary metric per variant (± stderr)", fontsize=11)
    fig.tight_layout()
    path = out / "bars.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _colors(n: int) -> list[str]:
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    return [palette[i % len(palette)] for i in range(n)]


def write_plots(rows: list[Row], tasks: list[str], grid: Grid, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [plot_bars(rows, tasks, grid, out), *plot_alpha(rows, tasks, grid, out)]
