"""`tunevec analyze`: the analysis of tuning vectors against their base, as one JSON-ready report.

The report is assembled in three steps, one module each, over the pure math beside them (alignment, similarity,
representation, ``tunevec.core.linalg``):

- ``analysis/walk.py``: stream the tensors in lockstep across the vectors and compute each module's numbers
  (size, spectrum, alignment with the base weight, factorisation) and the cross-domain sums;
- ``analysis/aggregate.py``: group them per role, projection and layer, weighting every share by the module's
  ‖τ‖² (a group's share is the share of the group's total ‖τ‖², with the baseline weighted the same way), ranks
  within a parameter budget, and the similarity matrices;
- ``analysis/output.py``: report.json, the plots and summary.md.

Representation change comes from ``analysis/probe.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from tunevec.analysis.aggregate import cross_domain, vector_results
from tunevec.analysis.meter import Meter
from tunevec.analysis.walk import ReportOptions, open_inputs, walk
from tunevec.core.errors import TunevecError

REPORT_FORMAT = "tunevec.analysis-report"
REPORT_VERSION = 1


def build_report(
    vector_paths: Sequence[str | os.PathLike[str]],
    base_path: str | os.PathLike[str],
    *,
    options: ReportOptions | None = None,
    probe_texts: list[dict] | None = None,
    probe_source: str | None = None,
    tuned_paths: Sequence[str | os.PathLike[str]] | None = None,
    probe_settings: dict | None = None,
    device: torch.device | None = None,
    meter: Meter | None = None,
) -> dict:
    """The whole analysis as a JSON-ready dict (NaN kept as float; ``analysis.output.to_json`` turns it into null).

    ``probe_texts`` ({"domain", "text"} records) switches on the representation probe. Its tuned models are base
    + τ of each vector, streamed into the resident base model; ``tuned_paths`` (one per vector) names tuned
    checkpoints to stream in instead. ``device`` is where every tensor is computed (default cpu); ``meter``
    records each stage's time and peak memory (``report["resources"]``).
    """
    opts = options or ReportOptions()
    device = device if device is not None else torch.device("cpu")
    meter = meter if meter is not None else Meter(device)
    started = time.perf_counter()
    with meter.stage("open"):
        vectors, base = open_inputs(vector_paths, base_path)
        for v in vectors:
            v.ensure_verified()  # a vector's first read hashes it all; counted here, not as the walk's reading
    with meter.stage("weights"):
        walked = walk(vectors, base, opts, device)
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {
            "path": str(base.path.resolve()),
            "fingerprint": base.fingerprint(),
            "architecture": base.architecture,
        },
        "settings": {**asdict(opts), "device": str(device)},
        "definitions": DEFINITIONS,
        "vectors": vector_results(walked, opts.param_budget),
        "cross_domain": cross_domain(walked),
        "representation": None,
        "timing_seconds": {k: round(t, 3) for k, t in walked.timing.items()},
    }
    if probe_texts:
        from tunevec.analysis.probe import ProbeSettings, representation_change

        if tuned_paths is not None and len(tuned_paths) != len(vectors):
            raise TunevecError(
                f"--tuned names {len(tuned_paths)} models for {len(vectors)} vectors; give one each"
            )
        tuned: dict = {}
        for idx, v in enumerate(vectors):
            if tuned_paths is None:
                tuned[v.name] = v  # base + τ, streamed from the vector
                continue
            path = Path(tuned_paths[idx])
            if not (path / "config.json").exists():
                raise TunevecError(
                    f"--tuned {path} (for vector {v.name!r}) is not a model folder; leave --tuned out to probe "
                    "base + tau, or pass --no-probe"
                )
            tuned[v.name] = path
        t0 = time.perf_counter()
        settings = ProbeSettings(**(probe_settings or {}))
        with meter.stage("probe"):
            report["representation"] = representation_change(
                base.path, tuned, probe_texts, settings, device=device, layers=opts.layers
            )
        report["representation"]["source"] = probe_source
        report["timing_seconds"]["probe"] = round(time.perf_counter() - t0, 3)
    report["timing_seconds"]["total"] = round(time.perf_counter() - started, 3)
    report["resources"] = meter.as_dict()
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
    "cka": "linear CKA of token-level hidden states (pad-masked) of base vs tuned (base + τ unless --tuned names "
    "checkpoints) on the probe texts",
    "principal_angles": "angles between the top-k PCA subspaces of base and tuned hidden states",
    "dims_for_energy": "principal components of the centred change ΔH = H_tuned − H_base holding 90% of its "
    "variance",
}
