"""Directional alignment of a tuning vector τ with its base weight W: amplified old directions or new ones?

Notation: W = U Σ Vᵀ (m × n), U_k / V_k its top-k left / right singular vectors, σ_i its singular values,
P = U_k U_kᵀ and Q = V_k V_kᵀ the projectors on the principal output / input subspaces, P⊥ = I − P, Q⊥ = I − Q.
All shares are fractions of ‖τ‖_F²; for τ = 0 they are NaN (no direction to speak of).
Definitions and the choice of k are written up in docs/analysis-definitions.md.
"""

from __future__ import annotations

import math

import torch

from tunevec.core.errors import TunevecError
from tunevec.core.linalg import as_matrix, sq_norm, top_svd

W_ENERGY = 0.9  # default k: the rank holding this share of ‖W‖_F² ...
MAX_K_FRACTION = 4  # ... capped at min(m, n) // 4, so the complement stays the larger part of the space


def default_max_k(shape: tuple[int, ...]) -> int:
    """Cap on the default k: min(m, n) // 4 (at least 1)."""
    return max(1, min(shape) // MAX_K_FRACTION)


def principal_directions(
    W: torch.Tensor,
    k: int | None = None,
    *,
    energy: float = W_ENERGY,
    max_k: int | None = None,
    method: str = "full",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets (U_k m×k, σ_k, V_k n×k) of the base weight W.

    k = None picks k = min(smallest r with Σ_{i≤r} σ_i² ≥ energy · ‖W‖_F², max_k), max_k defaulting to
    min(m, n) // 4. Pretrained weights have flat spectra, so 90% of the energy often needs half the dimensions;
    the cap keeps "principal subspace" a minority of the space, where the random baselines stay informative.
    ``randomized`` sketches only max_k triplets and chooses k among them against the exact ‖W‖_F².
    """
    W = as_matrix(W, "W")
    dim = min(W.shape)
    if k is not None:
        if not 1 <= k <= dim:
            raise TunevecError(f"k must be in [1, {dim}] for a {tuple(W.shape)} weight, got {k}")
        return top_svd(W, k, method=method, seed=seed)
    if not 0.0 < energy <= 1.0:
        raise TunevecError(f"energy must be in (0, 1], got {energy}")
    cap = min(default_max_k(W.shape) if max_k is None else max_k, dim)
    total = sq_norm(W)
    if total == 0 or cap < 1:
        raise TunevecError(
            "W is all zeros (or max_k < 1): it has no principal directions; pass a real base weight"
        )
    u, s, v = top_svd(W, dim if method == "full" else cap, method=method, seed=seed)
    reached = torch.nonzero(torch.cumsum(s.double() ** 2, 0) >= energy * total)
    k = min(int(reached[0]) + 1 if reached.numel() else cap, cap)
    return u[:, :k], s[:k], v[:, :k]


def _check_basis(tau: torch.Tensor, U_k: torch.Tensor, V_k: torch.Tensor) -> tuple[int, int, int]:
    m, n = tau.shape
    if (
        U_k.ndim != 2
        or V_k.ndim != 2
        or U_k.shape[0] != m
        or V_k.shape[0] != n
        or U_k.shape[1] != V_k.shape[1]
    ):
        raise TunevecError(
            f"bases do not fit tau {tuple(tau.shape)}: need U_k (m×k) and V_k (n×k) with the same k, "
            f"got {tuple(U_k.shape)} and {tuple(V_k.shape)}"
        )
    return m, n, U_k.shape[1]


def subspace_share(tau: torch.Tensor, U_k: torch.Tensor, V_k: torch.Tensor) -> dict[str, float]:
    """Share of ‖τ‖_F² inside W's principal subspaces, against a random-subspace baseline.

    left      = ‖U_kᵀ τ‖_F² / ‖τ‖_F²      (output side; baseline k/m)
    right     = ‖τ V_k‖_F² / ‖τ‖_F²       (input side; baseline k/n)
    two_sided = ‖U_kᵀ τ V_k‖_F² / ‖τ‖_F²  (both; baseline k²/(mn))
    The baseline is the expected share for a uniformly random k-dim subspace (or an isotropic random τ):
    E‖P x‖² = (k/m)‖x‖² per column. ``*_ratio`` = share / baseline: 1 means no preference for W's subspace.
    """
    tau = as_matrix(tau)
    m, n, k = _check_basis(tau, U_k, V_k)
    U_k, V_k = U_k.to(tau.dtype), V_k.to(tau.dtype)
    total = sq_norm(tau)
    ut = U_k.mT @ tau
    shares = {"left": sq_norm(ut), "right": sq_norm(tau @ V_k), "two_sided": sq_norm(ut @ V_k)}
    baselines = {"left": k / m, "right": k / n, "two_sided": k * k / (m * n)}
    out: dict[str, float] = {"k": k}
    for side, energy in shares.items():
        share = energy / total if total > 0 else math.nan
        out[f"{side}_share"] = share
        out[f"{side}_baseline"] = baselines[side]
        out[f"{side}_ratio"] = share / baselines[side]
    return out


def split_energy(
    tau: torch.Tensor, U_k: torch.Tensor, S_k: torch.Tensor, V_k: torch.Tensor
) -> dict[str, float | torch.Tensor]:
    """Split ‖τ‖_F² into four orthogonal parts relative to W's top-k singular directions (shares sum to 1).

    τ = PτQ + (PτQ⊥ + P⊥τQ) + P⊥τQ⊥ is a Frobenius-orthogonal sum. With C = U_kᵀ τ V_k (k × k):
      amplification = Σ_i C_ii² = Σ_{i≤k} (u_iᵀ τ v_i)²   — along W's own pairs (u_i, v_i): rescales σ_i
      rotation      = ‖C‖_F² − Σ_i C_ii²                  — inside both subspaces, couples u_i with v_j (i≠j)
      mixed         = ‖PτQ⊥‖_F² + ‖P⊥τQ‖_F²                — in one principal subspace, outside the other
      new           = ‖P⊥ τ Q⊥‖_F²                         — orthogonal to both: directions W did not use
    each divided by ‖τ‖_F². Random-τ baselines: k/(mn), k(k−1)/(mn), k(m+n−2k)/(mn), (m−k)(n−k)/(mn).
    ``rel_sigma_change`` holds Δσ_i/σ_i = u_iᵀ τ v_i / σ_i for i ≤ k — the first-order change of each of W's
    singular values (exact as τ → 0 for simple σ_i; NaN where σ_i = 0).
    """
    tau = as_matrix(tau)
    m, n, k = _check_basis(tau, U_k, V_k)
    U_k, V_k, S_k = U_k.to(tau.dtype), V_k.to(tau.dtype), S_k.to(tau.dtype)
    total = sq_norm(tau)
    ut = U_k.mT @ tau
    c = ut @ V_k
    inside, left, right = sq_norm(c), sq_norm(ut), sq_norm(tau @ V_k)
    diag = c.diagonal()
    energy = {
        "amplification": sq_norm(diag),
        "rotation": inside - sq_norm(diag),
        "mixed": (left - inside) + (right - inside),
        # ‖P⊥τQ⊥‖² by inclusion–exclusion; clamp the rounding residue of a subtraction near 0.
        "new": max(total - left - right + inside, 0.0),
    }
    baselines = {
        "amplification": k / (m * n),
        "rotation": k * (k - 1) / (m * n),
        "mixed": k * (m + n - 2 * k) / (m * n),
        "new": (m - k) * (n - k) / (m * n),
    }
    out: dict[str, float | torch.Tensor] = {"k": k}
    for part, e in energy.items():
        out[f"{part}_share"] = e / total if total > 0 else math.nan
        out[f"{part}_baseline"] = baselines[part]
    sigma = S_k.double()
    out["rel_sigma_change"] = torch.where(sigma > 0, diag.double() / sigma, torch.full_like(sigma, math.nan))
    return out


def amplification_split(
    tau: torch.Tensor,
    W: torch.Tensor,
    k: int | None = None,
    *,
    energy: float = W_ENERGY,
    max_k: int | None = None,
    method: str = "full",
    seed: int = 0,
) -> dict[str, float | torch.Tensor]:
    """:func:`split_energy` of τ against W's top-k directions (k = None: chosen by :func:`principal_directions`)."""
    U_k, S_k, V_k = principal_directions(W, k, energy=energy, max_k=max_k, method=method, seed=seed)
    return split_energy(tau, U_k, S_k, V_k)


def alignment_summary(
    tau: torch.Tensor,
    W: torch.Tensor,
    k: int | None = None,
    *,
    energy: float = W_ENERGY,
    max_k: int | None = None,
    method: str = "full",
    seed: int = 0,
) -> dict[str, float]:
    """One module's alignment numbers as a flat, JSON-ready dict (one SVD of W serves all of them).

    Keys: k; w_energy_at_k (share of ‖W‖_F² in W's top k); tau_rel_norm = ‖τ‖_F / ‖W‖_F;
    {left,right,two_sided}_{share,baseline,ratio} from :func:`subspace_share`;
    {amplification,rotation,mixed,new}_{share,baseline} from :func:`split_energy`;
    mean_rel_sigma_change = mean_i Δσ_i/σ_i and mean_abs_rel_sigma_change = mean_i |Δσ_i/σ_i| over i ≤ k.
    """
    tau, W = as_matrix(tau), as_matrix(W, "W")
    if tau.shape != W.shape:
        raise TunevecError(f"tau {tuple(tau.shape)} and W {tuple(W.shape)} must have the same shape")
    U_k, S_k, V_k = principal_directions(W, k, energy=energy, max_k=max_k, method=method, seed=seed)
    return alignment_from_directions(tau, U_k, S_k, V_k, sq_norm(W))


def alignment_from_directions(
    tau: torch.Tensor,
    U_k: torch.Tensor,
    S_k: torch.Tensor,
    V_k: torch.Tensor,
    w_sq_norm: float,
    *,
    tau_sq_norm: float | None = None,
    keep_sigma: int | None = None,
) -> dict[str, float | list[float]]:
    """:func:`alignment_summary` for a W whose top-k directions are already computed, so that one SVD of W
    serves every vector tuned from it (the report's case). ``w_sq_norm`` is ‖W‖_F², ``tau_sq_norm`` ‖τ‖_F² if
    known; ``keep_sigma`` adds ``rel_sigma_change_top``, the first ``keep_sigma`` of Δσ_i/σ_i.
    """
    tau_sq = sq_norm(tau) if tau_sq_norm is None else tau_sq_norm
    out: dict[str, float | list[float]] = {
        "k": U_k.shape[1],
        "w_energy_at_k": float((S_k.double() ** 2).sum()) / w_sq_norm if w_sq_norm > 0 else math.nan,
        "tau_rel_norm": math.sqrt(tau_sq / w_sq_norm) if w_sq_norm > 0 else math.nan,
    }
    out.update(subspace_share(tau, U_k, V_k))
    split = split_energy(tau, U_k, S_k, V_k)
    rel = split.pop("rel_sigma_change")
    out.update(split)
    out["mean_rel_sigma_change"] = float(rel.nanmean())
    out["mean_abs_rel_sigma_change"] = float(rel.abs().nanmean())
    if keep_sigma is not None:
        out["rel_sigma_change_top"] = [float(x) for x in rel[:keep_sigma]]
    return out
