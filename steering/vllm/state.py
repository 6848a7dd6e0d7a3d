"""Everything tunevec keeps inside one vLLM worker process, in one object: ``MixtureState``.

It is created with the worker's LoRA manager (``lora_manager.py``), handed to the grouped op (``punica.py``) and
to the prompt-logprob row routing (``logits.py``), and reached by the worker extension's RPCs. Nothing of it lives
in module globals or in attributes set on vLLM's objects, and every cache in it is bounded:

- the **resident factors** of the vectors the server announced (one snapshot: name -> factor folder and content
  digest, fixed for the life of the server), read on first use, checked against their digest, and kept in the
  LoRA dtype;
- the **composition** of each adapter vLLM holds (``compose.py``), dropped when vLLM drops the adapter;
- per (adapter, module), the **slot layout**: each output slice's rank and the columns' coefficients;
- per (vector set, module), the **shared stack** of those vectors' factors, and per step signature the
  **coefficient tables** over it, used when several mixtures share a step;
- the **logits rows** of the prompt-logprob call in progress (which adapter slot each row belongs to).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunevec.steering.lora import LoraAdapter
from tunevec.steering.vllm.compose import Composition

# The path of the server's vector snapshot, set by `tunevec serve` before vLLM spawns its processes: every process
# (the API server and each worker) reads the same file, so the front end and the workers never disagree on a digest.
SNAPSHOT_ENV = "TUNEVEC_VECTOR_SNAPSHOT"
# A mixture's LoRARequest path: this prefix and the canonical spec, composed in memory by the workers.
MIXTURE_PREFIX = "tunevec-mixture:"
STACKED_SETS = 8  # vector sets whose shared stacks are kept (each holds a copy of those vectors' factors)
TABLES_KEPT = 256  # step signatures whose coefficient tables are kept


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor's delta lands in vLLM's LoRA modules."""

    module: str
    slice: int  # which of the module's output slices (q, k, v of qkv_proj; 0 for an unpacked module)
    row: int  # its first output row
    rows: int


@dataclass(frozen=True)
class DeltaTarget:
    """Where a tensor kept whole applies: a norm module (``kind`` "norm") or a LoRA-wrapped linear layer's output
    (``kind`` "bias", at ``target``'s slice)."""

    kind: str
    module: str
    param: str  # "weight" or "bias"
    target: Target | None = None  # biases: the slice they add to


@dataclass(frozen=True)
class Pack:
    """Factors ready for the op: A ``[R, in]`` (None for an embedding: the layer looks its rows up) and B
    ``[out, R]``, in the activation dtype; ``coef``: the columns' float32 coefficients, applied between shrink and
    expand; ``kernels``: prepared GEMMs over the factors, built by the op on first use."""

    a: torch.Tensor | None
    b: torch.Tensor
    coef: torch.Tensor | None = (
        None  # float32 per column (a tunevec mixture's alphas); None: weights carry them
    )
    kernels: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def rank(self) -> int:
        return self.b.shape[1]


@dataclass(frozen=True)
class SlotLayout:
    """A tunevec adapter's columns in one module: the real rank of each output slice, and their coefficients."""

    ranks: tuple[int, ...]
    coef: torch.Tensor  # float32, sum(ranks) columns in slice order


class _Bounded(OrderedDict):
    """An LRU dict of at most ``limit`` entries."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def get_or_make(self, key: Any, make: Callable[[], Any]) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.limit:
            self.popitem(last=False)
        return value


def write_snapshot(vectors: dict[str, dict[str, Any]], folder: str | Path) -> str:
    """Write the server's vector snapshot (``{name: {"path": factor folder, "digest": content digest, ...}}``) to a
    file named by its own hash, and return the path that ``SNAPSHOT_ENV`` carries to every process.

    A file rather than the variable itself: a snapshot of large models is more than an environment variable holds.
    """
    text = json.dumps(vectors, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = Path(folder) / f"snapshot-{digest}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return str(path)


def read_snapshot(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The snapshot ``SNAPSHOT_ENV`` names, checked against the hash in its name."""
    where = environ.get(SNAPSHOT_ENV)
    if not where:
        return {}  # an engine started without `tunevec serve`: no vector to compose, any LoRA adapter still served
    text = Path(where).read_text()
    if f"snapshot-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json" != Path(where).name:
        raise RuntimeError(
            f"the vector snapshot {where} was changed after the server wrote it; restart the server"
        )
    return json.loads(text)


