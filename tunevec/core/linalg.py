"""Linear algebra of one tuning-vector matrix τ = θ_tuned − θ_base: spectra, ranks, low-rank factorisation.

Every function here takes a 2-D matrix (out × in) or a 1-D spectrum. Biases, norms and other 1-D tensors have no
spectrum; the caller skips them (``tunevec.core.roles.classify(name).is_linear`` says which tensors are matrices).
Computation is in fp32 (fp64 inputs stay fp64); sums of squares are accumulated in fp64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tunevec.core.errors import TunevecError

METHODS = ("full", "randomized")


def as_matrix(m: torch.Tensor, what: str = "tau") -> torch.Tensor:
    """``m`` as a floating 2-D tensor in at least fp32 (bf16/fp16 SVD is unsupported or inaccurate)."""
    if m.ndim != 2:
        raise TunevecError(
            f"{what} must be a 2-D matrix, got shape {tuple(m.shape)}; "
            "skip 1-D tensors (biases, norms) and reshape others before calling"
        )
    return m if m.dtype == torch.float64 else m.float()


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise TunevecError(f"method must be one of {METHODS}, got {method!r}")


_NORM_CHUNK = 1 << 22  # entries per fp64 chunk of sq_norm: 32 MiB of float64, whatever the tensor's size


def sq_norm(m: torch.Tensor) -> float:
    """‖m‖_F², accumulated in fp64 so that shares of it are exact to fp32 rounding of the entries.

    In chunks: a float64 copy of a whole embedding (131M entries at 7B) would cost 1 GiB for one number."""
    flat = m.reshape(-1)
    if flat.numel() <= _NORM_CHUNK:
        return float(torch.linalg.vector_norm(flat, dtype=torch.float64) ** 2)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _NORM_CHUNK):
        total += torch.linalg.vector_norm(flat[start : start + _NORM_CHUNK], dtype=torch.float64) ** 2
    return float(total)


def randomized_svd(
    m: torch.Tensor, rank: int, *, oversample: int = 10, n_iter: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD m ≈ U diag(S) Vᵀ by randomized range finding (Halko, Martinsson & Tropp 2011, alg. 5.1).

    A thin wrapper over ``torch.svd_lowrank`` with sketch size q = rank + oversample and ``n_iter`` power
    iterations (re-orthonormalised by QR each step). ``svd_lowrank`` draws its test matrix from the global RNG,
    so we fork the RNG and seed it: the same call returns the same factors and the caller's RNG is untouched.
    Returns U (m×rank), S (rank), V (n×rank), S descending.
    """
    m = as_matrix(m, "m")
    dim = min(m.shape)
    if not 1 <= rank <= dim:
        raise TunevecError(f"rank must be in [1, {dim}] for a {tuple(m.shape)} matrix, got {rank}")
    q = min(rank + oversample, dim)
    # fork_rng(devices=[]) forks only the CPU generator; a CUDA tensor needs its own device's generator forked.
    devices = [] if m.device.type == "cpu" else [m.device]
    with torch.random.fork_rng(devices=devices, device_type=m.device.type):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(m, q=q, niter=n_iter)
    return u[:, :rank], s[:rank], v[:, :rank]


