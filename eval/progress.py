"""What a grid run prints: one line per event, each cell's score and time, and an estimate of the time left."""

from __future__ import annotations

import time
from typing import Any


def say(message: str) -> None:
    print(f"[tunevec eval] {message}", flush=True)


class Clock:
    """Cells accounted for so far and the time left, estimated from the mean time of the cells that ran."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.seconds: list[float] = []
        self.started = time.monotonic()

    def tick(self, seconds: float | None) -> None:
        """One more cell accounted for: finished in ``seconds``, or failed (None: not part of the estimate)."""
        self.done += 1
        if seconds is not None:
            self.seconds.append(seconds)

    def eta(self) -> str:
        left = self.total - self.done
        if not left:
            return f"grid done in {minutes(time.monotonic() - self.started)}"
        per = sum(self.seconds) / len(self.seconds) if self.seconds else 0
        return f"~{minutes(per * left)} left for {left} cells"


def minutes(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def score_text(cell: dict[str, Any]) -> str:
    """A finished cell's primary metric with its standard error: ``acc 0.6250 ± 0.0625``."""
    m = cell.get("primary_metric")
    if not m:
        return "no metric"
    value = cell["metrics"][m]
    se = value.get("stderr")
    return f"{m} {value['value']:.4f}" + (f" ± {se:.4f}" if se is not None else "")


def short(exc: BaseException) -> str:
    """An exception on one line, cut at 400 characters (the failure line of a cell)."""
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:400] + ("..." if len(text) > 400 else "")
