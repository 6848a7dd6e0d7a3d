"""`tunevec analyze`: the report says what the tuning vectors did, on synthetic checkpoints with known answers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from synthetic import llama_like, perturbed, write_model

from tunevec.analysis.alignment import alignment_summary
from tunevec.analysis.probe import BUILTIN_PROBE, ProbeSettings, representation_change
from tunevec.analysis.report import ReportOptions, build_report
from tunevec.cli import main
from tunevec.core.errors import TunevecError
from tunevec.core.extract import extract
from tunevec.core.roles import classify

HIDDEN = 16
K = 4
FAST = ReportOptions(progress=False)


def structured_tuning(base: dict[str, torch.Tensor], scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Tuned weights whose τ amplifies W's top-K singular values in attention and is new in the MLP.

    attention: τ = U_K diag(scale · σ_K) V_Kᵀ (each existing singular value grows by ``scale``)
    MLP:       τ = P⊥ G Q⊥ for Gaussian G, P⊥ / Q⊥ projecting out W's top-K left / right singular vectors
    """
    g = torch.Generator().manual_seed(7)
    tuned = {}
    for name, w in base.items():
        role = classify(name).role
        if role not in ("attention", "mlp") or w.ndim != 2:
            tuned[name] = w.clone()
            continue
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        uk, vk = u[:, :K], vh[:K].mT
        if role == "attention":
            tau = uk @ torch.diag(scale * s[:K]) @ vk.mT
        else:
            rnd = torch.randn(w.shape, generator=g, dtype=torch.float64)
            p_out = torch.eye(w.shape[0], dtype=torch.float64) - uk @ uk.mT
            p_in = torch.eye(w.shape[1], dtype=torch.float64) - vk @ vk.mT
            tau = scale * p_out @ rnd @ p_in
        tuned[name] = (w.double() + tau).float()
    return tuned


@pytest.fixture
def synthetic_pair(tmp_path):
    base = llama_like(0, hidden=HIDDEN)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", structured_tuning(base))
    vec = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "v", name="structured", progress=False)
    return tmp_path, base, vec


def test_new_directions_in_mlp_and_amplification_in_attention_are_reported_per_role(synthetic_pair):
    tmp, _, _ = synthetic_pair
    report = build_report([tmp / "v"], tmp / "base", options=ReportOptions(k=K, progress=False))
    roles = report["vectors"]["structured"]["linear_by_role"]
    att, mlp = roles["attention"]["alignment"], roles["mlp"]["alignment"]
    assert att["amplification_share"] == pytest.approx(1.0, abs=1e-3)
    assert att["new_share"] < 1e-3
    assert att["amplification_ratio"] > 10
    assert mlp["new_share"] == pytest.approx(1.0, abs=1e-3)
    assert mlp["amplification_share"] < 1e-3
    assert mlp["new_share"] > mlp["new_baseline"]
    # every attention module's singular values grew by 5% along their own directions
    for name, m in report["vectors"]["structured"]["modules"].items():
        if m["role"] == "attention":
            assert m["alignment"]["mean_rel_sigma_change"] == pytest.approx(0.05, rel=1e-2), name
            assert m["alignment"]["k"] == K
    # size: attention τ is rank K, so K singular values hold all of its energy
    assert roles["attention"]["spectrum"]["energy_at"][str(K)] == pytest.approx(1.0, abs=1e-5)
    assert report["vectors"]["structured"]["by_layer"]["1"]["mlp"]["n_modules"] == 3


