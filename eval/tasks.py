"""lm-eval's tasks for a grid: where they are found, and what of each one a cell's scores depend on.

A grid names tasks by lm-eval name. Bundled fixture tasks sit in a ``tasks/`` folder beside the fixture base and
are found without ``--include_path``; anything else comes from the grid's include paths or lm-eval's own index.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tunevec.eval.grid import Grid, digest


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
