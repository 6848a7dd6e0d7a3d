"""The Markdown summary of an analysis report: the findings stated in numbers, then the tables behind them."""

from __future__ import annotations

import math

from tunevec.analysis.aggregate import LINEAR_ROLES


def _f(x, spec: str = ".3g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _pct(x, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.{digits}f}%"


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.3g}×"


def _alignment_lines(vec: dict) -> list[str]:
    roles = vec.get("linear_by_role", {})
    lines = []
    for role in LINEAR_ROLES:
        a = roles.get(role, {}).get("alignment")
        if not a:
            continue
        lines.append(
            f"- **{role}**: {_pct(a['new_share'])} of ‖τ‖² in new directions (orthogonal to W's top-k subspaces on "
            f"both sides) vs {_pct(a['new_baseline'])} random baseline ({_ratio(a['new_ratio'])}); amplification "
            f"share {_f(a['amplification_share'])} vs baseline {_f(a['amplification_baseline'])} "
            f"({_ratio(a['amplification_ratio'])}); inside both subspaces (two-sided) {_pct(a['two_sided_share'])} "
            f"vs {_pct(a['two_sided_baseline'], 2)} ({_ratio(a['two_sided_ratio'])}); left {_ratio(a['left_ratio'])}, "
            f"right {_ratio(a['right_ratio'])}; mean |Δσ_i/σ_i| over i ≤ k {_f(a['mean_abs_rel_sigma_change'])} "
            f"(signed {_f(a['mean_rel_sigma_change'])}); mean k {_f(a['mean_k'], '.1f')} holding "
            f"{_pct(a['mean_w_energy_at_k'])} of ‖W‖²."
        )
    mlp, att = (roles.get(r, {}).get("alignment") for r in ("mlp", "attention"))
    if mlp and att:
        lines.append("- " + pattern_verdict(mlp, att))
    return lines


NEW_MARGIN_PP = (
    2.0  # MLP's excess of new-direction share over its baseline must beat attention's by this (pp)
)
AMP_FACTOR = 1.25  # attention's amplification ratio must exceed MLP's by this factor


def pattern_verdict(mlp: dict, att: dict) -> str:
    """Whether "MLP writes new directions, attention amplifies existing ones" holds, with the criteria stated.

    New directions are compared as excess over baseline in percentage points (the ratio cannot exceed
    1 / baseline, which is near 1 for large matrices); amplification as share / baseline.
    """
    vals = (mlp["new_share"], mlp["new_baseline"], att["new_share"], att["new_baseline"])
    amps = (mlp["amplification_ratio"], att["amplification_ratio"])
    if any(v is None or not math.isfinite(v) for v in (*vals, *amps)):
        return "Pattern check skipped: a role has no alignment numbers."
    new_mlp, new_att = 100 * (vals[0] - vals[1]), 100 * (vals[2] - vals[3])
    new_ok = new_mlp - new_att >= NEW_MARGIN_PP
    amp_ok = amps[1] >= AMP_FACTOR * amps[0]
    new_rev = new_att - new_mlp >= NEW_MARGIN_PP
    amp_rev = amps[0] >= AMP_FACTOR * amps[1]
    if new_ok and amp_ok:
        verdict = "holds"
    elif new_ok or amp_ok:
        verdict = "holds in part"
    elif new_rev or amp_rev:
        verdict = "does not hold (the difference goes the other way)"
    else:
        verdict = "is not distinguishable (MLP and attention within the margins)"
    return (
        f'Pattern "MLP writes new directions, attention amplifies existing ones" {verdict}: new-direction share '
        f"over baseline MLP {new_mlp:+.1f} pp vs attention {new_att:+.1f} pp (needs ≥ {NEW_MARGIN_PP:g} pp more in "
        f"MLP); amplification ratio attention {amps[1]:.3g}× vs MLP {amps[0]:.3g}× (needs ≥ {AMP_FACTOR:g}× more in "
        "attention)."
    )


