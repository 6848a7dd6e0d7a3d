"""Walk tuning vectors against their base, tensor by tensor, and compute each module's numbers.

Tensors are read one name at a time, in lockstep across the vectors: memory holds at most one base weight and one
τ per vector (plus their SVD factors). One SVD of each base weight serves every vector.

Per linear module (q/k/v/o/gate/up/down) of each vector:
  size        ‖τ‖_F, ‖W‖_F, ‖τ‖_F / ‖W‖_F
  spectrum    singular values of τ, effective rank, stable rank, energy captured at ranks 1..K
  alignment   shares of ‖τ‖² in W's top-k singular subspaces and the split amplification / rotation / mixed /
              new, each with its random-subspace baseline (analysis/alignment.py, docs/analysis-definitions.md)
  factor      τ ≈ B A at the rank holding ``factor_energy`` (randomized SVD), its measured error, and the exact
              reference from the full spectrum where that is computed
Embedding, head and norm tensors get size only. Cross-domain similarity is accumulated from the same stream.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tunevec.analysis.aggregate import LINEAR_ROLES
from tunevec.analysis.alignment import (
    W_ENERGY,
    alignment_from_directions,
    default_max_k,
    principal_directions,
)
from tunevec.analysis.similarity import SimilarityAccumulator
from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import TunevecError
from tunevec.core.linalg import (
    METHODS,
    effective_rank,
    energy_at_ranks,
    factorise,
    rank_for_energy,
    singular_values,
    sq_norm,
    stable_rank,
    top_svd,
)
from tunevec.core.roles import classify
from tunevec.core.vector import TuningVector

ENERGY_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ReportOptions:
    """Settings of one analysis run; recorded verbatim in the report's ``settings``."""

    svd: str = "randomized"  # randomized | full: SVD of W (alignment), of τ (spectrum) and the factorisation
    sketch: int = 256  # randomized: singular values of τ computed per module (the spectrum's length)
    full_svd_max_dim: int = 1024  # min(m, n) up to which W's and τ's SVDs are exact even with svd=randomized
    k: int | None = None  # alignment k; None: rank holding w_energy of ‖W‖², capped (see max_k)
    w_energy: float = W_ENERGY
    max_k: int = 256  # cap on the default k, on top of min(m, n) // 4
    factor_energy: float | None = 0.9  # factorisation: rank holding this share of ‖τ‖² per module
    param_budget: int | None = None  # factorisation: ranks allocated across modules within this many params
    factor_max_rank: int = 256  # sketch size of the randomized factorisation
    spectrum_keep: int = 64  # singular values / energy-curve points stored per module
    sigma_keep: int = 16  # Δσ_i/σ_i stored per module (i ≤ this)
    seed: int = 0
    layers: tuple[int, int] | None = (
        None  # decoder layers start..end-1 only (tensors outside any layer skipped)
    )
    progress: bool = True

    def __post_init__(self) -> None:
        if self.svd not in METHODS:
            raise TunevecError(f"--svd must be one of {METHODS}, got {self.svd!r}")
        if self.k is not None and self.k < 1:
            raise TunevecError(f"--k must be at least 1, got {self.k}")
        if not 0.0 < self.w_energy <= 1.0:
            raise TunevecError(f"--energy must be in (0, 1], got {self.w_energy}")
        if self.factor_energy is not None and not 0.0 < self.factor_energy <= 1.0:
            raise TunevecError(f"--factor-energy must be in (0, 1], got {self.factor_energy}")
        if self.param_budget is not None and self.param_budget < 0:
            raise TunevecError(f"--param-budget must be non-negative, got {self.param_budget}")
        if self.layers is not None and not 0 <= self.layers[0] < self.layers[1]:
            raise TunevecError(
                f"--layers START:END needs 0 <= START < END, got {self.layers[0]}:{self.layers[1]}"
            )
        for name in ("sketch", "max_k", "factor_max_rank", "spectrum_keep"):
            if getattr(self, name) < 1:
                raise TunevecError(f"{name} must be at least 1, got {getattr(self, name)}")

    def method_for(self, shape: Sequence[int]) -> str:
        """The SVD used for W and for τ's spectrum: exact for small matrices, where it is also the faster."""
        return "full" if self.svd == "full" or min(shape) <= self.full_svd_max_dim else "randomized"


# ---------------------------------------------------------------- opening and checking the inputs


