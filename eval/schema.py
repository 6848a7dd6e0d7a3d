"""The grid file's schema: what each key of a grid YAML may hold, declared once as pydantic models.

``GridFile`` is the whole file; its ``server:`` block is ``ServerSettings``, the engine and LoRA settings every
tunevec server shares (``server/config.py``: ``EngineSettings``, ``LoraSettings``) plus what only an evaluation
needs (how specs are served, how long a server may take to start). Types are strict (YAML's own: ``1`` is not
``true``, ``"5"`` is not a number); unknown keys are refused with the known ones listed. Only the file's shape is
checked here: spec syntax, sweep points, duplicates and everything on disk are ``eval/grid.py``'s.

``parse_grid`` turns pydantic's errors into one TunevecError that names the grid and each bad entry
(``grid g.yaml: variants[2]: give exactly one of spec ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tunevec.core.errors import TunevecError
from tunevec.server.config import EngineSettings, LoraSettings, redefault


def kind_of(value: Any) -> str:
    """What a YAML value is, in words: "a list", "a mapping", "int"."""
    return {list: "a list", dict: "a mapping", str: "a string"}.get(type(value), type(value).__name__)


def _error(message: str) -> PydanticCustomError:
    """A validation error worded for the grid file (no context: pydantic leaves the text as it is)."""
    return PydanticCustomError("tunevec", message)


class _Mapping(BaseModel):
    """A mapping of the grid file: strict YAML types, unknown keys refused with the known ones listed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise _error(f"must be a mapping, got {kind_of(data)}")
        unknown = [k for k in data if k not in cls.model_fields]
        if unknown:
            raise _error(
                f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(cls.model_fields)}"
            )
        return data


# ---------------------------------------------------------------------- values


