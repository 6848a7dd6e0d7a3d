"""`tunevec extract` and `tunevec analyze`: thin argument layers over tunevec.core.extract and analysis.report."""

from __future__ import annotations

import argparse

from tunevec.analysis.options import add_device_arguments, parse_layers


def configure_extract(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base", required=True, help="base model: a folder (HF, single or sharded safetensors) or a hub id"
    )
    parser.add_argument(
        "--tuned", required=True, help="fine-tuned model of the same architecture: a folder or a hub id"
    )
    parser.add_argument("--base-revision", help="hub branch, tag or commit of --base (default: main)")
    parser.add_argument("--tuned-revision", help="hub branch, tag or commit of --tuned (default: main)")
    parser.add_argument(
        "--out", required=True, help="artifact folder to write (vector.safetensors + manifest.json)"
    )
    parser.add_argument("--name", help="vector name (default: the --out folder's name)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the stored tau (auto: the checkpoints' own; rounding, if any, is reported in the manifest)",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="extract although base and tuned run with other rope/norm/attention settings (recorded; base + tau "
        "then does not reproduce the tuned model)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing artifact")
    add_device_arguments(parser)
    parser.set_defaults(run=run_extract)


def run_extract(args: argparse.Namespace) -> int:
    from tunevec.analysis.device import limit_memory, resolve_device
    from tunevec.analysis.estimate import check, estimate_extract
    from tunevec.analysis.meter import Meter
    from tunevec.core.checkpoint import Checkpoint, resolve_model
    from tunevec.core.extract import extract

    device = resolve_device(args.device)
    limit_memory(device, args.max_memory)
    base = Checkpoint(resolve_model(args.base, args.base_revision).path)
    tuned = Checkpoint(resolve_model(args.tuned, args.tuned_revision).path)
    options = [
        "a GPU (--device cuda), where only one tensor pair is on the device",
        "--max-memory SIZE if more memory is available than reported",
    ]
    check(estimate_extract(base, tuned, args.dtype, device), args.max_memory, options)
    meter = Meter(device)
    with meter.stage("extract"):
        vec = extract(
            args.base,
            args.tuned,
            args.out,
            name=args.name,
            dtype=args.dtype,
            force=args.force,
            base_revision=args.base_revision,
            tuned_revision=args.tuned_revision,
            allow_config_changes=args.allow_config_change,
            device=device,
        )
    m = vec.manifest
    total = sum(e.norm**2 for e in m.tensors.values()) ** 0.5
    print(
        f"wrote {vec.path}: vector {m.name!r}, {len(m.tensors)} tensors, ||tau||_F = {total:.4g}, "
        f"{m.policies['extract_seconds']} s"
    )
    for v in m.policies["vocab_extension"]:
        print(
            f"  vocabulary grew in {v['tensor']}: {v['added_rows']} added rows kept out of tau "
            f"(norm {v['added_rows_norm']:.4g})"
        )
    tok = m.policies.get("tokenizer", {})
    if tok.get("needs_tuned_tokenizer"):
        print(
            f"  the tuned tokenizer maps {tok['renamed_special_count'] + tok['new_in_base_rows_count']} token(s) "
            "to rows the base tokenizer reads otherwise: text with them needs the tuned tokenizer"
        )
    for key, change in m.policies.get("config_changes", {}).items():
        print(f"  config differs ({key}): base {change['base']!r}, tuned {change['tuned']!r}")
    for s in m.policies["skipped"]:
        print(f"  skipped {s['tensor']}: {s['reason']}")
    for line in meter.lines("  measured "):
        print(line)
    return 0


