"""How extract, analyze and attribute grow with model size, and what a 7B pair will cost.

On random-weight pairs of real shapes built locally (bench/_random_pair.py: SmolLM2-135M, SmolLM2-360M and a
Llama-3.2-1B shape; the top quarter of the layers "fine-tuned"), each command runs in a fresh process on the CPU.
Per command: wall time and the process's peak RSS (wait4), and per part the command's own figures (time and peak
RSS per stage from analysis/meter.py, the weights walk's and the probe's parts, attribution's parts). Every run
also records the work it did as analysis/estimate.py counts it (bytes, flops), so each part gives a throughput;
the throughputs fitted over the sizes are what analysis/costs.py holds, and with them the estimate predicts a
Llama-2-7B pair (every linear of every layer changed, the probe on 3,072 tokens, attribution on 48 x 64 tokens).

Settings: analyze with --full-svd-max-dim 512 so that every size takes the randomized SVDs a 7B pair's
4096-wide matrices take (plus one run of the smallest size with the defaults, for the exact-SVD rate), the probe
on 24 texts x 128 tokens; attribute on 8 examples x 64 tokens, k in {1, 4}, 2 random seeds.

    .venv/bin/python bench/bench_scaling.py                       # all three sizes, ~25 min on 2 cores
    .venv/bin/python bench/bench_scaling.py --shapes smol135m     # one size
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = ("smol135m", "smol360m", "llama1b")
PATH_7B = ["--full-svd-max-dim", "512"]
PROBE = ["--max-probe-texts", "24", "--probe-max-tokens", "3072"]
ATTRIBUTE = ["--domain", "bench", "--max-examples", "8", "--max-tokens", "64", "--k", "1", "--k", "4"]
ATTRIBUTE += ["--seeds", "2", "--batch-size", "8"]


THREADS = {"n": None}  # --threads: torch threads of every command (OMP_NUM_THREADS for extract)
LOADS: list[tuple[str, float]] = []  # (command, 1-minute load average when it started)


def run(args: list[str], log: Path) -> tuple[float, int]:
    """Run ``bench/_cli.py ARGS`` in a fresh process; (wall seconds, peak RSS bytes). Output goes to ``log``."""
    cmd = [sys.executable, str(HERE / "_cli.py"), *args, "--device", "cpu"]
    env = dict(os.environ)
    if THREADS["n"]:
        env["OMP_NUM_THREADS"] = str(THREADS["n"])
        if args[0] != "extract":
            cmd += ["--threads", str(THREADS["n"])]
    LOADS.append((args[0], os.getloadavg()[0]))
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed (exit {proc.returncode}); see {log}")
    return wall, usage.ru_maxrss * 1024


def measure(shape: str, work: Path) -> dict:
    import torch
    from _random_pair import build_pair

    from tunevec.analysis.estimate import estimate_extract
    from tunevec.core.checkpoint import Checkpoint

    pair = work / shape
    info_file = pair / "pair.json"
    if not info_file.exists():
        info = build_pair(shape, pair, device=torch.device("cpu"), changed="top-quarter")
        info_file.write_text(json.dumps(info))
    info = json.loads(info_file.read_text())
    base, tuned, vec = pair / "base", pair / "tuned", pair / "vec"
    out: dict = {"shape": shape, "params": info["params"], "pair": info}
    print(f"[{shape}] {info['params'] / 1e6:.0f}M parameters", flush=True)

    est = estimate_extract(Checkpoint(base), Checkpoint(tuned), "auto", torch.device("cpu"))
    wall, rss = run(
        ["extract", "--base", str(base), "--tuned", str(tuned), "--out", str(vec), "--force"],
        pair / "extract.log",
    )
    measured = re.search(r"measured extract: ([0-9.]+) s", (pair / "extract.log").read_text())
    out["extract"] = {
        "wall": wall,
        "seconds": float(measured.group(1)),
        "peak_rss": rss,
        "estimate": est.as_dict(),
    }
    print(f"[{shape}] extract {wall:.1f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)

    for vf in (vec / ".tunevec-verified.json",):
        vf.unlink(missing_ok=True)  # so analyze's open stage measures the hash, as after a fresh extraction
    runs = {"analyze": [*PATH_7B, *PROBE]}
    if shape == SIZES[0]:
        runs["analyze_defaults"] = ["--no-probe"]  # the exact-SVD path (min(m, n) <= 1024)
    for key, extra in runs.items():
        report = pair / key
        wall, rss = run(
            ["analyze", str(vec), "--base", str(base), "--out", str(report), *extra], pair / f"{key}.log"
        )
        rep = json.loads((report / "report.json").read_text())
        out[key] = {
            "wall": wall,
            "peak_rss": rss,
            "timing": rep["timing_seconds"],
            "probe_timing": (rep.get("representation") or {}).get("timing_seconds"),
            "resources": rep["resources"],
            "estimate": rep["estimate"],
        }
        (vec / ".tunevec-verified.json").unlink(missing_ok=True)
        print(f"[{shape}] {key} {wall:.1f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)

    att = pair / "attribution"
    wall, rss = run(
        ["attribute", str(vec), "--base", str(base), "--out", str(att), *ATTRIBUTE], pair / "attribute.log"
    )
    res = json.loads((att / "attribution.json").read_text())
    vres = next(iter(res["vectors"].values()))
    out["attribute"] = {
        "wall": wall,
        "peak_rss": rss,
        "timing": vres["timing_seconds"],
        "evaluations": vres["patched_models_evaluated"] + 1,
        "work": vres["work"],
        "resources": res["resources"],
        "estimate": res["estimate"],
    }
    print(f"[{shape}] attribute {wall:.1f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)
    return out


# ----------------------------------------------------------------------------- fitting


def parts(r: dict) -> dict[str, tuple[float, float, str]]:
    """Per measured part: (seconds, work, kind of work)."""
    a, w = r["analyze"], r["analyze"]["estimate"]["stages"]
    p = a["probe_timing"]
    t = a["timing"]
    at = r["attribute"]
    st = at["estimate"]["stages"]["vector 1"]
    d, done = st["details"], at["work"]
    # what ran: the layers of every patched evaluation and remembered model, the head of every evaluation, the
    # prefix once and the estimates' two forward and backward passes
    evaluated = (
        d["prefix_flops"]
        + d["layer_flops"] * done["layers_run"]
        + d["head_flops"] * done["evaluations"]
        + 6.0 * d["evaluation_flops"]
    )
    out = {
        "extract": (
            r["extract"]["seconds"],
            r["extract"]["estimate"]["stages"]["extract"]["work"]["extract"],
            "extract",
        ),
        "analyze: open (hash)": (
            a["resources"]["stages"]["open"]["seconds"],
            w["open"]["work"]["hash"],
            "hash",
        ),
        "analyze: read": (t["read"], w["weights"]["work"]["io"], "io"),
        "analyze: SVDs (W, tau)": (t["svd_w"] + t["spectrum"], w["weights"]["work"]["svd"], "svd"),
        "analyze: alignment + factor": (
            t["alignment"] + t["factor"],
            w["weights"]["work"]["matmul"],
            "matmul",
        ),
        "analyze: probe load": (p["load"], w["probe"]["work"]["load"], "load"),
        "analyze: probe forward": (p["forward"], w["probe"]["work"]["forward"], "forward"),
        "analyze: probe stream tau": (p["stream"], w["probe"]["work"]["io"], "io"),
        "analyze: probe statistics": (p["statistics"], w["probe"]["work"]["stats"], "stats"),
        "attribute: load": (
            at["resources"]["stages"]["load"]["seconds"],
            at["estimate"]["stages"]["load"]["work"]["load"],
            "load",
        ),
        "attribute: setup (tau, base copy)": (at["timing"]["setup"], st["work"]["io"], "io"),
        "attribute: passes": (
            at["timing"]["prefix"] + at["timing"]["estimates"] + at["timing"]["patched"],
            evaluated,
            "forward_tf32" if at.get("precision") == "tf32" else "forward",
        ),
    }
    if "analyze_defaults" in r:
        dt = r["analyze_defaults"]["timing"]
        dw = r["analyze_defaults"]["estimate"]["stages"]["weights"]["work"]
        out["analyze (exact SVDs): SVDs"] = (dt["svd_w"] + dt["spectrum"], dw["svd_full"], "svd_full")
    return out


def device_results(folder: Path) -> list[dict]:
    """bench/device_check.sh's output folder as results of this script's shape: one per attribution run."""
    log = (folder / "device_check.log").read_text()
    pair = json.loads(re.search(r'^(\{"shape".*\})$', log, re.M).group(1))
    extract_s = float(re.search(r"measured extract: ([0-9.]+) s", log).group(1))
    rep = json.loads((folder / "report.json").read_text())
    analyze = {
        "timing": rep["timing_seconds"],
        "probe_timing": rep["representation"]["timing_seconds"],
        "resources": rep["resources"],
        "estimate": rep["estimate"],
    }
    out = []
    for name in ("attribution", "attribution-tf32"):
        if not (folder / f"{name}.json").exists():
            continue
        att = json.loads((folder / f"{name}.json").read_text())
        v = next(iter(att["vectors"].values()))
        work = {"extract": 2.0 * pair["bytes_per_checkpoint"]}
        out.append(
            {
                "shape": f"{pair['shape']} ({att['matmul_precision']})",
                "params": pair["params"],
                "extract": {"seconds": extract_s, "estimate": {"stages": {"extract": {"work": work}}}},
                "analyze": analyze,
                "attribute": {
                    "timing": v["timing_seconds"],
                    "work": v["work"],
                    "resources": att["resources"],
                    "estimate": att["estimate"],
                    "precision": att["matmul_precision"],
                },
            }
        )
    return out


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares seconds = a + b · work over (work, seconds) points; (a, b)."""
    n = len(points)
    mx = sum(w for w, _ in points) / n
    my = sum(s for _, s in points) / n
    sxx = sum((w - mx) ** 2 for w, _ in points)
    b = sum((w - mx) * (s - my) for w, s in points) / sxx if sxx > 0 else math.nan
    return my - b * mx, b


