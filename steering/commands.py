"""`tunevec merge`, `tunevec lora` and `tunevec activation`: thin argument layers over steering and core."""

from __future__ import annotations

import argparse


def configure_merge(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model: a folder or a Hugging Face hub id")
    parser.add_argument("--base-revision", help="hub branch, tag or commit of --base (default: main)")
    parser.add_argument(
        "--vectors", required=True, help="folder of tuning-vector artifacts (one per subfolder)"
    )
    parser.add_argument(
        "--spec", required=True, help="variant spec, e.g. 'medical:0.8+math:0.4' (docs/spec-grammar.md)"
    )
    parser.add_argument("--out", required=True, help="HF model folder to write")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.set_defaults(run=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from tunevec.core.checkpoint import resolve_model
    from tunevec.steering.inject import Injection, merge_to_checkpoint
    from tunevec.steering.library import VectorLibrary

    base = str(resolve_model(args.base, args.base_revision).path)
    paths = VectorLibrary.from_dir(args.vectors).paths()
    injection = Injection.from_settings({"spec": args.spec, "vectors": paths, "base": base})
    out = merge_to_checkpoint(base, injection, args.out, force=args.force)
    print(f"wrote {out}: {injection.spec.canonical()} applied to {len(injection.applied)} tensors")
    return 0


def configure_lora(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("vector", help="tuning-vector artifact folder")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="rank per module")
    how.add_argument("--energy", type=float, help="smallest rank per module keeping this share of ||tau||^2")
    parser.add_argument("--max-rank", type=int, default=512, help="cap per module (vLLM allows up to 512)")
    parser.add_argument("--method", choices=["randomized", "full"], default="randomized", help="SVD used")
    parser.add_argument("--out", required=True, help="adapter folder to write (PEFT layout)")
    parser.set_defaults(run=run_lora)


def run_lora(args: argparse.Namespace) -> int:
    from tunevec.core.vector import TuningVector
    from tunevec.steering.lora import adapter_from_vector

    vec = TuningVector(args.vector)
    adapter = adapter_from_vector(
        vec, rank=args.rank, energy=args.energy, max_rank=args.max_rank, method=args.method
    )
    path = adapter.save(args.out, base_model=vec.manifest.base.get("path", ""))
    errors = [m["rel_error"] for m in adapter.meta["modules"].values()]
    print(
        f"wrote {path}: {len(adapter.factors)} modules, max module rank {adapter.max_module_rank}, "
        f"relative error mean {sum(errors) / max(len(errors), 1):.4f} max {max(errors, default=0):.4f}"
    )
    for role, share in sorted(adapter.meta["dropped"].items()):
        print(f"  not in the adapter ({role}): {share:.2%} of ||tau||^2")
    return 0


def configure_activation(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="a controlvector GGUF (direction.N tensors) as an activation vector")
    imp.add_argument("gguf", help="the .gguf file (repeng's export_gguf, llama.cpp's cvector-generator)")
    imp.add_argument("--base", required=True, help="the base model it steers (its sizes are checked)")
    imp.add_argument("--out", required=True, help="the activation-vector folder to write")
    imp.add_argument("--name", help="its name in specs (default: the file's stem)")
    imp.add_argument("--force", action="store_true", help="replace an existing --out")
    exp = sub.add_parser("export", help="an activation vector as a controlvector GGUF for llama.cpp")
    exp.add_argument("vector", help="the activation-vector folder")
    exp.add_argument("--out", required=True, help="the .gguf file to write")
    parser.set_defaults(run=run_activation)


def run_activation(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tunevec.core.activation import ActivationVector, from_gguf
    from tunevec.core.checkpoint import Checkpoint

    if args.action == "import":
        name = args.name or Path(args.gguf).stem
        vec = from_gguf(args.gguf, args.out, name, Checkpoint(args.base), replace=args.force)
        print(f"imported {args.gguf} as activation vector {vec.name!r} (layers {vec.layers}) in {args.out}")
    else:
        ActivationVector(args.vector).to_gguf(args.out)
        print(f"wrote {args.out}")
    return 0
