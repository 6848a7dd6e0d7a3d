"""Per-request mixtures: a spec becomes a composed LoRA adapter, content-addressed, cached, registered with vLLM.

The adapter for a spec is named by its canonical text and numbered by its content digest, so two requests that
spell the same mixture differently share one adapter, and an id is never reused for other weights (vLLM's own
counter would hand out fresh ids per name; stale name->id pairs after an unload are the bug class of vLLM #47724).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tunevec.server.config import ServerConfig
from tunevec.steering.library import VectorLibrary
from tunevec.steering.lora import LoraAdapter, adapter_from_vector, compose
from tunevec.steering.spec import Spec
from vllm.lora.request import LoRARequest

from tunevec.core.errors import TunevecError
from tunevec.core.vector import TuningVector

logger = logging.getLogger("tunevec.mixtures")

# Mixture folders on disk outlive their names in the engine (a re-requested mixture reloads without recomposing),
# up to DISK_FACTOR x cache_capacity folders. Past that the least recently used go, but never one used in the last
# KEEP_RECENT_S seconds: vLLM reads an adapter's files when it schedules the request, after resolve() returned, and
# replicas may share one cache folder.
DISK_FACTOR = 4
KEEP_RECENT_S = 600.0


@dataclass
class Mixture:
    spec: Spec
    name: str  # the model name vLLM sees: the canonical spec text
    request: LoRARequest
    rank: int
    max_rel_error: float


class MixtureRegistry:
    def __init__(self, config: ServerConfig, library: VectorLibrary):
        self.config = config
        self.library = library
        self.cache_dir = Path(config.cache_dir)
        self.adapters = self._vector_adapters()
        self._lru: OrderedDict[str, Mixture] = OrderedDict()
        self._ids: dict[int, str] = {}
        self._build_lock = threading.Lock()
        self._name_locks: dict[str, asyncio.Lock] = {}

    def _vector_adapters(self) -> dict[str, LoraAdapter]:
        """One low-rank adapter per vector, factorised once and cached on disk next to the mixtures."""
        out = {}
        for name in self.library.names():
            vec = self.library[name]
            key = f"{name}-{_content_digest(vec)}-{self.config.adapter_key()}"
            path = self.cache_dir / "vectors" / key
            if not (path / "adapter_config.json").exists():
                logger.info("tunevec: factorising vector %s (%s)", name, self.config.adapter_key())
                adapter = adapter_from_vector(vec, **self.config.factorise_kwargs())
                adapter.save(path)
            out[name] = LoraAdapter.load(path)
        return out

    def parse(self, text_or_json: str | dict) -> Spec:
        """Parse and validate a request's spec; raises TunevecError naming the problem."""
        spec = Spec.parse(text_or_json) if isinstance(text_or_json, str) else Spec.from_json(text_or_json)
        spec.validate(
            self.library.names(),
            max_components=self.config.max_components,
            max_abs_alpha=self.config.max_abs_alpha,
            num_layers=self.config.num_layers,
        )
        return spec

    def describe(self, spec: Spec) -> dict:
        """What a spec would run as, without building it: rank per module, truncation, error bound."""
        ranks = self._stacked_ranks(spec)
        summed = max(ranks.values(), default=0)
        return {
            "canonical": spec.canonical(),
            "digest": spec.digest(),
            "vectors": spec.vectors,
            "method": spec.method,
            "rank": summed,
            "max_rank": self.config.max_lora_rank,
            "needs_truncation": summed > self.config.max_lora_rank,
            "truncation_allowed": self.config.allow_truncation,
            "vector_adapters": {
                v: {"dropped": self.adapters[v].meta.get("dropped"), "rank": self.adapters[v].max_module_rank}
                for v in spec.vectors
            },
        }

    def _stacked_ranks(self, spec: Spec) -> dict[str, int]:
        ranks: dict[str, int] = {}
        for comp in spec.components:
            for name, (b, _) in self.adapters[comp.vector].factors.items():
                if comp.applies_to(name) and comp.alpha != 0:
                    ranks[name] = ranks.get(name, 0) + b.shape[1]
        return ranks

    async def resolve(self, spec: Spec) -> Mixture:
        """The registered adapter for ``spec``, building it on first use (off the event loop)."""
        name = spec.canonical()
        if name in self._lru:
            self._lru.move_to_end(name)
            _touch(Path(self._lru[name].request.lora_path))
            return self._lru[name]
        lock = self._name_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self._lru:
                return self._lru[name]
            try:
                mixture = await asyncio.get_running_loop().run_in_executor(None, self._build, spec)
            finally:
                self._name_locks.pop(
                    name, None
                )  # waiters already hold it; one lock per spec ever seen would leak
            self._lru[name] = mixture
            self._evict()
            return mixture

    def _build(self, spec: Spec) -> Mixture:
        summed = max(self._stacked_ranks(spec).values(), default=0)
        if summed == 0:
            raise TunevecError(f"spec {spec.canonical()!r} selects no LoRA module (check its scopes)")
        if summed > self.config.max_lora_rank and not self.config.allow_truncation:
            raise TunevecError(
                f"mixture {spec.canonical()!r} has rank {summed}, above the server's max LoRA rank "
                f"{self.config.max_lora_rank}; use fewer components, or start the server with --allow-truncation"
            )
        digest = spec.digest()
        lora_id = spec.int_id()
        other = self._ids.get(lora_id)
        if other is not None and other != spec.canonical():
            raise TunevecError(
                f"adapter id collision between {other!r} and {spec.canonical()!r}; report this"
            )
        path = self.cache_dir / "mixtures" / f"{digest}-{self.config.adapter_key()}"
        with self._build_lock:
            if not (path / "adapter_config.json").exists():
                adapter = compose(spec, self.adapters, max_rank=self.config.max_lora_rank)
                adapter.save(path, base_model=self.config.served_model_name)
                self._prune_disk(keep=path)
            _touch(path)
        meta = LoraAdapter.load(path).meta
        self._ids[lora_id] = spec.canonical()
        request = LoRARequest(lora_name=spec.canonical(), lora_int_id=lora_id, lora_path=str(path))
        return Mixture(
            spec, spec.canonical(), request, min(summed, self.config.max_lora_rank), meta["max_rel_error"]
        )

    def _prune_disk(self, keep: Path) -> None:
        """Delete the least recently used mixture folders beyond DISK_FACTOR x cache_capacity (see above)."""
        folders = [
            p for p in (self.cache_dir / "mixtures").iterdir() if p.is_dir() and not p.name.startswith(".")
        ]
        excess = len(folders) - DISK_FACTOR * self.config.cache_capacity
        if excess <= 0:
            return
        in_use = {Path(m.request.lora_path) for m in self._lru.values()} | {keep}
        cutoff = time.time() - KEEP_RECENT_S
        for folder in sorted(folders, key=_mtime):
            if excess <= 0 or _mtime(folder) > cutoff:
                break
            if folder not in in_use:
                shutil.rmtree(folder, ignore_errors=True)
                excess -= 1
                logger.info("tunevec: removed unused mixture adapter %s from the disk cache", folder.name)

    def _evict(self) -> None:
        while len(self._lru) > self.config.cache_capacity:
            name, mixture = self._lru.popitem(last=False)
            self._on_evict(mixture)

    def _on_evict(self, mixture: Mixture) -> None:
        """Hook for the app to unregister the name; files stay, so an in-flight request can still load them."""

    def loaded(self) -> list[Mixture]:
        return list(self._lru.values())


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # a folder pruned by a replica is rebuilt on use
        os.utime(path)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _content_digest(vec: TuningVector) -> str:
    """The vector's content, from its per-tensor checksums: a re-extracted vector gets fresh adapters."""
    h = hashlib.sha256()
    for name in sorted(vec.manifest.tensors):
        h.update(vec.manifest.tensors[name].sha256.encode())
    return h.hexdigest()[:16]
