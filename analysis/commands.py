"""`tunevec extract` and `tunevec analyze`: thin argument layers over tunevec.vector and analysis.report."""

from __future__ import annotations

import argparse


def configure_extract(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model folder (HF, single or sharded safetensors)")
    parser.add_argument("--tuned", required=True, help="fine-tuned model folder of the same architecture")
    parser.add_argument("--out", required=True, help="artifact folder to write (vector.safetensors + manifest.json)")
    parser.add_argument("--name", help="vector name (default: the tuned folder's name)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--force", action="store_true", help="replace an existing artifact")
    parser.set_defaults(run=run_extract)


def run_extract(args: argparse.Namespace) -> int:
    from tunevec.vector import extract

    vec = extract(args.base, args.tuned, args.out, name=args.name, dtype=args.dtype, force=args.force)
    m = vec.manifest
    total = sum(e.norm**2 for e in m.tensors.values()) ** 0.5
    print(f"wrote {vec.path}: vector {m.name!r}, {len(m.tensors)} tensors, ||tau||_F = {total:.4g}, "
          f"{m.policies['extract_seconds']} s")
    for v in m.policies["vocab_extension"]:
        print(f"  vocabulary grew in {v['tensor']}: {v['added_rows']} added rows kept out of tau "
              f"(norm {v['added_rows_norm']:.4g})")
    for s in m.policies["skipped"]:
        print(f"  skipped {s['tensor']}: {s['reason']}")
    return 0
