"""`tunevec tune` and what it stands on: the fixture tasks' validation splits (disjoint from their test docs, never
trained), the validation/test views of lm-eval tasks, the objective, and the variant written into tunevec.yaml;
then the command end to end on the tiny fixtures against one real server (with an API key), small budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import artifacts_dir
from servers import running_server

from tunevec.core.errors import TunevecError
from tunevec.eval.search import Score, Space, Trial, choose, parse_objective
from tunevec.eval.variants_file import write_variant
from tunevec.fixtures.tasks import MATH_TASK, MEDICAL_TASK

KEY = "tune-test-key"

# ------------------------------------------------------------------------------ the fixtures' validation splits


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_tiny_validation_docs_are_disjoint_from_test_docs_and_never_trained(tiny_fixtures):
    from tunevec.fixtures.config import resolve_config
    from tunevec.fixtures.corpora import build_corpora

    tasks = tiny_fixtures / "tasks"
    corpora = build_corpora(resolve_config("tiny").corpus, 0)
    training = "\x00".join(f"{it.text}\x00{it.question}".casefold() for d in ("medical", "math")
                           for it in corpora.get(d, "train"))  # fmt: skip
    for task, key in ((MEDICAL_TASK, "subject"), (MATH_TASK, "question")):
        test = _jsonl(tasks / f"{task}.jsonl")
        validation = _jsonl(tasks / f"{task}.validation.jsonl")
        assert len(validation) == len(test) == 100
        assert {d[key] for d in validation}.isdisjoint(d[key] for d in test)
        for d in validation:
            assert d[key].casefold() not in training, f"{task} validation doc was trained on: {d[key]}"
    med = _jsonl(tasks / f"{MEDICAL_TASK}.validation.jsonl")
    assert all(len(set(d["choices"])) == 4 and 0 <= d["gold"] < 4 for d in med)
    cfg = yaml.safe_load((tasks / f"{MEDICAL_TASK}.yaml").read_text())
    assert cfg["validation_split"] == "validation" and cfg["test_split"] == "test"


def test_smol_validation_docs_ask_other_facts_the_same_way_as_the_test_docs():
    from tunevec.fixtures.config import resolve_config
    from tunevec.fixtures.facts import ICD_TASK, build_facts
    from tunevec.fixtures.instructions import instruction_docs

    facts = build_facts(resolve_config("smol").facts, 0)
    train = facts.train["medical"]
    titles = "\x00".join(qa.key.casefold() for qa in train if qa.source == "icd10")
    brands = {qa.key for qa in train if qa.source == "drug"}
    questions = {qa.question for d in ("medical", "math") for qa in facts.train[d]}
    for domain in ("medical", "math"):
        assert {qa.key for qa in facts.validation[domain]}.isdisjoint(qa.key for qa in facts.task[domain])
        assert not {qa.question for qa in facts.validation[domain]} & questions  # the task's wording
    icd = [qa for qa in facts.validation["medical"] if qa.source == "icd10"]
    drug = [qa for qa in facts.validation["medical"] if qa.source == "drug"]
    assert len(icd) == len(drug) == 100
    for qa in icd:
        assert qa.question == ICD_TASK.format(title=qa.key)
        assert qa.key.casefold() not in titles, f"validation diagnosis was trained: {qa.key}"
    assert all(qa.key in brands for qa in drug)  # trained brands, asked in the unseen wording, as in the test
    assert len(facts.validation["math"]) == 126  # the 226 facts the test does not ask
    test_docs, val_docs = instruction_docs(60, 0), instruction_docs(60, 0, split="validation")
    assert len(val_docs) == 60
    assert {d["question"] for d in val_docs}.isdisjoint(d["question"] for d in test_docs)
    assert sorted({d["constraint"] for d in val_docs}) == sorted({d["constraint"] for d in test_docs})


def test_task_views_show_validation_or_test_docs_and_carving_partitions_them(tiny_fixtures):
    from lm_eval.tasks import TaskManager

    from tunevec.eval.splits import plan_tasks, views

    tm = TaskManager(include_path=str(tiny_fixtures / "tasks"), include_defaults=False)
    own = plan_tasks(tm, [MATH_TASK], None)
    assert own[0].mode == "own"
    questions = {
        split: [d["question"] for d in views(tm, own, split)[0].eval_docs] for split in ("validation", "test")
    }
    assert questions["test"] == [
        d["question"] for d in _jsonl(tiny_fixtures / "tasks" / f"{MATH_TASK}.jsonl")
    ]
    assert questions["validation"] == [
        d["question"] for d in _jsonl(tiny_fixtures / "tasks" / f"{MATH_TASK}.validation.jsonl")
    ]
    carved = plan_tasks(tm, [MATH_TASK], 0.3)
    halves = {
        split: [d["question"] for d in views(tm, carved, split)[0].eval_docs]
        for split in ("validation", "test")
    }
    assert set(halves["validation"]).isdisjoint(halves["test"])
    assert sorted(halves["validation"] + halves["test"]) == sorted(questions["test"])
    assert 15 <= len(halves["validation"]) <= 45  # about 30% of 100, by content hash
    with pytest.raises(TunevecError, match="between 0 and 1"):
        plan_tasks(tm, [MATH_TASK], 1.5)


# ------------------------------------------------------------------------------ objective, space, choice


def _score(v: float) -> Score:
    return Score(v, 0.01, "acc", 100)


def test_objective_is_a_weighted_mean_with_floors():
    obj = parse_objective(["mcq=3", "math"], ["instructions=base-0.05", "math=0.1"])
    scores = {"mcq": _score(0.6), "math": _score(0.2), "instructions": _score(0.3)}
    assert obj.value(scores) == pytest.approx((3 * 0.6 + 0.2) / 4)
    assert obj.stderr(scores) == pytest.approx((9 * 0.01**2 + 0.01**2) ** 0.5 / 4)
    assert obj.floor_values({"instructions": _score(0.25)}) == {
        "instructions": pytest.approx(0.2),
        "math": 0.1,
    }
    assert obj.tasks == ["mcq", "math", "instructions"]
    for bad in (["mcq=-1"], ["mcq=x"], []):
        with pytest.raises(TunevecError, match="--maximize"):
            parse_objective(bad, [])
    with pytest.raises(TunevecError, match="--floor"):
        parse_objective(["mcq"], ["math=lots"])


def test_space_writes_canonical_specs_and_starts_at_the_plain_sum():
    space = Space(("medical", "math"), ("mlp", "attention"), 0.0, 2.0, 0.05)
    ones = space.ones()
    assert ones == {"medical@mlp": 1.0, "medical@attention": 1.0, "math@mlp": 1.0, "math@attention": 1.0}
    alphas = {"medical@mlp": 1.5, "medical@attention": 0.0, "math@mlp": 0.3, "math@attention": 1.0}
    assert space.spec(alphas) == "math@attention+math@mlp:0.3+medical@mlp:1.5"
    assert space.spec(dict.fromkeys(ones, 0.0)) is None  # every alpha 0: the base
    assert Space(("medical",), None, 1.5, 3.0, 0.5).ones() == {"medical": 2.0}  # 1 outside: the middle


def test_the_chosen_trial_is_the_best_feasible_one_and_ties_go_to_the_first():
    def trial(n: int, value: float, feasible: bool = True) -> Trial:
        return Trial(n, {"m": 1.0}, f"m:{n}", {}, value, feasible, 1.0)

    assert choose([trial(0, 0.5), trial(1, 0.7, feasible=False), trial(2, 0.6), trial(3, 0.6)]).number == 2
    assert choose([trial(0, 0.5, feasible=False)]) is None


def test_the_variant_is_written_into_tunevec_yaml_keeping_the_rest(tmp_path):
    config = tmp_path / "tunevec.yaml"
    config.write_text(
        "# my server\nbase: /m/base  # the base\nvariants:\n  mine: medical:0.5  # keep\nport: 8000\n"
    )
    write_variant(config, "tuned", "math:0.8+medical:1.2", "tunevec tune 2026-12-04")
    text = config.read_text()
    assert text.startswith("# my server\nbase: /m/base  # the base\nvariants:\n  mine: medical:0.5  # keep\n")
    assert yaml.safe_load(text) == {
        "base": "/m/base",
        "variants": {"mine": "medical:0.5", "tuned": "math:0.8+medical:1.2"},
        "port": 8000,
    }
    write_variant(config, "tuned", "medical@mlp:1.5")  # the same name again: replaced, not added
    assert yaml.safe_load(config.read_text())["variants"]["tuned"] == "medical@mlp:1.5"
    assert config.read_text().count("tuned:") == 1
    fresh = tmp_path / "new.yaml"
    write_variant(fresh, "tuned", "medical")
    assert yaml.safe_load(fresh.read_text()) == {"variants": {"tuned": "medical"}}
    flow = tmp_path / "flow.yaml"
    flow.write_text("variants: {a: medical}\n")
    with pytest.raises(TunevecError, match="one line"):
        write_variant(flow, "tuned", "math")


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def server(tiny_fixtures: Path, tiny_vectors: Path) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEVEC_API_KEY", KEY)
        with running_server(
            tiny_fixtures / "base", tiny_vectors, log=artifacts_dir() / "logs" / "tune-server.log"
        ) as url:
            yield url


def _tune(url: str, base: Path, out: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tunevec.cli", "tune", "--server-url", url, "--base", str(base),
           "--vector", "medical", "--vector", "math", "--maximize", MEDICAL_TASK, "--maximize", MATH_TASK,
           "--floor", f"{MATH_TASK}=base-1", "--limit", "12", "--test-limit", "20", "--alpha-max", "1.5",
           "--alpha-step", "0.25", "--out", str(out), "--config", str(config), "--name", "tiny-tuned", *extra]  # fmt: skip
    env = dict(os.environ, OPENAI_API_KEY=KEY)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_tune_searches_on_validation_reports_on_test_writes_the_variant_and_resumes(
    server, tiny_fixtures, tmp_path
):
    out, config = tmp_path / "tune", tmp_path / "tunevec.yaml"
    config.write_text("# served with: tunevec serve --config tunevec.yaml\nmax_components: 4\n")
    done = _tune(server, tiny_fixtures / "base", out, config, "--trials", "3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # progress: trials done, the best so far and the time left, one line per trial
    lines = [line for line in done.stdout.splitlines() if line.startswith("[tunevec tune] trial ")]
    assert len(lines) == 3 and all(" · best " in line and "left" in line for line in lines), lines
    assert lines[0].startswith("[tunevec tune] trial 1/3: math+medical -> ")  # the plain sum comes first

    result = json.loads((out / "tune.json").read_text())
    trials = result["trials"]
    assert len(trials) == 3 and trials[0]["alphas"] == {"medical": 1.0, "math": 1.0}
    assert all(t["feasible"] for t in trials)
    for t in trials:
        assert t["objective"] == pytest.approx(
            (t["validation"][MEDICAL_TASK]["value"] + t["validation"][MATH_TASK]["value"]) / 2
        )
        assert all(s["n"] == 12 for s in t["validation"].values())
    best = max(trials, key=lambda t: (t["objective"], -t["number"]))
    assert result["chosen"]["number"] == best["number"]
    roles = {row["role"]: row for row in result["table"]}
    assert roles["chosen"]["model"] == (best["spec"] or "base")
    assert roles["base"]["model"] == "base"
    for row in result["table"]:
        for task in (MEDICAL_TASK, MATH_TASK):
            assert row["test"][task]["n"] == 20 and row["test"][task]["stderr"] is not None
            assert row["validation"][task]["n"] == 12
    assert result["base_validation"]  # the floor is relative to the base: it was scored first

    # the variant, in the config `tunevec serve --config` reads, next to what was there
    from tunevec.server.config import ServerConfig

    text = config.read_text()
    assert text.startswith("# served with: tunevec serve --config tunevec.yaml\nmax_components: 4\n")
    served = ServerConfig.load(
        str(config), {"base": str(tiny_fixtures / "base"), "vectors": str(tiny_fixtures)}
    )
    assert served.variants["tiny-tuned"] == best["spec"]

    # run again with a budget already spent: the study resumes (no trial scored twice) and reports the same choice
    again = _tune(server, tiny_fixtures / "base", out, config, "--trials", "10", "--budget-minutes", "0.01")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming" in again.stdout and "3 trial(s) already scored" in again.stdout
    assert "budget: another trial" in again.stdout
    resumed = json.loads((out / "tune.json").read_text())
    assert [t["spec"] for t in resumed["trials"]] == [t["spec"] for t in trials]
    assert resumed["chosen"]["spec"] == result["chosen"]["spec"]
    # other settings on the same study are refused, not mixed in
    other = _tune(server, tiny_fixtures / "base", out, config, "--trials", "3", "--alpha-max", "2")
    assert other.returncode == 2 and "--fresh" in other.stderr
