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

Everything here is checked by ``Grid.from_dict`` (shape, types, spec syntax) and ``Grid.check`` (paths exist,
vectors exist and belong to the base, mixtures fit the LoRA rank, tasks are known to lm-eval), so a bad grid
fails before any server starts. Variants are deduplicated by what they serve: ``medical`` in ``variants`` and
alpha 1 of a ``medical`` sweep are one variant (one set of cells) carrying the sweep's alpha as a tag.

"tuned - tau" is not offered: tau was extracted against the base, so tuned - tau is the base itself (to float
rounding), and the library refuses vectors on a base they were not extracted from. The meaningful ablations are
scoped and signed specs: ``medical@mlp``, ``medical@attention``, ``medical:-1``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from tunevec.core.errors import TunevecError

BASE = "base"  # the variant (and served model name) of the plain base model on the steering server
STEERING_MODES = ("lora", "inject")
CHAT_MODES = (False, True, "server")  # no template / template applied by lm-eval / by the server (chat API)
_TOP_KEYS = (
    "name", "base", "vectors", "tasks", "include_path", "limit", "num_fewshot", "chat",
    "variants", "sweeps", "server", "lm_eval",
)  # fmt: skip
_TASK_KEYS = ("name", "limit", "num_fewshot", "chat")
_VARIANT_KEYS = ("name", "spec", "tuned", "checkpoint")
_SWEEP_KEYS = ("name", "vector", "spec", "alphas")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ServerSettings:
    """How servers started for the run are configured (ignored for variants on an external --server-url).

    ``steering`` says how base + spec variants are served:

    - ``lora``: one steering server (``tunevec serve``) for the base and every spec, each spec a rank-
      ``adapter_rank`` LoRA mixture composed per request -- what tunevec serves in production;
    - ``inject``: one plain vLLM server per variant, its weights base + delta(spec) at full rank, injected by
      tunevec's model loader -- exact (``medical`` is the tuned checkpoint again), no LoRA kernels, but a server
      start per variant.
    """

    steering: str = "lora"
    dtype: str = "float32"
    max_model_len: int = 1024
    adapter_rank: int | None = 16
    adapter_energy: float | None = None
    max_lora_rank: int = 64
    max_loras: int = 4
    max_components: int = 4
    max_abs_alpha: float = 4.0
    enforce_eager: bool = True
    startup_timeout: float = 900.0
    # CPU backend: cores kept free of the engine's OpenMP threads (vLLM's default keeps one for its front end;
    # 0 gives a 2-core machine's both cores to the model). None: vLLM's default.
    reserved_cpus: int | None = None
    extra_args: tuple[str, ...] = ()  # further vLLM engine arguments, for every server started

    def result_key(self) -> dict[str, Any]:
        """The settings that change scores (part of each cell's config hash)."""
        key = {"steering": self.steering, "dtype": self.dtype, "max_model_len": self.max_model_len,
               "extra_args": list(self.extra_args)}  # fmt: skip
        if self.steering == "lora":
            key |= {"adapter_rank": self.adapter_rank, "adapter_energy": self.adapter_energy,
                    "max_lora_rank": self.max_lora_rank}  # fmt: skip
        return key


