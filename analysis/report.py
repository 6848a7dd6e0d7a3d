"""`tunevec analyze`: stream tuning vectors against their base and build one JSON-ready report.

The math lives in the pure modules beside this one (decompose, alignment, similarity, representation); this
module only walks tensors and assembles numbers. Tensors are read one name at a time, in lockstep across the
vectors: memory holds at most one base weight and one τ per vector (plus their SVD factors).

Per linear module (q/k/v/o/gate/up/down) of each vector:
  size        ‖τ‖_F, ‖W‖_F, ‖τ‖_F / ‖W‖_F
  spectrum    singular values of τ, effective rank, stable rank, energy captured at ranks 1..K
  alignment   shares of ‖τ‖² in W's top-k singular subspaces and the split amplification / rotation / mixed /
              new, each with its random-subspace baseline (docs/analysis-definitions.md)
  factor      τ ≈ B A at the rank holding ``factor_energy`` (randomized SVD), its measured error, and the exact
              reference from the full spectrum where that is computed
Embedding, head and norm tensors get size only. Aggregates per role, per projection and per layer weight every
share by the module's ‖τ‖², so a group's share is the share of the group's total ‖τ‖² (and the baseline is the
expected share for isotropic τ with the same per-module energies). Cross-domain similarity is accumulated from
the same stream; representation change comes from analysis.probe.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tunevec.analysis.alignment import (
    W_ENERGY,
    default_max_k,
    principal_directions,
    split_energy,
    subspace_share,
)
from tunevec.analysis.similarity import SimilarityAccumulator

from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import TunevecError
from tunevec.core.linalg import (
    METHODS,
    allocate_ranks,
    effective_rank,
    energy_at_ranks,
    factorise,
    rank_for_energy,
    singular_values,
    sq_norm,
    stable_rank,
)
from tunevec.core.roles import classify
from tunevec.core.vector import TuningVector

REPORT_FORMAT = "tunevec.analysis-report"
REPORT_VERSION = 1
PARTS = ("amplification", "rotation", "mixed", "new")
SIDES = ("left", "right", "two_sided")
LINEAR_ROLES = ("attention", "mlp")
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
        for name in ("sketch", "max_k", "factor_max_rank", "spectrum_keep"):
            if getattr(self, name) < 1:
                raise TunevecError(f"{name} must be at least 1, got {getattr(self, name)}")

    def method_for(self, shape: Sequence[int]) -> str:
        """The SVD used for W and for τ's spectrum: exact for small matrices, where it is also the faster."""
        return "full" if self.svd == "full" or min(shape) <= self.full_svd_max_dim else "randomized"


# ---------------------------------------------------------------- opening and checking the inputs


def open_inputs(vector_paths: Sequence[str | os.PathLike[str]], base_path: str | os.PathLike[str]):
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


def _spectrum(tau: torch.Tensor, total: float, opts: ReportOptions) -> tuple[dict, torch.Tensor, bool]:
    """Spectrum numbers of one τ; returns (dict, singular values computed, whether they are all of them)."""
    dim = min(tau.shape)
    method = opts.method_for(tau.shape)
    if total == 0:
        s = torch.zeros(min(dim, opts.spectrum_keep))
        complete = True
    elif method == "full":
        s, complete = singular_values(tau), True
    else:
        rank = min(opts.sketch, dim)
        s = singular_values(tau, method="randomized", rank=rank, seed=opts.seed)
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
    return out, s, complete


def _principal(W: torch.Tensor, opts: ReportOptions):
    """W's top-k singular triplets under the report's k rule (one SVD per base weight, shared by all vectors)."""
    dim = min(W.shape)
    method = opts.method_for(W.shape)
    if opts.k is not None:
        return principal_directions(W, min(opts.k, dim), method=method, seed=opts.seed)
    cap = min(default_max_k(tuple(W.shape)), opts.max_k)
    return principal_directions(W, None, energy=opts.w_energy, max_k=cap, method=method, seed=opts.seed)