def fit(results: list[dict]) -> tuple[dict[str, float], dict[str, dict]]:
    """Throughput per kind and, per part, the power law seconds ∝ params^b over the sizes.

    A kind's throughput is 1 / slope of seconds = a + work / rate over every part of that kind at every size (the
    intercept a is the fixed cost of a part: opening files, Python, small-matrix overheads, which would otherwise
    lower the rate the small models give); with fewer than three points, or a slope that is not positive, it is
    Σ work / Σ seconds."""
    points: dict[str, list[tuple[float, float]]] = {}
    laws: dict[str, dict] = {}
    per_part: dict[str, list[tuple[float, float, float]]] = {}
    for r in results:
        for name, (sec, work, kind) in parts(r).items():
            if work > 0 and sec > 0:
                points.setdefault(kind, []).append((work, sec))
            per_part.setdefault(name, []).append((r["params"], sec, work / sec if sec > 0 else math.nan))
    for name, pts in per_part.items():
        laws[name] = {"points": pts}
        if len(pts) >= 2 and all(p[1] > 0 for p in pts):
            xs = [math.log(p[0]) for p in pts]
            ys = [math.log(p[1]) for p in pts]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
            laws[name]["exponent"] = b
    rates = {}
    for kind, pts in points.items():
        slope = _line(pts)[1] if len(pts) >= 3 else math.nan
        pooled = sum(w for w, _ in pts) / sum(s for _, s in pts)
        rates[kind] = 1.0 / slope if slope > 0 else pooled
    return rates, laws


