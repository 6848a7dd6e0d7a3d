"""PNG plots of an analysis report (matplotlib, Agg backend; the input is the JSON-clean report dict).

spectra.png        cumulative energy of τ's spectrum vs rank, per module (thin) and per role (thick), per vector
alignment.png      per layer, MLP vs attention: new-direction share and amplification ratio, with baselines
size.png           relative change ‖τ‖/‖W‖ per layer, MLP vs attention
cka.png            representation change per layer: CKA, mean principal angle, dimensions of the change
cross_domain.png   cosine between vectors (matrix) and per layer for MLP vs attention
attribution.png    attribution patching (analysis/attribution.py): recovered gain vs k, top-k vs random-k, and
                   the per-component estimate next to the measured effect of removing the component
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter  # noqa: E402

ROLE_STYLE = {"mlp": {"color": "tab:red", "ls": "-"}, "attention": {"color": "tab:blue", "ls": "--"}}
DPI = 110


def _num(x) -> float:
    return math.nan if x is None else float(x)


def _layers(vec: dict) -> list[int]:
    return sorted(int(k) for k in vec["by_layer"])


def _per_layer(vec: dict, role: str, path: tuple[str, ...]) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for lay in _layers(vec):
        node = vec["by_layer"][str(lay)].get(role)
        for key in path:
            node = None if node is None else node.get(key)
        xs.append(lay)
        ys.append(_num(node))
    return xs, ys


def _layer_axis(ax, label: str = "layer") -> None:
    """An x axis of layer indices: integer ticks and a light grid, the same on every per-layer plot."""
    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_spectra(report: dict, path: Path) -> Path:
    vecs = list(report["vectors"].values())
    fig, axes = plt.subplots(1, len(vecs), figsize=(5.2 * len(vecs), 4.2), squeeze=False)
    for ax, vec in zip(axes[0], vecs, strict=True):
        curves: dict[str, list[list[float]]] = {}
        for m in vec["modules"].values():
            curve = m["spectrum"]["energy_curve"]
            if not curve or m["norm"] == 0:
                continue
            st = ROLE_STYLE.get(m["role"], {"color": "gray", "ls": ":"})
            ax.plot(range(1, len(curve) + 1), curve, color=st["color"], alpha=0.18, lw=0.8)
            curves.setdefault(m["role"], []).append(curve)
        for role, cs in curves.items():
            n = min(len(c) for c in cs)
            mean = [sum(c[i] for c in cs) / len(cs) for i in range(n)]
            st = ROLE_STYLE.get(role, {"color": "gray", "ls": ":"})
            ax.plot(
                range(1, n + 1),
                mean,
                color=st["color"],
                ls=st["ls"],
                lw=2.4,
                label=f"{role} (mean of {len(cs)})",
            )
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("rank r")
        ax.set_ylabel("share of ‖τ‖² in top r singular values")
        ax.set_title(f"{vec['name']}: spectrum of τ per module")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _ratio_axis(ax) -> None:
    """Log scale for ratios spanning a decade or more (labelled 1, 2, 5, 10, ...), linear otherwise."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y) and y > 0]
    if ys and max(ys) / min(ys) >= 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())