def _alignment(tau: torch.Tensor, U, S, V, w_total: float, total: float, opts: ReportOptions) -> dict:
    """The numbers of :func:`analysis.alignment.alignment_summary` for a W whose SVD is already computed.

    Same keys and formulas (tests check equality); split out so one SVD of W serves every vector.
    """
    out: dict = {
        "k": U.shape[1],
        "w_energy_at_k": float((S.double() ** 2).sum()) / w_total if w_total > 0 else math.nan,
        "tau_rel_norm": math.sqrt(total / w_total) if w_total > 0 else math.nan,
    }
    out.update(subspace_share(tau, U, V))
    split = split_energy(tau, U, S, V)
    rel = split.pop("rel_sigma_change")
    out.update(split)
    out["mean_rel_sigma_change"] = float(rel.nanmean())
    out["mean_abs_rel_sigma_change"] = float(rel.abs().nanmean())
    out["rel_sigma_change_top"] = [float(x) for x in rel[: opts.sigma_keep]]
    return out


def _factor(tau: torch.Tensor, s: torch.Tensor, complete: bool, total: float, opts: ReportOptions) -> dict:
    """τ ≈ B A at the rank holding factor_energy: measured error, and the exact optimum when s is complete."""
    # A sketch covering half the spectrum or more saves nothing over the exact SVD (and is slower).
    method = "full" if opts.svd == "full" or 2 * opts.factor_max_rank >= min(tau.shape) else "randomized"
    f = factorise(
        tau, energy=opts.factor_energy, method=method, max_rank=opts.factor_max_rank, seed=opts.seed
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


# ---------------------------------------------------------------- aggregation


def _wmean(items: list[tuple[float, float]]) -> float:
    """Σ w x / Σ w over finite x (NaN when no weight)."""
    num = sum(w * x for w, x in items if x is not None and math.isfinite(x))
    den = sum(w for w, x in items if x is not None and math.isfinite(x))
    return num / den if den > 0 else math.nan


def aggregate(modules: Iterable[dict]) -> dict:
    """Group numbers over module records; shares and baselines weighted by each module's ‖τ‖².

    A weighted share is the share of the group's total ‖τ‖² in that part; its baseline the expected share for
    isotropic τ with the same per-module energies; ratio = share / baseline.
    """
    mods = list(modules)
    tau_sq = sum(m["norm"] ** 2 for m in mods)
    base_sq = sum(m["base_norm"] ** 2 for m in mods)
    out: dict = {
        "n_modules": len(mods),
        "norm": math.sqrt(tau_sq),
        "base_norm": math.sqrt(base_sq),
        "rel_change": math.sqrt(tau_sq / base_sq) if base_sq > 0 else math.nan,
    }
    aligned = [m for m in mods if m.get("alignment")]
    if aligned:
        a: dict = {}
        w = [m["norm"] ** 2 for m in aligned]
        for key in [f"{p}_share" for p in PARTS] + [f"{s}_share" for s in SIDES]:
            base_key = key.replace("_share", "_baseline")
            share = _wmean([(wi, m["alignment"][key]) for wi, m in zip(w, aligned, strict=True)])
            baseline = _wmean([(wi, m["alignment"][base_key]) for wi, m in zip(w, aligned, strict=True)])
            a[key] = share
            a[base_key] = baseline
            a[key.replace("_share", "_ratio")] = share / baseline if baseline and baseline > 0 else math.nan
        a["mean_abs_rel_sigma_change"] = _wmean(
            [(1.0, m["alignment"]["mean_abs_rel_sigma_change"]) for m in aligned]
        )
        a["mean_rel_sigma_change"] = _wmean([(1.0, m["alignment"]["mean_rel_sigma_change"]) for m in aligned])
        a["mean_k"] = _wmean([(1.0, m["alignment"]["k"]) for m in aligned])
        a["mean_w_energy_at_k"] = _wmean([(1.0, m["alignment"]["w_energy_at_k"]) for m in aligned])
        out["alignment"] = a
    spec = [m for m in mods if m.get("spectrum") and m["norm"] > 0]
    if spec:
        w = [m["norm"] ** 2 for m in spec]
        ks = sorted({int(k) for m in spec for k in m["spectrum"]["energy_at"]})
        out["spectrum"] = {
            "mean_effective_rank": _wmean([(1.0, m["spectrum"]["effective_rank"]) for m in spec]),
            "mean_stable_rank": _wmean([(1.0, m["spectrum"]["stable_rank"]) for m in spec]),
            "energy_at": {
                str(k): _wmean(
                    [
                        (wi, m["spectrum"]["energy_at"].get(str(k), math.nan))
                        for wi, m in zip(w, spec, strict=True)
                    ]
                )
                for k in ks
            },
        }
    fac = [m for m in mods if m.get("factor")]
    if fac:
        resid = sum((m["factor"]["rel_error"] * m["norm"]) ** 2 for m in fac)
        fsq = sum(m["norm"] ** 2 for m in fac)
        out["factor"] = {
            "params": sum(m["factor"]["params"] for m in fac),
            "mean_rank": _wmean([(1.0, m["factor"]["rank"]) for m in fac]),
            "rel_error": math.sqrt(resid / fsq) if fsq > 0 else 0.0,
        }
    return out


def _layer_role(name: str) -> str:
    """Group key "layer/role" for linear modules, "-" for everything else."""
    r = classify(name)
    return f"{r.layer}/{r.role}" if r.role in LINEAR_ROLES and r.layer is not None else "-"


def _groups(modules: dict[str, dict]) -> dict:
    by_role: dict[str, list] = {}
    by_proj: dict[str, list] = {}
    by_layer: dict[str, dict[str, list]] = {}
    for m in modules.values():
        by_role.setdefault(m["role"], []).append(m)
        if m["module"]:
            by_proj.setdefault(m["module"], []).append(m)
        if m["layer"] is not None:
            layer = by_layer.setdefault(str(m["layer"]), {})
            layer.setdefault("all", []).append(m)
            layer.setdefault(m["role"], []).append(m)
    layers = sorted(by_layer, key=int)
    return {
        "by_role": {r: aggregate(ms) for r, ms in by_role.items()},
        "by_module": {p: aggregate(ms) for p, ms in by_proj.items()},
        "by_layer": {lay: {g: aggregate(ms) for g, ms in by_layer[lay].items()} for lay in layers},
        "linear": aggregate([m for m in modules.values() if m["role"] in LINEAR_ROLES]),
        "all": aggregate(modules.values()),
    }


def _budget(modules: dict[str, dict], spectra: dict[str, torch.Tensor], budget: int) -> dict:
    """Ranks within a parameter budget (allocate_ranks) and each module's error at its rank, from its spectrum.

    For an exact spectrum the error is Eckart–Young's √(1 − energy_at(r)); for a randomized sketch it is the error
    of factorising with that sketch (B A is an orthogonal projection of τ, capturing Σ_{i≤r} S_i² exactly).
    Ranks never exceed the singular values computed.
    """
    shapes = {n: tuple(modules[n]["shape"]) for n in spectra}
    ranks = allocate_ranks(spectra, shapes, param_budget=budget)
    per, resid, total, params = {}, 0.0, 0.0, 0
    for name, r in ranks.items():
        sq = modules[name]["norm"] ** 2
        captured = energy_at_ranks(spectra[name], [r], total_energy=sq)[0] if r else (1.0 if sq == 0 else 0.0)
        err = math.sqrt(max(0.0, 1.0 - captured))
        per[name] = {"rank": r, "rel_error": err, "params": r * sum(shapes[name])}
        resid += err**2 * sq
        total += sq
        params += per[name]["params"]
    return {
        "param_budget": budget,
        "params_used": params,
        "rel_error": math.sqrt(resid / total) if total > 0 else 0.0,
        "energy": 1.0 - resid / total if total > 0 else 1.0,
        "modules": per,
    }


# ---------------------------------------------------------------- the report


def analyse_weights(vectors: list[TuningVector], base: Checkpoint, opts: ReportOptions) -> tuple[dict, dict]:
    """Stream every tensor once, in lockstep across vectors; returns (per-vector results, cross-domain)."""
    from tqdm import tqdm

    names = vectors[0].names()
    pairs = list(itertools.combinations(range(len(vectors)), 2))
    accs = {pair: SimilarityAccumulator() for pair in pairs}
    modules: list[dict[str, dict]] = [{} for _ in vectors]
    others: list[dict[str, dict]] = [{} for _ in vectors]
    spectra: list[dict[str, torch.Tensor]] = [{} for _ in vectors]
    timing = {"svd_w": 0.0, "spectrum": 0.0, "alignment": 0.0, "factor": 0.0, "similarity": 0.0, "read": 0.0}

    streams = [v.stream(names) for v in vectors]
    bar = tqdm(names, desc="analyse", unit="tensor", disable=not opts.progress)
    for name in bar:
        t0 = time.perf_counter()
        taus = []
        for stream in streams:
            got, tau = next(stream)
            if got != name:  # all vectors list the same names; the stream follows the order asked for
                raise TunevecError(f"internal: expected tensor {name!r}, read {got!r}")
            taus.append(tau.float())
        role = classify(name)
        linear = role.role in LINEAR_ROLES and role.is_linear and taus[0].ndim == 2
        W = base.read(name).float() if linear else None
        timing["read"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        for (i, j), acc in accs.items():
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
                others[idx][name] = rec
                continue
            t0 = time.perf_counter()
            rec["spectrum"], s, complete = _spectrum(tau, total, opts)
            timing["spectrum"] += time.perf_counter() - t0
            spectra[idx][name] = s
            if total > 0:
                t0 = time.perf_counter()
                rec["alignment"] = _alignment(tau, *svd_w, w_total, total, opts)
                timing["alignment"] += time.perf_counter() - t0
                if opts.factor_energy is not None:
                    t0 = time.perf_counter()
                    rec["factor"] = _factor(tau, s, complete, total, opts)
                    timing["factor"] += time.perf_counter() - t0
            modules[idx][name] = rec
        del taus, W, svd_w
    bar.close()
    for stream in streams:
        stream.close()

    results = {}
    for idx, v in enumerate(vectors):
        res = {
            "name": v.name,
            "path": str(v.path.resolve()),
            "tuned": v.manifest.tuned,
            "modules": modules[idx],
            "other_tensors": others[idx],
            **_groups({**modules[idx], **others[idx]}),
        }
        res["linear_by_role"] = {r: res["by_role"][r] for r in LINEAR_ROLES if r in res["by_role"]}
        if opts.param_budget is not None:
            res["budget"] = _budget(modules[idx], spectra[idx], opts.param_budget)
        results[v.name] = res

    cross = {"names": [v.name for v in vectors], "pairs": []}
    n = len(vectors)
    matrix = [[1.0 if i == j else math.nan for j in range(n)] for i in range(n)]
    sign_matrix = [[1.0 if i == j else math.nan for j in range(n)] for i in range(n)]
    for (i, j), acc in accs.items():
        overall = acc.overall()
        lin_acc = {nm: d for nm, d in acc.per_module().items() if classify(nm).role in LINEAR_ROLES}
        cross["pairs"].append(
            {
                "a": vectors[i].name,
                "b": vectors[j].name,
                "overall": overall,
                "by_role": acc.grouped(lambda nm: classify(nm).role),
                "by_module": acc.grouped(lambda nm: classify(nm).module or classify(nm).role),
                "by_layer_role": acc.grouped(_layer_role),
                "per_module": lin_acc,
            }
        )
        matrix[i][j] = matrix[j][i] = overall["cosine"]
        sign_matrix[i][j] = sign_matrix[j][i] = overall["sign_agreement"]
    cross["cosine_matrix"] = matrix
    cross["sign_agreement_matrix"] = sign_matrix
    return results, {"cross_domain": cross, "timing_seconds": {k: round(t, 3) for k, t in timing.items()}}


def build_report(
    vector_paths: Sequence[str | os.PathLike[str]],
    base_path: str | os.PathLike[str],
    *,
    options: ReportOptions | None = None,
    probe_texts: list[dict] | None = None,
    probe_source: str | None = None,
    tuned_paths: Sequence[str | os.PathLike[str]] | None = None,
    probe_settings: dict | None = None,
) -> dict:
    """The whole analysis as a JSON-ready dict (NaN kept as float; :func:`to_json` turns it into null).

    ``probe_texts`` ({"domain", "text"} records) switches on the representation probe; the tuned models come
    from each vector's manifest (``tuned.path``) unless ``tuned_paths`` (one per vector) overrides them.
    """
    opts = options or ReportOptions()
    started = time.perf_counter()
    vectors, base = open_inputs(vector_paths, base_path)
    vectors_res, extra = analyse_weights(vectors, base, opts)
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {
            "path": str(base.path.resolve()),
            "fingerprint": base.fingerprint(),
            "architecture": base.architecture,
        },
        "settings": asdict(opts),
        "definitions": DEFINITIONS,
        "vectors": vectors_res,
        "cross_domain": extra["cross_domain"],
        "representation": None,
        "timing_seconds": extra["timing_seconds"],
    }
    if probe_texts:
        from tunevec.analysis.probe import ProbeSettings, representation_change

        if tuned_paths is not None and len(tuned_paths) != len(vectors):
            raise TunevecError(
                f"--tuned names {len(tuned_paths)} models for {len(vectors)} vectors; give one each"
            )
        tuned = {}
        for idx, v in enumerate(vectors):
            path = Path(tuned_paths[idx]) if tuned_paths else Path(v.manifest.tuned.get("path", ""))
            if not (path / "config.json").exists():
                raise TunevecError(
                    f"tuned model of vector {v.name!r} not found at {path} (from its manifest); pass --tuned, "
                    "or --no-probe to skip the representation probe"
                )
            tuned[v.name] = path
        t0 = time.perf_counter()
        settings = ProbeSettings(**(probe_settings or {}))
        report["representation"] = representation_change(base.path, tuned, probe_texts, settings)
        report["representation"]["source"] = probe_source
        report["timing_seconds"]["probe"] = round(time.perf_counter() - t0, 3)
    report["timing_seconds"]["total"] = round(time.perf_counter() - started, 3)
    return report


DEFINITIONS = {
    "rel_change": "‖τ‖_F / ‖W‖_F (groups: √Σ‖τ‖² / √Σ‖W‖²)",
    "effective_rank": "exp(H(p)), p_i = σ_i / Σ σ_j over the singular values computed (all of them when "
    "spectrum.complete)",
    "stable_rank": "‖τ‖_F² / σ_1²",
    "energy_at": "Σ_{i≤r} σ_i² / ‖τ‖_F² (share kept by the best rank-r approximation)",
    "k": "alignment subspace size: given by --k, else the smallest rank holding --energy of ‖W‖_F², capped at "
    "min(m, n) // 4 and --max-k",
    "left/right/two_sided_share": "‖U_kᵀτ‖² / ‖τ‖², ‖τV_k‖² / ‖τ‖², ‖U_kᵀτV_k‖² / ‖τ‖²; baselines k/m, k/n, k²/(mn)",
    "amplification_share": "Σ_{i≤k} (u_iᵀ τ v_i)² / ‖τ‖²: change of W's own singular values along their pairs; "
    "baseline k/(mn)",
    "rotation_share": "(‖U_kᵀτV_k‖² − Σ_i (u_iᵀτv_i)²) / ‖τ‖²; baseline k(k−1)/(mn)",
    "mixed_share": "(‖PτQ⊥‖² + ‖P⊥τQ‖²) / ‖τ‖²; baseline k(m+n−2k)/(mn)",
    "new_share": "‖P⊥τQ⊥‖² / ‖τ‖²: energy orthogonal to W's principal subspaces; baseline (m−k)(n−k)/(mn)",
    "rel_sigma_change": "Δσ_i/σ_i = u_iᵀ τ v_i / σ_i for i ≤ k (first-order change of W's singular values)",
    "group_share": "groups weight each module's share by its ‖τ‖² (the share of the group's total ‖τ‖²); "
    "baselines are weighted the same way; ratio = share / baseline",
    "factor": "τ ≈ B A, B = U_r√S_r, A = √S_r V_rᵀ, r the smallest rank holding --factor-energy of ‖τ‖² "
    "(sketch ≤ factor_max_rank); rel_error = ‖τ − BA‖_F / ‖τ‖_F measured",
    "cosine": "⟨a, b⟩ / (‖a‖ ‖b‖) over the entries compared; groups: cosine of the concatenated tensors",
    "sign_agreement": "entries with the same sign among those non-zero in both",
    "cka": "linear CKA of token-level hidden states (pad-masked) of base vs tuned on the probe texts",
    "principal_angles": "angles between the top-k PCA subspaces of base and tuned hidden states",
    "dims_for_energy": "principal components of the centred change ΔH = H_tuned − H_base holding 90% of its "
    "variance",
}


def to_json(obj):
    """``obj`` with NaN/inf as None and tensors as lists, so the JSON is strict (no NaN literals)."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_json(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_report(report: dict, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write report.json, the PNG plots and summary.md into ``out``; returns the paths written."""
    import json

    from tunevec.analysis.plots import write_plots
    from tunevec.analysis.summary import summary_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json"}
    clean = to_json(report)
    paths["json"].write_text(json.dumps(clean, indent=1, ensure_ascii=False, allow_nan=False))
    plots = write_plots(clean, out)
    paths.update(plots)
    paths["markdown"] = out / "summary.md"
    paths["markdown"].write_text(summary_markdown(clean, {k: p.name for k, p in plots.items()}))
    return paths
