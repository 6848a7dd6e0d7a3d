"""A grouped LoRA op behind vLLM's punica interface: tokens grouped by adapter slot, each slot at its real rank.

vLLM's CPU wrapper (``PunicaWrapperCPU`` over ``vllm/lora/ops/torch_ops``) handles every token on its own: it
gathers that token's adapter weights, zero-padded to ``--max-lora-rank``, and runs a batched matrix-vector
product, once per slice (q, k, v ...) for the shrink and again for the expand. ``PunicaWrapperGrouped`` computes
``y += ((x A^T) * c) B^T`` with far fewer, larger operations:

- **A plan, once per step** (``update_metadata`` -> ``StepPlan``): the step's tokens cut into runs of one slot
  (vLLM lays a request's tokens out contiguously; tokens without an adapter are in no run and get exactly
  nothing), each slot's tunevec composition looked up, and the choice of how each slot is served this step.
- **Packs, once per slot activation** (lazily): for one module and one slot, the slices' A stacked ``[R, in]``
  and their B block-diagonal ``[out, R]``, R the sum of the slices' real ranks. A tunevec mixture's slot holds the
  vectors' factors unscaled (``compose.py``); its pack carries their float32 coefficients, applied between shrink
  and expand exactly as the shared stacks apply them, so a mixture alone and in a shared step round the same
  products the same way, in any dtype (alpha itself is never rounded). A module whose weights in that slot are all
  zero packs to nothing and costs nothing.
- **Compute**, per module: one run: two GEMMs (for a few tokens, vLLM's oneDNN kernels on prepacked factors:
  half the time of torch's small bfloat16 GEMMs on CPU) and the coefficients' scale; several short runs (decode
  steps that interleave adapters): the active slots' packs side by side, ``y += ((x A_all^T) * M) B_all^T`` with
  ``M`` each token's coefficients on its own slot's columns (three ops whatever the slot count); several long
  runs: run by run.
- **Shared stacks**: when two or more slots of a step hold tunevec mixtures, they are served from one stack of the
  vectors they use (``MixtureState.stack``) and a per-token row of a float32 coefficient table, ``y += ((x A^T) *
  C) B^T``, instead of from each slot's own copy of the same factors: four ops and one copy of the factors however
  many mixtures share the step. Stack and slots hold the same factors, so the two ways agree to the rounding of
  the activation dtype (tests/test_differential.py).

Packs are keyed by the LoRA layer's stacked weight tuple and dropped when the slot's adapter changes
(``update_metadata`` sees ``lora_index_to_id`` change, and ``invalidate_slot`` is called on every activation, which
also covers an adapter reloaded in place under the same id).

The output head (``add_lora_logits``) runs on logits rows, whose slots ``logits.route_logits_rows`` decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from tunevec.steering.vllm.logits import UnroutableLogits, route_logits_rows
from tunevec.steering.vllm.state import MixtureState, Pack

# Steps with at most this many tokens and more than one run use the masked all-slots product (three ops per module
# whatever the slot count); larger steps go run by run. Decode steps are one token per request, prefill chunks are
# long runs; the line sits where the extra n x sum(R) multiply-adds stay small against the per-op cost.
STACKED_MAX_TOKENS = 64
# Runs of at most this many tokens go through vLLM's oneDNN GEMMs on prepacked factors (where vLLM's CPU build
# has them): at decode sizes torch's own bfloat16 matmuls cost twice as much on CPU (bench/bench_lora_op.py).
SMALL_RUN_TOKENS = 64


@dataclass(frozen=True)
class _Run:
    start: int
    stop: int
    slot: int


class StepPlan:
    """How one step's rows map to adapter slots and how each slot is served; built once per step."""

    def __init__(
        self, runs: list[_Run], num_rows: int, slot_ids: list[int | None], state: MixtureState | None
    ):
        self.runs = runs
        self.num_rows = num_rows
        self.slots = tuple(sorted({r.slot for r in runs}))
        self.ids = {s: slot_ids[s] if s < len(slot_ids) else None for s in self.slots}
        shared: tuple[int, ...] = ()
        vectors: set[str] = set()
        if state is not None and state.shared_stacks and len(self.slots) > 1:
            comps = {s: state.composition(self.ids[s]) for s in self.slots}
            factored = tuple(s for s in self.slots if comps[s] is not None and comps[s].factored)
            if len(factored) > 1:
                shared = factored
                for s in shared:
                    vectors.update(comps[s].vectors)
        self.shared = shared
        self.shared_ids = tuple(self.ids[s] for s in shared)
        self.vectors = tuple(sorted(vectors))
        self.rest = [r for r in runs if r.slot not in shared] if shared else runs
        self.rest_slots = tuple(s for s in self.slots if s not in shared)
        self.stacked = len(self.rest) > 1 and num_rows <= STACKED_MAX_TOKENS
        self._row_index: torch.Tensor | None = None
        self.per_module: dict[Any, Any] = {}  # this step's per-module tensors (coefficient rows, masks)

    def row_index(self, device: torch.device) -> torch.Tensor:
        """Per row, 1 + the position of its slot in ``shared``, or 0 (no adapter, or not a shared slot)."""
        if self._row_index is None:
            idx = torch.zeros(self.num_rows, dtype=torch.long, device=device)
            position = {s: i + 1 for i, s in enumerate(self.shared)}
            for run in self.runs:
                if run.slot in position:
                    idx[run.start : run.stop] = position[run.slot]
            self._row_index = idx
        return self._row_index


