"""Merge methods: how the tuning vectors of one checkpoint tensor combine into one delta, and their registry.

Each method is a pure function over same-shape tensors (one τᵢ per vector, all for the same checkpoint tensor)
and per-vector coefficients αᵢ. They compute in float32 and return float32; callers cast to the weight dtype.
Nothing here knows about files or specs, except ``dare_generator``, which turns (seed, tensor name) into a random
stream so DARE masks are reproducible wherever a variant is built.

``METHODS`` is the registry (mergekit's ``merge_methods/registry.py`` pattern): one ``MergeMethod`` record per
method holds its name, its typed parameters with their ranges and defaults, and its function. A spec checks its
method and parameters against the record before any tensor is read, and ``tunevec.steering.delta`` calls the
record's function. Adding a method means adding one record here.

torch is imported inside the functions that compute, not at the top: ``tunevec.steering.spec`` reads this registry
to parse a request, and parsing must not pay for (or depend on) loading torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunevec.core.errors import TunevecError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Param:
    """A merge method's parameter: its type, its default and the range a value must lie in.

    ``low_open``/``high_open`` make an end of the range exclusive: density is in (0, 1], a seed in [0, 2^63).
    """

    name: str
    type: type[int] | type[float]
    default: int | float
    low: int | float
    high: int | float
    low_open: bool = False
    high_open: bool = False
    doc: str = ""

    @property
    def requirement(self) -> str:
        """What a value must be, for error messages: ``density must be a number in (0, 1] (...)``."""
        kind = "an integer" if self.type is int else "a number"
        interval = (
            f"{'(' if self.low_open else '['}{_bound_text(self.low)}, "
            f"{_bound_text(self.high)}{')' if self.high_open else ']'}"
        )
        return f"{self.name} must be {kind} in {interval}" + (f" ({self.doc})" if self.doc else "")

    def accepts(self, value: object) -> bool:
        """Whether ``value`` is of this parameter's type and inside its range (an int is a valid float).

        Python compares ints of any size with floats exactly, so a 400-digit integer is refused here without ever
        being converted to a float (which would raise OverflowError).
        """
        if isinstance(value, bool):  # JSON true/false is a mistake, not 1/0
            return False
        if self.type is int:
            if not isinstance(value, int):
                return False
        elif not isinstance(value, int | float) or (isinstance(value, float) and not math.isfinite(value)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def convert(self, value: int | float) -> int | float:
        """An accepted value as this parameter's type (density given as 1 becomes 1.0)."""
        return self.type(value)


def _bound_text(x: int | float) -> str:
    if isinstance(x, float) and x.is_integer():
        x = int(x)  # (0, 1], not (0.0, 1.0]
    if x >= 2**32 and x & (x - 1) == 0:
        return f"2^{x.bit_length() - 1}"
    return str(x)