def _path(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise _error(f"must be a path, got {value!r}")
    return value


def _limit(value: Any) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise _error(f"must be a positive number of docs (or a fraction < 1), got {value!r}")
    if isinstance(value, float) and value >= 1:
        if not value.is_integer():
            raise _error(f"{value!r} is neither a fraction below 1 nor a whole number of docs")
        return int(value)
    return value


def _chat(value: Any) -> bool | str:
    """No chat template / the template applied by lm-eval / by the server (the chat completions API)."""
    if value is not True and value is not False and value != "server":
        raise _error(f"must be false, true (lm-eval applies the template) or server, got {value!r}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _error(f"must be a non-empty string, got {value!r}")
    return value


def _entry_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or "," in value:
        raise _error(f"must be a non-empty string without commas, got {value!r}")
    return value


def _task_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or "," in value:
        raise _error(f"must be one lm-eval task name, got {value!r}")
    return value.strip()


def _vector_name(value: Any) -> str:
    from tunevec.steering.spec import VECTOR_NAME

    if not isinstance(value, str) or not VECTOR_NAME.fullmatch(value):
        raise _error(f"must name a vector, got {value!r}")
    return value


def _spec_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _error(f"must be a non-empty string, got {value!r}")
    return value


def _template(value: Any) -> str:
    if not isinstance(value, str) or value.count("{alpha}") != 1:
        raise _error("must contain {alpha} exactly once, e.g. 'medical@mlp:{alpha}'")
    return value


def _one_is_a_list(value: Any) -> Any:
    """A single name stands for a list of one (``tasks: toy_mcq``, ``include_path: my_tasks/``)."""
    return [value] if isinstance(value, str | Path) else value


def _absent_is_empty(value: Any) -> Any:
    return [] if value is None else value


def _required(value: Any) -> Any:
    if value is None:  # `tasks:` with nothing under it reads as null
        raise PydanticCustomError("missing", "Field required")
    return value


PathText = Annotated[str, BeforeValidator(_path)]  # relative to the grid file; resolved by eval/grid.py
Limit = Annotated[int | float | None, BeforeValidator(_limit)]  # docs per task; below 1: a share of the docs
Chat = Annotated[bool | str, BeforeValidator(_chat)]
EntryName = Annotated[str, BeforeValidator(_entry_name)]
TaskName = Annotated[str, BeforeValidator(_task_name)]
# Optional keys that, when written, must hold a value: an explicit null is refused, not taken as "absent".
GivenText = Annotated[str | None, BeforeValidator(_text)]
GivenPath = Annotated[str | None, BeforeValidator(_path)]
GivenVector = Annotated[str | None, BeforeValidator(_vector_name)]
GivenSpec = Annotated[str | None, BeforeValidator(_spec_text)]  # syntax checked by eval/grid.py
GivenTemplate = Annotated[str | None, BeforeValidator(_template)]


def _entries(kind: Any, *, required: bool = False) -> Any:
    """A list of ``kind`` in the file: a single name is a list of one; null is empty (or missing if required)."""
    first = _required if required else _absent_is_empty
    # Annotated validators run last-listed first: null and single names are settled before the list is checked.
    return Annotated[list[kind], BeforeValidator(_one_is_a_list), BeforeValidator(first)]


# ---------------------------------------------------------------------- entries


class TaskEntry(_Mapping):
    """``tasks:`` entry: an lm-eval task name, or a mapping whose keys override the grid's for this task."""

    name: TaskName
    limit: Limit = None
    num_fewshot: int | None = Field(None, ge=0)
    chat: Chat = False

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        if not isinstance(data, dict):
            raise _error(f"must be a task name or a mapping with `name`, got {kind_of(data)}")
        return data


class VariantEntry(_Mapping):
    """``variants:`` entry: a spec string (``base`` is the base), or a mapping with exactly one of spec, tuned
    (the checkpoint a vector was extracted from) or checkpoint (any model folder)."""

    name: EntryName | None = None
    spec: GivenSpec = None
    tuned: GivenVector = None
    checkpoint: GivenPath = None

    @model_validator(mode="before")
    @classmethod
    def _one_model(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"spec": data}
        if not isinstance(data, dict):
            raise _error(f"must be a spec string or a mapping, got {kind_of(data)}")
        given = [k for k in ("spec", "tuned", "checkpoint") if k in data]
        if len(given) != 1 and set(data) <= set(cls.model_fields):  # unknown keys are reported first
            raise _error(
                "give exactly one of spec (base + vectors), tuned (a vector's tuned checkpoint) or checkpoint "
                f"(a model folder); got {', '.join(given) or 'none'}. (tuned - tau is the base itself, so there "
                "is no tuned+spec form; see docs/eval.md)"
            )
        return data


class SweepEntry(_Mapping):
    """``sweeps:`` entry: alphas of ``VECTOR:{alpha}`` (``vector:``) or of a spec template (``spec:``)."""

    name: GivenText = None  # default: the vector, else the template
    vector: GivenVector = None
    spec: GivenTemplate = None
    alphas: list[float] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and ("vector" in data) == ("spec" in data)
            and set(data) <= set(cls.model_fields)
        ):
            raise _error("give exactly one of vector (-> VECTOR:{alpha}) or spec (a template with {alpha})")
        return data

    @field_validator("alphas")
    @classmethod
    def _distinct(cls, alphas: list[float]) -> list[float]:
        if len(set(alphas)) != len(alphas):
            raise _error(f"must not repeat a value: {alphas}")
        return alphas

    @property
    def template(self) -> str:
        return self.spec if self.spec is not None else f"{self.vector}:{{alpha}}"


# ---------------------------------------------------------------------- settings


class ServerSettings(_Mapping, EngineSettings, LoraSettings):
    """The ``server:`` block: how the servers started for the run are configured (ignored for variants on an
    external --server-url). Every engine and LoRA setting of ``tunevec serve``, with evaluation's defaults
    (float32, a 1024-token context, eager mode: a faster start on CPU), plus how long a server may take to start
    and ``steering``, how base + spec variants are served:

    - ``lora``: one steering server (``tunevec serve``) for the base and every spec, each spec a rank-
      ``adapter_rank`` LoRA mixture composed per request -- what tunevec serves in production;
    - ``inject``: one plain vLLM server per variant, its weights base + delta(spec) at full rank, injected by
      tunevec's model loader -- exact (``medical`` is the tuned checkpoint again), no LoRA kernels, but a server
      start per variant.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_assignment=False)

    steering: Literal["lora", "inject"] = Field(
        "lora", description="spec variants as LoRA mixtures on one server, or at full rank on a server each"
    )
    dtype: str = redefault(EngineSettings, "dtype", "float32")
    max_model_len: int = Field(
        1024, ge=16, description="context length of started servers (lm-eval's max_length)"
    )
    enforce_eager: bool = redefault(EngineSettings, "enforce_eager", True)  # a faster start on CPU
    startup_timeout: float = Field(
        900.0, gt=0, description="seconds a started server may take to answer /health"
    )

    def result_key(self) -> dict[str, Any]:
        """The settings that change scores (part of each cell's config hash)."""
        key = {"steering": self.steering, "dtype": self.dtype, "max_model_len": self.max_model_len,
               "extra_args": list(self.extra_args)}  # fmt: skip
        if self.steering == "lora":
            key |= {"adapter_rank": self.adapter_rank, "adapter_energy": self.adapter_energy,
                    "max_lora_rank": self.max_lora_rank}  # fmt: skip
        return key


class LmEvalSettings(_Mapping):
    """lm-eval's client side: concurrency and retries change speed, not scores (not in the config hash)."""

    num_concurrent: int = Field(8, ge=1)
    batch_size: int = Field(1, ge=1)
    max_retries: int = Field(3, ge=1)
    timeout: int = Field(300, ge=1)
    bootstrap_iters: int = Field(100000, ge=1)
    seed: int = Field(1234, ge=1)


def _settings(value: Any) -> Any:
    return {} if value is None else value  # `server:` with nothing under it: the defaults


Tasks = Annotated[_entries(TaskEntry, required=True), Field(min_length=1)]
Paths = _entries(PathText)
Variants = _entries(VariantEntry)
Sweeps = _entries(SweepEntry)


class GridFile(_Mapping):
    """A whole grid file (or the same keys from the command line), before it is expanded into variants."""

    name: GivenText = None  # default: the file's stem
    base: PathText | None = None
    vectors: PathText | None = None
    tasks: Tasks
    include_path: Paths = []
    limit: Limit = None  # per task unless the task sets its own
    num_fewshot: int | None = Field(None, ge=0)
    chat: Chat = False
    variants: Variants = []
    sweeps: Sweeps = []
    server: Annotated[ServerSettings, BeforeValidator(_settings)] = ServerSettings()
    lm_eval: Annotated[LmEvalSettings, BeforeValidator(_settings)] = LmEvalSettings()


# ---------------------------------------------------------------------- errors


def parse_grid(data: dict[str, Any], where: str) -> GridFile:
    """``GridFile`` from a grid's mapping; pydantic's errors become one TunevecError naming each entry."""
    try:
        return GridFile.model_validate(data)
    except ValidationError as exc:
        raise TunevecError(f"{where}: " + "; ".join(_describe(e) for e in exc.errors())) from None


_EMPTY = {"tasks": "name at least one lm-eval task", "alphas": "give at least one alpha"}


def _describe(error: Any) -> str:
    """One pydantic error in the grid file's words: ``server.max_model_len must be ..., got -1``,
    ``variants[2]: give exactly one of ...``, ``tasks is missing``."""
    loc = tuple(error["loc"])
    kind, message = error["type"], error["msg"].removeprefix("Value error, ")
    if kind == "missing":
        return _join(loc[:-1], f"`{loc[-1]}` is missing")
    if kind == "too_short" and error["input"] == [] and loc:
        return _join(loc[:-1], f"`{loc[-1]}` is empty; {_EMPTY.get(loc[-1], 'give at least one')}")
    if kind == "literal_error":
        expected = error["ctx"]["expected"].replace(" or ", ", ").split(", ")
        message = f"must be one of {', '.join(c.strip(chr(39)) for c in expected)}, got {error['input']!r}"
    elif message.startswith("Input should be "):
        message = f"must be {message.removeprefix('Input should be ')}, got {error['input']!r}"
    return _join(loc, message)


def _join(loc: tuple, message: str) -> str:
    """``where must ...`` for a value, ``where: ...`` for a sentence about a mapping."""
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    if not where:
        return message
    return f"{where} {message}" if message.startswith("must ") else f"{where}: {message}"
