"""A grouped LoRA op behind vLLM's punica interface: tokens grouped by adapter slot, each slot at its real rank.

vLLM's CPU wrapper (``PunicaWrapperCPU`` over ``vllm/lora/ops/torch_ops``) handles every token on its own: it
gathers that token's adapter weights, zero-padded to ``--max-lora-rank``, and runs a batched matrix-vector
product, once per slice (q, k, v ...) for the shrink and again for the expand. Each token streams
``r_max x d`` weights per module, and every module of every slot is computed whether its weights are zero or not.

``PunicaWrapperGrouped`` computes the same ``y += (x Aᵀ) Bᵀ`` with far fewer, larger operations:

- **Grouping, once per step** (``update_metadata``): the step's tokens are cut into runs of consecutive tokens
  that use the same slot (vLLM lays a request's tokens out contiguously). Tokens without an adapter are in no
  run, so they get exactly nothing.
- **Packing, once per slot activation** (lazily, on first use): for one module and one slot, the slices' A are
  stacked into one ``[R, in]`` matrix and their B laid out block-diagonally in one ``[out, R]`` matrix, R being
  the sum of the slices' *real* ranks (trailing all-zero rows of A / columns of B are dropped, which is exact).
  A module whose weights in that slot are all zero packs to nothing and costs nothing.
- **Compute**, per module:
  - one run (the common case: a batch of one mixture, or one long prefill): ``y[s:e] += (x[s:e] Aᵀ) Bᵀ``, two
    GEMMs and one pass over the output rows (``addmm_``), whatever the slice count;
  - many short runs (decode steps that interleave several adapters): the active slots' packs are concatenated
    once per slot layout, and ``y += ((x A_allᵀ) ⊙ M) B_allᵀ`` with ``M`` the token-to-slot mask: three ops
    whatever the number of slots, at the price of ``n x ΣR`` extra multiply-adds, negligible for few tokens;
  - many long runs: per run, as for one.

**Factored adapters** (optional, ``FactoredAdapters``): when several slots hold adapters that are combinations of
the same shared factors (tunevec's mixtures: sum_i alpha_i B_i A_i of a few vectors), reading every slot's own
copy streams the shared factors once per slot. A provider that knows the structure gives, per module, one stack of
all shared factors (``A [R, in]``, ``B [out, R]``) and, per adapter, its coefficients over the stack's columns.
A step with two or more such slots then runs ``y += ((x Aᵀ) ⊙ C) Bᵀ``, ``C`` each token's coefficient row: four
ops and one copy of the factors, however many mixtures share the batch. A single slot keeps the two-op path
(its coefficients are folded into its own weights).

Packs are keyed by the LoRA layer's stacked weight tuple and dropped when the slot's adapter changes
(``update_metadata`` sees ``lora_index_to_id`` change, and ``invalidate_slot`` is called on every activation, which
also covers an adapter reloaded in place under the same id).

The class depends only on vLLM's ``PunicaWrapperBase`` contract, so the same code runs wherever the torch ops run;
``tests/test_punica_grouped.py`` checks it against vLLM's reference ops on random adapters (prefill and decode,
several slots, no-LoRA tokens mixed in, sliced outputs such as qkv and gate_up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

# Steps with at most this many tokens and more than one run use the masked all-slots product (three ops per module
# whatever the slot count); larger steps go run by run. Decode steps are one token per request, prefill chunks are
# long runs; the line sits where the extra n x sum(R) multiply-adds stay small against the per-op cost.
STACKED_MAX_TOKENS = 64


@dataclass(frozen=True)
class _Pack:
    """One (module, slot): A stacked over slices ``[R, in]`` (None for embeddings) and B block-diagonal ``[out, R]``."""

    a: torch.Tensor | None
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.b.shape[1]


class FactoredAdapters(Protocol):
    """Adapters known as coefficients over factors that many of them share (see the module docstring)."""

    def stack(self, module: str, dtype: torch.dtype) -> _Pack | None:
        """Every shared factor of ``module``: A ``[R, in]`` stacked, B ``[out, R]`` at each factor's output rows."""
        ...

    def coefficients(self, lora_id: int, module: str, dtype: torch.dtype) -> torch.Tensor | None:
        """Adapter ``lora_id`` over ``stack(module)``'s columns (``[R]``), or None if it is not factored."""
        ...