def test_module_alignment_matches_alignment_summary_computed_directly(synthetic_pair):
    tmp, base, vec = synthetic_pair
    report = build_report([tmp / "v"], tmp / "base", options=ReportOptions(progress=False, svd="full"))
    name = "model.layers.0.mlp.down_proj.weight"
    got = report["vectors"]["structured"]["modules"][name]["alignment"]
    want = alignment_summary(vec.read(name), base[name], method="full")  # k cap min(m, n)//4 < 256
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_cross_domain_cosine_is_one_with_itself_and_near_zero_with_an_independent_vector(tmp_path):
    base = llama_like(0, hidden=HIDDEN)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "t1", perturbed(base, seed=1))
    write_model(tmp_path / "t2", perturbed(base, seed=2))
    extract(tmp_path / "base", tmp_path / "t1", tmp_path / "a", name="a", progress=False)
    extract(tmp_path / "base", tmp_path / "t1", tmp_path / "a2", name="a_again", progress=False)
    extract(tmp_path / "base", tmp_path / "t2", tmp_path / "b", name="b", progress=False)
    report = build_report([tmp_path / "a", tmp_path / "a2", tmp_path / "b"], tmp_path / "base", options=FAST)
    pairs = {(p["a"], p["b"]): p for p in report["cross_domain"]["pairs"]}
    same = pairs[("a", "a_again")]
    assert same["overall"]["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert same["overall"]["sign_agreement"] == 1.0
    for name, mod in same["per_module"].items():
        assert mod["cosine"] == pytest.approx(1.0, abs=1e-9), name
    indep = pairs[("a", "b")]
    assert abs(indep["overall"]["cosine"]) < 0.1
    assert indep["overall"]["sign_agreement"] == pytest.approx(0.5, abs=0.05)
    assert abs(indep["by_role"]["mlp"]["cosine"]) < 0.1
    matrix = report["cross_domain"]["cosine_matrix"]
    assert matrix[0][1] == pytest.approx(1.0) and abs(matrix[0][2]) < 0.1 and matrix[2][2] == 1.0


def test_vectors_from_different_bases_are_refused(tmp_path):
    base0, base1 = llama_like(0, hidden=HIDDEN), llama_like(1, hidden=HIDDEN)
    for tag, base in (("0", base0), ("1", base1)):
        write_model(tmp_path / f"base{tag}", base)
        write_model(tmp_path / f"tuned{tag}", perturbed(base))
        extract(
            tmp_path / f"base{tag}",
            tmp_path / f"tuned{tag}",
            tmp_path / f"v{tag}",
            name=f"v{tag}",
            progress=False,
        )
    with pytest.raises(TunevecError, match="different bases"):
        build_report([tmp_path / "v0", tmp_path / "v1"], tmp_path / "base0", options=FAST)
    with pytest.raises(TunevecError, match="different base"):
        build_report([tmp_path / "v1"], tmp_path / "base0", options=FAST)
    assert main(["analyze", str(tmp_path / "v0"), str(tmp_path / "v1"), "--base", str(tmp_path / "base0"),
                 "--out", str(tmp_path / "r"), "--no-probe"]) == 2  # fmt: skip


def test_cli_writes_json_plots_and_markdown_with_the_findings(synthetic_pair, capsys):
    tmp, _, _ = synthetic_pair
    extract(tmp / "base", tmp / "tuned", tmp / "v2", name="again", progress=False)
    out = tmp / "report"
    rc = main(["analyze", str(tmp / "v"), str(tmp / "v2"), "--base", str(tmp / "base"), "--out", str(out),
               "--no-probe", "--k", str(K), "--param-budget", "2000"])  # fmt: skip
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "report.json",
        "summary.md",
        "spectra.png",
        "alignment.png",
        "size.png",
        "cross_domain.png",
    } <= names
    assert "cka.png" not in names  # --no-probe
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = json.loads(
        (out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}")
    )
    assert report["settings"]["k"] == K and report["representation"] is None
    budget = report["vectors"]["structured"]["budget"]
    assert budget["params_used"] <= 2000 and 0 < budget["energy"] <= 1
    md = (out / "summary.md").read_text()
    assert "**mlp**: 100.0% of ‖τ‖² in new directions" in md
    assert 'Pattern "MLP writes new directions, attention amplifies existing ones" holds:' in md
    assert "cosine 1.0000" in md
    assert "mlp: rel change" in capsys.readouterr().out