def _vector_section(vec: dict, settings: dict) -> list[str]:
    lines = [f"### {vec['name']}", ""]
    lin, roles = vec["linear"], vec.get("linear_by_role", {})
    size = "; ".join(
        f"{r} {_f(roles[r]['rel_change'])} (‖τ‖ {_f(roles[r]['norm'])})" for r in LINEAR_ROLES if r in roles
    )
    live = [g["all"] for g in vec["by_layer"].values() if g.get("all", {}).get("norm", 0) > 0]
    partial = ""
    if 0 < len(live) < len(vec["by_layer"]):
        rel = math.sqrt(sum(g["norm"] ** 2 for g in live) / sum(g["base_norm"] ** 2 for g in live))
        partial = f"; over the {len(live)} of {len(vec['by_layer'])} layers with τ ≠ 0: {_f(rel)}"
    lines.append(
        f"- **Size**: linear layers ‖τ‖_F = {_f(lin['norm'])}, relative change ‖τ‖/‖W‖ = {_f(lin['rel_change'])} "
        f"({size}){partial}; all tensors {_f(vec['all']['rel_change'])}."
    )
    for role in LINEAR_ROLES:
        sp = roles.get(role, {}).get("spectrum")
        if sp:
            e = sp["energy_at"]
            at = ", ".join(f"r={k}: {_pct(e[k])}" for k in ("1", "8", "64") if k in e)
            lines.append(
                f"- **Low rank, {role}**: energy captured at {at}; mean effective rank {_f(sp['mean_effective_rank'])}, "
                f"mean stable rank {_f(sp['mean_stable_rank'])}."
            )
    lines += _alignment_lines(vec)
    fac = {r: roles[r].get("factor") for r in LINEAR_ROLES if r in roles and roles[r].get("factor")}
    if fac:
        exact = [
            m["factor"]
            for m in vec["modules"].values()
            if m.get("factor", {}).get("optimal_rel_error") is not None
        ]
        ref = ""
        if exact:
            worst = max(m["energy_vs_optimal"] for m in exact if m["energy_vs_optimal"] is not None)
            best = min(m["energy_vs_optimal"] for m in exact if m["energy_vs_optimal"] is not None)
            same = sum(m["rank"] == m["exact_rank"] for m in exact)
            ref = (
                f" Against the exact SVD ({len(exact)} modules): same rank in {same}, captured energy "
                f"{_pct(best, 2)}–{_pct(worst, 2)} of the optimum at that rank."
            )
        parts = "; ".join(
            f"{r}: mean rank {_f(f['mean_rank'], '.1f')}, {f['params']:,} params, error {_f(f['rel_error'])}"
            for r, f in fac.items()
        )
        methods = [m["factor"]["method"] for m in vec["modules"].values() if m.get("factor")]
        how = ", ".join(f"{meth} SVD for {methods.count(meth)} modules" for meth in sorted(set(methods)))
        lines.append(
            f"- **Factorisation** at {_pct(settings['factor_energy'], 0)} energy per module ({how}; randomized "
            f"sketch ≤ {settings['factor_max_rank']}): {parts}.{ref}"
        )
    if vec.get("budget"):
        b = vec["budget"]
        lines.append(
            f"- **Budget** {b['param_budget']:,} params: used {b['params_used']:,}, captured {_pct(b['energy'])} of "
            f"‖τ‖², relative error {_f(b['rel_error'])}."
        )
    lines.append("")
    return lines


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> "0–2, 5"."""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}–{x}")
            start = None
    return ", ".join(out)


def _layer_table(vec: dict) -> list[str]:
    lines = [
        f"#### {vec['name']} per layer",
        "",
        "| layer | role | ‖τ‖/‖W‖ | new share (baseline) | amplification (ratio) | two-sided ratio | eff. rank | energy r=8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    frozen = []
    for lay in sorted(vec["by_layer"], key=int):
        if vec["by_layer"][lay].get("all", {}).get("norm", 1.0) == 0:
            frozen.append(lay)
            continue
        for role in LINEAR_ROLES:
            g = vec["by_layer"][lay].get(role)
            if not g:
                continue
            a, sp = g.get("alignment") or {}, g.get("spectrum") or {}
            lines.append(
                f"| {lay} | {role} | {_f(g['rel_change'])} | {_pct(a.get('new_share'))} "
                f"({_pct(a.get('new_baseline'))}) | {_f(a.get('amplification_share'))} "
                f"({_ratio(a.get('amplification_ratio'))}) | {_ratio(a.get('two_sided_ratio'))} | "
                f"{_f(sp.get('mean_effective_rank'))} | {_pct((sp.get('energy_at') or {}).get('8'))} |"
            )
    if frozen:
        lines += ["", f"τ = 0 (untouched by the fine-tune) in layers {_ranges([int(x) for x in frozen])}."]
    lines.append("")
    return lines


def _representation(rep: dict) -> list[str]:
    lines = [
        "## Representation change",
        "",
        f"{rep['n_texts']} probe texts ({rep.get('source') or 'probe'}), {rep['n_tokens']} tokens "
        f"(per domain: {', '.join(f'{d} {n}' for d, n in rep['domains'].items())}), hidden size "
        f"{rep['hidden_size']}, principal angles over the top {rep['angle_k']} PCA directions. {rep['layer_note']}.",
        "",
    ]
    for name, vec in rep["vectors"].items():
        s = vec["summary"]
        lay = s["min_cka_layer"]
        dom = ", ".join(f"{d} {_f(v[lay], '.4f')}" for d, v in vec["by_domain"].items())
        lines.append(
            f"- **{name}**: lowest CKA {_f(s['min_cka'], '.4f')} at layer {lay} (per domain: {dom}); last layer "
            f"{_f(s['final_cka'], '.4f')}; mean over layers {_f(s['mean_cka'], '.4f')}; largest mean principal angle "
            f"{_f(s['max_mean_angle_deg'], '.2f')}°; at most {s['max_dims_for_energy']} of {rep['hidden_size']} "
            f"dimensions hold 90% of the (centred) change; ‖ΔH‖/‖H‖ at most {_f(s['max_rel_change'])}."
        )
    lines += [
        "",
        "| vector | layer | CKA | 1 − CKA | mean angle ° | dims for 90% | top-1 share | mean-shift share | ‖ΔH‖/‖H‖ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, vec in rep["vectors"].items():
        same = []
        for row in vec["layers"]:
            if row["rel_change"] == 0:
                same.append(row["layer"])
                continue
            gap = None if row["cka"] is None else 1.0 - row["cka"]
            lines.append(
                f"| {name} | {row['layer']} | {_f(row['cka'], '.4f')} | {_f(gap, '.2e')} | "
                f"{_f(row['mean_angle_deg'], '.2f')} | {row['dims_for_energy']} | {_pct(row['top1_share'])} | "
                f"{_pct(row['mean_shift_share'])} | {_f(row['rel_change'])} |"
            )
        if same:
            lines.append(f"| {name} | {_ranges(same)} | identical hidden states (ΔH = 0) | | | | | | |")
    lines.append("")
    return lines


def _cross(cross: dict) -> list[str]:
    lines = ["## Cross-domain similarity", ""]
    if not cross["pairs"]:
        return [*lines, "One vector only: nothing to compare.", ""]
    for p in cross["pairs"]:
        o, roles = p["overall"], p["by_role"]
        per_role = "; ".join(
            f"{r} {_f(roles[r]['cosine'], '.4f')} (signs {_pct(roles[r]['sign_agreement'])})" for r in roles
        )
        lines.append(
            f"- **{p['a']} vs {p['b']}**: cosine {_f(o['cosine'], '.4f')}, sign agreement "
            f"{_pct(o['sign_agreement'])} (0.5 = chance; {_pct(o['both_nonzero_share'])} of entries non-zero in both); "
            f"by role: {per_role}."
        )
    lines.append("")
    return lines


def summary_markdown(report: dict, plots: dict[str, str]) -> str:
    """The findings in numbers, per vector, then representation change, cross-domain, definitions and tables."""
    st = report["settings"]
    k_rule = (
        f"k = {st['k']} (fixed)"
        if st["k"] is not None
        else f"k = smallest rank holding {_pct(st['w_energy'], 0)} of ‖W‖_F², capped at min(m, n)//4 and {st['max_k']}"
    )
    lines = [
        "# Tuning-vector analysis",
        "",
        f"Base `{report['base']['path']}` ({report['base']['architecture']}, fingerprint "
        f"`{report['base']['fingerprint'][:12]}`); vectors: "
        + ", ".join(f"`{n}`" for n in report["vectors"])
        + f". SVD: {st['svd']} (exact below min(m, n) ≤ {st['full_svd_max_dim']}; τ spectra sketch {st['sketch']}). "
        f"Alignment: {k_rule}. Shares are of ‖τ‖_F², per group weighted by each module's ‖τ‖², and are compared with "
        "the share a random subspace / isotropic τ would get (ratio = share / baseline). Definitions: "
        "docs/analysis-definitions.md and the list at the end.",
        "",
        "## Findings per vector",
        "",
    ]
    for vec in report["vectors"].values():
        lines += _vector_section(vec, st)
    if report.get("representation"):
        lines += _representation(report["representation"])
    lines += _cross(report["cross_domain"])
    lines += ["## Plots", ""] + [f"- {kind}: ![{kind}]({name})" for kind, name in plots.items()] + [""]
    lines += ["## Per-layer tables", ""]
    for vec in report["vectors"].values():
        lines += _layer_table(vec)
    lines += ["## Definitions", ""] + [f"- `{k}`: {v}" for k, v in report["definitions"].items()]
    t = report.get("timing_seconds", {})
    lines += ["", f"Timing (s): {', '.join(f'{k} {v}' for k, v in t.items())}.", ""]
    return "\n".join(lines)
