"""Evaluation grids as data: a YAML mapping (or the same keys from the command line) -> validated cells.

A grid names *variants* (what is served) and *tasks* (lm-eval task names); every (variant, task) pair is a
*cell*. The schema (docs/eval.md has the full table)::

    name: demo
    base: path/to/base            # or --base; relative paths are relative to the grid file
    vectors: path/to/vectors      # or --vectors; one artifact per subfolder
    tasks: [tunevec_medical_mcq, {name: tunevec_math, chat: true, limit: 20}]
    include_path: [my_tasks/]     # extra lm-eval task folders
    limit: 50                     # docs per task (default: all)
    variants:
      - base                      # the base model
      - medical:0.5               # any spec; its name is the spec's canonical text
      - {name: med-mlp, spec: medical@mlp}
      - {name: medical-tuned, tuned: medical}        # the checkpoint `medical` was extracted from
      - {name: other, checkpoint: path/to/model}     # any HF folder, served by its own plain vLLM server
    sweeps:
      - {vector: medical, alphas: [0.25, 0.5, 1, 2]}  # -> medical:0.25 ... (alpha 0 is the base)
      - {name: med-mlp, spec: "medical@mlp:{alpha}", alphas: [0.5, 1]}
    server: {dtype: float32, max_model_len: 1024, adapter_rank: 16, max_lora_rank: 64}
    lm_eval: {num_concurrent: 8, batch_size: 1, max_retries: 3}

The file's shape is declared in ``eval/schema.py`` (pydantic models). This module expands it: ``Grid.from_dict``
validates the shape, parses every spec and sweep point, and turns entries into variants and tasks; ``Grid.check``
checks them against the world (paths exist, vectors exist and belong to the base, mixtures fit the LoRA rank,
tasks are known to lm-eval), so a bad grid fails before any server starts. Variants are deduplicated by what they serve: ``medical`` in ``variants`` and
alpha 1 of a ``medical`` sweep are one variant (one set of cells) carrying the sweep's alpha as a tag.

"tuned - tau" is not offered: tau was extracted against the base, so tuned - tau is the base itself (to float
rounding), and the library refuses vectors on a base they were not extracted from. The meaningful ablations are
scoped and signed specs: ``medical@mlp``, ``medical@attention``, ``medical:-1``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from tunevec.core.errors import TunevecError
from tunevec.eval.schema import (
    GridFile,
    LmEvalSettings,
    ServerSettings,
    SweepEntry,
    VariantEntry,
    kind_of,
    parse_grid,
)

BASE = "base"  # the variant (and served model name) of the plain base model on the steering server
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    limit: int | float | None = None
    num_fewshot: int | None = None
    chat: bool | str = False


@dataclass(frozen=True)
class Variant:
    """One served model: the base, base + a spec (steering server), or a checkpoint (its own plain server)."""

    name: str
    spec: str | None = None  # canonical spec text; None with checkpoint None means the base
    checkpoint: Path | None = None
    tuned: str | None = None  # vector whose tuned checkpoint this is (set for `tuned:` variants)
    # (sweep name, alpha) for every sweep this variant is a point of
    alphas: tuple[tuple[str, float], ...] = ()

    @property
    def kind(self) -> str:
        if self.checkpoint is not None or self.tuned is not None:
            return "checkpoint"
        return "base" if self.spec is None else "spec"

    @property
    def identity(self) -> str:
        """What is served; equal identities are the same model (deduplicated)."""
        if self.kind == "checkpoint":
            return f"checkpoint:{self.checkpoint or 'tuned:' + str(self.tuned)}"
        return f"spec:{self.spec or BASE}"

    @property
    def model(self) -> str:
        """The request's ``model`` field."""
        return self.spec or BASE if self.kind != "checkpoint" else self.name

    def describe(self) -> str:
        if self.kind == "checkpoint":
            return f"tuned checkpoint of {self.tuned}" if self.tuned else f"checkpoint {self.checkpoint.name}"
        return "base model" if self.spec is None else f"base + {self.spec}"


@dataclass(frozen=True)
class Sweep:
    name: str
    template: str  # spec text with "{alpha}"
    alphas: tuple[float, ...]
    vector: str | None = None  # set when given as {vector: ...}; used to draw that vector's tuned reference