@dataclass(frozen=True)
class _Run:
    start: int
    stop: int
    slot: int


class _StepPlan:
    """How this step's tokens map to slots: runs of one slot, and a cache of per-layout masks."""

    def __init__(self, runs: list[_Run], num_tokens: int):
        self.runs = runs
        self.num_tokens = num_tokens
        self.slots = sorted({r.slot for r in runs})
        self.masks: dict[tuple[int, ...], torch.Tensor] = {}
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}

    def row_index(self, slots: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Per token, 1 + the position of its slot in ``slots``, or 0 (no adapter, or a slot not in ``slots``)."""
        idx = self._rows.get(slots)
        if idx is None:
            idx = torch.zeros(self.num_tokens, dtype=torch.long, device=device)
            for run in self.runs:
                if run.slot in slots:
                    idx[run.start : run.stop] = 1 + slots.index(run.slot)
            self._rows[slots] = idx
        return idx

    @property
    def stacked(self) -> bool:
        return len(self.runs) > 1 and self.num_tokens <= STACKED_MAX_TOKENS

    def mask(self, ranks: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``[n, sum(ranks)]`` with ones where the token's slot owns the column (ranks listed in ``self.slots`` order)."""
        key = (*ranks, hash(dtype))
        mask = self.masks.get(key)
        if mask is None:
            first = {}
            col = 0
            for slot, r in zip(self.slots, ranks, strict=True):
                first[slot] = (col, col + r)
                col += r
            mask = torch.zeros(self.num_tokens, col, dtype=dtype, device=device)
            for run in self.runs:
                lo, hi = first[run.slot]
                mask[run.start : run.stop, lo:hi] = 1
            self.masks[key] = mask
        return mask


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
    lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], slot: int, dtype: torch.dtype
) -> _Pack | None:
    """The slot's slices as one A ``[R, in]`` and one block-diagonal B ``[out, R]``; None if all are zero.

    ``lora_a[i]`` is ``[max_loras, 1, r_max, in]``, ``lora_b[i]`` is ``[max_loras, 1, out_i, r_max]`` (vLLM's
    stacked layout). A slice's rank is where both its A rows and its B columns are still non-zero. The pack is in
    ``dtype``, the activations' (vLLM keeps LoRA weights in ``--lora-dtype``).
    """
    parts = []
    for a_stk, b_stk in zip(lora_a, lora_b, strict=True):
        a, b = a_stk[slot, 0], b_stk[slot, 0]
        r = min(_real_rank_a(a), _real_rank_b(b))
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
    return _Pack(a_cat, b_bd)


def pack_embedding(lora_b: torch.Tensor, slot: int, dtype: torch.dtype) -> _Pack | None:
    """An embedding slot's B ``[dim, R]`` at its real rank (the A side is a row lookup done by the layer)."""
    b = lora_b[slot, 0]
    r = _real_rank_b(b)
    return None if r == 0 else _Pack(None, b[:, :r].to(dtype).contiguous())


