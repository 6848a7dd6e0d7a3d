"""Run a planned grid: every unfinished cell, one lm-eval run each, server group by server group.

The runner is a thin layer over lm-eval. Its parts, one module each:

- ``eval/plan.py``: checks, each cell's configuration hash, resume state, and which server serves which cells;
- ``eval/servers.py``: the server of each group (the steering server for the base and every spec, or a plain
  vLLM server per injected or checkpoint variant), one at a time, restarted if it dies;
- ``eval/harness.py``: one ``lm_eval.simple_evaluate`` per cell, and the cell file it leaves;
- ``eval/progress.py``: one line per cell with its score, its time and an estimate of the time left.

A failing cell is reported and the grid goes on; a server that does not start fails only its own cells.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tunevec.core.errors import TunevecError
from tunevec.eval.harness import run_cell
from tunevec.eval.plan import GridRun, PlannedCell, group_cells
from tunevec.eval.progress import Clock, say, score_text, short
from tunevec.eval.servers import server_for


def run_grid(run: GridRun, *, log_dir: Path | None = None, on_cell: Callable | None = None) -> GridRun:
    """Run every unfinished cell; servers are started per group and stopped before the next group starts."""
    log_dir = log_dir or run.out / "logs"
    todo = run.todo
    total = len(run.cells)
    say(f"{total} cells ({len(run.grid.variants)} variants x {len(run.grid.tasks)} tasks): "
        f"{total - len(todo)} finished, {len(todo)} to run; output in {run.out}")  # fmt: skip
    if not todo:
        return run
    clock = Clock(len(todo))

    def failed(planned: PlannedCell, reason: str) -> None:
        run.failures.append((planned.cell.key, reason))
        clock.tick(None)
        say(
            f"[{clock.done}/{clock.total}] FAILED {planned.variant.name} x {planned.cell.task.name}: {reason}"
        )

    for group, cells in group_cells(todo, run.grid):
        try:
            with server_for(run, group, log_dir) as server:
                for i, planned in enumerate(cells):
                    if server is not None and not server.healthy():
                        server.restart()
                    try:
                        url = server.url if server else run.server_url
                        model = planned.variant.model if group == "steering" else planned.variant.name
                        concurrency = run.grid.lm_eval.num_concurrent
                        if server is not None and server.concurrency_cap:
                            concurrency = min(concurrency, server.concurrency_cap)
                        result = run_cell(run, planned, url, model, concurrency)
                    except Exception as exc:  # one broken cell must not cost the rest of a long grid
                        failed(planned, short(exc))
                        continue
                    finally:
                        cells[i] = None  # accounted for (done or failed)
                    planned.done = True
                    clock.tick(result["seconds"])
                    say(f"[{clock.done}/{clock.total}] {planned.variant.name} x {planned.cell.task.name}: "
                        f"{score_text(result)} ({result['seconds']:.0f}s; {clock.eta()})")  # fmt: skip
                    if on_cell:
                        on_cell(result)
        except TunevecError as exc:  # the server would not start (or kept dying): skip its cells, go on
            say(f"{exc}")
            for planned in cells:
                if planned is not None:
                    failed(planned, f"server unavailable: {short(exc)[:200]}")
    return run
