"""Validation and test views of lm-eval tasks, for choosing on one and reporting on the other (``tunevec tune``).

A task is used in one of two ways:

- **its own splits** (the default): the task declares both ``validation_split`` and ``test_split``. The test view
  is the task as lm-eval runs it; the validation view is the same task with ``test_split`` unset, so lm-eval
  evaluates its validation docs (lm-eval's rule: test docs when a task has them, else validation docs). The
  bundled fixture tasks have both (``tunevec/fixtures/tasks.py``), as do many lm-eval tasks (``mmlu_*``,
  ``arc_*``, ``hellaswag``...).
- **carved** (``--carve-validation F``, for tasks with only one evaluation split, e.g. ``gsm8k``): the docs lm-eval
  would evaluate are split by a hash of each doc's content, a share ``F`` to validation and the rest to test. The
  split is the same on every machine and run, whatever the docs' order, and the two views never share a doc.

Either way the views are built on fresh ``Task`` objects per evaluation, never by editing a task's files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tunevec.core.errors import TunevecError

SPLITS = ("validation", "test")


def doc_share(doc: Any) -> float:
    """A number in [0, 1) fixed by the doc's content (its JSON with sorted keys)."""
    text = json.dumps(doc, sort_keys=True, default=str, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


@dataclass(frozen=True)
class TaskPlan:
    """How one task yields its two views: ``own`` splits, or ``carved`` from the split lm-eval evaluates."""

    name: str
    mode: str  # "own" | "carved"
    carve: float | None = None  # share of the docs that go to validation when carved

    def describe(self) -> str:
        if self.mode == "own":
            return "its validation split; reported on its test split"
        return (
            f"{self.carve:.0%} of its eval docs (by content hash) for validation, the rest reported as test"
        )


def plan_tasks(task_manager: Any, names: list[str], carve: float | None) -> list[TaskPlan]:
    """How each task gives a validation and a test view; TunevecError for a task that cannot, saying what to do."""
    if carve is not None and not 0 < carve < 1:
        raise TunevecError(f"--carve-validation {carve}: give a share between 0 and 1, such as 0.5")
    loaded = load_tasks(task_manager, names)
    plans = []
    for name in names:
        task = loaded[name]
        if carve is not None:
            plans.append(TaskPlan(name, "carved", carve))
        elif task.has_validation_docs() and task.has_test_docs():
            plans.append(TaskPlan(name, "own"))
        else:
            has = [
                s
                for s, ok in (("validation", task.has_validation_docs()), ("test", task.has_test_docs()))
                if ok
            ]
            raise TunevecError(
                f"task {name!r} has {' and '.join(has) or 'no'} split(s) to evaluate, but tune needs two disjoint "
                "ones (it chooses alpha on validation docs and reports on test docs it never saw); give "
                "--carve-validation 0.5 to split its docs in two by content"
            )
    return plans


def load_tasks(task_manager: Any, names: list[str]) -> dict[str, Any]:
    """Fresh lm-eval Task objects for ``names`` (groups are refused: tune scores one task per objective)."""
    try:
        loaded = task_manager.load(names)["tasks"]
    except (KeyError, ValueError) as exc:
        raise TunevecError(f"lm-eval cannot load task(s) {', '.join(names)}: {exc}") from exc
    missing = [n for n in names if n not in loaded]
    if missing:
        raise TunevecError(
            f"{', '.join(missing)}: lm-eval groups are not tasks tune can score; name their tasks one by one"
        )
    return loaded


def views(task_manager: Any, plans: list[TaskPlan], split: str) -> list[Any]:
    """Fresh Task objects showing ``split`` ("validation" or "test") of each planned task."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    loaded = load_tasks(task_manager, [p.name for p in plans])
    out = []
    for plan in plans:
        task = loaded[plan.name]
        if plan.mode == "own":
            if split == "validation":
                task.config.test_split = (
                    None  # lm-eval evaluates validation docs when a task has no test docs
                )
        else:
            source = task.config.test_split if task.has_test_docs() else task.config.validation_split
            keep_validation = split == "validation"
            task.dataset[source] = task.dataset[source].filter(
                lambda doc, share=plan.carve, want=keep_validation: (doc_share(doc) < share) == want,
                keep_in_memory=True,  # no cache files beside the dataset for a view
            )
        out.append(task)
    return out