def plot_alignment(report: dict, path: Path) -> Path:
    vecs = list(report["vectors"].values())
    fig, axes = plt.subplots(len(vecs), 2, figsize=(11, 3.6 * len(vecs)), squeeze=False)
    for row, vec in zip(axes, vecs, strict=True):
        ax_new, ax_amp = row
        for role in ("mlp", "attention"):
            st = ROLE_STYLE[role]
            xs, ys = _per_layer(vec, role, ("alignment", "new_share"))
            _, base = _per_layer(vec, role, ("alignment", "new_baseline"))
            ax_new.plot(xs, ys, marker="o", color=st["color"], ls=st["ls"], label=f"{role}: new share")
            ax_new.plot(xs, base, color=st["color"], ls=":", lw=1, label=f"{role}: random baseline")
            xs, ratio = _per_layer(vec, role, ("alignment", "amplification_ratio"))
            _, two = _per_layer(vec, role, ("alignment", "two_sided_ratio"))
            ax_amp.plot(
                xs,
                ratio,
                marker="o",
                color=st["color"],
                ls=st["ls"],
                label=f"{role}: amplification / baseline",
            )
            ax_amp.plot(
                xs,
                two,
                marker="x",
                color=st["color"],
                ls=":",
                lw=1,
                label=f"{role}: two-sided share / baseline",
            )
        ax_new.set_ylim(0, 1.02)
        ax_new.set_ylabel("share of ‖τ‖²")
        ax_new.set_title(f"{vec['name']}: energy orthogonal to W's top-k subspaces (new directions)")
        ax_amp.axhline(1.0, color="black", lw=0.8)
        _ratio_axis(ax_amp)
        ax_amp.set_ylabel("share / random baseline")
        ax_amp.set_title(f"{vec['name']}: along W's own singular pairs (amplification)")
        for ax in row:
            _layer_axis(ax)
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_size(report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    markers = "osd^v<>"
    for idx, vec in enumerate(report["vectors"].values()):
        for role in ("mlp", "attention"):
            st = ROLE_STYLE[role]
            xs, ys = _per_layer(vec, role, ("rel_change",))
            ax.plot(
                xs,
                ys,
                marker=markers[idx % len(markers)],
                color=st["color"],
                ls=st["ls"],
                label=f"{vec['name']} {role}",
            )
    _layer_axis(ax)
    ax.set_ylabel("‖τ‖_F / ‖W‖_F")
    ax.set_title("Size of the change per layer")
    ax.legend(fontsize=8)
    return _save(fig, path)


CKA_FLOOR = 1e-8  # 1 − CKA below this (identical hidden states, rounding only) is drawn at the floor


def _gap(cka) -> float:
    return math.nan if cka is None else max(1.0 - float(cka), CKA_FLOOR)


def plot_cka(report: dict, path: Path) -> Path:
    rep = report["representation"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    dom_styles = [":", "-.", (0, (5, 2)), (0, (1, 3))]
    for idx, (name, vec) in enumerate(rep["vectors"].items()):
        color = f"C{idx % 10}"
        xs = [row["layer"] for row in vec["layers"]]
        axes[0].plot(
            xs, [_gap(r["cka"]) for r in vec["layers"]], marker="o", lw=2.2, color=color, label=f"{name}: all"
        )
        for d_idx, (dom, vals) in enumerate(vec["by_domain"].items()):
            ls = dom_styles[d_idx % len(dom_styles)]
            axes[0].plot(xs, [_gap(v) for v in vals], ls=ls, lw=1.2, color=color, label=f"{name}: {dom} text")
        axes[1].plot(
            xs,
            [_num(r["mean_angle_deg"]) for r in vec["layers"]],
            marker="o",
            color=color,
            label=f"{name} mean",
        )
        axes[1].plot(
            xs, [_num(r["max_angle_deg"]) for r in vec["layers"]], ls=":", color=color, label=f"{name} max"
        )
        axes[2].plot(
            xs, [_num(r["dims_for_energy"]) for r in vec["layers"]], marker="o", color=color, label=name
        )
    axes[0].set_yscale("log")
    axes[0].set_title(f"1 − linear CKA, base vs tuned (floor {CKA_FLOOR:g} = unchanged)")
    axes[0].set_ylabel("1 − CKA (log)")
    axes[1].set_title(f"Principal angles, top-{rep['angle_k']} PCA subspaces")
    axes[1].set_ylabel("degrees")
    axes[2].set_title(f"Dimensions holding 90% of the change (of {rep['hidden_size']})")
    axes[2].set_ylabel("principal components of ΔH")
    for ax in axes:
        _layer_axis(ax, "layer (0 = embeddings)")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_cross_domain(report: dict, path: Path) -> Path:
    cross = report["cross_domain"]
    names = cross["names"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1, 1.6]})
    mat = [[_num(x) for x in row] for row in cross["cosine_matrix"]]
    im = axes[0].imshow(mat, vmin=-1, vmax=1, cmap="coolwarm")
    axes[0].set_xticks(range(len(names)), names, rotation=30)
    axes[0].set_yticks(range(len(names)), names)
    for i, row in enumerate(mat):
        for j, v in enumerate(row):
            axes[0].text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=9)
    axes[0].set_title("Cosine of whole tuning vectors")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    for pair in cross["pairs"]:
        per: dict[str, dict[int, float]] = {}
        for key, val in pair["by_layer_role"].items():
            if key == "-":
                continue
            lay, role = key.split("/")
            per.setdefault(role, {})[int(lay)] = _num(val["cosine"])
        for role in ("mlp", "attention"):
            if role not in per:
                continue
            st = ROLE_STYLE[role]
            xs = sorted(per[role])
            axes[1].plot(
                xs,
                [per[role][x] for x in xs],
                marker="o",
                color=st["color"],
                ls=st["ls"],
                label=f"{pair['a']} vs {pair['b']}: {role}",
            )
    axes[1].axhline(0, color="black", lw=0.8)
    _layer_axis(axes[1])
    axes[1].set_ylabel("cosine")
    axes[1].set_title("Cross-domain cosine per layer")
    if cross["pairs"]:
        axes[1].legend(fontsize=8)
    else:
        axes[1].text(0.5, 0.5, "one vector: no pairs", ha="center", transform=axes[1].transAxes)
    return _save(fig, path)


