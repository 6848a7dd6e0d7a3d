"""Write an analysis report: strict JSON (report.json), the PNG plots and the Markdown summary (summary.md)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch


def to_json(obj: Any) -> Any:
    """``obj`` with NaN/inf as None and tensors as lists, so the JSON is strict (no NaN literals)."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_json(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_report(report: dict, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write report.json, the PNG plots and summary.md into ``out``; returns the paths written."""
    from tunevec.analysis.plots import write_plots
    from tunevec.analysis.summary import summary_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json"}
    clean = to_json(report)
    paths["json"].write_text(json.dumps(clean, indent=1, ensure_ascii=False, allow_nan=False))
    plots = write_plots(clean, out)
    paths.update(plots)
    paths["markdown"] = out / "summary.md"
    paths["markdown"].write_text(summary_markdown(clean, {k: p.name for k, p in plots.items()}))
    return paths
