"""A vectors folder whose ``medical`` moves every norm weight, for the norms-whole cost in bench_mixtures.

    .venv/bin/python bench/norm_moving_vectors.py --fixtures artifacts/fixtures/smol --vectors VECTORS --out DIR
    .venv/bin/python bench/bench_mixtures.py --model smol --base artifacts/fixtures/smol/base --vectors DIR/vectors

The demo's fine-tunes are LoRA merges: they move no norm, so bench_mixtures' "with / without norms" pair would
compare one model with itself. This copies the medical fine-tune, multiplies each norm weight by 1 + ``--scale``·z
(z standard normal, fixed seed), extracts ``medical`` from that copy and puts it beside the other vectors of
``--vectors``, so the pair measures what carrying norm deltas per token costs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunevec.cli import main as tunevec_main
from tunevec.core.roles import classify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--fixtures", type=Path, required=True, help="folder with base/ and medical/ checkpoints"
    )
    parser.add_argument("--vectors", type=Path, required=True, help="the other vectors to serve beside it")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", type=float, default=0.02)
    args = parser.parse_args(argv)
    tuned = args.out / "medical-norms"
    shutil.rmtree(tuned, ignore_errors=True)
    shutil.copytree(args.fixtures / "medical", tuned)
    gen = torch.Generator().manual_seed(0)
    moved = 0
    for path in sorted(tuned.glob("*.safetensors")):
        tensors = load_file(path)
        for name, w in tensors.items():
            if classify(name).role == "norm":  # every family's table
                z = torch.randn(w.shape, generator=gen)
                tensors[name] = (w.float() * (1 + args.scale * z)).to(w.dtype)
                moved += 1
        save_file(tensors, path, metadata={"format": "pt"})
    if not moved:
        sys.exit(f"no norm weights found in {args.fixtures / 'medical'}")
    vectors = args.out / "vectors"
    shutil.rmtree(vectors, ignore_errors=True)
    vectors.mkdir(parents=True)
    for other in sorted(p for p in args.vectors.iterdir() if (p / "manifest.json").exists()):
        if other.name != "medical":
            shutil.copytree(other, vectors / other.name)
    base = str(args.fixtures / "base")
    code = tunevec_main(["extract", "--base", base, "--tuned", str(tuned), "--out", str(vectors / "medical")])
    print(f"moved {moved} norm weights by {args.scale:.0%} (relative); vectors in {vectors}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