@dataclass(frozen=True)
class Cell:
    variant: Variant
    task: TaskSpec

    @property
    def key(self) -> str:
        return cell_key(self.variant.name, self.task.name)


@dataclass
class Grid:
    variants: list[Variant]
    tasks: list[TaskSpec]
    name: str = "grid"
    base: Path | None = None
    base_ref: str | None = None  # the base as written: a folder, or a Hugging Face id resolved by check()
    vectors: Path | None = None
    include_path: list[Path] = field(default_factory=list)
    sweeps: list[Sweep] = field(default_factory=list)
    server: ServerSettings = field(default_factory=ServerSettings)
    lm_eval: LmEvalSettings = field(default_factory=LmEvalSettings)
    source: str = "<command line>"

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> Grid:
        """Read a grid file; ``overrides`` (from the command line) replace its top-level keys."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise TunevecError(f"grid file {path}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise TunevecError(f"grid file {path} is not valid YAML: {exc}") from exc
        if data is None:
            raise TunevecError(f"grid file {path} is empty; it needs at least `tasks:` and `variants:`")
        if not isinstance(data, dict):
            raise TunevecError(f"grid file {path}: expected a mapping at the top level, got {kind_of(data)}")
        return cls.from_dict({**data, **(overrides or {})}, source=str(path), root=path.parent)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, source: str = "<command line>", root: Path | None = None
    ) -> Grid:
        """Validate the grid's shape and specs (no file system or lm-eval access); errors name the entry."""
        where = f"grid {source}"
        parsed = parse_grid(data, where)
        root = root or Path.cwd()

        def path_of(text: str) -> Path:
            p = Path(text).expanduser()
            return p if p.is_absolute() else (root / p)

        tasks = [_task(entry, parsed) for entry in parsed.tasks]
        dup = _duplicates(t.name for t in tasks)
        if dup:
            raise TunevecError(f"{where}: task {dup!r} is listed twice")
        variants = [_variant(e, f"{where}: variants[{i}]", path_of) for i, e in enumerate(parsed.variants)]
        sweeps = [_sweep(s, f"{where}: sweeps[{i}]") for i, s in enumerate(parsed.sweeps)]
        for sweep in sweeps:
            for alpha in sweep.alphas:
                variants.append(_sweep_point(sweep, alpha))
        if not variants:
            raise TunevecError(f"{where}: no variants; list some under `variants:` or `sweeps:`")
        return cls(
            variants=_dedupe(variants, where),
            tasks=tasks,
            name=parsed.name or (Path(source).stem if source != "<command line>" else "grid"),
            base=path_of(parsed.base) if parsed.base else None,
            base_ref=parsed.base,
            vectors=path_of(parsed.vectors) if parsed.vectors else None,
            include_path=[path_of(p) for p in parsed.include_path],
            sweeps=sweeps,
            server=parsed.server,
            lm_eval=parsed.lm_eval,
            source=source,
        )

    # ------------------------------------------------------------------ checks against the world

    def check(self, *, external_server: bool = False, task_index: Any = None) -> None:
        """Check paths, vectors, ranks and task names; raises TunevecError before anything is started.

        ``task_index`` maps task names to lm-eval index entries (``eval.tasks.task_manager``); None skips the
        task check (unit tests of the grid shape).
        """
        from tunevec.core.checkpoint import Checkpoint
        from tunevec.steering.library import VectorLibrary
        from tunevec.steering.spec import Spec

        where = f"grid {self.source}"
        if external_server and self.server.steering == "inject":
            raise TunevecError(
                f"{where}: server.steering is inject (a server per variant, started here), which cannot use "
                "--server-url; drop one of them"
            )
        on_steering = any(v.kind != "checkpoint" for v in self.variants)
        specs = any(v.kind == "spec" for v in self.variants)
        tuned = any(v.tuned for v in self.variants)
        # A running server checks specs against its own vectors (eval.plan.check_remote); local vectors are
        # needed for servers started here and to find the checkpoints of `tuned:` variants.
        needs_vectors = tuned or (specs and (not external_server or self.vectors is not None))
        if ((on_steering and not external_server) or needs_vectors) and self.base is None:
            raise TunevecError(f"{where}: no base model; give --base (or `base:` in the grid)")
        if self.base is not None and not self.base.is_dir() and self.base_ref:
            from tunevec.core.checkpoint import resolve_model

            self.base = resolve_model(self.base_ref).path  # a Hugging Face id, through the hub cache
        if self.base is not None and not (self.base / "config.json").is_file():
            raise TunevecError(f"{where}: base {self.base} is not a model folder (no config.json)")
        library = None
        if needs_vectors:
            if self.vectors is None:
                what = "`tuned:` variants" if tuned else "spec variants"
                raise TunevecError(f"{where}: {what} need --vectors (or `vectors:` in the grid)")
            library = VectorLibrary.from_dir(self.vectors, Checkpoint(self.base))
        num_layers = Checkpoint(self.base).num_layers if self.base else None
        resolved = []
        for v in self.variants:
            if v.kind == "spec" and library is not None:
                spec = Spec.parse(v.spec)
                try:
                    spec.validate(
                        library.names(),
                        max_components=self.server.max_components,
                        max_abs_alpha=self.server.max_abs_alpha,
                        num_layers=num_layers,
                    )
                except TunevecError as exc:
                    raise TunevecError(f"{where}: variant {v.name!r}: {exc}") from None
                self._check_rank(v, spec, where)
            if v.tuned is not None:
                vec = library.weights(v.tuned)
                tuned_path = vec.manifest.tuned.get("path")
                hub_id = vec.manifest.tuned.get("hub_id")
                if hub_id and not (tuned_path and Path(tuned_path).is_dir()):
                    from tunevec.core.checkpoint import resolve_model

                    # The exact snapshot the vector was extracted from, through the hub cache.
                    tuned_path = str(resolve_model(hub_id, vec.manifest.tuned.get("commit")).path)
                if not tuned_path or not (Path(tuned_path) / "config.json").is_file():
                    raise TunevecError(
                        f"{where}: variant {v.name!r}: vector {v.tuned!r} records its tuned model at "
                        f"{tuned_path!r}, which is not a model folder; use `checkpoint: PATH` instead"
                    )
                v = replace(v, checkpoint=Path(tuned_path))
            elif v.checkpoint is not None and not (v.checkpoint / "config.json").is_file():
                raise TunevecError(f"{where}: variant {v.name!r}: {v.checkpoint} is not a model folder")
            resolved.append(v)
        self.variants = resolved
        for p in self.include_path:
            if not p.is_dir():
                raise TunevecError(f"{where}: include_path {p} is not a folder")
        if task_index is not None:
            missing = [t.name for t in self.tasks if t.name not in task_index]
            if missing:
                hint = ", ".join(sorted(task_index)[:8]) if len(task_index) < 50 else "see `lm-eval ls tasks`"
                raise TunevecError(
                    f"{where}: unknown lm-eval task(s) {', '.join(missing)}; give the folder of their YAML "
                    f"with --include_path (known here: {hint})"
                )
            for t in self.tasks:
                output_type = (getattr(task_index[t.name], "cfg", None) or {}).get("output_type")
                if t.chat == "server" and output_type not in (None, "generate_until"):
                    raise TunevecError(
                        f"{where}: task {t.name!r} is {output_type}; chat: server (the chat completions API) "
                        "can only generate. Use chat: true (lm-eval applies the chat template and scores "
                        "through the completions API)"
                    )

    def _check_rank(self, v: Variant, spec: Any, where: str) -> None:
        """Each distinct vector adds adapter_rank to a module's LoRA rank; refuse a mixture the server would."""
        if self.server.adapter_rank is None or self.server.steering != "lora" or spec.method != "linear":
            return  # a non-linear spec is injected on a server of its own (eval/plan.py server_group)
        stacked = len(set(spec.vectors)) * self.server.adapter_rank
        if stacked > self.server.max_lora_rank and not self.server.allow_truncation:
            raise TunevecError(
                f"{where}: variant {v.name!r} stacks {len(set(spec.vectors))} vectors of rank "
                f"{self.server.adapter_rank} (= {stacked}) above server.max_lora_rank {self.server.max_lora_rank}; "
                "raise server.max_lora_rank, lower server.adapter_rank, or set server.allow_truncation"
            )

    # ------------------------------------------------------------------ cells

    def cells(self) -> list[Cell]:
        return [Cell(v, t) for v in self.variants for t in self.tasks]