def plan_runs(token_ids: tuple[int, ...] | list[int], lora_index_to_id: list[int | None]) -> list[_Run]:
    """Runs of consecutive tokens whose adapter id maps to the same slot; id 0 ("no adapter") is in no run."""
    if not token_ids:
        return []
    slot_of = {lora_id: slot for slot, lora_id in enumerate(lora_index_to_id) if lora_id is not None}
    ids = np.asarray(token_ids, dtype=np.int64)
    cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    starts = np.concatenate(([0], cuts))
    stops = np.concatenate((cuts, [len(ids)]))
    runs = []
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        lora_id = int(ids[start])
        if lora_id > 0:
            runs.append(_Run(start, stop, slot_of[lora_id]))
    return runs


def plan_slot_runs(slots: list[int]) -> list[_Run]:
    """Runs of consecutive rows with the same slot; slot -1 ("no adapter") is in no run."""
    runs = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            if slots[start] >= 0:
                runs.append(_Run(start, i, slots[start]))
            start = i
    return runs


def _real_rank_a(a: torch.Tensor) -> int:
    """Rows of ``a`` ([r_max, in]) up to the last one with a non-zero entry."""
    nz = torch.nonzero(a.abs().sum(dim=1)).flatten()
    return int(nz[-1]) + 1 if nz.numel() else 0


def _real_rank_b(b: torch.Tensor) -> int:
    """Columns of ``b`` ([out, r_max]) up to the last one with a non-zero entry."""
    nz = torch.nonzero(b.abs().sum(dim=0)).flatten()
    return int(nz[-1]) + 1 if nz.numel() else 0


def pack_linear(
    lora_a: tuple[torch.Tensor, ...],
    lora_b: tuple[torch.Tensor, ...],
    slot: int,
    dtype: torch.dtype,
    ranks: tuple[int, ...] | None = None,
) -> Pack | None:
    """The slot's slices as one A ``[R, in]`` and one block-diagonal B ``[out, R]``; None if all are zero.

    ``lora_a[i]`` is ``[max_loras, 1, r_max, in]``, ``lora_b[i]`` is ``[max_loras, 1, out_i, r_max]`` (vLLM's
    stacked layout). Each slice's rank is ``ranks[i]`` when the adapter's composition says it (tunevec's mixtures),
    otherwise where both its A rows and its B columns are still non-zero. The pack is in ``dtype``, the
    activations' (vLLM keeps LoRA weights in ``--lora-dtype``).
    """
    parts = []
    for i, (a_stk, b_stk) in enumerate(zip(lora_a, lora_b, strict=True)):
        a, b = a_stk[slot, 0], b_stk[slot, 0]
        r = ranks[i] if ranks is not None else min(_real_rank_a(a), _real_rank_b(b))
        parts.append((a[:r], b[:, :r]))
    total = sum(a.shape[0] for a, _ in parts)
    if total == 0:
        return None
    a_cat = torch.cat([a for a, _ in parts], dim=0).to(dtype).contiguous()
    out = sum(b.shape[0] for _, b in parts)
    b_bd = torch.zeros(out, total, dtype=dtype, device=lora_b[0].device)
    row = col = 0
    for a, b in parts:
        b_bd[row : row + b.shape[0], col : col + a.shape[0]] = b
        row += b.shape[0]
        col += a.shape[0]
    return Pack(a_cat, b_bd)


