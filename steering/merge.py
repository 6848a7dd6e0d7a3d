"""Merge methods: how the tuning vectors of one checkpoint tensor combine into one delta.

Each method is a pure function over same-shape tensors (one τᵢ per vector, all for the same checkpoint tensor)
and per-vector coefficients αᵢ. They compute in float32 and return float32; callers cast to the weight dtype.
Nothing here knows about files, tensor names or specs, except ``dare_generator``, which turns (seed, tensor name)
into a random stream so DARE masks are reproducible wherever a variant is built.

``METHODS`` declares each method's parameters and defaults, so a spec is validated before any tensor is read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from tunevec.core.errors import TunevecError

# Method name -> {parameter: default}. A spec fills in every default, so its canonical text names all parameters
# and keeps its meaning even if a default changes later.
METHODS: dict[str, dict[str, float | int]] = {
    "linear": {},
    "ties": {"density": 0.5},
    "dare": {"density": 0.5, "seed": 0},
}


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
    return torch.stack([t.to(torch.float32) for t in taus])


def _coefficients(alphas: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """αᵢ as a float32 column that broadcasts against the (k, *shape) stack."""
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
    key = hashlib.sha256(f"tunevec.dare\0{seed}\0{tensor_name}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    return generator
