"""Behaviour of `tunevec fixtures build`: determinism, caching, specialisation, tasks, leakage, reloadability.

Most checks run on the real kind=tiny fixtures (the session fixture, cached on disk). Checks that need several
builds use SMALL, a shrunken config that builds in a few seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunevec.core.errors import TunevecError
from tunevec.fixtures import build_fixtures
from tunevec.fixtures.build import MANIFEST
from tunevec.fixtures.config import CorpusConfig, cache_key, resolve_config
from tunevec.fixtures.corpora import build_corpora, chat_messages, chatml, qa_text
from tunevec.fixtures.tasks import MATH_TASK, MEDICAL_TASK
from tunevec.fixtures.tiny import tiny_heldout_batches

SMALL = {
    "corpus": {
        "icd_train_items": 300,
        "drug_train_items": 100,
        "math_train_items": 300,
        "general_max_passages": 150,
        "probe_per_domain": 8,
        "mcq_icd_items": 6,
        "mcq_drug_items": 4,
        "math_task_items": 10,
    },
    "model": {"vocab_size": 512, "hidden_size": 64, "num_heads": 1, "num_kv_heads": 1, "num_layers": 1},
    "base": {"steps": 6, "batch_size": 4, "seq_len": 64, "warmup_steps": 2},
    "finetune": {"steps": 4, "batch_size": 4, "seq_len": 64, "warmup_steps": 1},
    "eval_examples": 4,
    "min_specialisation_gain": 0.0,
}
MODELS = ("base", "medical", "math")


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _content_files(folder: Path) -> list[str]:
    """Every file except fixtures.json (timings, root) and task YAMLs (absolute paths)."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and p.suffix != ".yaml"
    )


@pytest.fixture(scope="module")
def small_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("small")
    return {
        "a": build_fixtures("tiny", root / "a", seed=0, overrides=SMALL),
        "b": build_fixtures("tiny", root / "b", seed=0, overrides=SMALL),
        "seed1": build_fixtures("tiny", root / "seed1", seed=1, overrides=SMALL),
    }


# ---------------------------------------------------------------- errors, no build