def pack_embedding(
    lora_b: torch.Tensor, slot: int, dtype: torch.dtype, rank: int | None = None
) -> Pack | None:
    """An embedding slot's B ``[dim, R]`` at its real rank (the A side is a row lookup done by the layer)."""
    b = lora_b[slot, 0]
    r = _real_rank_b(b) if rank is None else rank
    return None if r == 0 else Pack(None, b[:, :r].to(dtype).contiguous())


def _shrink_linear(pack: Pack, x: torch.Tensor) -> torch.Tensor:
    return x @ pack.a.T


def _shrink_logits(pack: Pack, x: torch.Tensor) -> torch.Tensor:
    return x.to(pack.a.dtype) @ pack.a.T


def _lora(
    y: torch.Tensor, x: torch.Tensor, pack: Pack, scale: float, shrink, mid: torch.Tensor | None = None
) -> None:  # noqa: ANN001
    """``y += ((x A^T) * mid) B^T``: for a few rows of a linear layer through vLLM's oneDNN GEMMs on the pack's
    prepacked factors (where the build has them), otherwise torch's."""
    if (
        shrink is _shrink_linear
        and x.shape[0] <= SMALL_RUN_TOKENS
        and x.is_contiguous()
        and y.is_contiguous()
    ):
        kernels = pack.kernels.get("onednn")
        if kernels is None:
            kernels = pack.kernels["onednn"] = _onednn_kernels(pack)
        if kernels:
            from vllm import _custom_ops as ops

            h = ops.onednn_mm(kernels[0], x, None)
            if mid is not None:
                h.mul_(mid)
            y.add_(ops.onednn_mm(kernels[1], h, None), alpha=scale)
            return
    h = shrink(pack, x)
    if mid is not None:
        h.mul_(mid)
    y.addmm_(h, pack.b.T, alpha=scale)


def _onednn_kernels(pack: Pack) -> tuple[Any, Any] | tuple[()]:
    try:
        from vllm import _custom_ops as ops

        if not getattr(ops, "_supports_onednn", False) or pack.b.device.type != "cpu":
            return ()
        return ops.create_onednn_mm(pack.a.t(), 32), ops.create_onednn_mm(pack.b.t(), 32)
    except Exception:  # a build without these kernels: torch's GEMMs serve
        return ()


