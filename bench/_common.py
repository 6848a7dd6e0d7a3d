"""Shared helpers of the serving benchmarks: the offline environment, fixture paths, the run header, statistics
and tables. Servers are in ``_servers.py``, load generation in ``_load.py``."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_BASE = REPO / "artifacts/test/fixtures-tiny/base"
TINY_VECTORS = REPO / "artifacts/test/vectors-tiny"
SMOL_FIXTURES = REPO / "artifacts/fixtures/smol"


# ----------------------------------------------------------------------------------------------- model paths


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", choices=("tiny", "smol"), default="tiny", help="fixture set (default tiny)"
    )
    parser.add_argument("--base", type=Path, help="base model folder (default: the --model fixture's base/)")
    parser.add_argument("--vectors", type=Path, help="folder with medical/ and math/ tuning vectors")
    parser.add_argument("--dtype", help="engine dtype (default float32 for tiny, auto for smol)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests (a smoke run)")
    parser.add_argument("--log-dir", type=Path, help="server logs and caches (default: a temp folder, kept)")


def _find_vectors(base: Path) -> Path | None:
    """A folder under artifacts/ with medical/ and math/ vectors extracted from ``base`` (by fingerprint)."""
    import json

    from tunevec.core.checkpoint import Checkpoint

    try:
        fingerprint = Checkpoint(base).fingerprint()
    except Exception:
        return None
    for manifest in sorted((REPO / "artifacts").rglob("medical/manifest.json")):
        folder = manifest.parent.parent
        if ".tunevec-cache" in folder.parts or not (folder / "math" / "manifest.json").exists():
            continue
        try:
            ok = all(
                json.loads((folder / v / "manifest.json").read_text()).get("base", {}).get("fingerprint")
                == fingerprint
                for v in ("medical", "math")
            )
        except (OSError, ValueError):
            continue
        if ok:
            return folder
    return None


def resolve_model(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """(base, vectors, dtype) for --model / --base / --vectors; exits with a message if one is missing."""
    if args.model == "tiny":
        base = args.base or TINY_BASE
        vectors = args.vectors or TINY_VECTORS
        dtype = args.dtype or "float32"
        hint = "run the test suite once (tests/conftest.py builds them: fixtures tiny_fixtures, tiny_vectors)"
    else:
        base = args.base or SMOL_FIXTURES / "base"
        vectors = args.vectors or _find_vectors(base)
        dtype = args.dtype or "auto"
        hint = (
            "build them (`make demo` builds the fixtures and extracts both vectors under artifacts/; or "
            "`tunevec fixtures build --kind smol --out artifacts/fixtures/smol`, then `tunevec extract` for "
            "medical and math) or pass --base and --vectors"
        )
    for what, path in (("base", base), ("vectors", vectors)):
        if path is None or not Path(path).exists():
            sys.exit(f"--model {args.model}: no {what} folder ({path}); {hint}")
    for v in ("medical", "math"):
        if not (Path(vectors) / v / "manifest.json").exists():
            sys.exit(f"{vectors}: no {v}/ vector; {hint}")
    return Path(base).resolve(), Path(vectors).resolve(), dtype


def vocab_size(base: Path) -> int:
    import json

    return int(json.loads((base / "config.json").read_text())["vocab_size"])


def num_layers(base: Path) -> int:
    import json

    return int(json.loads((base / "config.json").read_text())["num_hidden_layers"])


# ----------------------------------------------------------------------------------------------- header


def header(title: str, lines: list[str]) -> str:
    import torch
    import vllm

    load = os.getloadavg()
    out = [
        f"== {title} ==",
        f"machine: {platform.node() or '?'}, nproc={os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min) at start",
        f"software: python {platform.python_version()}, torch {torch.__version__}, vllm {vllm.__version__}",
    ]
    return "\n".join(out + lines)


def loadavg() -> str:
    a = os.getloadavg()
    return f"{a[0]:.2f} {a[1]:.2f} {a[2]:.2f}"


# ----------------------------------------------------------------------------------------------- run folder


def workdir_for(args: argparse.Namespace, prefix: str) -> Path:
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        return args.log_dir.resolve()
    return Path(tempfile.mkdtemp(prefix=prefix))


# ----------------------------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(rows: list[list[str]], head: list[str]) -> str:
    """A plain-text table with right-aligned columns (the first left-aligned)."""
    cols = [head, *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])