class MixtureState:
    """One worker's tunevec state (see the module docstring)."""

    def __init__(
        self,
        vectors: dict[str, dict[str, Any]],
        lora_dtype: torch.dtype,
        resident: dict[str, LoraAdapter] | None = None,
    ):
        self.vectors = vectors  # the snapshot: name -> {"path", "digest", ...}
        self.lora_dtype = lora_dtype
        self._lock = threading.Lock()
        # name -> factors in the LoRA dtype; ``resident`` gives some up front (benchmarks and tests of the op).
        self._resident: dict[str, LoraAdapter] = {
            n: LoraAdapter(
                {t: (b.to(lora_dtype), a.to(lora_dtype)) for t, (b, a) in f.factors.items()}, f.meta, f.deltas
            )
            for n, f in (resident or {}).items()
        }
        self._compositions: dict[int, Composition] = {}
        self._layouts: dict[int, dict[str, SlotLayout | None]] = {}
        self._stacks = _Bounded(STACKED_SETS)
        self._tables = _Bounded(TABLES_KEPT)
        self._targets: Callable[[str], Target | None] | None = None
        self._delta_targets: Callable[[str], DeltaTarget | None] | None = None
        self._summed: dict[int, dict[str, torch.Tensor]] = {}  # lora id -> tensor -> sum_i alpha_i delta_i
        self._norms: dict[int, dict[str, tuple | None]] = {}  # lora id -> norm module -> (dw, db) or None
        self._plan_source: Callable[[], Any] | None = None
        self.shared_stacks = False  # set by bind_modules: off under tensor parallelism (stacks are unsharded)
        # Which adapter slot each logits row belongs to, while vLLM computes one request's prompt logprobs
        # (logits.py); None outside such a call, when the rows are the step's sampled rows.
        self.logits_rows: torch.Tensor | str | None = None
        # The step's per-token adapter slots (the grouped op's), for the prompt-logprob routing; set by the manager.
        self.token_slots: Callable[[], torch.Tensor] | None = None
        # How the op served the steps so far (``tunevec_stats``): lets a test prove which path its traffic took.
        self.stats: Counter[str] = Counter()

    # --- the engine's modules ---------------------------------------------------------------------------------

    def bind_modules(
        self,
        targets: Callable[[str], Target | None],
        shared_stacks: bool,
        delta_targets: Callable[[str], DeltaTarget | None] | None = None,
        plan: Callable[[], Any] | None = None,
    ) -> None:
        """How checkpoint tensors map to vLLM's LoRA modules (and, for tensors kept whole, to norm modules and
        biased layers), whether shared stacks may serve them, and where the current step's plan is found."""
        self._targets = targets
        self._delta_targets = delta_targets
        self.shared_stacks = shared_stacks
        self._plan_source = plan

    def plan(self) -> Any:
        """The grouped op's plan of the step being computed (None before the first step)."""
        return None if self._plan_source is None else self._plan_source()

    def delta_target(self, tensor: str) -> DeltaTarget | None:
        return None if self._delta_targets is None else self._delta_targets(tensor)

    def target(self, tensor: str) -> Target | None:
        if self._targets is None:
            raise RuntimeError("MixtureState.bind_modules was not called: the LoRA manager did not bind it")
        return self._targets(tensor)

    # --- resident factors -------------------------------------------------------------------------------------

    def adapters(self, names: tuple[str, ...]) -> dict[str, LoraAdapter]:
        """The named vectors' factors in the LoRA dtype, read once (a conversion per mixture would cost more than
        composing it on CPUs without native bfloat16) and checked against the snapshot's digest."""
        out = {}
        with self._lock:
            for name in names:
                adapter = self._resident.get(name)
                if adapter is None:
                    entry = self.vectors.get(name)
                    if entry is None:
                        raise ValueError(f"mixture names vector {name!r}, which this server does not serve")
                    if entry.get("kind") == "activation":
                        adapter = self._resident[name] = _activation(entry)
                        out[name] = adapter
                        continue
                    loaded = LoraAdapter.load(entry["path"])
                    if loaded.meta.get("content_digest") != entry["digest"]:
                        raise ValueError(
                            f"factor folder {entry['path']} holds vector content "
                            f"{loaded.meta.get('content_digest')}, the server announced {entry['digest']}; "
                            "restart the server to refactorise"
                        )
                    factors = {
                        t: (b.to(self.lora_dtype), a.to(self.lora_dtype))
                        for t, (b, a) in loaded.factors.items()
                    }
                    adapter = self._resident[name] = LoraAdapter(factors, loaded.meta, loaded.deltas)
                out[name] = adapter
        return out

    # --- compositions -----------------------------------------------------------------------------------------

    def record(self, lora_id: int, composition: Composition, keep: set[int]) -> None:
        """Remember what adapter ``lora_id`` holds; forget every composition whose adapter is not in ``keep``."""
        with self._lock:
            for old in [i for i in self._compositions if i not in keep and i != lora_id]:
                del self._compositions[old]
                self._layouts.pop(old, None)
            for old in [i for i in self._summed if i not in keep and i != lora_id]:
                del self._summed[old]
            for old in [i for i in self._norms if i not in keep and i != lora_id]:
                del self._norms[old]
            self._compositions[lora_id] = composition
            self._layouts.pop(lora_id, None)
            self._summed.pop(lora_id, None)
            self._norms.pop(lora_id, None)
            self._tables.clear()

    def composition(self, lora_id: int | None) -> Composition | None:
        return None if lora_id is None else self._compositions.get(lora_id)

    def held(self) -> int:
        return len(self._compositions)

    def layout(self, lora_id: int, module: str, slices: int) -> SlotLayout | None:
        """Adapter ``lora_id``'s columns in ``module`` (``slices`` output slices); None if it is not tunevec's."""
        composition = self._compositions.get(lora_id)
        if composition is None:
            return None
        per_module = self._layouts.setdefault(lora_id, {})
        if module not in per_module:
            ranks = [0] * slices
            coefs: list[torch.Tensor | None] = [None] * slices
            for tensor in composition.blocks:
                t = self.target(tensor)
                if t is not None and t.module == module:
                    ranks[t.slice] = composition.rank(tensor)
                    coefs[t.slice] = composition.coefficients(tensor)
            parts = [c for c in coefs if c is not None]
            coef = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32)
            per_module[module] = SlotLayout(tuple(ranks), coef)
        return per_module[module]

    # --- tensors kept whole: norm weights and biases, linear biases --------------------------------------------

    def summed_delta(self, lora_id: int, tensor: str) -> torch.Tensor | None:
        """``sum_i alpha_i delta_i`` of adapter ``lora_id`` for a tensor kept whole, in float32; None if it has none."""
        composition = self._compositions.get(lora_id)
        if composition is None or tensor not in composition.deltas:
            return None
        per_tensor = self._summed.setdefault(lora_id, {})
        if tensor not in per_tensor:
            parts = composition.deltas[tensor]
            adapters = self.adapters(tuple(v for v, _ in parts))
            total = torch.zeros_like(adapters[parts[0][0]].deltas[tensor], dtype=torch.float64)
            for vector, alpha in parts:
                total += alpha * adapters[vector].deltas[tensor].double()
            per_tensor[tensor] = total.float()
        return per_tensor[tensor]

    def norm_deltas(self, plan: Any, module: str) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per slot of the step whose adapter moves norm ``module``: (weight delta, bias delta or None)."""
        out = {}
        for slot, lora_id in plan.ids.items():
            if lora_id is None or lora_id not in self._compositions:
                continue
            per_id = self._norms.setdefault(lora_id, {})
            if module not in per_id:
                per_id[module] = self._norm_delta(lora_id, module)
            if per_id[module] is not None:
                out[slot] = per_id[module]
        return out

    def _norm_delta(self, lora_id: int, module: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        weight = bias = None
        for tensor in self._compositions[lora_id].deltas:
            t = self.delta_target(tensor)
            if t is not None and t.kind == "norm" and t.module == module:
                if t.param == "weight":
                    weight = self.summed_delta(lora_id, tensor)
                else:
                    bias = self.summed_delta(lora_id, tensor)
        if weight is None and bias is None:
            return None
        return (torch.zeros_like(bias) if weight is None else weight), bias

    def steer_deltas(self, plan: Any, module: str) -> dict[int, torch.Tensor]:
        """Per slot of the step whose adapter names activation vectors for decoder layer ``module``: their
        ``sum_i alpha_i v_i`` (float32)."""
        out = {}
        for slot, lora_id in plan.ids.items():
            composition = self._compositions.get(lora_id) if lora_id is not None else None
            if composition is None:
                continue
            per_id = self._norms.setdefault(lora_id, {})
            key = ("steer", module)
            if key not in per_id:
                found = None
                for tensor in composition.deltas:
                    t = self.delta_target(tensor)
                    if t is not None and t.kind == "steer" and t.module == module:
                        found = self.summed_delta(lora_id, tensor)
                per_id[key] = found
            if per_id[key] is not None:
                out[slot] = per_id[key]
        return out

    def bias_deltas(self, lora_id: int, module: str) -> list[tuple[Target, torch.Tensor]]:
        """Adapter ``lora_id``'s bias deltas that add to ``module``'s output, with the slice each adds to."""
        composition = self._compositions.get(lora_id)
        if composition is None:
            return []
        out = []
        for tensor in composition.deltas:
            t = self.delta_target(tensor)
            if t is not None and t.kind == "bias" and t.module == module:
                out.append((t.target, self.summed_delta(lora_id, tensor)))
        return out

    # --- shared stacks ----------------------------------------------------------------------------------------

    def stack(self, module: str, vectors: tuple[str, ...], out_rows: int, dtype: torch.dtype) -> Pack | None:
        """Every factor of ``vectors`` that lands in ``module``: A stacked ``[R, in]``, B ``[out_rows, R]`` with
        each block at its output rows; None if none does. Column blocks follow ``stack_columns``."""
        per_module = self._stacks.get_or_make((vectors, dtype), dict)
        if module not in per_module:
            per_module[module] = self._build_stack(module, vectors, out_rows, dtype)
        return per_module[module][0]

    def stack_columns(
        self, module: str, vectors: tuple[str, ...], dtype: torch.dtype
    ) -> list[tuple[str, str, int]]:
        """(vector, tensor, rank) per column block of ``stack(module, vectors, ...)``."""
        return self._stacks[(vectors, dtype)][module][1]

    def _build_stack(self, module, vectors, out_rows, dtype):  # noqa: ANN001, ANN202
        adapters = self.adapters(vectors)
        blocks, columns = [], []
        for name in vectors:
            for tensor, (b, a) in adapters[name].factors.items():
                t = self.target(tensor)
                if t is not None and t.module == module:
                    blocks.append((t, b, a))
                    columns.append((name, tensor, b.shape[1]))
        if not blocks:
            return None, []
        rank = sum(r for _, _, r in columns)
        b_all = torch.zeros(out_rows, rank, dtype=dtype)
        col = 0
        for t, b, _ in blocks:
            b_all[t.row : t.row + t.rows, col : col + b.shape[1]] = b
            col += b.shape[1]
        a_all = torch.cat([a for _, _, a in blocks], dim=0).to(dtype).contiguous()
        return Pack(a_all, b_all), columns

    def table(
        self, module: str, vectors: tuple[str, ...], lora_ids: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """``[1 + len(lora_ids), R]`` float32: row 0 zeros (tokens of no shared slot), then each adapter's
        coefficients over ``stack(module, vectors)``'s columns."""
        key = (vectors, lora_ids, dtype)
        per_module = self._tables.get_or_make(key, dict)
        table = per_module.get(module)
        if table is None:
            columns = self.stack_columns(module, vectors, dtype)
            rows = [[0.0] * sum(r for _, _, r in columns)]
            for lora_id in lora_ids:
                comp = self._compositions[lora_id]
                row: list[float] = []
                for vector, tensor, rank in columns:
                    row += [comp.coefficient(tensor, vector)] * rank
                rows.append(row)
            table = per_module[module] = torch.tensor(rows, dtype=torch.float32)
        return table


def _activation(entry: dict[str, Any]) -> LoraAdapter:
    """An activation vector's directions as whole deltas named after their decoder layers (no factors)."""
    from tunevec.core.activation import ActivationVector, residual_name

    vec = ActivationVector(entry["path"])
    if vec.content_digest != entry["digest"]:
        raise ValueError(
            f"activation vector {entry['path']} holds content {vec.content_digest}, the server announced "
            f"{entry['digest']}; restart the server"
        )
    deltas = {residual_name(entry["prefix"], k): d for k, d in vec.directions().items()}
    return LoraAdapter({}, {"content_digest": vec.content_digest, "kind": "activation"}, deltas)
