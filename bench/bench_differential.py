"""The differential harness's whole matrix: every mixture path of real servers against the reference and alone.

    .venv/bin/python bench/bench_differential.py [--configs NAME ...] [--out FILE.md]

One `tunevec serve` per engine configuration on the tiny fixtures (built if missing), the harness of
``tests/differential.py`` run against each, and one markdown table of every row with its bound, the bfloat16 A/A
noise and the engine's step statistics (which prove the batched rows shared steps). ``tests/test_differential.py``
runs four of these configurations in `make test`; this runs them all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from differential import Config, activation_vectors, run_config, serve  # noqa: E402

CONFIGS = [
    Config("float32"),
    Config("float32/lora-bf16/no-prefix-cache", lora_dtype="bfloat16", prefix_caching=False),
    Config("float32/no-chunking", chunked_tokens=None),
    Config("bfloat16", dtype="bfloat16"),
    Config("bfloat16/lora-fp16", dtype="bfloat16", lora_dtype="float16"),
    Config("bfloat16/no-prefix-cache", dtype="bfloat16", prefix_caching=False),
    Config("tp2", tensor_parallel=2),
    Config("tp2/lora-bf16", tensor_parallel=2, lora_dtype="bfloat16"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="*", help="names of the configurations to run (default: all)")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    parser.add_argument("--workdir", type=Path, default=REPO / "artifacts" / "bench-differential")
    args = parser.parse_args()
    from conftest import artifacts_dir, extracted_vectors
    from transformers import AutoTokenizer

    from tunevec.fixtures import build_fixtures

    fixtures = build_fixtures("tiny", artifacts_dir() / "fixtures-tiny", seed=0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    # The tiny vectors plus the activation vector the harness's mixtures name (derived from medical).
    vectors = activation_vectors(
        fixtures, extracted_vectors(fixtures, artifacts_dir() / "vectors-tiny"), args.workdir / "vectors"
    )
    tok = AutoTokenizer.from_pretrained(fixtures / "base")
    long = " ".join(["The patient was given the brand name drug and its generic equivalent."] * 8)
    prompts = [tok(t)["input_ids"] for t in ("The diagnosis typhoid meningitis is coded", long)]
    chosen = [c for c in CONFIGS if not args.configs or c.name in args.configs]
    sections, failed = [], []
    for config in chosen:
        t0 = time.monotonic()
        try:
            with serve(
                config, fixtures / "base", vectors, args.workdir / f"{config.name.replace('/', '_')}.log"
            ) as url:
                result = run_config(config, url, fixtures / "base", vectors, prompts)
        except Exception as exc:  # one configuration that cannot start must not hide the others
            sections.append(f"### {config.name}\n\nnot run: {type(exc).__name__}: {str(exc)[:300]}\n")
            failed.append(config.name)
            print(sections[-1], flush=True)
            continue
        steps = ", ".join(f"{k}: {v}" for k, v in sorted(result.stats.items()))
        sections.append(
            f"### {config.name} ({'within bounds' if result.ok else 'OUT OF BOUNDS'}, {time.monotonic() - t0:.0f} s)\n\n"
            f"{result.table()}\n\nA/A (base alone vs batched, max nats/token): {result.aa:.2e}; base vs reference: "
            f"{result.base_vs_reference:.2e}; engine steps: {steps}\n"
        )
        if not result.ok:
            failed.append(config.name)
        print(sections[-1], flush=True)
    text = "\n".join(sections)
    if args.out:
        args.out.write_text(text)
    print(
        f"\n{len(chosen) - len(failed)} of {len(chosen)} configurations within bounds"
        + (f"; not: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