# ---------------------------------------------------------------------- helpers


def safe_name(text: str) -> str:
    """``text`` with characters unsafe in file names replaced, plus a short digest if anything was replaced."""
    safe = _SAFE.sub("_", text)
    return safe if safe == text else f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def cell_key(variant: str, task: str) -> str:
    """A file-system-safe, unique name for a cell: ``<variant>__<task>`` with unsafe characters replaced and a
    short digest of the exact names added whenever anything was replaced."""
    raw = f"{variant}__{task}"
    safe = f"{_SAFE.sub('_', variant)}__{_SAFE.sub('_', task)}"
    if safe != raw:
        safe += "-" + hashlib.sha256(raw.encode()).hexdigest()[:8]
    return safe


def _task(entry: Any, grid: GridFile) -> TaskSpec:
    """A task with the grid's limit, few-shot count and chat mode, unless the entry sets its own."""
    given = entry.model_fields_set
    return TaskSpec(
        name=entry.name,
        limit=entry.limit if "limit" in given else grid.limit,
        num_fewshot=entry.num_fewshot if "num_fewshot" in given else grid.num_fewshot,
        chat=entry.chat if "chat" in given else grid.chat,
    )


def _canonical(text: str, at: str) -> str | None:
    """Canonical spec text; None for the base. Syntax only: which vectors exist is Grid.check's job."""
    from tunevec.steering.spec import Spec

    if text.strip() == BASE:
        return None
    try:
        spec = Spec.parse(text)
    except TunevecError as exc:
        raise TunevecError(f"{at}: {exc}") from None
    if all(c.alpha == 0 for c in spec.components):
        raise TunevecError(f"{at}: spec {text!r} has only zero coefficients; that is the base, write `base`")
    return spec.canonical()