@dataclass(frozen=True)
class LmEvalSettings:
    """lm-eval's client side: concurrency and retries change speed, not scores (not in the config hash)."""

    num_concurrent: int = 8
    batch_size: int = 1
    max_retries: int = 3
    timeout: int = 300
    bootstrap_iters: int = 100000
    seed: int = 1234


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
            raise TunevecError(f"grid file {path}: expected a mapping at the top level, got {_kind(data)}")
        return cls.from_dict({**data, **(overrides or {})}, source=str(path), root=path.parent)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, source: str = "<command line>", root: Path | None = None
    ) -> Grid:
        """Validate the grid's shape and specs (no file system or lm-eval access); errors name the entry."""
        where = f"grid {source}"
        _known(data, _TOP_KEYS, where)
        root = root or Path.cwd()

        def path_of(value: Any, what: str) -> Path | None:
            if value is None:
                return None
            if not isinstance(value, str | Path) or not str(value):
                raise TunevecError(f"{where}: {what} must be a path, got {value!r}")
            p = Path(value).expanduser()
            return p if p.is_absolute() else (root / p)

        limit = _limit(data.get("limit"), f"{where}: limit")
        fewshot = _count(data.get("num_fewshot"), f"{where}: num_fewshot")
        chat = _chat(data.get("chat", False), f"{where}: chat")
        tasks = [_task(t, i, where, limit, fewshot, chat) for i, t in enumerate(_list(data, "tasks", where))]
        if not tasks:
            raise TunevecError(f"{where}: `tasks` is empty; name at least one lm-eval task")
        dup = _duplicates(t.name for t in tasks)
        if dup:
            raise TunevecError(f"{where}: task {dup!r} is listed twice")

        variants: list[Variant] = []
        for i, entry in enumerate(_list(data, "variants", where, required=False)):
            variants.append(_variant(entry, f"{where}: variants[{i}]", path_of))
        sweeps = [
            _sweep(s, f"{where}: sweeps[{i}]") for i, s in enumerate(_list(data, "sweeps", where, False))
        ]
        for sweep in sweeps:
            for alpha in sweep.alphas:
                variants.append(_sweep_point(sweep, alpha))
        if not variants:
            raise TunevecError(f"{where}: no variants; list some under `variants:` or `sweeps:`")
        variants = _dedupe(variants, where)

        include = data.get("include_path") or []
        include = [include] if isinstance(include, str | Path) else include
        if not isinstance(include, list):
            raise TunevecError(f"{where}: include_path must be a path or a list of paths")
        name = data.get("name", Path(source).stem if source != "<command line>" else "grid")
        if not isinstance(name, str) or not name:
            raise TunevecError(f"{where}: name must be a non-empty string")
        return cls(
            variants=variants,
            tasks=tasks,
            name=name,
            base=path_of(data.get("base"), "base"),
            vectors=path_of(data.get("vectors"), "vectors"),
            include_path=[path_of(p, "include_path entry") for p in include],
            sweeps=sweeps,
            server=_settings(ServerSettings, data.get("server"), f"{where}: server"),
            lm_eval=_settings(LmEvalSettings, data.get("lm_eval"), f"{where}: lm_eval"),
            source=source,
        )

    # ------------------------------------------------------------------ checks against the world

    def check(self, *, external_server: bool = False, task_index: Any = None) -> None:
        """Check paths, vectors, ranks and task names; raises TunevecError before anything is started.

        ``task_index`` maps task names to lm-eval index entries (``eval.runner.task_index``); None skips the
        task check (unit tests of the grid shape).
        """
        from tunevec.steering.library import VectorLibrary
        from tunevec.steering.spec import Spec

        from tunevec.core.checkpoint import Checkpoint

        where = f"grid {self.source}"
        if external_server and self.server.steering == "inject":
            raise TunevecError(
                f"{where}: server.steering is inject (a server per variant, started here), which cannot use "
                "--server-url; drop one of them"
            )
        on_steering = any(v.kind != "checkpoint" for v in self.variants)
        specs = any(v.kind == "spec" for v in self.variants)
        tuned = any(v.tuned for v in self.variants)
        # A running server checks specs against its own vectors (eval.runner.check_remote); local vectors are
        # needed for servers started here and to find the checkpoints of `tuned:` variants.
        needs_vectors = tuned or (specs and (not external_server or self.vectors is not None))
        if ((on_steering and not external_server) or needs_vectors) and self.base is None:
            raise TunevecError(f"{where}: no base model; give --base (or `base:` in the grid)")
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
                vec = library[v.tuned]
                tuned_path = vec.manifest.tuned.get("path")
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
        if self.server.adapter_rank is None or self.server.steering != "lora":
            return
        stacked = len(set(spec.vectors)) * self.server.adapter_rank
        if stacked > self.server.max_lora_rank and "--allow-truncation" not in self.server.extra_args:
            raise TunevecError(
                f"{where}: variant {v.name!r} stacks {len(set(spec.vectors))} vectors of rank "
                f"{self.server.adapter_rank} (= {stacked}) above server.max_lora_rank {self.server.max_lora_rank}; "
                "raise server.max_lora_rank or lower server.adapter_rank"
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


def _kind(value: Any) -> str:
    return {list: "a list", dict: "a mapping", str: "a string"}.get(type(value), type(value).__name__)


def _known(data: dict, keys: tuple[str, ...], where: str) -> None:
    unknown = [k for k in data if k not in keys]
    if unknown:
        raise TunevecError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(keys)}"
        )


