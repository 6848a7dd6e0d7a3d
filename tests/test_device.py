"""--device: what it resolves to, what it refuses, and CPU/CUDA agreement of extract, analyze and attribute.

The agreement tests run only where torch sees a CUDA device (skipped with the reason otherwise; CI has none).
Tolerances, stated once (docs/scaling.md repeats them):

- extract: tau bit for bit (the same float32 subtraction), norms to 1e-6 relative;
- analyze, weights: every number of every module to 1e-4 (relative to the number, or absolute below 1);
- analyze, probe: CKA to 1e-6, principal angles to 0.01°, change dimensions within 1;
- attribute: losses to 1e-5 relative, estimates to 1e-3 of the largest estimate, recovered shares to 1e-3.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import artifacts_dir

from tunevec.analysis.device import resolve_device
from tunevec.analysis.options import parse_layers, parse_size
from tunevec.core.errors import TunevecError

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="no CUDA device visible to torch: CPU/CUDA agreement needs one"
)


# ----------------------------------------------------------------------------- resolution (everywhere)


def test_auto_is_cpu_without_cuda_and_cuda_names_are_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(TunevecError, match="sees no CUDA device.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(TunevecError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(TunevecError, match=r"only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


def test_memory_sizes_and_layer_ranges_parse_as_documented():
    assert parse_size("20GiB") == parse_size("20G") == 20 * 2**30
    assert parse_size("64GB") == 64 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1000") == 1000
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)
    assert parse_layers("24:30") == (24, 30)
    for bad in ("30:24", "5", "a:b", "3:3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_layers(bad)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_on_a_cpu_only_machine_is_refused_with_what_to_do(tmp_path):
    from tunevec.analysis.attribution import configure

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(
        [str(tmp_path), "--base", str(tmp_path), "--out", str(tmp_path / "r"), "--device", "cuda"]
    )
    with pytest.raises(TunevecError, match="sees no CUDA device.*--device cpu"):
        args.run(args)


# ----------------------------------------------------------------------------- agreement (CUDA only)


def _fixtures(request, kind: str) -> Path:
    """The built fixtures of ``kind`` if present (no fixture code imported), else the conftest fixture."""
    path = artifacts_dir() / f"fixtures-{kind}"
    if (path / "fixtures.json").exists():
        return path
    return request.getfixturevalue(f"{kind}_fixtures")


def _close(a, b, path: str = "", rel: float = 1e-4) -> list[str]:
    """Paths where two JSON-like trees differ beyond ``rel`` (relative, or absolute below 1)."""
    if isinstance(a, dict):
        return [
            p
            for k in a
            if k not in ("timing_seconds", "resources", "created", "settings", "estimate")
            for p in _close(a[k], b[k], f"{path}.{k}", rel)
        ]
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [
            p for i, (x, y) in enumerate(zip(a, b, strict=True)) for p in _close(x, y, f"{path}[{i}]", rel)
        ]
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return []
        return [] if abs(a - b) <= rel * max(1.0, abs(a), abs(b)) else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def _agreement(request, tmp_path: Path, kind: str, other: str = "cuda") -> None:
    """extract, analyze (weights and probe) and attribute on the CPU and on ``other``, compared."""
    from tunevec.analysis.attribution import attribute_vector, load_examples
    from tunevec.analysis.output import to_json
    from tunevec.analysis.probe import ProbeSettings, load_probe, representation_change
    from tunevec.analysis.report import build_report
    from tunevec.analysis.resident import load_model
    from tunevec.analysis.walk import ReportOptions
    from tunevec.core.extract import extract
    from tunevec.core.vector import TuningVector

    fx = _fixtures(request, kind)
    devices = {"cpu": torch.device("cpu"), "other": torch.device(other)}
    for key, dev in devices.items():
        extract(fx / "base", fx / "medical", tmp_path / key, name="medical", progress=False, device=dev)
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text())["tensors"] for d in devices)
    for name, entry in a.items():
        assert entry["sha256"] == b[name]["sha256"], name  # tau bit for bit
        assert entry["norm"] == pytest.approx(b[name]["norm"], rel=1e-6)

    opts = ReportOptions(progress=False, param_budget=100_000)
    reports = {
        k: to_json(build_report([tmp_path / "cpu"], fx / "base", options=opts, device=d))
        for k, d in devices.items()
    }
    assert _close(reports["cpu"]["vectors"], reports["other"]["vectors"]) == []

    texts = load_probe(fx / "probe.jsonl")[:24]
    settings = ProbeSettings(max_texts=24)
    vector = TuningVector(tmp_path / "cpu")
    reps = {
        k: representation_change(fx / "base", {"medical": vector}, texts, settings, progress=False, device=d)
        for k, d in devices.items()
    }
    rows = zip(
        reps["cpu"]["vectors"]["medical"]["layers"],
        reps["other"]["vectors"]["medical"]["layers"],
        strict=True,
    )
    for x, y in rows:
        assert x["cka"] == pytest.approx(y["cka"], abs=1e-6)
        assert x["mean_angle_deg"] == pytest.approx(y["mean_angle_deg"], abs=0.01)
        assert abs(x["dims_for_energy"] - y["dims_for_energy"]) <= 1

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fx / "base")
    data = fx / "heldout.jsonl" if (fx / "heldout.jsonl").exists() else fx / "probe.jsonl"
    examples = load_examples(data, tok, "medical", 8, 64)
    runs = {}
    for key, dev in devices.items():
        model = load_model(fx / "base", dev)
        runs[key] = attribute_vector(model, vector, examples, ks=[1, 2], seeds=(0,), batch_size=4)
        del model
    x, y = runs["cpu"], runs["other"]
    for key in ("base", "tuned", "all_components"):
        assert x["loss"][key] == pytest.approx(y["loss"][key], rel=1e-5)
    scale = max(abs(r["estimate"]["mean"]) for r in x["components"])
    for rx, ry in zip(x["components"], y["components"], strict=True):
        for kind_ in ("tuned", "base", "mean", "weight"):
            assert abs(rx["estimate"][kind_] - ry["estimate"][kind_]) <= 1e-3 * scale, (rx["name"], kind_)
    for cx, cy in zip(x["curve"], y["curve"], strict=True):
        assert cx["recovered"] == pytest.approx(cy["recovered"], abs=1e-3)


@needs_cuda
def test_cpu_and_cuda_agree_on_the_tiny_fixtures(request, tmp_path):
    _agreement(request, tmp_path, "tiny")


@needs_cuda
def test_cpu_and_cuda_agree_on_the_smol_fixtures(request, tmp_path):
    _agreement(request, tmp_path, "smol")
