"""Aggregate the per-module numbers of an analysis into groups: per role, projection and layer, the linear modules
and everything; ranks within a parameter budget; the cross-domain similarity matrices.

Every share is weighted by each module's ‖τ‖², so a group's share is the share of the group's total ‖τ‖² (and its
baseline the expected share for isotropic τ with the same per-module energies).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from tunevec.core.linalg import allocate_ranks, energy_at_ranks
from tunevec.core.roles import classify

if TYPE_CHECKING:
    from tunevec.analysis.walk import Walk

PARTS = ("amplification", "rotation", "mixed", "new")
SIDES = ("left", "right", "two_sided")
LINEAR_ROLES = ("attention", "mlp")  # the roles whose 2-D weights get spectrum, alignment and factor numbers


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


def groups(modules: dict[str, dict]) -> dict:
    """One vector's module records aggregated by role, projection, layer (and role within it), linear, all."""
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


def budget(modules: dict[str, dict], spectra: dict[str, torch.Tensor], param_budget: int) -> dict:
    """Ranks within a parameter budget (allocate_ranks) and each module's error at its rank, from its spectrum.

    For an exact spectrum the error is Eckart–Young's √(1 − energy_at(r)); for a randomized sketch it is the error
    of factorising with that sketch (B A is an orthogonal projection of τ, capturing Σ_{i≤r} S_i² exactly).
    Ranks never exceed the singular values computed.
    """
    shapes = {n: tuple(modules[n]["shape"]) for n in spectra}
    ranks = allocate_ranks(spectra, shapes, param_budget=param_budget)
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
        "param_budget": param_budget,
        "params_used": params,
        "rel_error": math.sqrt(resid / total) if total > 0 else 0.0,
        "energy": 1.0 - resid / total if total > 0 else 1.0,
        "modules": per,
    }


def vector_results(walk: Walk, param_budget: int | None) -> dict[str, dict]:
    """Per vector: its module records, the tensors with size only, and every group aggregate."""
    results = {}
    for idx, v in enumerate(walk.vectors):
        res = {
            "name": v.name,
            "path": str(v.path.resolve()),
            "tuned": v.manifest.tuned,
            "modules": walk.modules[idx],
            "other_tensors": walk.others[idx],
            **groups({**walk.modules[idx], **walk.others[idx]}),
        }
        res["linear_by_role"] = {r: res["by_role"][r] for r in LINEAR_ROLES if r in res["by_role"]}
        if param_budget is not None:
            res["budget"] = budget(walk.modules[idx], walk.spectra[idx], param_budget)
        results[v.name] = res
    return results


def cross_domain(walk: Walk) -> dict:
    """Every pair of vectors: cosine and sign agreement overall and by role, projection, layer and module, and
    the matrices of both."""
    vectors = walk.vectors
    cross: dict = {"names": [v.name for v in vectors], "pairs": []}
    n = len(vectors)
    matrix = [[1.0 if i == j else math.nan for j in range(n)] for i in range(n)]
    sign_matrix = [[1.0 if i == j else math.nan for j in range(n)] for i in range(n)]
    for (i, j), acc in walk.similarity.items():
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
    return cross