def top_svd(
    m: torch.Tensor, rank: int, *, method: str = "full", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets (U m×r, S r, V n×r) by exact (``full``) or ``randomized`` SVD."""
    _check_method(method)
    m = as_matrix(m, "m")
    if method == "randomized":
        return randomized_svd(m, rank, seed=seed)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].mT


def singular_values(
    tau: torch.Tensor, *, method: str = "full", rank: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Singular values σ_1 ≥ σ_2 ≥ … of a 2-D τ (fp32).

    ``full``: all min(m, n) values from ``torch.linalg.svdvals`` (``rank`` truncates).
    ``randomized``: the top ``rank`` values from :func:`randomized_svd` (``rank`` required). The tail is not
    computed; pass ``total_energy=‖τ‖_F²`` to :func:`energy_at_ranks` / :func:`rank_for_energy` so shares stay exact.
    """
    _check_method(method)
    tau = as_matrix(tau)
    if method == "randomized":
        if rank is None:
            raise TunevecError("method='randomized' computes only the top singular values: pass rank=")
        return randomized_svd(tau, rank, seed=seed)[1]
    s = torch.linalg.svdvals(tau)
    return s if rank is None else s[:rank]


def effective_rank(s: torch.Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): exp(H(p)), p_i = s_i / Σ_j s_j, H(p) = −Σ p_i log p_i.

    Between 1 (one direction) and len(s) (flat spectrum); 0 for an all-zero spectrum. Terms with p_i = 0 add 0.
    """
    s = s.double().abs()
    total = s.sum()
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """Stable (numerical) rank Σ_i s_i² / s_1² = ‖τ‖_F² / ‖τ‖_2²; 0 for an all-zero spectrum."""
    s = s.double()
    top = s.abs().max() if s.numel() else torch.tensor(0.0)
    return 0.0 if top == 0 else float((s**2).sum() / top**2)


def _energy_curve(s: torch.Tensor, total_energy: float | None) -> tuple[torch.Tensor, float]:
    """Cumulative Σ_{i≤k} s_i² (fp64) and the total it is measured against (Σ s² unless given)."""
    cum = torch.cumsum(s.double().flatten() ** 2, 0)
    if total_energy is not None:
        return cum, float(total_energy)
    return cum, float(cum[-1]) if cum.numel() else 0.0


def energy_at_ranks(
    s: torch.Tensor, ks: list[int] | tuple[int, ...], *, total_energy: float | None = None
) -> list[float]:
    """Share of energy captured by the best rank-k approximation, for each k: Σ_{i≤k} s_i² / Σ_i s_i².

    ``total_energy`` replaces the denominator when ``s`` is a truncated spectrum (pass ‖τ‖_F²). k beyond
    len(s) counts only the values given. An all-zero spectrum captures everything (1.0) — nothing to miss.
    """
    cum, total = _energy_curve(s, total_energy)
    out = []
    for k in ks:
        if k < 0:
            raise TunevecError(f"ranks must be non-negative, got {k}")
        captured = float(cum[min(k, cum.numel()) - 1]) if k > 0 and cum.numel() else 0.0
        out.append(1.0 if total == 0 else captured / total)
    return out


def rank_for_energy(s: torch.Tensor, target: float, *, total_energy: float | None = None) -> int:
    """Smallest k with Σ_{i≤k} s_i² ≥ target · Σ_i s_i² (0 for an all-zero spectrum).

    ``total_energy`` replaces the denominator for a truncated spectrum; if the values given cannot reach the
    target, this raises rather than guess (compute more singular values).
    """
    if not 0.0 < target <= 1.0:
        raise TunevecError(f"energy target must be in (0, 1], got {target}")
    cum, total = _energy_curve(s, total_energy)
    if total == 0:
        return 0
    reached = torch.nonzero(cum >= target * total)
    if reached.numel() == 0:
        have = float(cum[-1]) / total if cum.numel() else 0.0
        raise TunevecError(
            f"the {s.numel()} singular values given hold {have:.4f} of the energy, below the target {target}; "
            "compute more of them (a larger rank / max_rank)"
        )
    return int(reached[0]) + 1


@dataclass
class LowRank:
    """τ ≈ B @ A with B (out × r) = U_r √S_r and A (r × in) = √S_r V_rᵀ (fp32, on τ's device)."""

    B: torch.Tensor
    A: torch.Tensor
    rank: int
    rel_error: float  # ‖τ − BA‖_F / ‖τ‖_F, measured directly (0 for τ = 0)
    energy: float  # ‖BA‖_F² / ‖τ‖_F², the share of τ's energy captured (1 for τ = 0)

    def dense(self) -> torch.Tensor:
        return self.B @ self.A


def factorise(
    tau: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    method: str = "randomized",
    max_rank: int | None = None,
    seed: int = 0,
    top: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> LowRank:
    """Truncated-SVD factorisation τ ≈ B A at a fixed ``rank`` or the smallest rank holding ``energy``.

    B = U_r diag(√S_r), A = diag(√S_r) V_rᵀ: the scale is split evenly so neither factor carries all of ‖τ‖.

    Choosing the rank for an energy target: ``full`` computes every singular value and takes the smallest r
    with Σ_{i≤r} σ_i² ≥ energy · ‖τ‖_F². ``randomized`` first computes a sketch of the top
    s = min(max_rank or dim, dim) triplets, then picks r ≤ s the same way, against the exact ‖τ‖_F² (cheap to
    compute) rather than the sketch's own total. For a randomized SVD, U_r U_rᵀ τ = U_r S_r V_rᵀ (U_r lies in the
    sketched range), so B A is an orthogonal projection of τ and Σ_{i≤r} S_i² / ‖τ‖_F² is exactly the share it
    captures: the chosen rank reaches the target for this sketch, never by an estimate of the tail. When the
    sketch cannot reach the target (max_rank too small), r = s and ``energy`` reports the share reached.
    ``max_rank`` also caps the ``full`` choice. Without ``max_rank`` the randomized sketch is the whole
    spectrum — correct but slower than ``full``; pass a cap.

    ``top``: the triplets ``top_svd`` would compute here (for ``energy=``: ``top_svd(tau, s, method, seed)``
    with s as above), when the caller already has them, e.g. from the spectrum of the same τ; the randomized SVD of
    a 4096-wide matrix is the largest cost of an analysis, and computing it twice gives the same factors.
    """
    if (rank is None) == (energy is None):
        raise TunevecError("pass exactly one of rank= or energy=")
    _check_method(method)
    tau = as_matrix(tau)
    dim = min(tau.shape)
    total = sq_norm(tau)
    cap = dim if max_rank is None else min(max_rank, dim)
    if cap < 1:
        raise TunevecError(f"max_rank must be at least 1, got {max_rank}")

    if rank is not None:
        if not 0 <= rank <= dim:
            raise TunevecError(f"rank must be in [0, {dim}] for a {tuple(tau.shape)} matrix, got {rank}")
        u, s, v = top_svd(tau, max(rank, 1), method=method, seed=seed)
    else:
        if not 0.0 < energy <= 1.0:
            raise TunevecError(f"energy target must be in (0, 1], got {energy}")
        want = dim if method == "full" else cap
        if top is not None and top[1].numel() == want:
            u, s, v = top
        else:
            u, s, v = top_svd(tau, want, method=method, seed=seed)
        cum = torch.cumsum(s.double() ** 2, 0)
        reached = torch.nonzero(cum >= energy * total)
        rank = 0 if total == 0 else (int(reached[0]) + 1 if reached.numel() else s.numel())
        rank = min(rank, cap)

    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * v[:, :rank].mT
    if total == 0:
        return LowRank(B=b, A=a, rank=rank, rel_error=0.0, energy=1.0)
    rel_error = math.sqrt(sq_norm(tau - b @ a) / total)
    return LowRank(
        B=b, A=a, rank=rank, rel_error=rel_error, energy=float((s[:rank].double() ** 2).sum()) / total
    )


def allocate_ranks(
    spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], *, param_budget: int
) -> dict[str, int]:
    """Ranks per module that capture the most total energy Σ_m Σ_{i≤r_m} σ_{m,i}² within a parameter budget.

    A rank-1 unit of module m costs out_m + in_m parameters (one column of B, one row of A). Greedy: take units
    in order of σ_{m,i}² / (out_m + in_m), skipping any that no longer fit. Within a module σ² decreases while
    the cost is fixed, so the greedy order always extends each module's rank by one (a prefix of its spectrum),
    and once a module's unit does not fit, none of its later units do. This is the fractional-knapsack greedy:
    the optimum exceeds its first stopping point by less than the energy of the unit that did not fit. Energy is absolute (not a per-module share), so modules where τ is
    large get more rank — that minimises the total error Σ_m ‖τ_m − B_m A_m‖_F². Zero singular values are never
    bought. Every module of ``spectra`` appears in the result (possibly with rank 0).
    """
    if param_budget < 0:
        raise TunevecError(f"param_budget must be non-negative, got {param_budget}")
    missing = [name for name in spectra if name not in shapes]
    if missing:
        raise TunevecError(f"no shape given for modules {missing[:5]}; pass shapes for every spectrum")
    names = list(spectra)
    gains, costs, owner = [], [], []
    for idx, name in enumerate(names):
        out_dim, in_dim = shapes[name]
        s = spectra[name].double().flatten()[: min(out_dim, in_dim)]
        s = s[s > 0]
        gains.append(s**2)
        costs.append(torch.full_like(s, float(out_dim + in_dim)))
        owner.append(torch.full((s.numel(),), idx, dtype=torch.long))
    ranks = dict.fromkeys(names, 0)
    if not names:
        return ranks
    gain, cost, who = torch.cat(gains), torch.cat(costs), torch.cat(owner)
    # Sort by gain per parameter; a stable sort keeps each module's own order among equal ratios.
    order = torch.argsort(gain / cost, descending=True, stable=True)
    cost, who = cost[order], who[order]
    # Fast path: the longest prefix of the greedy order that fits as a whole.
    spent = torch.cumsum(cost, 0)
    n_prefix = int(
        torch.searchsorted(spent, torch.tensor(float(param_budget), dtype=spent.dtype), right=True)
    )
    for idx in who[:n_prefix].tolist():
        ranks[names[idx]] += 1
    left = float(param_budget) - (float(spent[n_prefix - 1]) if n_prefix else 0.0)
    cost, who = cost[n_prefix:], who[n_prefix:]
    # Then the greedy's skip step: the next unit that still fits (only cheaper modules can), until none does.
    while cost.numel():
        fits = torch.nonzero(cost <= left)
        if fits.numel() == 0:
            break
        i = int(fits[0])
        ranks[names[int(who[i])]] += 1
        left -= float(cost[i])
        cost, who = cost[i + 1 :], who[i + 1 :]
    return ranks