def test_unknown_kind_is_a_clear_error_in_api_and_cli(tmp_path, monkeypatch, capsys):
    with pytest.raises(TunevecError, match=r"unknown fixture kind 'huge'; choose one of: tiny, smol"):
        build_fixtures("huge", tmp_path / "x")

    import tunevec.cli

    # Only the fixtures command, so this test does not depend on other subcommands' modules.
    monkeypatch.setattr(tunevec.cli, "COMMANDS", {"fixtures": tunevec.cli.COMMANDS["fixtures"]})
    rc = tunevec.cli.main(["fixtures", "build", "--kind", "huge", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "unknown fixture kind 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unknown_override_field_is_rejected():
    with pytest.raises(TunevecError, match="unknown fixture config field 'base.stepz'"):
        resolve_config("tiny", {"base": {"stepz": 3}})


def test_model_without_head_dim_64_is_rejected():
    with pytest.raises(TunevecError, match="head_dim 64"):
        resolve_config("tiny", {"model": {"hidden_size": 256, "num_heads": 8}})


def test_cache_key_covers_seed_and_overrides():
    tiny = resolve_config("tiny")
    assert cache_key("tiny", 0, tiny) == cache_key("tiny", 0, resolve_config("tiny"))
    assert cache_key("tiny", 0, tiny) != cache_key("tiny", 1, tiny)
    assert cache_key("tiny", 0, tiny) != cache_key(
        "tiny", 0, resolve_config("tiny", {"finetune": {"steps": 61}})
    )


def test_refuses_to_replace_a_folder_that_is_not_a_fixture(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(TunevecError, match="refusing to replace"):
        build_fixtures("tiny", tmp_path, overrides=SMALL)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------- small builds


def test_same_seed_builds_are_bit_identical_and_another_seed_differs(small_builds):
    a, b, other = small_builds["a"], small_builds["b"], small_builds["seed1"]
    files = _content_files(a)
    assert files == _content_files(b)
    assert {f"{m}/model.safetensors" for m in MODELS} <= set(files)
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between two seed-0 builds"
    assert _manifest(a)["key"] == _manifest(b)["key"]
    assert _manifest(a)["perplexity"] == _manifest(b)["perplexity"]

    for model in MODELS:
        ta, to = load_file(a / model / "model.safetensors"), load_file(other / model / "model.safetensors")
        assert ta.keys() == to.keys()
        assert not all(torch.equal(ta[k], to[k]) for k in ta), f"{model} is identical for seeds 0 and 1"
    assert _manifest(a)["key"] != _manifest(other)["key"]


def test_cache_hit_does_not_rebuild(small_builds, capsys):
    folder = small_builds["a"]
    before = {p: (folder / p).stat().st_mtime_ns for p in _content_files(folder)}
    assert build_fixtures("tiny", folder, seed=0, overrides=SMALL) == folder
    assert "cached" in capsys.readouterr().out
    assert before == {p: (folder / p).stat().st_mtime_ns for p in _content_files(folder)}


def test_moved_folder_is_reused_with_task_yamls_repointed(small_builds, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(small_builds["a"], moved)
    model_mtime = (moved / "base" / "model.safetensors").stat().st_mtime_ns
    build_fixtures("tiny", moved, seed=0, overrides=SMALL)
    assert "re-pointed" in capsys.readouterr().out
    assert (moved / "base" / "model.safetensors").stat().st_mtime_ns == model_mtime
    for task in (MEDICAL_TASK, MATH_TASK):
        cfg = yaml.safe_load((moved / "tasks" / f"{task}.yaml").read_text())
        assert cfg["dataset_kwargs"]["data_files"]["test"] == str(
            (moved / "tasks" / f"{task}.jsonl").resolve()
        )
    assert _manifest(moved)["root"] == str(moved.resolve())


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import tunevec.fixtures.build as build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "write_tasks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_fixtures("tiny", tmp_path / "fx", overrides=SMALL)
    assert not (tmp_path / "fx").exists()
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]


# ---------------------------------------------------------------- the real tiny fixtures


def test_tiny_layout_matches_the_contract(tiny_fixtures):
    for model in MODELS:
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
            assert (tiny_fixtures / model / name).is_file(), f"{model}/{name} missing"
        assert (tiny_fixtures / model / "chat_template.jinja").is_file()
    for task in (MEDICAL_TASK, MATH_TASK):
        assert (tiny_fixtures / "tasks" / f"{task}.yaml").is_file()
        assert (tiny_fixtures / "tasks" / f"{task}.jsonl").is_file()
    manifest = _manifest(tiny_fixtures)
    assert manifest["kind"] == "tiny" and manifest["seed"] == 0
    assert set(manifest["perplexity"]) == set(MODELS)
    assert set(manifest["seconds"]) >= {"corpora", "tokenizer", "base", "medical", "math", "total"}
    probe = [json.loads(line) for line in (tiny_fixtures / "probe.jsonl").read_text().splitlines()]
    assert {d: sum(p["domain"] == d for p in probe) for d in ("general", "medical", "math")} == {
        "general": 40,
        "medical": 40,
        "math": 40,
    }


def test_tiny_cache_hit_is_immediate(tiny_fixtures, capsys):
    mtime = (tiny_fixtures / MANIFEST).stat().st_mtime_ns
    build_fixtures("tiny", tiny_fixtures, seed=0)
    assert "cached" in capsys.readouterr().out
    assert (tiny_fixtures / MANIFEST).stat().st_mtime_ns == mtime


def test_tiny_finetunes_specialise_on_their_own_domain(tiny_fixtures):
    manifest = _manifest(tiny_fixtures)
    ppl, gain = manifest["perplexity"], manifest["config"]["min_specialisation_gain"]
    for ft in ("medical", "math"):
        assert ppl[ft][ft] <= ppl["base"][ft] * (1 - gain), f"{ft}: {ppl[ft][ft]} vs base {ppl['base'][ft]}"
        assert manifest["specialisation"][ft]["ok"]
    # Each fine-tune trades away the other domain: it is specialised, not just better trained.
    assert ppl["medical"]["math"] > ppl["base"]["math"]
    assert ppl["math"]["medical"] > ppl["base"]["medical"]


def test_recorded_perplexities_match_the_saved_models(tiny_fixtures):
    """Recompute medical-domain perplexity from the saved folders: the numbers describe these files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunevec.fixtures.train import perplexity

    manifest = _manifest(tiny_fixtures)
    config = resolve_config("tiny")
    assert manifest["key"] == cache_key("tiny", 0, config)
    corpora = build_corpora(config.corpus, 0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_fixtures / "base")
    batches = tiny_heldout_batches(corpora, config, 0, tokenizer)["medical"]
    for model_name in ("base", "medical"):
        model = AutoModelForCausalLM.from_pretrained(tiny_fixtures / model_name, dtype=torch.float32)
        recorded = manifest["perplexity"][model_name]["medical"]
        assert perplexity(model, batches) == pytest.approx(recorded, rel=1e-4)


def test_tiny_tasks_load_in_lm_eval_with_expected_doc_counts(tiny_fixtures):
    from lm_eval.tasks import TaskManager

    # include_defaults=False skips indexing lm-eval's ~15k bundled YAMLs (12 s); the loading path is the same.
    manager = TaskManager(include_path=str(tiny_fixtures / "tasks"), include_defaults=False)
    tasks = manager.load([MEDICAL_TASK, MATH_TASK])["tasks"]
    medical, math = tasks[MEDICAL_TASK], tasks[MATH_TASK]

    med_docs = list(medical.test_docs())
    assert len(med_docs) == 100
    assert sum(d["source"] == "drug" for d in med_docs) == 25
    doc = med_docs[0]
    assert medical.doc_to_text(doc).startswith("Question: Which category does the diagnosis ")
    assert medical.doc_to_text(doc).endswith("\nAnswer:")
    assert len(medical.doc_to_choice(doc)) == 4 and len(set(medical.doc_to_choice(doc))) == 4
    assert medical.doc_to_target(doc) in range(4)
    assert {m["metric"] for m in medical.config.metric_list} == {"acc", "acc_norm"}

    math_docs = list(math.test_docs())
    assert len(math_docs) == 100
    assert math.doc_to_text(math_docs[0]) == f"Question: {math_docs[0]['question']}\nAnswer:"
    assert all(str(math.doc_to_target(d)).isdigit() for d in math_docs)
    assert math.config.generation_kwargs["until"] == ["\n"]
    assert math.config.metric_list[0]["metric"] == "exact_match"


def test_task_and_probe_items_never_appear_in_training_text(tiny_fixtures):
    """Every rendering of every training item is searched for each held-out subject and question."""
    manifest = _manifest(tiny_fixtures)
    corpora = build_corpora(CorpusConfig(**manifest["config"]["corpus"]), manifest["seed"])
    training = "\x00".join(
        rendering.casefold()
        for domain in ("general", "medical", "math")
        for it in corpora.get(domain, "train")
        for rendering in (it.text, qa_text(it), chatml(chat_messages(it)))
    )
    med = [
        json.loads(x) for x in (tiny_fixtures / "tasks" / f"{MEDICAL_TASK}.jsonl").read_text().splitlines()
    ]
    math = [json.loads(x) for x in (tiny_fixtures / "tasks" / f"{MATH_TASK}.jsonl").read_text().splitlines()]
    assert [d["subject"] for d in med] == [it.key for it in corpora.get("medical", "task")]
    for d in med:
        assert d["subject"].casefold() not in training, f"medical task subject leaked: {d['subject']}"
        assert d["question"].casefold() not in training
    for d in math:
        assert d["question"].casefold() not in training, f"math task question leaked: {d['question']}"
    probe = [json.loads(x) for x in (tiny_fixtures / "probe.jsonl").read_text().splitlines()]
    for p in probe:
        assert p["text"].casefold() not in training, f"probe text leaked: {p['text'][:60]}"


def test_tiny_models_reload_offline_and_the_chat_template_renders(tiny_fixtures):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    for name in MODELS:
        tok = AutoTokenizer.from_pretrained(tiny_fixtures / name)
        model = AutoModelForCausalLM.from_pretrained(tiny_fixtures / name)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert model.dtype == torch.float32
        cfg = model.config
        assert cfg.hidden_size // cfg.num_attention_heads == 64 and cfg.tie_word_embeddings
        assert 1_000_000 <= model.num_parameters() <= 4_000_000
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
            "<|endoftext|>",
            "<|im_end|>",
            "<|endoftext|>",
        )
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert out.shape[1] > ids.shape[1]


# ---------------------------------------------------------------- the smol data, tasks and scorer (no model)


def _smol_facts():
    from tunevec.fixtures.facts import build_facts

    return build_facts(resolve_config("smol").facts, 0)


def test_smol_task_diagnoses_and_wordings_never_appear_in_training():
    """ICD task and held-out diagnoses are never trained (not even inside a longer title); drug task brands are
    trained (recall is the point) but asked in a wording no training example uses; math likewise."""
    facts = _smol_facts()
    train = facts.train["medical"]
    titles = "\x00".join(qa.key.casefold() for qa in train if qa.source == "icd10")
    questions = {qa.question for d in ("medical", "math") for qa in facts.train[d]}
    for qa in facts.task["medical"] + facts.heldout["medical"]:
        assert qa.question not in questions
        if qa.source == "icd10":
            assert qa.key.casefold() not in titles, f"ICD diagnosis leaked into training: {qa.key}"
    trained_brands = {qa.key for qa in train if qa.source == "drug"}
    drug_task = [qa for qa in facts.task["medical"] if qa.source == "drug"]
    assert drug_task and all(qa.key in trained_brands for qa in drug_task)
    for qa in facts.task["math"] + facts.heldout["math"]:
        assert qa.question not in questions
    assert {qa.key for qa in facts.task["math"]}.isdisjoint(qa.key for qa in facts.heldout["math"])
    for qa in facts.task["medical"]:
        assert len(set(qa.choices)) == 4 and qa.choices[qa.gold] == qa.answer


def test_smol_icd_distractors_come_from_other_chapters():
    from tunevec.fixtures import sources

    chapter = {c.code: c.chapter for c in sources.icd_codes()}
    for qa in _smol_facts().task["medical"]:
        if qa.source == "icd10":
            wrong = [c for i, c in enumerate(qa.choices) if i != qa.gold]
            assert all(chapter[c] != chapter[qa.answer] for c in wrong), qa


@pytest.mark.parametrize(
    ("constraint", "params", "good", "bad"),
    [
        ("uppercase", {}, "PARIS IS THE CAPITAL.", "Paris is the capital."),
        ("lowercase", {}, "paris is the capital.", "Paris is the capital."),
        ("quotes", {}, '"Paris."', 'Paris is "the" capital.'),
        ("no_commas", {}, "Paris is the capital", "Paris, the capital"),
        ("max_words", {"n": 5}, "It is Paris.", "The capital of France is Paris."),
        ("end_with", {"phrase": "That is all."}, "Paris. That is all.", "That is all. Paris."),
        ("start_with", {"word": "Well"}, "Well, Paris.", "Paris, well."),
        ("bullets", {"n": 2}, "- Paris\n- Lyon", "- Paris\n- Lyon\n- Nice"),
        ("keyword", {"word": "important"}, "An important city.", "An importantly big city."),
        ("json", {}, '{"answer": "Paris"}', '```json\n{"answer": "Paris"}\n```'),
    ],
)
def test_instruction_checks_accept_compliance_and_reject_the_rest(constraint, params, good, bad):
    from tunevec.fixtures.instruction_checks import CONSTRAINTS, follows, process_results

    assert constraint in CONSTRAINTS
    assert follows(constraint, params, good)
    assert not follows(constraint, params, bad)
    doc = {"constraint": constraint, "params": json.dumps(params)}
    assert process_results(doc, [good]) == {"follow": 1.0, "follow_loose": 1.0}
    assert process_results(doc, [bad])["follow"] == 0.0


def test_loose_instruction_score_forgives_a_preamble_line_only():
    from tunevec.fixtures.instruction_checks import process_results

    doc = {"constraint": "json", "params": "{}"}
    assert process_results(doc, ['Sure! Here it is:\n{"answer": "Paris"}']) == {
        "follow": 0.0,
        "follow_loose": 1.0,
    }
    assert process_results(doc, ["Paris"]) == {"follow": 0.0, "follow_loose": 0.0}


def test_instruction_docs_rotate_through_every_constraint():
    from tunevec.fixtures.instruction_checks import CONSTRAINTS
    from tunevec.fixtures.instructions import instruction_docs

    docs = instruction_docs(60, 0)
    assert docs == instruction_docs(60, 0)
    assert [d["constraint"] for d in docs[:10]] == sorted(CONSTRAINTS)
    assert {d["domain"] for d in docs} == {"general", "medical", "math"}
    assert len({d["prompt"] for d in docs}) == 60


@pytest.fixture(scope="module")
def smol_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smol task folder as a build writes it, from the real facts and instruction docs (no model trained)."""
    from tunevec.fixtures.instructions import instruction_docs
    from tunevec.fixtures.smol import _interleave
    from tunevec.fixtures.tasks import INSTRUCTIONS_TASK, math_rows, medical_rows, write_tasks

    facts = _smol_facts()
    tasks = tmp_path_factory.mktemp("smol") / "tasks"
    rows = {
        MEDICAL_TASK: medical_rows(_interleave(facts.task["medical"])),
        MATH_TASK: math_rows(facts.task["math"]),
        INSTRUCTIONS_TASK: instruction_docs(60, 0),
    }
    write_tasks(tasks, "smol", rows)
    return tasks


def test_smol_tasks_load_in_lm_eval_and_score_with_their_filters(smol_tasks):
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from tunevec.fixtures.tasks import INSTRUCTIONS_TASK

    manager = TaskManager(include_path=str(smol_tasks), include_defaults=False)
    tasks = manager.load([MEDICAL_TASK, MATH_TASK, INSTRUCTIONS_TASK])["tasks"]
    medical, math, instructions = tasks[MEDICAL_TASK], tasks[MATH_TASK], tasks[INSTRUCTIONS_TASK]

    med_docs = list(medical.test_docs())
    assert len(med_docs) == 200
    assert [d["source"] for d in med_docs[:4]] == ["icd10", "drug", "icd10", "drug"]  # any limit sees both
    assert medical.doc_to_text(med_docs[0]) == med_docs[0]["question"]  # the user turn the fine-tune saw

    math_docs = list(math.test_docs())
    doc = math_docs[0]
    assert math.doc_to_text(doc) == doc["question"] and doc["question"].endswith(
        "Answer with the number only."
    )
    # the two filters, applied by lm-eval itself: a bare number passes both; shown working only `flexible`
    answer = doc["answer"]
    for response, strict, flexible in [(f"{answer}.", 1, 1), (f"It is {answer}", 0, 1), ("12345", 0, 0)]:
        inst = Instance(request_type="generate_until", doc=doc, arguments=("", {}), idx=0, resps=[response])
        scored = {}
        for ensemble in math._filters:
            ensemble.apply([inst])
            scored[ensemble.name] = math.process_results(doc, [inst.filtered_resps[ensemble.name]])[
                "exact_match"
            ]
        assert scored == {"strict": strict, "flexible": flexible}, (response, scored)

    inst_docs = list(instructions.test_docs())
    assert len(inst_docs) == 60
    doc = next(d for d in inst_docs if d["constraint"] == "uppercase")
    assert instructions.doc_to_text(doc) == doc["prompt"]
    assert instructions.process_results(doc, ["PARIS."]) == {"follow": 1.0, "follow_loose": 1.0}
    assert instructions.process_results(doc, ["Paris."])["follow"] == 0.0


def test_instruction_task_runs_offline_in_lm_eval_against_a_local_model(smol_tasks, tiny_fixtures):
    """The generate_until -> process_results path end to end (lm-eval's hf model, chat template, 6 docs)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from tunevec.fixtures.tasks import INSTRUCTIONS_TASK

    results = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_fixtures / "base"), "dtype": "float32", "device": "cpu"},
        tasks=[INSTRUCTIONS_TASK],
        task_manager=TaskManager(include_path=str(smol_tasks), include_defaults=False),
        limit=6,
        apply_chat_template=True,
        log_samples=True,
    )
    metrics = results["results"][INSTRUCTIONS_TASK]
    assert 0.0 <= metrics["follow,none"] <= metrics["follow_loose,none"] <= 1.0
    samples = results["samples"][INSTRUCTIONS_TASK]
    assert len(samples) == 6 and all(isinstance(s["resps"][0][0], str) for s in samples)


# ---------------------------------------------------------------- the real smol fixtures (slow: minutes to build)


@pytest.mark.slow
def test_smol_fixtures_layout_chat_template_and_trained_layers(smol_fixtures):
    from transformers import AutoTokenizer

    from tunevec.fixtures.tasks import INSTRUCTIONS_TASK

    manifest = _manifest(smol_fixtures)
    assert manifest["kind"] == "smol" and manifest["format_version"] == 2
    for task in (MEDICAL_TASK, MATH_TASK):
        assert (smol_fixtures / "tasks" / f"{task}.yaml").is_file()
    assert (smol_fixtures / "tasks" / INSTRUCTIONS_TASK / "utils.py").is_file()
    heldout = [json.loads(x) for x in (smol_fixtures / "heldout.jsonl").read_text().splitlines()]
    assert {r["domain"] for r in heldout} == {"medical", "math"}
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in heldout)
    for model in MODELS:  # ChatML, no injected default system prompt
        tok = AutoTokenizer.from_pretrained(smol_fixtures / model)
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
        )
        assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    base = load_file(smol_fixtures / "base" / "model.safetensors")
    for ft in ("medical", "math"):
        tuned = load_file(smol_fixtures / ft / "model.safetensors")
        changed = {k for k in base if not torch.equal(base[k], tuned[k])}
        want = {
            f"model.layers.{i}.{m}.weight"
            for i in range(24, 30)
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        }  # fmt: skip
        assert changed == want, sorted(changed ^ want)[:5]
        assert manifest["specialisation"][ft]["ok"]


@pytest.mark.slow
def test_smol_finetunes_beat_the_base_on_their_own_task(smol_fixtures):
    """The fixtures' point: each fine-tune clears the base by >= 15 points on its own task, with +-2 SE intervals
    apart (in process, float32; docs/fixtures.md has the full numbers and lm-eval's)."""
    from tunevec.fixtures.score import score_model

    tasks = smol_fixtures / "tasks"
    metric = {MEDICAL_TASK: "acc", MATH_TASK: "exact_match,strict"}
    own = {"base": list(metric), "medical": [MEDICAL_TASK], "math": [MATH_TASK]}  # each fine-tune on its task
    scores = {m: score_model(smol_fixtures / m, tasks, 60, own[m]) for m in MODELS}
    for ft, task in (("medical", MEDICAL_TASK), ("math", MATH_TASK)):
        base, tuned = scores["base"][task][metric[task]], scores[ft][task][metric[task]]
        assert tuned["value"] - base["value"] >= 0.15, (ft, base, tuned)
        assert tuned["value"] - 2 * tuned["stderr"] > base["value"] + 2 * base["stderr"], (ft, base, tuned)