def _variant(entry: VariantEntry, at: str, path_of: Any) -> Variant:
    if entry.spec is not None:
        spec = _canonical(entry.spec, at)
        return Variant(name=entry.name or spec or BASE, spec=spec)
    if entry.tuned is not None:
        return Variant(name=entry.name or f"{entry.tuned}-tuned", tuned=entry.tuned)
    path = path_of(entry.checkpoint)
    return Variant(name=entry.name or path.name, checkpoint=path)


def _sweep(entry: SweepEntry, at: str) -> Sweep:
    name = entry.name if entry.name is not None else (entry.vector or entry.template)
    sweep = Sweep(name=name, template=entry.template, alphas=tuple(entry.alphas), vector=entry.vector)
    for a in sweep.alphas:  # every point must parse now, not when its cell runs
        if a != 0:
            _canonical(_fill(sweep.template, a), f"{at}: alpha {a:g}")
    return sweep


def _fill(template: str, alpha: float) -> str:
    from tunevec.steering.spec import format_number

    return template.replace("{alpha}", format_number(alpha))


def _sweep_point(sweep: Sweep, alpha: float) -> Variant:
    tag = ((sweep.name, alpha),)
    if alpha == 0:
        return Variant(name=BASE, spec=None, alphas=tag)
    spec = _canonical(_fill(sweep.template, alpha), f"sweep {sweep.name}")
    return Variant(name=spec, spec=spec, alphas=tag)


def _dedupe(variants: list[Variant], where: str) -> list[Variant]:
    """One variant per served model, first name wins, sweep tags merged; distinct models need distinct names."""
    by_identity: dict[str, int] = {}
    out: list[Variant] = []
    for v in variants:
        i = by_identity.get(v.identity)
        if i is None:
            by_identity[v.identity] = len(out)
            out.append(v)
        else:
            out[i] = replace(out[i], alphas=out[i].alphas + v.alphas)
    dup = _duplicates(v.name for v in out)
    if dup:
        raise TunevecError(f"{where}: two different variants are named {dup!r}; give each its own name")
    return out


def _duplicates(names: Any) -> str | None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            return n
        seen.add(n)
    return None


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
