"""Server settings: command line over an optional YAML file over defaults, validated before the engine starts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from tunevec.core.errors import TunevecError


@dataclass
class ServerConfig:
    base: str
    vectors: str
    served_model_name: str = "base"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    # Named variants: name -> spec text. Served as adapters, like any per-request mixture.
    variants: dict[str, str] = field(default_factory=dict)
    # A spec injected into the engine's weights at load time (full speed); the served model is then that variant.
    inject: str | None = None
    # Per-vector LoRA factorisation and the engine's LoRA limits.
    adapter_rank: int | None = 16
    adapter_energy: float | None = None
    max_lora_rank: int = 64
    max_loras: int = 4
    allow_truncation: bool = False
    # Request limits.
    max_components: int = 4
    max_abs_alpha: float = 4.0
    max_model_len: int | None = None
    # Mixture cache (names registered with the engine) and where adapters are written.
    cache_capacity: int = 32
    cache_dir: str = ""
    dtype: str = "auto"
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    kv_cache_gib: int = 1
    vllm_args: list[str] = field(default_factory=list)
    num_layers: int | None = None  # filled from the base config

    def __post_init__(self) -> None:
        if not Path(self.base, "config.json").exists():
            raise TunevecError(f"--base {self.base}: not a model folder (no config.json)")
        if not Path(self.vectors).is_dir():
            raise TunevecError(f"--vectors {self.vectors}: not a folder of tuning vectors")
        if (self.adapter_rank is None) == (self.adapter_energy is None):
            raise TunevecError("set exactly one of adapter_rank / adapter_energy")
        if self.adapter_energy is not None and not 0 < self.adapter_energy <= 1:
            raise TunevecError(f"adapter_energy must be in (0, 1], got {self.adapter_energy}")
        if self.max_abs_alpha <= 0 or self.max_components < 1:
            raise TunevecError("max_abs_alpha must be > 0 and max_components >= 1")
        self.api_key = self.api_key or os.environ.get("TUNEVEC_API_KEY") or None
        if not self.cache_dir:
            self.cache_dir = str(Path(self.vectors) / ".tunevec-cache")

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
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TunevecError(
                f"--config {yaml_path}: unknown keys {sorted(unknown)}; known: {sorted(known)}"
            )
        data.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("base", "vectors"):
            if not data.get(key):
                raise TunevecError(f"--{key} is required (on the command line or in --config)")
        return cls(**data)

    def adapter_key(self) -> str:
        """Distinguishes cached adapters built with different factorisation settings."""
        how = f"r{self.adapter_rank}" if self.adapter_rank is not None else f"e{self.adapter_energy}"
        return f"{how}-m{self.max_lora_rank}"

    def factorise_kwargs(self) -> dict:
        return {"rank": self.adapter_rank, "energy": self.adapter_energy, "max_rank": self.max_lora_rank}
