"""Cost known before it is paid: the estimates each command prints, the refusals, --layers, and the meters.

Timing targets live in bench/bench_scaling.py and bench/device_check.sh; here only behaviour: what is estimated
from what, that a run which would not fit is refused before any model is loaded, with options that are real.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import time

import pytest
import torch
from synthetic import llama_like, perturbed, write_model

from tunevec.analysis.estimate import (
    AnalyzeInputs,
    AttributionWork,
    ModelShape,
    ProbeWork,
    TensorPlan,
    analyze_cost,
    check,
    estimate_attribute,
    randomized_svd_flops,
)
from tunevec.analysis.meter import Meter
from tunevec.analysis.walk import ReportOptions
from tunevec.core.errors import TunevecError
from tunevec.core.extract import extract

CPU = torch.device("cpu")


def _parser(configure) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser


def _llama7b() -> tuple[ModelShape, AnalyzeInputs, int]:
    """A Llama-2-7B pair (every linear changed), from shapes alone: what docs/scaling.md predicts."""
    d, ffn, layers, vocab = 4096, 11008, 32, 32000
    shapes = {
        "model.embed_tokens.weight": (vocab, d),
        "lm_head.weight": (vocab, d),
        "model.norm.weight": (d,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (d, d)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (ffn, d)
        shapes[p + "mlp.down_proj.weight"] = (d, ffn)
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (d,)
    config = {"num_hidden_layers": layers, "hidden_size": d, "intermediate_size": ffn, "vocab_size": vocab}
    model = ModelShape.from_shapes(shapes, config, "LlamaForCausalLM", 2)
    plans, changed = [], 0
    for name, dims in shapes.items():
        linear = "proj" in name  # every linear of the test's own table
        changed += math.prod(dims) if linear else 0
        layer = int(name.split(".")[2]) if ".layers." in name else None
        plans.append(TensorPlan(dims, layer, linear, (linear,), 2))
    return model, AnalyzeInputs(model, tuple(plans), 2, model.bytes, model.bytes), changed


def test_a_7b_pair_is_estimated_from_its_shapes_as_documented():
    model, inputs, changed = _llama7b()
    assert model.params == 6_738_415_616 and changed == 6_476_005_376
    probe = ProbeWork(
        texts=24, tokens=3072, padded_tokens=3072, kept_tokens=3072, max_length=128, batch_size=8
    )
    est = analyze_cost(inputs, ReportOptions(), probe, CPU)
    stages = est.as_dict()["stages"]
    # one resident float32 model is the probe's floor; the weights walk holds a tensor at a time
    assert stages["probe"]["parts"]["model (float32)"] == 4 * model.params
    assert (
        stages["weights"]["device_bytes"]
        < 2 * 2**30
        < 27 * 2**30
        < stages["probe"]["device_bytes"]
        < 32 * 2**30
    )
    # W and tau SVDs: 224 randomized sketches of 256 + 10 each; the factorisation reuses tau's
    one_w = randomized_svd_flops(4096, 11008, 256)
    assert stages["weights"]["work"]["svd"] == pytest.approx(
        2 * (32 * 3 * one_w + 32 * 4 * randomized_svd_flops(4096, 4096, 256))
    )
    job = AttributionWork(0, 64, changed, 2 * changed, 48, 48 * 64, 64, 48 * 63, 7, 5, 16)
    att = estimate_attribute(model, [job], CPU).as_dict()["stages"]["vector 1"]
    assert att["parts"]["base copy and tau"] == 4 * changed  # bf16 base copy + bf16 tau, beside the model
    assert job.evaluations == 3 + 128 + 7 * 8 and job.suffix_passes < job.evaluations


def test_a_run_that_does_not_fit_is_refused_with_the_options_that_would_make_it_fit(capsys):
    model, inputs, _ = _llama7b()
    probe = ProbeWork(
        texts=240, tokens=30000, padded_tokens=30720, kept_tokens=6000, max_length=128, batch_size=8
    )
    est = analyze_cost(inputs, ReportOptions(), probe, CPU)
    options = ["a GPU (--device cuda)", "fewer probe texts", "fewer layers (--layers)", "--max-memory SIZE"]
    with pytest.raises(
        TunevecError, match=r"would not fit: .* needed, 24.0 GiB --max-memory\. Options: a GPU"
    ):
        check(est, 24 * 2**30, options)
    printed = capsys.readouterr().out
    assert printed.startswith("estimate for analyze on cpu") and "probe:" in printed
    check(est, 64 * 2**30, options, quiet=True)  # fits a 64 GiB machine


def _pair(tmp_path):
    base = llama_like(0, vocab=64, hidden=32)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", perturbed(base))
    return extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "v", name="v", progress=False)


def test_commands_refuse_before_reading_when_max_memory_is_too_small(tmp_path, capsys):
    from tunevec.analysis.commands import configure_analyze, configure_extract

    _pair(tmp_path)
    out = tmp_path / "r"
    args = _parser(configure_analyze).parse_args(
        [
            str(tmp_path / "v"),
            "--base",
            str(tmp_path / "base"),
            "--out",
            str(out),
            "--no-probe",
            "--max-memory",
            "1MiB",
        ]
    )
    with pytest.raises(TunevecError, match="analyze would not fit.*fewer layers \\(--layers START:END"):
        args.run(args)
    assert not out.exists()
    assert "estimate for analyze on cpu" in capsys.readouterr().out
    args = _parser(configure_extract).parse_args(
        ["--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--out", str(tmp_path / "w")]
        + ["--max-memory", "64KiB"]
    )
    with pytest.raises(TunevecError, match="extract would not fit"):
        args.run(args)
    assert not (tmp_path / "w").exists()


def test_layers_restrict_the_weights_walk_and_the_estimate(tmp_path):
    from tunevec.analysis.output import to_json
    from tunevec.analysis.report import build_report

    _pair(tmp_path)
    opts = ReportOptions(progress=False, layers=(1, 2))
    report = to_json(build_report([tmp_path / "v"], tmp_path / "base", options=opts))
    layers = {m["layer"] for m in report["vectors"]["v"]["modules"].values()}
    assert layers == {1}
    assert report["settings"]["layers"] == [1, 2] and report["resources"]["stages"]["weights"]["seconds"] >= 0
    with pytest.raises(TunevecError, match="START < END|0 <= START < END"):
        ReportOptions(layers=(2, 2))


def test_the_factorisation_reuses_the_spectrums_sketch_and_gets_the_same_factors():
    from tunevec.analysis.walk import _factor, _spectrum

    g = torch.Generator().manual_seed(0)
    tau = torch.randn(600, 40, generator=g) @ torch.randn(40, 700, generator=g) + 0.01 * torch.randn(
        600, 700, generator=g
    )
    opts = ReportOptions(full_svd_max_dim=100, sketch=64, factor_max_rank=64)
    total = float(tau.double().pow(2).sum())
    spec, s, complete, triplets = _spectrum(tau, total, opts)
    assert triplets is not None and spec["svd"] == "randomized"
    reused = _factor(tau, s, complete, total, opts, triplets)
    fresh = _factor(tau, s, complete, total, opts, None)
    assert reused == fresh and reused["method"] == "randomized"


def test_the_meter_reports_each_stages_time_and_peak_memory():
    meter = Meter(CPU)
    with meter.stage("allocate"):
        # 64 MiB of fresh anonymous pages, touched: mapped directly, because an allocator (glibc's, or a preloaded
        # tcmalloc) may serve a tensor from memory an earlier test freed but kept resident; private, because a
        # shared mapping counts as shmem, not RssAnon.
        block = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for page in range(0, len(block), mmap.PAGESIZE):
            block[page] = 1
        time.sleep(0.2)  # several of the anonymous-memory sampler's 20 ms periods
        block.close()
    with meter.stage("idle"):
        pass
    stages = meter.as_dict()["stages"]
    assert stages["allocate"]["seconds"] >= 0.2 > stages["idle"]["seconds"] >= 0
    assert stages["allocate"]["peak_anon_bytes"] - stages["idle"]["peak_anon_bytes"] > 48 * 2**20
    if stages["allocate"]["rss_scope"] == "stage":  # VmHWM reset per stage where /proc/self/clear_refs allows
        assert stages["allocate"]["peak_rss_bytes"] - stages["idle"]["peak_rss_bytes"] > 48 * 2**20
    assert stages["allocate"]["peak_device_bytes"] is None
    assert json.dumps(meter.as_dict())


def test_attribute_refuses_before_loading_the_model_and_names_its_options(
    tiny_fixtures, tiny_vectors, tmp_path
):
    from tunevec.analysis.attribution import configure

    argv = [
        str(tiny_vectors / "medical"),
        "--base",
        str(tiny_fixtures / "base"),
        "--out",
        str(tmp_path / "a"),
    ]
    args = _parser(configure).parse_args([*argv, "--max-memory", "1MiB", "--device", "cpu"])
    with pytest.raises(
        TunevecError, match=r"attribute would not fit.*--batch-size, now 16.*--layers START:END"
    ):
        args.run(args)
    assert not (tmp_path / "a").exists()
    args = _parser(configure).parse_args([*argv, "--device", "cpu", "--tf32"])
    with pytest.raises(TunevecError, match="--tf32 applies to CUDA devices"):
        args.run(args)