class PunicaWrapperGrouped(PunicaWrapperCPU):
    """Grouped, rank-exact LoRA for vLLM (see the module docstring). Logits and sharded paths are inherited."""

    def __init__(
        self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs: Any
    ):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._slot_ids: list[int | None] = []
        # id(layer's stacked weight tuple) -> (that tuple, {slot: pack or None}); the tuple is kept so its id
        # cannot be reused while the entry lives.
        self._packs: dict[int, tuple[Any, dict[int, _Pack | None]]] = {}
        self._stacks: dict[tuple[int, tuple[int, ...]], _Pack] = {}
        self._plan = _StepPlan([], 0)
        self._factored: FactoredAdapters | None = None
        self._module_names: dict[int, str] = {}  # id(a layer's stacked A) -> its module name
        self._tables: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def bind(self, modules: dict[str, Any], factored: FactoredAdapters | None) -> None:
        """Name the LoRA layers (``{module name: layer}``) and give the provider of factored adapters, if any."""
        self._module_names = {id(layer.lora_a_stacked): name for name, layer in modules.items()}
        self._factored = factored
        self._tables.clear()

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
        self._plan = _StepPlan(plan_runs(mapping.index_mapping, ids), len(mapping.index_mapping))

    def invalidate_slot(self, slot: int) -> None:
        """Forget every pack of ``slot``: its adapter changed (or was reloaded in place)."""
        for _, by_slot in self._packs.values():
            by_slot.pop(slot, None)
        self._stacks.clear()
        self._tables.clear()

    def _pack(self, key_obj: Any, slot: int, build) -> _Pack | None:  # noqa: ANN001
        entry = self._packs.get(id(key_obj))
        if entry is None:
            entry = self._packs[id(key_obj)] = (key_obj, {})
        by_slot = entry[1]
        if slot not in by_slot:
            by_slot[slot] = build(slot)
        return by_slot[slot]

    def _stacked(
        self, key_obj: Any, packs: list[_Pack | None], plan: _StepPlan
    ) -> tuple[_Pack, tuple[int, ...]]:
        """The active slots' packs side by side (zero-rank slots take no columns), cached per slot layout."""
        ranks = tuple(0 if p is None else p.rank for p in packs)
        key = (id(key_obj), tuple(plan.slots))
        stack = self._stacks.get(key)
        if stack is None:
            live = [p for p in packs if p is not None]
            a = None if live[0].a is None else torch.cat([p.a for p in live], dim=0)
            stack = self._stacks[key] = _Pack(a, torch.cat([p.b for p in live], dim=1))
        return stack, ranks

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
        packs = {
            s: self._pack(
                lora_a_stacked, s, lambda s: pack_linear(lora_a_stacked, lora_b_stacked, s, x.dtype)
            )
            for s in plan.slots
        }
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        self._apply(y2, x2, lora_a_stacked, packs, scale, lambda p, xs: xs @ p.a.T)

    def add_lora_embedding(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        # ``x`` holds each token's row of its slot's A (looked up by the layer); only the expand is left.
        plan = self._plan
        if not plan.runs:
            return
        if not add_inputs:
            y.zero_()
        packs = {
            s: self._pack(lora_b_stacked, s, lambda s: pack_embedding(lora_b_stacked, s, y.dtype))
            for s in plan.slots
        }
        # Each token's row already is its own slot's shrink, so there is no all-slots product to take: run by run.
        self._apply(
            y, x, lora_b_stacked, packs, 1.0, lambda p, xs: xs[:, : p.rank].to(y.dtype), stacked=False
        )

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
        """The output head's LoRA on logits rows: one row per sampled token, or one per prompt token when vLLM
        computes prompt logprobs (tunevec's CPU runner fix tells which; docs/cpu-lora-logprobs.md)."""
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        slots = self._logits_slots(x2.size(0), lora_b_stacked)
        if slots is None:
            return
        plan = _StepPlan(plan_slot_runs(slots), len(slots))
        if not plan.runs:
            return
        vocab = lora_b_stacked.shape[2]
        packs = {
            s: self._pack(
                lora_a_stacked, s, lambda s: pack_linear((lora_a_stacked,), (lora_b_stacked,), s, y.dtype)
            )
            for s in plan.slots
        }
        self._apply(
            y2[:, :vocab], x2, lora_a_stacked, packs, scale, lambda p, xs: xs.to(p.a.dtype) @ p.a.T, plan=plan
        )

    def _logits_slots(self, rows: int, lora_b_stacked: torch.Tensor) -> list[int] | None:
        """The slot of each logits row, or None when no row can carry a head delta."""
        from tunevec.steering.vllm_patches import ROW_SLOTS_ATTR

        routed = self.__dict__.get(ROW_SLOTS_ATTR)
        if isinstance(routed, torch.Tensor) and routed.numel() == rows:
            return routed.tolist()  # prompt-logprob rows, routed per token
        if routed is None and self.sampler_indices.numel() == rows:
            return self.sampler_indices.tolist()  # one row per sampled token
        active = sorted({r.slot for r in self._plan.runs})
        if not active or not any(bool(lora_b_stacked[s].any()) for s in active):
            return None  # no adapter in this step touches the head: nothing to add, exactly
        if len(active) == 1 and self._plan_covers_all():
            return [active[0]] * rows
        raise RuntimeError(
            f"tunevec: cannot attribute {rows} logits rows to requests while an adapter with an output-head delta "
            "is active; see docs/cpu-lora-logprobs.md"
        )

    def _plan_covers_all(self) -> bool:
        """Whether every token of the step uses the same one slot (then every logits row does too)."""
        plan = self._plan
        return len(plan.runs) == 1 and plan.runs[0].start == 0 and plan.runs[0].stop == plan.num_tokens

    def _apply_factored(self, y, x, key_obj, scale: float, shrink, plan: _StepPlan) -> set[int]:  # noqa: ANN001
        """Slots served from the shared factors this step (only when two or more are factored); see the docstring."""
        module = self._module_names.get(id(key_obj))
        if module is None or self._factored is None or len(plan.slots) < 2:
            return set()
        ids = {s: self._slot_ids[s] for s in plan.slots if s < len(self._slot_ids)}
        coefs = {s: self._factored.coefficients(ids[s], module, y.dtype) for s in ids if ids[s] is not None}
        slots = tuple(s for s in plan.slots if coefs.get(s) is not None)
        if len(slots) < 2:
            return set()
        stack = self._factored.stack(module, y.dtype)
        if stack is None:
            return set(slots)  # no shared factor touches this module: those slots add nothing here, exactly
        key = (id(key_obj), tuple(ids[s] for s in slots))
        table = self._tables.get(key)
        if table is None:
            rows = [torch.zeros_like(coefs[slots[0]])] + [coefs[s] for s in slots]
            table = self._tables[key] = torch.stack(rows)
        n = plan.num_tokens
        h = shrink(stack, x[:n])
        h.mul_(table.index_select(0, plan.row_index(slots, h.device)))
        y[:n].addmm_(h, stack.b.T, alpha=scale)
        return set(slots)

    def _apply(self, y, x, key_obj, packs, scale: float, shrink, stacked: bool = True, plan=None) -> None:  # noqa: ANN001
        plan = self._plan if plan is None else plan
        done = self._apply_factored(y, x, key_obj, scale, shrink, plan) if stacked else set()
        if done:
            if done.issuperset(plan.slots):
                return
            plan = _StepPlan([r for r in plan.runs if r.slot not in done], plan.num_tokens)
            packs = {s: packs[s] for s in plan.slots}
        if all(p is None for p in packs.values()):
            return
        if stacked and plan.stacked:
            ordered = [packs[s] for s in plan.slots]
            stack, ranks = self._stacked(key_obj, ordered, plan)
            n = plan.num_tokens
            h = shrink(stack, x[:n])
            h.mul_(plan.mask(ranks, h.dtype, h.device))
            y[:n].addmm_(h, stack.b.T, alpha=scale)
            return
        for run in plan.runs:
            pack = packs[run.slot]
            if pack is None:
                continue
            h = shrink(pack, x[run.start : run.stop])
            y[run.start : run.stop].addmm_(h, pack.b.T, alpha=scale)
