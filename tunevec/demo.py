"""`make demo`: the whole job on the bundled smol fixtures, each stage cached so a second run only re-reads.

    python -m tunevec.demo --artifacts artifacts

1. build (or reuse) the smol fixtures: SmolLM2-135M-Instruct and its medical and math fine-tunes;
2. extract the medical and math tuning vectors (skipped when present and extracted from these very models);
3. analyse them with `tunevec analyze`, and find which layers' attention and MLP blocks carry each vector's gain
   with `tunevec attribute` (each skipped when its report is current; a failure is reported, not fatal);
4. start the steering server and run the demo grid (eval/grids/demo.yaml) with `tunevec eval`, resuming
   finished cells;
5. print the results table, where the reports and plots are, and the time each stage took.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tunevec.core.errors import TunevecError

REPO = Path(__file__).resolve().parents[1]
DEMO_GRID = REPO / "eval" / "grids" / "demo.yaml"
DOMAINS = ("medical", "math")
MCQ_TASK = "tunevec_medical_mcq"  # the demo grid's multiple-choice task, whose log-likelihoods are shown
# The representation probe runs three 135M models over the probe texts; 60 texts (of 240 by default) keep the
# analysis to a few minutes on 2 CPU cores. Measured: 1160 s with the defaults, 742 s of it the probe.
ANALYZE_OPTIONS = ("--max-probe-texts", "60")


def say(message: str) -> None:
    print(f"[tunevec demo] {message}", flush=True)


def extract_vectors(fixtures: Path, out: Path) -> Path:
    """medical/ and math/ under ``out``; an artifact is reused only if its base and tuned fingerprints match."""
    from tunevec.core.checkpoint import Checkpoint
    from tunevec.core.extract import extract
    from tunevec.core.vector import TuningVector

    base_fp = Checkpoint(fixtures / "base").fingerprint()
    for name in DOMAINS:
        tuned_fp = Checkpoint(fixtures / name).fingerprint()
        try:
            m = TuningVector(out / name).manifest
            current = m.base.get("fingerprint") == base_fp and m.tuned.get("fingerprint") == tuned_fp
        except TunevecError:
            current = False
        if current:
            say(f"vector {name}: current ({out / name})")
            continue
        vec = extract(fixtures / "base", fixtures / name, out / name, name=name, force=True, progress=False)
        say(f"vector {name}: extracted to {vec.path}")
    return out


def derive_activations(fixtures: Path, vectors: Path) -> None:
    """``<domain>-act`` beside each vector: the mean residual-stream shift tau causes on the fixtures' held-out chat
    exchanges of its own domain, as per-layer increments (``tunevec derive``; reused while its source is current)."""
    from tunevec.cli import main as tunevec_main
    from tunevec.core.activation import ActivationVector
    from tunevec.core.vector import TuningVector

    for name in DOMAINS:
        out = vectors / f"{name}-act"
        digest = TuningVector(vectors / name).content_digest
        try:
            current = ActivationVector(out).manifest["source"].get("vector_digest") == digest
        except (TunevecError, KeyError):
            current = False
        if current:
            say(f"activation vector {name}-act: current ({out})")
            continue
        argv = ["derive", str(vectors / name), "--base", str(fixtures / "base"), "--out", str(out),
                "--probe", str(fixtures / "heldout.jsonl"), "--domain", name, "--force"]  # fmt: skip
        if tunevec_main(argv) != 0:
            raise TunevecError(f"tunevec derive of {name} failed")


def _cached_run(label: str, command: str, args: list[str], vectors: Path, out: Path) -> Path | None:
    """Run `tunevec <command> ARGS` in a subprocess unless ``out`` holds its output for these very vectors.

    A failure is reported, not raised: the evaluation goes on without this stage.
    """
    from tunevec.cli import COMMANDS

    if command not in COMMANDS:
        say(f"tunevec {command} is not available in this build; skipping the {label}")
        return None
    cmd = [sys.executable, "-m", "tunevec.cli", command, *args]
    stamp = out / ".demo-inputs.json"
    inputs = {n: json.loads((vectors / n / "manifest.json").read_text())["tensors"] for n in DOMAINS}
    key = {"vectors": {n: sorted(e["sha256"] for e in t.values()) for n, t in inputs.items()}, "cmd": cmd[3:]}
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        say(f"{label}: current ({out})")
        return out
    say(f"{label}: " + " ".join(cmd[2:]))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-2000:]
        say(f"{label} failed (exit {done.returncode}); the evaluation goes on without it:\n{tail}")
        return None
    for line in done.stdout.splitlines():
        say(f"  {line}")
    stamp.write_text(json.dumps(key))
    return out


def analyse(fixtures: Path, vectors: Path, out: Path) -> Path | None:
    """`tunevec analyze` of both vectors (spectra, alignment, representation change, cross-domain)."""
    args = [*(str(vectors / n) for n in DOMAINS), "--base", str(fixtures / "base"), "--out", str(out)]
    return _cached_run("analysis", "analyze", [*args, *ANALYZE_OPTIONS], vectors, out)


def attribute(fixtures: Path, vectors: Path, out: Path) -> Path | None:
    """`tunevec attribute` of both vectors on the fixtures' held-out exchanges (heldout.jsonl)."""
    args = [*(str(vectors / n) for n in DOMAINS), "--base", str(fixtures / "base"), "--out", str(out)]
    return _cached_run("attribution", "attribute", args, vectors, out)