def test_randomized_path_zero_tau_modules_and_factorisation(tmp_path):
    base = llama_like(0, hidden=HIDDEN)
    tuned = perturbed(base, seed=3)
    for name in base:
        if ".layers.0." in name:  # a partial fine-tune: layer 0 untouched
            tuned[name] = base[name].clone()
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", tuned)
    extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "v", name="partial", progress=False)
    opts = ReportOptions(progress=False, full_svd_max_dim=0, sketch=6, factor_max_rank=6, param_budget=600)
    vec = build_report([tmp_path / "v"], tmp_path / "base", options=opts)["vectors"]["partial"]
    frozen = vec["modules"]["model.layers.0.mlp.up_proj.weight"]
    assert frozen["norm"] == 0 and "alignment" not in frozen and "factor" not in frozen
    live = vec["modules"]["model.layers.1.mlp.up_proj.weight"]
    assert live["spectrum"]["svd"] == "randomized" and not live["spectrum"]["complete"]
    assert live["spectrum"]["n_singular_values"] == 6
    assert live["factor"]["method"] == "randomized" and 0 < live["factor"]["rank"] <= 6
    assert 0 < live["factor"]["rel_error"] < 1
    assert vec["by_layer"]["0"]["mlp"]["norm"] == 0 and "alignment" not in vec["by_layer"]["0"]["mlp"]
    assert math.isfinite(vec["linear_by_role"]["mlp"]["alignment"]["new_share"])
    assert vec["budget"]["params_used"] <= 600
    assert all(m["rank"] == 0 for n, m in vec["budget"]["modules"].items() if ".layers.0." in n)


# ---------------------------------------------------------------- representation probe on a real tiny model


def tiny_llama(path, seed: int = 0, tuned_from=None, scale: float = 0.0):
    """A random 2-layer Llama (hidden 64) with a word-level tokenizer over the bundled probe texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [r["text"] for r in BUILTIN_PROBE],
        trainers.WordLevelTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]"], show_progress=False),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128,
        num_hidden_layers=2, vocab_size=300, pad_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if tuned_from is not None:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            model.load_state_dict(tuned_from.state_dict())
            for name, p in model.named_parameters():
                if "mlp" in name or "self_attn" in name:  # roles by the model's own module names, test only
                    p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model


def test_cka_of_a_model_with_itself_is_one_per_layer(tmp_path):
    tiny_llama(tmp_path / "base")
    settings = ProbeSettings(batch_size=6)
    rep = representation_change(tmp_path / "base", {"self": tmp_path / "base"}, list(BUILTIN_PROBE), settings)
    rows = rep["vectors"]["self"]["layers"]
    assert len(rows) == 3  # embeddings + 2 decoder layers
    for row in rows:
        assert row["cka"] == pytest.approx(1.0, abs=1e-9)
        assert row["max_angle_deg"] < 1e-3
    assert rep["n_tokens"] > 100 and set(rep["domains"]) == {"general", "medical", "math"}


def test_analyze_with_probe_reports_cka_below_one_for_a_tuned_model(tmp_path):
    base = tiny_llama(tmp_path / "fx" / "base")
    tiny_llama(tmp_path / "fx" / "tuned", tuned_from=base, scale=0.3)
    (tmp_path / "fx" / "probe.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in BUILTIN_PROBE[::2])  # the default: probe.jsonl beside the base
    )
    extract(tmp_path / "fx" / "base", tmp_path / "fx" / "tuned", tmp_path / "v", name="t", progress=False)
    out = tmp_path / "r"
    assert (
        main(["analyze", str(tmp_path / "v"), "--base", str(tmp_path / "fx" / "base"), "--out", str(out)])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    rep = report["representation"]
    assert rep["n_texts"] == len(BUILTIN_PROBE[::2]) and rep["source"].endswith("probe.jsonl")
    ckas = [row["cka"] for row in rep["vectors"]["t"]["layers"]]
    assert ckas[0] == pytest.approx(1.0)  # embeddings were not tuned
    assert all(c < 0.999 for c in ckas[1:])
    assert (out / "cka.png").exists() and "## Representation change" in (out / "summary.md").read_text()


def test_summary_and_report_do_not_import_each_other():
    """summary.py renders a written report; it must not need the module that builds one (no import cycle)."""
    import subprocess
    import sys

    code = (
        "import sys, tunevec.analysis.summary, tunevec.analysis.output; "
        "assert 'tunevec.analysis.report' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