def open_inputs(
    vector_paths: Sequence[str | os.PathLike[str]], base_path: str | os.PathLike[str]
) -> tuple[list[TuningVector], Checkpoint]:
    """Open the vectors and the base; refuse vectors that were not all extracted from this base."""
    if not vector_paths:
        raise TunevecError("give at least one tuning vector to analyse")
    vectors = [TuningVector(p) for p in vector_paths]
    names = [v.name for v in vectors]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TunevecError(f"vector names must be distinct, {dup} appears twice; re-extract with --name")
    first = vectors[0]
    for v in vectors[1:]:
        if v.manifest.base.get("fingerprint") != first.manifest.base.get("fingerprint"):
            raise TunevecError(
                f"vectors {first.name!r} ({first.path}) and {v.name!r} ({v.path}) were extracted from different "
                f"bases ({first.manifest.base.get('path')} vs {v.manifest.base.get('path')}); analyse together only "
                "vectors of one base"
            )
        if set(v.names()) != set(first.names()):
            raise TunevecError(f"vectors {first.name!r} and {v.name!r} cover different tensors")
    base = Checkpoint(base_path)
    for v in vectors:
        v.check_base(base)  # fingerprint, names and shapes against the base given
    return vectors, base


# ---------------------------------------------------------------- per module


def _spectrum(
    tau: torch.Tensor, total: float, opts: ReportOptions
) -> tuple[dict, torch.Tensor, bool, tuple | None]:
    """Spectrum numbers of one τ; returns (dict, singular values computed, whether they are all of them, and the
    randomized triplets when that is how they were computed, for the factorisation to reuse)."""
    dim = min(tau.shape)
    method = opts.method_for(tau.shape)
    triplets = None
    if total == 0:
        s = torch.zeros(min(dim, opts.spectrum_keep))
        complete = True
    elif method == "full":
        s, complete = singular_values(tau), True
    else:
        rank = min(opts.sketch, dim)
        triplets = top_svd(tau, rank, method="randomized", seed=opts.seed)
        s = triplets[1]
        complete = rank == dim
    curve_len = min(opts.spectrum_keep, s.numel())
    ks = [k for k in ENERGY_KS if k <= s.numel()]
    out = {
        "svd": method,
        "n_singular_values": int(s.numel()),
        "complete": complete,
        "singular_values": [float(x) for x in s[:curve_len]],
        "energy_curve": energy_at_ranks(s, list(range(1, curve_len + 1)), total_energy=total),
        "energy_at": dict(zip(map(str, ks), energy_at_ranks(s, ks, total_energy=total), strict=True)),
        # Exact over the full spectrum; over the top n_singular_values only when the spectrum is truncated.
        "effective_rank": effective_rank(s),
        # ‖τ‖_F² / σ_1² with the exact Frobenius norm, so a truncated spectrum does not bias it.
        "stable_rank": stable_rank(s) if complete else (total / float(s[0]) ** 2 if float(s[0]) > 0 else 0.0),
    }
    for target in (0.5, 0.9):
        try:
            out[f"rank_for_{int(target * 100)}"] = rank_for_energy(s, target, total_energy=total)
        except TunevecError:  # the sketch does not reach the target
            out[f"rank_for_{int(target * 100)}"] = None
    return out, s, complete, triplets


def _principal(W: torch.Tensor, opts: ReportOptions):
    """W's top-k singular triplets under the report's k rule (one SVD per base weight, shared by all vectors)."""
    dim = min(W.shape)
    method = opts.method_for(W.shape)
    if opts.k is not None:
        return principal_directions(W, min(opts.k, dim), method=method, seed=opts.seed)
    cap = min(default_max_k(tuple(W.shape)), opts.max_k)
    return principal_directions(W, None, energy=opts.w_energy, max_k=cap, method=method, seed=opts.seed)


def _factor(
    tau: torch.Tensor,
    s: torch.Tensor,
    complete: bool,
    total: float,
    opts: ReportOptions,
    triplets: tuple | None,
) -> dict:
    """τ ≈ B A at the rank holding factor_energy: measured error, and the exact optimum when s is complete.

    ``triplets``: the spectrum's randomized SVD of this τ; when the factorisation would compute the same one (same
    sketch size and seed: the defaults), it is reused."""
    # A sketch covering half the spectrum or more saves nothing over the exact SVD (and is slower).
    method = "full" if opts.svd == "full" or 2 * opts.factor_max_rank >= min(tau.shape) else "randomized"
    reuse = (
        triplets
        if method == "randomized"
        and triplets is not None
        and triplets[1].numel() == min(opts.factor_max_rank, min(tau.shape))
        else None
    )
    f = factorise(
        tau,
        energy=opts.factor_energy,
        method=method,
        max_rank=opts.factor_max_rank,
        seed=opts.seed,
        top=reuse,
    )
    out = {
        "method": method,
        "rank": f.rank,
        "rel_error": f.rel_error,
        "energy": f.energy,
        "reached": f.energy >= opts.factor_energy - 1e-9,
        "params": f.rank * (tau.shape[0] + tau.shape[1]),
    }
    if complete and total > 0:
        # Eckart–Young: the best rank-r error is √(1 − energy_at(r)); the exact rank for the target.
        best = energy_at_ranks(s, [f.rank], total_energy=total)[0]
        out["exact_rank"] = min(
            rank_for_energy(s, opts.factor_energy, total_energy=total), opts.factor_max_rank
        )
        out["optimal_rel_error"] = math.sqrt(max(0.0, 1.0 - best))
        out["energy_vs_optimal"] = f.energy / best if best > 0 else math.nan
    return out


