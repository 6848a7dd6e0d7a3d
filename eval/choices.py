"""What accuracy hides on a multiple-choice task: the log-likelihoods lm-eval scored, per variant.

Accuracy moves only when a choice overtakes another; the log-likelihoods behind it move with every change of the
weights. From the sample logs a grid run keeps (``OUT/cells/*.json`` -> ``lm_eval_output``), per variant of one
multiple-choice task:

- ``gold``: mean log-likelihood of the right answer, and its shift from the reference variant (the base);
- ``others``: the same for the wrong answers;
- ``margin``: mean of (gold − the best wrong answer); accuracy is the share of documents where it is > 0.

    python -m tunevec.eval.choices artifacts/eval/demo --task tunevec_medical_mcq
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from tunevec.core.errors import TunevecError


@dataclass(frozen=True)
class ChoiceStats:
    variant: str
    docs: int
    gold: float
    others: float
    margin: float


def choice_stats(out: Path, task: str) -> list[ChoiceStats]:
    """One ChoiceStats per finished cell of ``task`` in the grid output ``out``, in the grid's variant order."""
    stats = []
    for cell_file in sorted((out / "cells").glob("*.json")):
        cell = json.loads(cell_file.read_text())
        if cell.get("task") != task:
            continue
        samples = sorted((out / cell["lm_eval_output"]).glob(f"*/samples_{task}_*.jsonl"))
        if not samples:
            raise TunevecError(
                f"{cell_file}: no lm-eval sample log for {task} under {cell['lm_eval_output']}"
            )
        gold, others, margin = [], [], []
        for line in samples[-1].read_text().splitlines():
            doc = json.loads(line)
            try:
                lls = [float(r[0][0]) for r in doc["resps"]]
                target = int(doc["target"])
            except (KeyError, IndexError, TypeError, ValueError):
                lls, target = [], -1
            if len(lls) < 2 or not 0 <= target < len(lls):
                raise TunevecError(f"{samples[-1]}: {task} is not a multiple-choice task with a gold index")
            wrong = lls[:target] + lls[target + 1 :]
            gold.append(lls[target])
            others.append(statistics.fmean(wrong))
            margin.append(lls[target] - max(wrong))
        stats.append(
            ChoiceStats(
                cell["variant"],
                len(gold),
                statistics.fmean(gold),
                statistics.fmean(others),
                statistics.fmean(margin),
            )
        )
    if not stats:
        raise TunevecError(f"{out}: no finished cell of task {task!r}")
    table = out / "results.json"
    order = json.loads(table.read_text()).get("variants", []) if table.exists() else []
    rank = {v["name"]: i for i, v in enumerate(order)}
    return sorted(stats, key=lambda s: rank.get(s.variant, len(rank)))


def to_markdown(stats: list[ChoiceStats], reference: str = "base") -> str:
    ref = next((s for s in stats if s.variant == reference), None)

    def shift(value: float, base: float | None) -> str:
        return f"{value:.2f}" if base is None else f"{value:.2f} ({value - base:+.2f})"

    lines = [
        f"| variant | docs | gold log-lik (vs {reference}) | wrong answers (vs {reference}) | margin gold − best wrong |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in stats:
        lines.append(
            f"| `{s.variant}` | {s.docs} | {shift(s.gold, ref and ref.gold)} | {shift(s.others, ref and ref.others)} "
            f"| {s.margin:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="a `tunevec eval` output folder")
    ap.add_argument("--task", required=True, help="a multiple-choice task of that run")
    ap.add_argument("--reference", default="base", help="the variant shifts are measured from (default base)")
    args = ap.parse_args(argv)
    try:
        print(to_markdown(choice_stats(args.out, args.task), args.reference))
    except TunevecError as exc:
        ap.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