def plot_attribution(result: dict, path: Path) -> Path:
    """Per vector: recovered share of the gain against k (top-k by the estimate, the estimate's own prediction,
    random-k mean with its min-max band) and, per layer, the estimate next to the measured removal effect."""
    vecs = list(result["vectors"].items())
    fig, axes = plt.subplots(len(vecs), 2, figsize=(11, 4.0 * len(vecs)), squeeze=False)
    for (name, vec), (left, right) in zip(vecs, axes, strict=True):
        curve = vec["curve"]
        ks = [row["k"] for row in curve]
        rnd = [row["random"] for row in curve]
        left.fill_between(
            ks, [_num(r["min"]) for r in rnd], [_num(r["max"]) for r in rnd], color="gray", alpha=0.25, lw=0
        )
        left.plot(
            ks,
            [_num(r["mean"]) for r in rnd],
            color="gray",
            marker=".",
            label=f"random k ({len(vec['seeds'])} seeds, min-max)",
        )
        left.plot(
            ks,
            [_num(row["recovered"]) for row in curve],
            color="black",
            marker="o",
            label="top-k by estimate",
        )
        left.plot(
            ks,
            [_num(row["predicted"]) for row in curve],
            color="tab:green",
            ls=":",
            label="estimate's prediction",
        )
        left.axhline(1.0, color="black", lw=0.6, alpha=0.5)
        left.axhline(0.0, color="black", lw=0.6, alpha=0.5)
        left.set_xlabel("k (components given τ)")
        left.set_ylabel("share of the tuned model's loss gain recovered")
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        left.grid(alpha=0.3)
        left.set_title(f"{name}: patching τ into the top-k components")
        left.legend(fontsize=8)
        width = 0.38
        for i, block in enumerate(("attention", "mlp")):
            rows = [c for c in vec["components"] if c["block"] == block]
            xs = [c["layer"] + (i - 0.5) * width for c in rows]
            color = ROLE_STYLE[block]["color"]
            right.bar(
                xs,
                [c["estimate"]["mean"] for c in rows],
                width=width,
                color=color,
                alpha=0.6,
                label=f"{block}: estimate",
            )
            right.scatter(
                xs,
                [c["removed_from_tuned_gain"] for c in rows],
                color=color,
                edgecolor="black",
                zorder=3,
                s=22,
                label=f"{block}: measured (removed from tuned)",
            )
        right.axhline(0.0, color="black", lw=0.6)
        right.set_ylabel("loss gain carried (nats/token)")
        right.set_title(f"{name}: per component")
        _layer_axis(right)
        right.legend(fontsize=8)
    return _save(fig, path)


def write_plots(report: dict, out: Path) -> dict[str, Path]:
    """Write every plot the report has data for; returns {kind: path}."""
    paths = {
        "spectra": plot_spectra(report, out / "spectra.png"),
        "alignment": plot_alignment(report, out / "alignment.png"),
        "size": plot_size(report, out / "size.png"),
        "cross_domain": plot_cross_domain(report, out / "cross_domain.png"),
    }
    if report.get("representation"):
        paths["cka"] = plot_cka(report, out / "cka.png")
    return paths