# ---------------------------------------------------------------- the walk


@dataclass
class Walk:
    """What one pass over the tensors leaves: per vector (in ``vectors`` order) its linear module records, its
    other tensors' sizes and the singular values computed; the similarity accumulators per pair of vectors."""

    vectors: list[TuningVector]
    modules: list[dict[str, dict]]
    others: list[dict[str, dict]]
    spectra: list[dict[str, torch.Tensor]]
    similarity: dict[tuple[int, int], SimilarityAccumulator]
    timing: dict[str, float] = field(default_factory=dict)


def in_layers(layer: int | None, layers: tuple[int, int] | None) -> bool:
    """Whether a tensor of decoder layer ``layer`` (None: not in a layer) is inside ``layers`` = (start, end)."""
    return layers is None or (layer is not None and layers[0] <= layer < layers[1])


def walk(
    vectors: list[TuningVector],
    base: Checkpoint,
    opts: ReportOptions,
    device: torch.device | None = None,
) -> Walk:
    """Stream every tensor once, in lockstep across vectors, and compute each module's numbers on ``device``.

    Tensors travel to the device in their stored dtype and are converted there; what is kept (singular values,
    numbers) comes back to the host, so device memory holds one base weight, one τ per vector and their SVD
    factors at a time."""
    from tqdm import tqdm

    device = device if device is not None else torch.device("cpu")
    names = [n for n in vectors[0].names() if in_layers(classify(n, base.architecture).layer, opts.layers)]
    if not names:
        raise TunevecError(f"--layers {opts.layers[0]}:{opts.layers[1]} selects no tensor of the vectors")
    pairs = list(itertools.combinations(range(len(vectors)), 2))
    result = Walk(
        vectors=vectors,
        modules=[{} for _ in vectors],
        others=[{} for _ in vectors],
        spectra=[{} for _ in vectors],
        similarity={pair: SimilarityAccumulator() for pair in pairs},
        timing={
            "svd_w": 0.0,
            "spectrum": 0.0,
            "alignment": 0.0,
            "factor": 0.0,
            "similarity": 0.0,
            "read": 0.0,
        },
    )
    timing = result.timing

    streams = [v.stream(names) for v in vectors]
    bar = tqdm(names, desc="analyse", unit="tensor", disable=not opts.progress)
    for name in bar:
        t0 = time.perf_counter()
        taus = []
        for stream in streams:
            got, tau = next(stream)
            if got != name:  # all vectors list the same names; the stream follows the order asked for
                raise TunevecError(f"internal: expected tensor {name!r}, read {got!r}")
            taus.append(tau.to(device).float())
        role = classify(name)
        linear = role.role in LINEAR_ROLES and role.is_linear and taus[0].ndim == 2
        W = base.read(name).to(device).float() if linear else None
        timing["read"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        for (i, j), acc in result.similarity.items():
            acc.add(name, taus[i], taus[j])
        timing["similarity"] += time.perf_counter() - t0

        totals = [sq_norm(t) for t in taus]
        svd_w = None
        if linear and any(t > 0 for t in totals):
            t0 = time.perf_counter()
            svd_w = _principal(W, opts)
            timing["svd_w"] += time.perf_counter() - t0
        w_total = sq_norm(W) if linear else None

        for idx, (v, tau, total) in enumerate(zip(vectors, taus, totals, strict=True)):
            entry = v.manifest.tensors[name]
            rec = {
                "role": role.role,
                "layer": role.layer,
                "module": role.module,
                "shape": list(entry.shape),
                "norm": math.sqrt(total) if linear else entry.norm,
                "base_norm": math.sqrt(w_total) if linear else entry.base_norm,
            }
            rec["rel_change"] = rec["norm"] / rec["base_norm"] if rec["base_norm"] > 0 else math.nan
            if not linear:
                result.others[idx][name] = rec
                continue
            t0 = time.perf_counter()
            rec["spectrum"], s, complete, triplets = _spectrum(tau, total, opts)
            timing["spectrum"] += time.perf_counter() - t0
            result.spectra[idx][name] = s.cpu()
            if total > 0:
                t0 = time.perf_counter()
                rec["alignment"] = alignment_from_directions(
                    tau, *svd_w, w_total, tau_sq_norm=total, keep_sigma=opts.sigma_keep
                )
                timing["alignment"] += time.perf_counter() - t0
                if opts.factor_energy is not None:
                    t0 = time.perf_counter()
                    rec["factor"] = _factor(tau, s, complete, total, opts, triplets)
                    timing["factor"] += time.perf_counter() - t0
            result.modules[idx][name] = rec
        del taus, W, svd_w
        if device.type == "cuda":
            torch.cuda.synchronize(
                device
            )  # so the stage timings above count the device's work, not its queue
    bar.close()
    for stream in streams:
        stream.close()
    return result
