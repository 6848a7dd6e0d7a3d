"""Similarity of two tuning vectors (e.g. two domains' fine-tunes of one base), tensor by tensor or streamed.

A whole tuning vector is billions of entries and is read from disk one tensor at a time, so everything here
reduces a tensor pair to a few sums (:class:`PairSums`) that add up across tensors; no tensor is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from tunevec.core.errors import TunevecError

_CHUNK = 1 << 22  # entries per fp64 chunk: 32 MiB per operand, whatever the tensor size


@dataclass
class PairSums:
    """Additive sums over the compared entries of two tensors a, b; combine tensors with ``+``."""

    dot: float = 0.0  # Σ a_i b_i
    sq_a: float = 0.0  # Σ a_i²
    sq_b: float = 0.0  # Σ b_i²
    agree: int = 0  # entries with a_i ≠ 0, b_i ≠ 0 and sign(a_i) = sign(b_i)
    both_nonzero: int = 0  # entries with a_i ≠ 0 and b_i ≠ 0
    count: int = 0  # entries compared (inside the mask)

    def __add__(self, other: PairSums) -> PairSums:
        return PairSums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def cosine(self) -> float:
        """Σ a_i b_i / √(Σ a_i² · Σ b_i²); NaN if either side is all zeros."""
        denom = math.sqrt(self.sq_a * self.sq_b)
        return self.dot / denom if denom > 0 else math.nan

    def sign_agreement(self, zeros: str = "abstain") -> float:
        """agree / both_nonzero (``abstain``) or agree / count (``disagree``); NaN with nothing to compare."""
        if zeros not in ("abstain", "disagree"):
            raise TunevecError(f"zeros must be 'abstain' or 'disagree', got {zeros!r}")
        denom = self.both_nonzero if zeros == "abstain" else self.count
        return self.agree / denom if denom else math.nan

    def as_dict(self) -> dict[str, float]:
        """cosine, sign_agreement (zeros abstain), both_nonzero_share = both_nonzero / count, norms, numel.

        sign_agreement × both_nonzero_share is the agreement with zeros counted as disagreement.
        """
        return {
            "cosine": self.cosine,
            "sign_agreement": self.sign_agreement(),
            "both_nonzero_share": self.both_nonzero / self.count if self.count else math.nan,
            "norm_a": math.sqrt(self.sq_a),
            "norm_b": math.sqrt(self.sq_b),
            "numel": self.count,
        }


def pair_sums(a: torch.Tensor, b: torch.Tensor, *, mask: torch.Tensor | None = None) -> PairSums:
    """The sums of :class:`PairSums` for one tensor pair (any shape, any float dtype), in fp64 chunks.

    ``mask`` (bool, same shape) restricts every sum to the entries where it is True.
    """
    if a.shape != b.shape:
        raise TunevecError(
            f"tensors to compare must have the same shape: {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    if mask is not None and mask.shape != a.shape:
        raise TunevecError(f"mask shape {tuple(mask.shape)} does not match the tensors' {tuple(a.shape)}")
    a, b = a.reshape(-1), b.reshape(-1)
    m = None if mask is None else mask.reshape(-1).bool()
    out = PairSums()
    for start in range(0, a.numel(), _CHUNK):
        ac, bc = a[start : start + _CHUNK].double(), b[start : start + _CHUNK].double()
        if m is not None:
            keep = m[start : start + _CHUNK]
            ac, bc = ac[keep], bc[keep]
        sa, sb = torch.sign(ac), torch.sign(bc)
        nonzero = (sa != 0) & (sb != 0)
        out = out + PairSums(
            dot=float(ac @ bc),
            sq_a=float(ac @ ac),
            sq_b=float(bc @ bc),
            agree=int((nonzero & (sa == sb)).sum()),
            both_nonzero=int(nonzero.sum()),
            count=ac.numel(),
        )
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) = ⟨a, b⟩ / (‖a‖ ‖b‖) over all entries (flattened); NaN if either is all zeros."""
    return pair_sums(a, b).cosine


def sign_agreement(
    a: torch.Tensor, b: torch.Tensor, *, mask: torch.Tensor | None = None, zeros: str = "abstain"
) -> float:
    """Fraction of entries where a and b are both non-zero with the same sign.

    How zeros count: an entry where either side is exactly 0 (unchanged by that fine-tune, common for bf16
    deltas and for sparsified vectors) has no sign. ``zeros="abstain"`` (default) divides by the entries where
    both are non-zero, so 0.5 is chance level whatever the sparsity; ``zeros="disagree"`` divides by all
    compared entries, so zeros count as disagreement. ``mask`` restricts the entries compared.
    NaN when there is nothing to compare.
    """
    return pair_sums(a, b, mask=mask).sign_agreement(zeros)


class SimilarityAccumulator:
    """Streams tensor pairs one at a time; keeps only per-module sums, never the tensors.

    Usage::

        acc = SimilarityAccumulator()
        for name, a, b in pairs:  # e.g. two tuning vectors read side by side
            acc.add(name, a, b)
        acc.overall()["cosine"], acc.per_module()[name]["cosine"], acc.grouped(lambda n: classify(n).role)

    The overall cosine is Σ_t ⟨a_t, b_t⟩ / √(Σ_t ‖a_t‖² · Σ_t ‖b_t‖²) — the cosine of the full concatenated
    vectors, not a mean of per-module cosines.
    """

    def __init__(self) -> None:
        self._sums: dict[str, PairSums] = {}

    def add(
        self, name: str, a: torch.Tensor, b: torch.Tensor, *, mask: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Accumulate one tensor pair under ``name``; returns that module's values (:meth:`PairSums.as_dict`)."""
        if name in self._sums:
            raise TunevecError(f"{name!r} was already added; each tensor pair must be added once")
        self._sums[name] = pair_sums(a, b, mask=mask)
        return self._sums[name].as_dict()

    def per_module(self) -> dict[str, dict[str, float]]:
        return {name: s.as_dict() for name, s in self._sums.items()}

    def overall(self) -> dict[str, float]:
        return sum(self._sums.values(), PairSums()).as_dict()

    def grouped(self, key: Callable[[str], str | None]) -> dict[str, dict[str, float]]:
        """Values per group of modules, ``key(name)`` naming the group (e.g. ``classify(name).role``)."""
        groups: dict[str, PairSums] = {}
        for name, s in self._sums.items():
            group = str(key(name))
            groups[group] = groups.get(group, PairSums()) + s
        return {group: s.as_dict() for group, s in groups.items()}
