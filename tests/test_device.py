"""--device: what it resolves to, what it refuses, and CPU/CUDA agreement of extract, analyze and attribute.

The agreement tests run only where torch sees a CUDA device (skipped with the reason otherwise; CI has none).
Tolerances, stated once (docs/scaling.md repeats them):

- extract: tau bit for bit (the same float32 subtraction), its norms to 1e-4 relative (float32 sums);
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


KINDS = [pytest.param("tiny", id="tiny_fixtures"), pytest.param("smol", id="smol_fixtures")]
DEVICES = {"cpu": torch.device("cpu"), "cuda": torch.device("cuda")}


@pytest.fixture(scope="module", params=KINDS)
def extracted(request, tmp_path_factory) -> tuple[Path, Path]:
    """(fixtures, folder) with the medical vector extracted on the CPU (folder/cpu) and on CUDA (folder/cuda)."""
    from tunevec.core.extract import extract

    if not CUDA:
        pytest.skip("no CUDA device visible to torch: CPU/CUDA agreement needs one")
    fx = _fixtures(request, request.param)
    out = tmp_path_factory.mktemp(request.param)
    for key, dev in DEVICES.items():
        extract(fx / "base", fx / "medical", out / key, name="medical", progress=False, device=dev)
    return fx, out


@needs_cuda
def test_extract_on_cuda_stores_the_same_tau(extracted):
    _, out = extracted
    a, b = (json.loads((out / d / "manifest.json").read_text())["tensors"] for d in DEVICES)
    for name, entry in a.items():
        assert entry["sha256"] == b[name]["sha256"], name  # tau bit for bit
        # ‖τ‖ is a float32 sum: CUDA adds in another order (1.3e-5 apart on a 4M-entry tiny tensor)
        assert entry["norm"] == pytest.approx(b[name]["norm"], rel=1e-4)


@needs_cuda
def test_weights_walk_on_cuda_agrees(extracted):
    from tunevec.analysis.output import to_json
    from tunevec.analysis.report import build_report
    from tunevec.analysis.walk import ReportOptions

    fx, out = extracted
    opts = ReportOptions(progress=False, param_budget=100_000)
    reports = {
        k: to_json(build_report([out / "cpu"], fx / "base", options=opts, device=d))
        for k, d in DEVICES.items()
    }
    assert _close(reports["cpu"]["vectors"], reports["cuda"]["vectors"]) == []


@needs_cuda
def test_probe_on_cuda_agrees(extracted):
    from tunevec.analysis.probe import ProbeSettings, load_probe, representation_change
    from tunevec.core.vector import TuningVector

    fx, out = extracted
    texts = load_probe(fx / "probe.jsonl")[:24]
    vector = TuningVector(out / "cpu")
    reps = {
        k: representation_change(
            fx / "base", {"medical": vector}, texts, ProbeSettings(max_texts=24), progress=False, device=d
        )
        for k, d in DEVICES.items()
    }
    rows = zip(
        reps["cpu"]["vectors"]["medical"]["layers"], reps["cuda"]["vectors"]["medical"]["layers"], strict=True
    )
    for x, y in rows:
        assert x["cka"] == pytest.approx(y["cka"], abs=1e-6), x["layer"]
        assert x["mean_angle_deg"] == pytest.approx(y["mean_angle_deg"], abs=0.01), x["layer"]
        assert abs(x["dims_for_energy"] - y["dims_for_energy"]) <= 1, x["layer"]


@needs_cuda
def test_attribution_on_cuda_agrees(extracted):
    from transformers import AutoTokenizer

    from tunevec.analysis.attribution import attribute_vector, load_examples
    from tunevec.analysis.resident import load_model
    from tunevec.core.vector import TuningVector

    fx, out = extracted
    vector = TuningVector(out / "cpu")
    data = fx / "heldout.jsonl" if (fx / "heldout.jsonl").exists() else fx / "probe.jsonl"
    examples = load_examples(data, AutoTokenizer.from_pretrained(fx / "base"), "medical", 8, 64)
    runs = {}
    for key, dev in DEVICES.items():
        model = load_model(fx / "base", dev)
        runs[key] = attribute_vector(model, vector, examples, ks=[1, 2], seeds=(0,), batch_size=4)
        del model
    x, y = runs["cpu"], runs["cuda"]
    for key in ("base", "tuned", "all_components"):
        assert x["loss"][key] == pytest.approx(y["loss"][key], rel=1e-5), key
    scale = max(abs(r["estimate"]["mean"]) for r in x["components"])
    for rx, ry in zip(x["components"], y["components"], strict=True):
        for kind in ("tuned", "base", "mean", "weight"):
            assert abs(rx["estimate"][kind] - ry["estimate"][kind]) <= 1e-3 * scale, (rx["name"], kind)
    for cx, cy in zip(x["curve"], y["curve"], strict=True):
        assert cx["recovered"] == pytest.approx(cy["recovered"], abs=1e-3), cx["k"]