def predict_7b(cpu_rates: dict[str, float]) -> dict:
    """The estimate of a Llama-2-7B pair (every linear changed) with the fitted CPU rates and the CUDA table."""
    import torch
    from _random_pair import config_for, tensor_shapes

    from tunevec.analysis import costs
    from tunevec.analysis.estimate import (
        AnalyzeInputs,
        AttributionWork,
        ModelShape,
        ProbeWork,
        TensorPlan,
        analyze_cost,
        estimate_attribute,
        extract_cost,
    )
    from tunevec.analysis.walk import ReportOptions
    from tunevec.core.roles import classify

    config = config_for("llama7b")
    shapes = tensor_shapes(config)
    arch = "LlamaForCausalLM"
    model = ModelShape.from_shapes(shapes, config.to_dict(), arch, 2)
    plans = []
    changed = 0
    for name, dims in shapes.items():
        role = classify(name, arch)
        linear = role.role in ("attention", "mlp") and role.is_linear and len(dims) == 2
        changed += math.prod(dims) if linear else 0
        plans.append(TensorPlan(tuple(dims), role.layer, linear, (linear,), 2))
    inputs = AnalyzeInputs(model, tuple(plans), 2, model.bytes, model.bytes)
    probe = ProbeWork(
        texts=24, tokens=3072, padded_tokens=3072, kept_tokens=3072, max_length=128, batch_size=8
    )
    job = AttributionWork(
        first_layer=0, components=64, changed_params=changed, changed_bytes=2 * changed, examples=48,
        tokens=48 * 64, max_length=64, scored=48 * 63, ks=7, seeds=5, batch_size=16,
    )  # fmt: skip
    saved = dict(costs.RATES["cpu"]), costs.CPU_THREADS, torch.get_num_threads()
    costs.RATES["cpu"].update(cpu_rates)
    costs.CPU_THREADS = THREADS["n"] or saved[2]  # the rates are those of the threads the benchmark ran with
    out = {}
    try:
        for kind, threads in (("cpu", 1), ("cpu", os.cpu_count()), ("cuda", None)):
            dev = torch.device(kind)
            if threads:
                torch.set_num_threads(threads)
            label = f"cpu, {threads} thread{'s' if threads > 1 else ''}" if threads else "cuda (H200 rates)"
            out[label] = {
                "extract": extract_cost(model, model.bytes, 2, dev).as_dict(),
                "analyze": analyze_cost(inputs, ReportOptions(), probe, dev).as_dict(),
                "attribute": estimate_attribute(model, [job], dev).as_dict(),
                "attribute --tf32": estimate_attribute(model, [job], dev, tf32=True).as_dict(),
            }
            if kind == "cpu":
                del out[label]["attribute --tf32"]
    finally:
        costs.RATES["cpu"].clear()
        costs.RATES["cpu"].update(saved[0])
        costs.CPU_THREADS = saved[1]
        torch.set_num_threads(saved[2])
    return out


