"""Plan a grid run: check everything that can be checked before a server starts, hash each cell's configuration,
mark the cells already finished, and group the rest by the server that will serve them.

A cell's configuration is everything that determines its scores: the variant (canonical spec, the base's
fingerprint and each vector's content hash; or the checkpoint's fingerprint), the task (name, limit, few-shot,
chat mode, its config with local data files replaced by their content hash), the server settings that change
scores, the lm-eval version and seed. A cell whose file holds the same hash is not run again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunevec.core.errors import TunevecError
from tunevec.eval.grid import Cell, Grid, Variant, digest
from tunevec.eval.harness import CELL_VERSION, is_finished
from tunevec.eval.tasks import default_include_path, task_fingerprint, task_manager


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
        cells.append(PlannedCell(cell, path, config, h, done=not fresh and is_finished(path, h)))
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
            vectors[name] = vec.content_digest  # a hash of every tensor's bytes (weights or directions)
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


# ---------------------------------------------------------------------- which server serves which cells


def server_group(v: Variant, grid: Grid) -> str:
    """``steering`` (shared steering server), ``inject:<name>`` or ``checkpoint:<name>`` (a server of its own).

    Under ``steering: lora`` a spec that no per-request mixture can serve exactly (TIES, DARE: not linear in the
    factors) gets an injected server of its own, as `tunevec serve --inject` would.
    """
    if v.kind == "checkpoint":
        return f"checkpoint:{v.name}"
    if grid.server.steering == "inject" or (v.spec is not None and _nonlinear(v.spec)):
        return f"inject:{v.name}"
    return "steering"


def _nonlinear(spec: str) -> bool:
    from tunevec.steering.spec import Spec

    return Spec.parse(spec).method != "linear"


def group_cells(todo: list[PlannedCell], grid: Grid) -> list[tuple[str, list[PlannedCell]]]:
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