def run(artifacts: Path, grid_path: Path, fresh: bool = False) -> int:
    from tunevec.eval.choices import choice_stats, to_markdown
    from tunevec.eval.commands import evaluate
    from tunevec.eval.grid import Grid
    from tunevec.fixtures import build_fixtures

    artifacts = artifacts.resolve()
    times: dict[str, float] = {}
    started = time.monotonic()

    def stage(name: str, t0: float) -> None:
        times[name] = time.monotonic() - t0
        say(f"{name}: {times[name]:.0f}s")

    t0 = time.monotonic()
    fixtures = build_fixtures("smol", artifacts / "fixtures" / "smol")
    stage("fixtures", t0)

    t0 = time.monotonic()
    vectors = extract_vectors(fixtures, artifacts / "vectors" / "smol")
    derive_activations(fixtures, vectors)
    stage("vectors", t0)

    t0 = time.monotonic()
    report = analyse(fixtures, vectors, artifacts / "analysis" / "smol")
    stage("analysis", t0)

    t0 = time.monotonic()
    attribution = attribute(fixtures, vectors, artifacts / "analysis" / "smol-attribution")
    stage("attribution", t0)

    t0 = time.monotonic()
    grid = Grid.load(grid_path, {"base": str(fixtures / "base"), "vectors": str(vectors)})
    out = artifacts / "eval" / grid.name
    result = evaluate(grid, out, fresh=fresh)
    stage("evaluation", t0)

    total = time.monotonic() - started
    print()
    print(result["table"])
    print()
    try:
        choices = to_markdown(choice_stats(out, MCQ_TASK))
        print(
            f"Answer log-likelihoods behind {MCQ_TASK} (python -m tunevec.eval.choices {out} --task {MCQ_TASK}):"
        )
        print(choices + "\n")
    except TunevecError as exc:  # a failed cell must not hide the rest of the summary
        say(f"answer log-likelihoods not shown: {exc}")
    if report is not None:
        say(
            f"analysis report: {report} ({', '.join(sorted(p.name for p in report.iterdir() if p.is_file()))})"
        )
    if attribution is not None:
        say(f"attribution patching: {attribution} (attribution.md, .json, .png)")
    say(f"evaluation: {result['paths']['md']} (also results.csv, results.json)")
    for p in result["plots"]:
        say(f"plot: {p}")
    say(f"lm-eval results and samples: {out / 'lm-eval'}; server logs: {out / 'logs'}")
    say("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f"; total {total / 60:.1f} min")
    if result["failures"]:
        say(f"{len(result['failures'])} cell(s) failed; run `make demo` again to retry only those")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunevec.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--artifacts", type=Path, default=Path("artifacts"), help="where everything is written"
    )
    parser.add_argument("--grid", type=Path, default=DEMO_GRID, help="grid file (default: the demo grid)")
    parser.add_argument("--fresh", action="store_true", help="re-run finished evaluation cells")
    args = parser.parse_args(argv)
    try:
        return run(args.artifacts, args.grid, fresh=args.fresh)
    except TunevecError as exc:
        print(f"tunevec demo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