def configure_analyze(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("vectors", nargs="+", metavar="V", help="tuning-vector artifact folders (one base)")
    parser.add_argument("--base", required=True, help="the base model folder the vectors were extracted from")
    parser.add_argument("--out", required=True, help="report folder: report.json, *.png, summary.md")
    probe = parser.add_mutually_exclusive_group()
    probe.add_argument(
        "--probe",
        help="JSONL probe texts {domain, text} (default: probe.jsonl beside the base folder, else bundled texts)",
    )
    probe.add_argument(
        "--no-probe", action="store_true", help="skip the representation probe (no models run)"
    )
    parser.add_argument(
        "--tuned",
        action="append",
        help="tuned model folder per vector, in order (default: the manifest's tuned.path)",
    )
    parser.add_argument(
        "--max-probe-texts", type=int, default=240, help="probe texts used (round-robin by domain)"
    )
    parser.add_argument("--probe-max-tokens", type=int, default=6000, help="token rows kept per layer")
    parser.add_argument("--k", type=int, help="alignment: fixed size of W's principal subspace")
    parser.add_argument(
        "--energy",
        type=float,
        default=0.9,
        help="alignment: k = rank holding this share of ||W||_F^2 (default 0.9)",
    )
    parser.add_argument("--max-k", type=int, default=256, help="alignment: cap on k (also min(m, n)//4)")
    parser.add_argument("--svd", choices=["randomized", "full"], default="randomized")
    parser.add_argument(
        "--sketch", type=int, default=256, help="randomized: singular values of tau per module"
    )
    parser.add_argument(
        "--full-svd-max-dim",
        type=int,
        default=1024,
        help="matrices with min(m, n) up to this use the exact SVD",
    )
    parser.add_argument(
        "--factor-energy", type=float, default=0.9, help="factorisation: energy target per module"
    )
    parser.add_argument(
        "--param-budget", type=int, help="factorisation: allocate ranks within this many parameters"
    )
    parser.add_argument(
        "--factor-max-rank", type=int, default=256, help="factorisation: randomized sketch size"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice); 1 is far faster for SVDs on an oversubscribed CPU",
    )
    parser.add_argument(
        "--layers",
        type=parse_layers,
        metavar="START:END",
        help="only decoder layers START..END-1: their tensors in the weights walk, hidden states START..END in "
        "the probe (embeddings, final norm and head left out of the walk)",
    )
    add_device_arguments(parser)
    parser.set_defaults(run=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tunevec.analysis.device import limit_memory, resolve_device
    from tunevec.analysis.estimate import check, estimate_analyze
    from tunevec.analysis.meter import Meter
    from tunevec.analysis.output import write_report
    from tunevec.analysis.probe import BUILTIN_PROBE, ProbeSettings, load_probe, probe_work
    from tunevec.analysis.report import ReportOptions, build_report
    from tunevec.analysis.walk import open_inputs

    if args.threads is not None:
        import torch

        if args.threads < 1:
            from tunevec.core.errors import TunevecError

            raise TunevecError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    limit_memory(device, args.max_memory)

    options = ReportOptions(
        svd=args.svd,
        sketch=args.sketch,
        full_svd_max_dim=args.full_svd_max_dim,
        k=args.k,
        w_energy=args.energy,
        max_k=args.max_k,
        factor_energy=args.factor_energy,
        param_budget=args.param_budget,
        factor_max_rank=args.factor_max_rank,
        seed=args.seed,
        layers=args.layers,
    )
    records, source = None, None
    if not args.no_probe:
        default = Path(args.base).resolve().parent / "probe.jsonl"
        if args.probe:
            records, source = load_probe(args.probe), args.probe
        elif default.is_file():
            records, source = load_probe(default), str(default)
        else:
            records, source = list(BUILTIN_PROBE), "bundled probe texts (analysis/probe.py)"
        print(f"probe: {len(records)} texts from {source}")
    probe_settings = {"max_texts": args.max_probe_texts, "max_tokens": args.probe_max_tokens}
    vectors, base = open_inputs(args.vectors, args.base)
    work = probe_work(base.path, records, ProbeSettings(**probe_settings)) if records else None
    estimate = estimate_analyze(vectors, base, options, work, device)
    check(estimate, args.max_memory, _analyze_options(args, device))
    meter = Meter(device)
    report = build_report(
        args.vectors,
        args.base,
        options=options,
        probe_texts=records,
        probe_source=source,
        tuned_paths=args.tuned,
        probe_settings=probe_settings,
        device=device,
        meter=meter,
    )
    report["estimate"] = estimate.as_dict()
    paths = write_report(report, args.out)
    print(f"wrote {args.out}: " + ", ".join(p.name for p in paths.values()))
    for name, vec in report["vectors"].items():
        roles = vec["linear_by_role"]
        parts = []
        for role in ("mlp", "attention"):
            a = roles.get(role, {}).get("alignment")
            if a:
                parts.append(
                    f"{role}: rel change {roles[role]['rel_change']:.3g}, new {a['new_share']:.1%} "
                    f"(baseline {a['new_baseline']:.1%}), amplification x{a['amplification_ratio']:.3g} baseline"
                )
        print(f"  {name}: " + "; ".join(parts))
    for pair in report["cross_domain"]["pairs"]:
        print(f"  cosine {pair['a']} vs {pair['b']}: {pair['overall']['cosine']:.4f}")
    rep = report.get("representation")
    if rep:
        for name, v in rep["vectors"].items():
            s = v["summary"]
            print(
                f"  {name}: min CKA {s['min_cka']:.4f} (layer {s['min_cka_layer']}), last layer {s['final_cka']:.4f}"
            )
    for line in meter.lines("  measured "):
        print(line)
    return 0


def _analyze_options(args: argparse.Namespace, device) -> list[str]:
    """What would make an analysis fit, for the refusal message (each a real option of the command)."""
    out = []
    if device.type == "cpu":
        out.append("a GPU (--device cuda): the probe's float32 model then lives in GPU memory")
    if not args.no_probe:
        out.append(
            f"fewer probe texts (--max-probe-texts, now {args.max_probe_texts}; --probe-max-tokens, now "
            f"{args.probe_max_tokens}: the stored hidden states shrink with them)"
        )
    out.append("fewer layers (--layers START:END: fewer tensors walked and hidden states stored)")
    if not args.no_probe:
        out.append("--no-probe (weights only: no model is loaded)")
    out.append("--max-memory SIZE if more memory is available than reported")
    return out
