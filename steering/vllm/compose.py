"""The one function that composes a mixture: which factors an adapter slot holds, and with which coefficients.

A linear mixture ``sum_i alpha_i B_i A_i`` of the server's vectors is served as one adapter whose factors are the
vectors' own factors side by side, ``B = [B_1 ... B_k]``, ``A = [A_1; ...; A_k]``, **unscaled**, and whose
coefficients ``[alpha_1 ... alpha_1, ..., alpha_k ... alpha_k]`` (one per column, in float32) are applied by the
grouped op between its shrink and its expand: ``y += ((x A^T) * c) B^T``.

Why the coefficients stay apart from the weights:

- the slot's weights are then bit for bit the resident factors, so a mixture served from its own slot and the same
  mixture served from the shared factor stack (several mixtures in one step, ``punica.py``) multiply the same
  numbers in the same order: alone and batched agree by construction, in any LoRA dtype;
- alpha is exact: folded into weights stored in bfloat16 it would be rounded with them (0.8 -> 0.80078 in the
  old coefficient tables, a different rounding of alpha * B in the old slot weights).

Where no coefficient can be applied, the composition is **folded**: alpha multiplies B in float32 before the cast
to the LoRA dtype. That is the case for every tensor on engines whose LoRA op is vLLM's own (CUDA), and for a
tensor whose summed rank is above ``--max-lora-rank`` and is re-truncated by an SVD (its factors are no longer
the vectors').
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tunevec.steering.lora import LoraAdapter, truncate
from tunevec.steering.spec import Spec

FOLDED = ""  # Block.vector of a tensor whose factors carry their coefficients (CUDA, or re-truncated)


@dataclass(frozen=True)
class Block:
    """``rank`` consecutive columns of a slot: one vector's factors, or folded ones (``vector == FOLDED``)."""

    vector: str
    rank: int
    coefficient: (
        float  # the sum of the alphas of the spec's components that apply to this tensor; 1.0 if folded
    )


@dataclass(frozen=True)
class Composition:
    """What a slot holds for one mixture, tensor by tensor (checkpoint tensor names, in the slot's column order)."""

    canonical: str
    blocks: dict[str, tuple[Block, ...]]
    # tensors kept whole (norm weights and biases, linear biases) -> (vector, summed alpha) per vector using them
    deltas: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)

    @property
    def factored(self) -> bool:
        """Whether every column is a vector's own factor (so the mixture can be served from shared stacks)."""
        return all(b.vector != FOLDED for blocks in self.blocks.values() for b in blocks)

    @property
    def vectors(self) -> tuple[str, ...]:
        used = {b.vector for blocks in self.blocks.values() for b in blocks} - {FOLDED}
        return tuple(sorted(used | {v for parts in self.deltas.values() for v, _ in parts}))

    def rank(self, tensor: str) -> int:
        return sum(b.rank for b in self.blocks.get(tensor, ()))

    def coefficients(self, tensor: str) -> torch.Tensor:
        """Per column of ``tensor``'s factors, in float32 (ones where folded)."""
        parts = [
            torch.full((b.rank,), b.coefficient, dtype=torch.float32) for b in self.blocks.get(tensor, ())
        ]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32)

    def coefficient(self, tensor: str, vector: str) -> float:
        """The coefficient of ``vector``'s factors of ``tensor`` (0 when the mixture does not use them)."""
        return sum(b.coefficient for b in self.blocks.get(tensor, ()) if b.vector == vector)


@dataclass(frozen=True)
class ComposedMixture:
    composition: Composition
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # tensor -> (B, A), what the slot holds
    truncated: dict[str, float]  # tensor -> relative error of its re-truncation


def compose_mixture(
    spec: Spec, adapters: dict[str, LoraAdapter], *, max_rank: int, fold: bool
) -> ComposedMixture:
    """The slot contents of a linear ``spec`` over the vectors' resident factors (see the module docstring).

    Per checkpoint tensor, each vector appears once, with the summed alpha of the spec's components that apply to
    that tensor (``medical:1+medical@mlp:0.5`` gives the MLP tensors 1.5). ``fold`` puts alpha into B (engines
    without tunevec's op). A tensor whose summed rank exceeds ``max_rank`` is folded and re-truncated.
    """
    coefficients: dict[str, dict[str, float]] = {}  # tensor -> vector -> alpha
    whole: dict[str, dict[str, float]] = {}
    for comp in spec.components:
        if comp.alpha == 0:
            continue
        adapter = adapters[comp.vector]
        for table, tensors in ((coefficients, adapter.factors), (whole, adapter.deltas)):
            for tensor in tensors:
                if comp.applies_to(tensor):
                    per_vector = table.setdefault(tensor, {})
                    per_vector[comp.vector] = per_vector.get(comp.vector, 0.0) + comp.alpha
    blocks: dict[str, tuple[Block, ...]] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    truncated: dict[str, float] = {}
    for tensor, per_vector in coefficients.items():
        parts = [(v, a, *adapters[v].factors[tensor]) for v, a in per_vector.items() if a != 0]
        if not parts:
            continue
        rank = sum(b.shape[1] for _, _, b, _ in parts)
        if fold or rank > max_rank:
            dtype = parts[0][2].dtype
            b = torch.cat([alpha * b.float() for _, alpha, b, _ in parts], dim=1)
            a = torch.cat([a.float() for _, _, _, a in parts], dim=0)
            if rank > max_rank:
                b, a, truncated[tensor] = truncate(b, a, max_rank)
            factors[tensor] = (b.to(dtype).contiguous(), a.to(dtype).contiguous())
            blocks[tensor] = (Block(FOLDED, b.shape[1], 1.0),)
        else:
            factors[tensor] = (
                torch.cat([b for _, _, b, _ in parts], dim=1).contiguous(),
                torch.cat([a for _, _, _, a in parts], dim=0).contiguous(),
            )
            blocks[tensor] = tuple(Block(v, b.shape[1], alpha) for v, alpha, b, _ in parts)
    deltas = {t: tuple((v, a) for v, a in per.items() if a != 0) for t, per in whole.items()}
    deltas = {t: parts for t, parts in deltas.items() if parts}
    return ComposedMixture(Composition(spec.canonical(), blocks, deltas), factors, truncated)