def _list(data: dict, key: str, where: str, required: bool = True) -> list:
    value = data.get(key)
    if value is None:
        if required:
            raise TunevecError(f"{where}: `{key}` is missing")
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise TunevecError(f"{where}: `{key}` must be a list, got {_kind(value)}")
    return value


def _limit(value: Any, where: str) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise TunevecError(f"{where} must be a positive number of docs (or a fraction < 1), got {value!r}")
    if isinstance(value, float) and value >= 1:
        if not value.is_integer():
            raise TunevecError(f"{where}: {value!r} is neither a fraction below 1 nor a whole number of docs")
        return int(value)
    return value


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TunevecError(f"{where} must be a whole number >= 0, got {value!r}")
    return value


def _chat(value: Any, where: str) -> bool | str:
    if value not in CHAT_MODES or (value == 1 and value is not True) or (value == 0 and value is not False):
        raise TunevecError(
            f"{where} must be false, true (lm-eval applies the template) or server, got {value!r}"
        )
    return value


def _task(entry: Any, i: int, where: str, limit: Any, fewshot: Any, chat: Any) -> TaskSpec:
    at = f"{where}: tasks[{i}]"
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise TunevecError(f"{at} must be a task name or a mapping with `name`, got {_kind(entry)}")
    _known(entry, _TASK_KEYS, at)
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip() or "," in name:
        raise TunevecError(f"{at}: `name` must be one lm-eval task name, got {name!r}")
    return TaskSpec(
        name=name.strip(),
        limit=_limit(entry["limit"], f"{at}: limit") if "limit" in entry else limit,
        num_fewshot=_count(entry["num_fewshot"], f"{at}: num_fewshot") if "num_fewshot" in entry else fewshot,
        chat=_chat(entry["chat"], f"{at}: chat") if "chat" in entry else chat,
    )


def _canonical(text: Any, at: str) -> str | None:
    """Canonical spec text; None for the base. Syntax only: which vectors exist is Grid.check's job."""
    from tunevec.steering.spec import Spec

    if not isinstance(text, str) or not text.strip():
        raise TunevecError(f"{at}: spec must be a non-empty string, got {text!r}")
    if text.strip() == BASE:
        return None
    try:
        spec = Spec.parse(text)
    except TunevecError as exc:
        raise TunevecError(f"{at}: {exc}") from None
    if all(c.alpha == 0 for c in spec.components):
        raise TunevecError(f"{at}: spec {text!r} has only zero coefficients; that is the base, write `base`")
    return spec.canonical()


def _variant(entry: Any, at: str, path_of: Any) -> Variant:
    if isinstance(entry, str):
        spec = _canonical(entry, at)
        return Variant(name=spec or BASE, spec=spec)
    if not isinstance(entry, dict):
        raise TunevecError(f"{at} must be a spec string or a mapping, got {_kind(entry)}")
    _known(entry, _VARIANT_KEYS, at)
    given = [k for k in ("spec", "tuned", "checkpoint") if k in entry]
    if len(given) != 1:
        raise TunevecError(
            f"{at}: give exactly one of spec (base + vectors), tuned (a vector's tuned checkpoint) or checkpoint "
            f"(a model folder); got {', '.join(given) or 'none'}. (tuned - tau is the base itself, so there is "
            "no tuned+spec form; see docs/eval.md)"
        )
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip() or "," in name):
        raise TunevecError(f"{at}: name must be a non-empty string without commas, got {name!r}")
    if "spec" in entry:
        spec = _canonical(entry["spec"], at)
        return Variant(name=name or spec or BASE, spec=spec)
    if "tuned" in entry:
        from tunevec.steering.spec import VECTOR_NAME

        vec = entry["tuned"]
        if not isinstance(vec, str) or not VECTOR_NAME.fullmatch(vec):
            raise TunevecError(f"{at}: tuned must name a vector, got {vec!r}")
        return Variant(name=name or f"{vec}-tuned", tuned=vec)
    path = path_of(entry["checkpoint"], f"{at}: checkpoint")
    return Variant(name=name or path.name, checkpoint=path)


