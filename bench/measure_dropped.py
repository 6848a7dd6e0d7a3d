"""How far leaving out what no LoRA slot carries moves a model: the measurements behind --max-dropped-share.

    .venv/bin/python bench/measure_dropped.py

For the tiny and SmolLM2 fixture vectors (artifacts/test, built by the test suite), and for small random models
of families whose fine-tune moves biases and norms (tests/archs.py: every tensor moved), prints the left-out
share of ||tau||^2, the mean / largest change of a token's log-probability (nats) between base + tau and
base + its carried part, and for scale the mean change the whole of tau makes (base + tau against the base), on
probe texts (steering.fidelity.uncarried_effect).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def probe_texts(fixtures: Path, n: int = 24) -> list[str]:
    lines = (fixtures / "probe.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


def main() -> None:
    from tunevec.core.extract import extract
    from tunevec.core.vector import TuningVector
    from tunevec.steering.fidelity import uncarried_effect

    rows = []
    for kind in ("tiny", "smol"):
        fixtures = REPO / f"artifacts/test/fixtures-{kind}"
        vectors = REPO / f"artifacts/test/vectors-{kind}"
        if not (vectors / "medical").exists():
            print(f"skipping {kind}: no {vectors} (run the test suite once)")
            continue
        texts = probe_texts(fixtures)
        for name in ("medical", "math"):
            rows.append(
                (f"{kind} {name}", uncarried_effect(fixtures / "base", TuningVector(vectors / name), texts))
            )
    from archs import FAMILIES, PROMPTS, pair

    with tempfile.TemporaryDirectory() as tmp:
        for family in ("llama", "qwen2", "phi3", "gemma2"):
            if family not in FAMILIES:
                continue
            base, tuned = pair(family, Path(tmp))
            vec = extract(base, tuned, Path(tmp) / family / "vectors" / "tuned", progress=False)
            rows.append((f"random {family} (every tensor moved)", uncarried_effect(base, vec, PROMPTS)))
    head = f"{'vector':<38} {'left-out share':>14} {'mean nats':>10} {'max nats':>9} {'whole tau':>10} {'tokens':>7}"
    print(head)
    for name, r in rows:
        print(
            f"{name:<38} {r['share']:>14.4%} {r['mean_nats']:>10.4f} {r['max_nats']:>9.4f} "
            f"{r['vector_mean_nats']:>10.4f} {r['tokens']:>7}"
        )


if __name__ == "__main__":
    main()