class PunicaWrapperGrouped(PunicaWrapperCPU):
    """Grouped, rank-exact LoRA for vLLM (see the module docstring). Sharded (fully-sharded LoRA) paths are not
    served: ``tunevec serve`` refuses ``--fully-sharded-loras``."""

    def __init__(
        self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs: Any
    ):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._slot_ids: list[int | None] = []
        # id(layer's stacked weight tuple) -> (that tuple, {slot: pack or None}); the tuple is kept so its id
        # cannot be reused while the entry lives.
        self._packs: dict[int, tuple[Any, dict[int, Pack | None]]] = {}
        self._combined: dict[tuple[int, tuple[int, ...]], Pack | None] = {}
        self._state: MixtureState | None = None
        self._names: dict[int, str] = {}  # id(a layer's stacked weights) -> its module name
        self._layers: dict[int, Any] = {}  # id(a layer's stacked A) -> the layer
        self._plan = StepPlan([], 0, [], None)

    def bind(self, state: MixtureState | None, modules: dict[str, Any]) -> None:
        """Name the LoRA layers (``{module name: layer}``) and give the worker's tunevec state."""
        self._names, self._layers = {}, {}
        for name, layer in modules.items():
            for attr in ("lora_a_stacked", "lora_b_stacked"):
                if hasattr(layer, attr):
                    self._names[id(getattr(layer, attr))] = name
            if hasattr(layer, "lora_a_stacked"):
                self._layers[id(layer.lora_a_stacked)] = layer
        self._state = state
        self._combined.clear()

    # --- metadata ---------------------------------------------------------------------------------------------

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs) -> None:  # noqa: ANN001
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        ids = list(lora_index_to_id)
        for slot in range(max(len(ids), len(self._slot_ids))):
            old = self._slot_ids[slot] if slot < len(self._slot_ids) else None
            new = ids[slot] if slot < len(ids) else None
            if old != new:
                self.invalidate_slot(slot)
        self._slot_ids = ids
        plan = self._plan = StepPlan(
            plan_runs(mapping.index_mapping, ids), len(mapping.index_mapping), ids, self._state
        )
        if self._state is not None and plan.runs:
            stats = self._state.stats
            stats["steps with adapters"] += 1
            stats["steps with several slots"] += len(plan.slots) > 1
            stats["steps with shared stacks"] += bool(plan.shared)
            stats["steps with a slot of base tokens"] += plan.num_rows > sum(
                r.stop - r.start for r in plan.runs
            )

    def invalidate_slot(self, slot: int) -> None:
        """Forget every pack of ``slot``: its adapter changed (or was reloaded in place)."""
        for _, by_slot in self._packs.values():
            by_slot.pop(slot, None)
        self._combined.clear()

    # --- packs ------------------------------------------------------------------------------------------------

    def _pack(self, key_obj: Any, slot: int, build) -> Pack | None:  # noqa: ANN001
        entry = self._packs.get(id(key_obj))
        if entry is None:
            entry = self._packs[id(key_obj)] = (key_obj, {})
        by_slot = entry[1]
        if slot not in by_slot:
            by_slot[slot] = build(slot)
        return by_slot[slot]

    def _layout(self, key_obj: Any, slot: int, slices: int):  # noqa: ANN202
        """The tunevec composition's layout of ``slot`` in this module, or None (not a tunevec mixture)."""
        module = self._names.get(id(key_obj))
        lora_id = self._slot_ids[slot] if slot < len(self._slot_ids) else None
        if self._state is None or module is None or lora_id is None:
            return None
        return self._state.layout(lora_id, module, slices)

    def _with_layout(self, pack: Pack | None, layout) -> Pack | None:  # noqa: ANN001
        """A tunevec mixture's pack, with its columns' float32 coefficients."""
        if pack is None or layout is None:
            return pack
        return Pack(pack.a, pack.b, layout.coef.to(pack.b.device))

    # --- ops --------------------------------------------------------------------------------------------------

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        plan = self._plan
        if not plan.runs:
            return

        def build(slot: int) -> Pack | None:
            layout = self._layout(lora_a_stacked, slot, len(lora_a_stacked))
            ranks = None if layout is None else layout.ranks
            return self._with_layout(
                pack_linear(lora_a_stacked, lora_b_stacked, slot, x.dtype, ranks), layout
            )

        y2 = y.view(-1, y.shape[-1])
        self._apply(y2, x.view(-1, x.shape[-1]), lora_a_stacked, build, plan, scale, _shrink_linear)
        if self._state is not None:
            self._add_biases(y2, lora_a_stacked, lora_b_stacked, plan)

    def _add_biases(self, y: torch.Tensor, lora_a_stacked: Any, lora_b_stacked: Any, plan: StepPlan) -> None:
        """Each run's bias delta (``sum_i alpha_i beta_i`` of its mixture) added to its rows of the output."""
        module = self._names.get(id(lora_a_stacked))
        if module is None:
            return

        def build(slot: int) -> torch.Tensor | None:
            lora_id = self._slot_ids[slot] if slot < len(self._slot_ids) else None
            parts = [] if lora_id is None else self._state.bias_deltas(lora_id, module)
            if not parts:
                return None
            bias = torch.zeros(y.shape[-1], dtype=torch.float32, device=y.device)
            for target, delta in parts:
                bias[target.row : target.row + target.rows] += delta.to(y.device)
            return bias.to(y.dtype)

        for run in plan.runs:
            bias = self._pack(lora_b_stacked, run.slot, build)
            if bias is not None:
                y[run.start : run.stop] += bias

    def add_lora_embedding(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        # ``x`` holds each token's row of its slot's A (looked up by the layer): only the expand is left, and each
        # row is in its own slot's column layout, so every slot is served from its own pack, run by run.
        plan = self._plan
        if not add_inputs:
            y.zero_()
        if not plan.runs:
            return

        def build(slot: int) -> Pack | None:
            layout = self._layout(lora_b_stacked, slot, 1)
            rank = None if layout is None else layout.ranks[0]
            return self._with_layout(pack_embedding(lora_b_stacked, slot, y.dtype, rank), layout)

        def shrink(pack: Pack, xs: torch.Tensor) -> torch.Tensor:
            return xs[:, : pack.rank].to(
                y.dtype, copy=True
            )  # scaled in place next: never the layer's own rows

        self._apply(y, x, lora_b_stacked, build, plan, 1.0, shrink, shared=False, stacked=False)

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """The output head's LoRA on logits rows (one per sampled token, or one per prompt token of the request
        whose prompt logprobs vLLM is computing: ``logits.route_logits_rows`` tells which)."""
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])

        def build(slot: int) -> Pack | None:
            layout = self._layout(lora_a_stacked, slot, 1)
            ranks = None if layout is None else layout.ranks
            return self._with_layout(
                pack_linear((lora_a_stacked,), (lora_b_stacked,), slot, y.dtype, ranks), layout
            )

        slots = route_logits_rows(self._state, self.sampler_indices, x2.size(0))
        if slots is None:
            # Unreachable through `tunevec serve`, which refuses head-delta mixtures where rows are not routed; a
            # step whose adapters have no head delta adds nothing, exactly, whatever the rows are.
            if any(self._pack(lora_a_stacked, s, build) is not None for s in self._plan.slots):
                raise UnroutableLogits(
                    f"tunevec: {x2.size(0)} logits rows cannot be attributed to requests while an adapter with an "
                    "output-head delta is active (docs/cpu-lora-logprobs.md)"
                )
            return
        plan = StepPlan(plan_slot_runs(slots), len(slots), self._slot_ids, self._state)
        if not plan.runs:
            return
        if self._state is not None and self._state.logits_rows is not None:
            self._state.stats["prompt-logprob logits calls routed"] += 1
        vocab = lora_b_stacked.shape[2]
        self._apply(y2[:, :vocab], x2, lora_a_stacked, build, plan, scale, _shrink_logits)

    def _apply(
        self, y, x, key_obj, build, plan: StepPlan, scale: float, shrink, shared=True, stacked=True
    ) -> None:  # noqa: ANN001
        runs, slots = plan.runs, plan.slots
        if shared and plan.shared:
            self._apply_shared(y, x, key_obj, plan, scale, shrink)
            runs, slots = plan.rest, plan.rest_slots
            if not runs:
                return
        packs = {s: self._pack(key_obj, s, build) for s in slots}
        if stacked and plan.stacked and len(runs) > 1:
            self._apply_stacked(y, x, key_obj, plan, packs, slots, runs, scale, shrink)
            return
        for run in runs:
            pack = packs[run.slot]
            if pack is None:
                continue
            _lora(y[run.start : run.stop], x[run.start : run.stop], pack, scale, shrink, pack.coef)

    def _apply_stacked(self, y, x, key_obj, plan, packs, slots, runs, scale, shrink) -> None:  # noqa: ANN001
        """Several short runs: the slots' packs side by side, each token's coefficients on its slot's columns."""
        key = (id(key_obj), slots)
        if key not in self._combined:
            live = [packs[s] for s in slots if packs[s] is not None]
            if not live:
                combined = None
            else:
                a = None if live[0].a is None else torch.cat([p.a for p in live], dim=0)
                combined = Pack(a, torch.cat([p.b for p in live], dim=1))
            self._combined[key] = combined
        combined = self._combined[key]
        if combined is None:
            return
        mask = plan.per_module.get(("mask", id(key_obj)))
        if mask is None:
            columns, col = {}, 0
            for s in slots:
                if packs[s] is not None:
                    columns[s] = (col, packs[s])
                    col += packs[s].rank
            mask = torch.zeros(plan.num_rows, col, dtype=torch.float32, device=y.device)
            for run in runs:
                if run.slot in columns:
                    c0, pack = columns[run.slot]
                    mask[run.start : run.stop, c0 : c0 + pack.rank] = 1.0 if pack.coef is None else pack.coef
            plan.per_module[("mask", id(key_obj))] = mask
        n = plan.num_rows
        _lora(y[:n], x[:n], combined, scale, shrink, mask)

    def _apply_shared(self, y, x, key_obj, plan: StepPlan, scale: float, shrink) -> None:  # noqa: ANN001
        """The step's tunevec mixtures from one stack of the vectors they use (see the module docstring)."""
        state, module = self._state, self._names.get(id(key_obj))
        if state is None or module is None:
            raise RuntimeError("tunevec: a shared-stack step reached a LoRA layer the state was not bound to")
        stack = state.stack(module, plan.vectors, y.shape[1], y.dtype)
        if stack is None:
            return  # no vector of the step touches this module: the shared slots add nothing here, exactly
        coef = plan.per_module.get(("shared", id(key_obj)))
        if coef is None:
            table = state.table(module, plan.vectors, plan.shared_ids, y.dtype).to(y.device)
            coef = plan.per_module[("shared", id(key_obj))] = table.index_select(0, plan.row_index(y.device))
        n = plan.num_rows
        _lora(y[:n], x[:n], stack, scale, shrink, coef)