def _sweep(entry: Any, at: str) -> Sweep:
    from tunevec.steering.spec import VECTOR_NAME

    if not isinstance(entry, dict):
        raise TunevecError(f"{at} must be a mapping like {{vector: medical, alphas: [0.5, 1, 2]}}")
    _known(entry, _SWEEP_KEYS, at)
    if ("vector" in entry) == ("spec" in entry):
        raise TunevecError(
            f"{at}: give exactly one of vector (-> VECTOR:{{alpha}}) or spec (a template with {{alpha}})"
        )
    vector = entry.get("vector")
    if vector is not None:
        if not isinstance(vector, str) or not VECTOR_NAME.fullmatch(vector):
            raise TunevecError(f"{at}: vector must be a vector name, got {vector!r}")
        template = f"{vector}:{{alpha}}"
    else:
        template = entry["spec"]
        if not isinstance(template, str) or template.count("{alpha}") != 1:
            raise TunevecError(
                f"{at}: spec must contain {{alpha}} exactly once, e.g. 'medical@mlp:{{alpha}}'"
            )
    alphas = entry.get("alphas")
    if not isinstance(alphas, list) or not alphas:
        raise TunevecError(f"{at}: alphas must be a non-empty list of numbers")
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, int | float):
            raise TunevecError(f"{at}: alpha {a!r} is not a number")
    if len(set(alphas)) != len(alphas):
        raise TunevecError(f"{at}: alphas repeat a value: {alphas}")
    name = entry.get("name", vector or template)
    if not isinstance(name, str) or not name:
        raise TunevecError(f"{at}: name must be a non-empty string")
    sweep = Sweep(name=name, template=template, alphas=tuple(float(a) for a in alphas), vector=vector)
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


def _settings(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise TunevecError(f"{where} must be a mapping, got {_kind(data)}")
    known = {f.name: f for f in fields(cls)}
    _known(data, tuple(known), where)
    defaults = cls()
    values = {}
    for key, value in data.items():
        default = getattr(defaults, key)
        kind = known[key].type
        if key == "extra_args":
            if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                raise TunevecError(f"{where}: extra_args must be a list of strings")
            value = tuple(value)
        elif "None" in str(kind) and value is None:
            pass
        elif isinstance(default, bool) or "bool" in str(kind):
            if not isinstance(value, bool):
                raise TunevecError(f"{where}: {key} must be true or false, got {value!r}")
        elif "int" in str(kind) and "float" not in str(kind):
            least = 0 if key == "reserved_cpus" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise TunevecError(f"{where}: {key} must be a whole number >= {least}, got {value!r}")
        elif "float" in str(kind):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise TunevecError(f"{where}: {key} must be a positive number, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise TunevecError(f"{where}: {key} must be a string, got {value!r}")
        values[key] = value
    if cls is ServerSettings and "adapter_energy" in values and "adapter_rank" not in values:
        values["adapter_rank"] = None  # an energy target replaces the default rank
    settings = cls(**values)
    if cls is ServerSettings and (settings.adapter_rank is None) == (settings.adapter_energy is None):
        raise TunevecError(f"{where}: set exactly one of adapter_rank / adapter_energy")
    if cls is ServerSettings and settings.steering not in STEERING_MODES:
        raise TunevecError(
            f"{where}: steering must be one of {', '.join(STEERING_MODES)}, got {settings.steering!r}"
        )
    return settings


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