# ----------------------------------------------------------------------------- report


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def tables(results: list[dict], rates: dict, laws: dict, pred: dict) -> str:
    lines = ["### Measured (wall time, peak RSS of the process)", ""]
    lines.append("| shape | params | extract s | GiB | analyze s | GiB | attribute s | GiB | evaluations |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e6:.0f}M | {r['extract']['wall']:.1f} | {gib(r['extract']['peak_rss'])} | "
            f"{r['analyze']['wall']:.1f} | {gib(r['analyze']['peak_rss'])} | {r['attribute']['wall']:.1f} | "
            f"{gib(r['attribute']['peak_rss'])} | {r['attribute']['evaluations']} |"
        )
    lines += ["", "### Parts: seconds per size, throughput, growth", ""]
    head = " | ".join(r["shape"] for r in results)
    lines.append(f"| part | {head} | rate per size | exponent b (s ∝ params^b) |")
    lines.append("|---|" + "---:|" * len(results) + "---|---:|")
    for name, law in laws.items():
        secs = {p[0]: p for p in law["points"]}
        cells = [f"{secs[r['params']][1]:.2f}" if r["params"] in secs else "" for r in results]
        rates_ = ", ".join(f"{p[2]:.3g}" for p in law["points"])
        exp = f"{law['exponent']:.2f}" if "exponent" in law else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rates_} | {exp} |")
    lines += ["", "### Fitted throughputs (per second)", ""]
    lines += [f"- {k}: {v:.3g}" for k, v in sorted(rates.items())]
    lines += ["", "### Memory: estimate / measured anonymous peak / measured VmHWM (GiB)", ""]
    lines.append("| shape | extract | analyze | attribute |")
    lines.append("|---|---:|---:|---:|")
    for r in results:
        cells = []
        for key in ("extract", "analyze", "attribute"):
            e = r[key]["estimate"]["host_bytes"]
            stages = r[key].get("resources", {}).get("stages", {})
            anon = max((s.get("peak_anon_bytes") or 0 for s in stages.values()), default=0)
            cells.append(f"{gib(e)} / {gib(anon) if anon else '-'} / {gib(r[key]['peak_rss'])}")
        lines.append(f"| {r['shape']} | " + " | ".join(cells) + " |")
    lines += ["", "### Predicted Llama-2-7B pair", ""]
    lines.append("| device | command | stage | time | peak memory |")
    lines.append("|---|---|---|---:|---:|")
    for kind, cmds in pred.items():
        for cmd, est in cmds.items():
            for stage, s in est["stages"].items():
                lines.append(
                    f"| {kind} | {cmd} | {stage} | {s['seconds']:.0f} s | {gib(s['device_bytes'])} GiB |"
                )
            lines.append(
                f"| {kind} | {cmd} | **total** | **{est['seconds']:.0f} s** | **{gib(est['device_bytes'])} GiB** |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=[*SIZES, "tiny"], default=list(SIZES))
    ap.add_argument("--work", type=Path, default=Path("/tmp/tunevec-bench-scaling"))
    ap.add_argument("--json", type=Path, help="write every figure here (default WORK/results.json)")
    ap.add_argument(
        "--refit", action="store_true", help="fit and print again from the JSON of an earlier run"
    )
    ap.add_argument(
        "--device-dir", type=Path, help="print the parts and rates of bench/device_check.sh's output"
    )
    ap.add_argument(
        "--threads",
        type=int,
        help="torch threads of every command (default torch's: the cores); 1 on a machine other jobs load, where "
        "two OpenMP threads per SVD can run 25-60x slower than one (docs/analysis-report.md)",
    )
    args = ap.parse_args()
    THREADS["n"] = args.threads
    import torch

    path = args.json or args.work / "results.json"
    if args.device_dir:
        for r in device_results(args.device_dir):
            print(f"\n{r['shape']}: part, seconds, work, rate")
            for name, (sec, work, kind) in parts(r).items():
                print(f"  {name}: {sec:.2f} s, {work:.3g}, {kind} {work / sec if sec else math.nan:.3g}/s")
        return
    if args.refit:
        results = json.loads(path.read_text())["results"]
        rates, laws = fit(results)
        print(tables(results, rates, laws, predict_7b(rates)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    print(
        f"# bench_scaling {time.strftime('%Y-%m-%d %H:%M')}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = [measure(shape, args.work) for shape in args.shapes]
    rates, laws = fit(results)
    pred = predict_7b(rates)
    text = tables(results, rates, laws, pred)
    print(text)
    meta = {
        "threads": args.threads or torch.get_num_threads(),
        "load_at_start": LOADS,
        "load_end": os.getloadavg(),
    }
    payload = {"meta": meta, "results": results, "rates": rates, "laws": laws, "predicted_7b": pred}
    path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {path}; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