# A method's function: (τᵢ for the applying components, their αᵢ, the spec's parameters, the tensor's name) -> Δ.
MergeFunction = Callable[
    [Sequence["torch.Tensor"], Sequence[float], Mapping[str, "int | float"], str], "torch.Tensor"
]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: its name in specs, its parameters in canonical order, and its function."""

    name: str
    params: tuple[Param, ...]
    merge: MergeFunction
    doc: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def takes(self) -> str:
        """The parameter list for messages: ``density, seed`` or ``no parameters``."""
        return ", ".join(p.name for p in self.params) if self.params else "no parameters"


def _stack(taus: Sequence[torch.Tensor], alphas: Sequence[float]) -> torch.Tensor:
    """Check the inputs and stack τᵢ as one float32 tensor of shape (k, *shape)."""
    if len(taus) == 0:
        raise TunevecError("merge needs at least one tensor; got none")
    if len(taus) != len(alphas):
        raise TunevecError(
            f"merge got {len(taus)} tensors but {len(alphas)} coefficients; pass one per tensor"
        )
    shape = taus[0].shape
    for i, t in enumerate(taus):
        if t.shape != shape:
            raise TunevecError(
                f"merge inputs must share one shape: tensor 0 is {tuple(shape)}, tensor {i} is {tuple(t.shape)}"
            )
    import torch

    return torch.stack([t.to(torch.float32) for t in taus])


def _coefficients(alphas: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """αᵢ as a float32 column that broadcasts against the (k, *shape) stack."""
    import torch

    a = torch.tensor([float(x) for x in alphas], dtype=torch.float32, device=like.device)
    return a.view(-1, *([1] * (like.dim() - 1)))


def merge_linear(taus: Sequence[torch.Tensor], alphas: Sequence[float]) -> torch.Tensor:
    """Task arithmetic: Δ = Σᵢ αᵢ·τᵢ."""
    stacked = _stack(taus, alphas)
    return (stacked * _coefficients(alphas, stacked)).sum(dim=0)


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, round(density·n)) entries of largest |τ|, zero the rest.

    Equal magnitudes are broken by position (lower flat index kept first) through a stable sort, so the result is
    the same on every device; low-precision τ (bf16) has many equal magnitudes, and "any k of them" would not be
    reproducible.
    """
    import torch

    if not 0.0 < density <= 1.0:
        raise TunevecError(f"density must be in (0, 1], got {density}")
    n = tau.numel()
    k = max(1, round(density * n))
    if k >= n:
        return tau.clone()
    flat = tau.reshape(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    keep[order[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def merge_ties(taus: Sequence[torch.Tensor], alphas: Sequence[float], density: float) -> torch.Tensor:
    """TIES merging (Yadav et al., 2023) with per-vector coefficients, entry by entry:

        τ̂ᵢ = trim(τᵢ, density)                  top-k magnitude per vector (see ``trim``)
        δᵢ = αᵢ·τ̂ᵢ
        γ  = +1 if Σᵢ δᵢ ≥ 0 else −1             elected sign: sign of the summed (signed) mass
        mᵢ = 1 if sign(δᵢ) = γ else 0            zeros never agree, so trimmed entries are never counted
        Δ  = Σᵢ mᵢ·δᵢ / max(1, Σᵢ mᵢ)            disjoint mean over the agreeing vectors

    With every αᵢ = λ > 0 this is exactly TIES-merging with scaling λ; with every αᵢ = 1 it equals mergekit's
    ``ties`` (weight 1, ``normalize: true``, ``lambda: 1``). Unlike mergekit, which divides by Σ wᵢ·mᵢ and so
    treats weights as relative, the mean here is a count: αᵢ keeps its meaning as a strength (``medical:0.5``
    is half of ``medical:1``), and a negative αᵢ subtracts instead of cancelling out in the divisor.
    """
    import torch

    stacked = _stack(taus, alphas)
    trimmed = torch.stack([trim(t, density) for t in stacked])
    deltas = trimmed * _coefficients(alphas, trimmed)
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
    agree = torch.sign(deltas) == elected
    count = agree.sum(dim=0).clamp(min=1).to(torch.float32)
    return torch.where(agree, deltas, torch.zeros_like(deltas)).sum(dim=0) / count


def merge_dare(
    taus: Sequence[torch.Tensor], alphas: Sequence[float], density: float, generator: torch.Generator
) -> torch.Tensor:
    """DARE (Yu et al., 2024) followed by a linear sum:

        mᵢ ~ Bernoulli(density), drawn as uᵢ < density with uᵢ ~ U[0, 1) from ``generator``, i = 1, 2, … in order
        Δ  = Σᵢ αᵢ·(mᵢ ⊙ τᵢ) / density

    E[Δ] = Σᵢ αᵢ·τᵢ. The uniforms are drawn on the CPU from a CPU generator and then moved to the tensors' device,
    because CUDA and CPU generators give different streams for the same seed; the mask must not depend on where
    the variant is built. With density 1 nothing is dropped and no numbers are drawn.
    """
    import torch

    if not 0.0 < density <= 1.0:
        raise TunevecError(f"density must be in (0, 1], got {density}")
    stacked = _stack(taus, alphas)
    if density < 1.0:
        shape = stacked.shape[1:]
        masks = [
            torch.rand(shape, generator=generator, dtype=torch.float32) < density for _ in range(len(taus))
        ]
        stacked = (
            torch.where(torch.stack(masks).to(stacked.device), stacked, torch.zeros_like(stacked)) / density
        )
    return (stacked * _coefficients(alphas, stacked)).sum(dim=0)


def dare_generator(seed: int, tensor_name: str) -> torch.Generator:
    """A CPU generator seeded from sha256(seed, tensor name).

    Each tensor gets its own stream, so a DARE mask depends only on the spec's seed and the tensor's name: not on
    the order tensors are streamed in, nor on which process (or vLLM worker) builds the variant.
    """
    import torch

    key = hashlib.sha256(f"tunevec.dare\0{seed}\0{tensor_name}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    return generator


# --- the registry ----------------------------------------------------------------------------------------------

DENSITY = Param("density", float, 0.5, 0.0, 1.0, low_open=True, doc="the fraction of each vector kept")
SEED = Param("seed", int, 0, 0, 2**63, high_open=True, doc="with the tensor name, it fixes the random mask")

# Method name -> record. A spec fills in every default, so its canonical text names all parameters and keeps its
# meaning even if a default changes later. The first record is the default method.
METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "linear",
            (),
            lambda taus, alphas, params, tensor: merge_linear(taus, alphas),
            "task arithmetic: Δ = Σᵢ αᵢ·τᵢ",
        ),
        MergeMethod(
            "ties",
            (DENSITY,),
            lambda taus, alphas, params, tensor: merge_ties(taus, alphas, params["density"]),
            "TIES: trim each τᵢ to its top-density magnitudes, elect a sign, mean the agreeing entries",
        ),
        MergeMethod(
            "dare",
            (DENSITY, SEED),
            lambda taus, alphas, params, tensor: merge_dare(
                taus, alphas, params["density"], dare_generator(params["seed"], tensor)
            ),
            "DARE: keep each entry with probability density, rescale by 1/density, sum linearly",
        ),
    )
}
# Every parameter name any method declares (the full JSON form's top-level keys besides method and components).
PARAM_NAMES: tuple[str, ...] = tuple(dict.fromkeys(p.name for m in METHODS.values() for p in m.params))
