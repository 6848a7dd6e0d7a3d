"""`tunevec eval`: grids as data, refused early when malformed; end to end on the tiny fixtures; resume.

The fast tests use synthetic checkpoints and a one-line local task; none of them may start a server (``spawn`` is
replaced by a tripwire). The slow tests run the real grid runner against a real tunevec server on the tiny
fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from synthetic import llama_like, perturbed, write_model

import tunevec.eval.plan
import tunevec.eval.runner
import tunevec.eval.servers
from tunevec.cli import main
from tunevec.core.errors import TunevecError
from tunevec.core.extract import extract
from tunevec.eval.grid import BASE, Grid, cell_key
from tunevec.eval.harness import metrics_of, primary_metric
from tunevec.eval.table import build_rows, to_markdown

REPO = Path(__file__).resolve().parents[1]
TINY_GRID = REPO / "eval" / "grids" / "tiny.yaml"
DEMO_GRID = REPO / "eval" / "grids" / "demo.yaml"


@pytest.fixture
def no_servers(monkeypatch):
    """Fail the test if anything tries to start a server."""

    def tripwire(*args, **kwargs):
        raise AssertionError("a server was started for a grid that should have been refused")

    monkeypatch.setattr(tunevec.eval.servers, "spawn", tripwire)


@pytest.fixture(scope="module")
def synthetic_world(tmp_path_factory):
    """A synthetic base, two tuned models, their vectors, and a local lm-eval task folder."""
    tmp = tmp_path_factory.mktemp("eval-synthetic")
    base = llama_like(0)
    write_model(tmp / "models" / "base", base)
    for i, name in enumerate(("medical", "math"), start=1):
        write_model(tmp / "models" / name, perturbed(base, seed=i))
        extract(
            tmp / "models" / "base", tmp / "models" / name, tmp / "vectors" / name, name=name, progress=False
        )
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "toy.jsonl").write_text(json.dumps({"q": "1+1?", "choices": ["2", "3"], "gold": 0}) + "\n")
    (tasks / "toy.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "toy_mcq",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(tasks / "toy.jsonl")}},
                "output_type": "multiple_choice",
                "test_split": "test",
                "doc_to_text": "{{q}}",
                "doc_to_choice": "choices",
                "doc_to_target": "gold",
                "metric_list": [{"metric": "acc"}],
            }
        )
    )
    return tmp


def write_grid(tmp_path: Path, grid: dict | str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(grid if isinstance(grid, str) else yaml.safe_dump(grid))
    return path


# ---------------------------------------------------------------------- grids as data (fast)


def test_sweep_points_become_specs_and_merge_with_the_same_variant_listed_explicitly():
    grid = Grid.from_dict(
        {
            "tasks": ["t"],
            "variants": ["base", "medical", {"name": "med-mlp", "spec": "medical@mlp:1.0"}],
            "sweeps": [
                {"vector": "medical", "alphas": [0, 0.5, 1]},
                {"name": "mlp", "spec": "medical@mlp:{alpha}", "alphas": [1, 2]},
            ],
        }
    )
    by_name = {v.name: v for v in grid.variants}
    assert list(by_name) == ["base", "medical", "med-mlp", "medical:0.5", "medical@mlp:2"]
    assert by_name["base"].alphas == (("medical", 0.0),)  # alpha 0 is the base itself
    assert by_name["medical"].alphas == (("medical", 1.0),)
    assert by_name["med-mlp"].spec == "medical@mlp" and by_name["med-mlp"].alphas == (("mlp", 1.0),)
    assert by_name["medical:0.5"].model == "medical:0.5"
    assert by_name["base"].model == BASE
    assert len(grid.cells()) == 5


def test_cell_keys_are_file_safe_and_distinct_for_specs_that_differ_only_in_punctuation():
    a, b = cell_key("medical:0.5", "t"), cell_key("medical_0.5", "t")
    assert a != b and "/" not in cell_key("dare(density=0.3;seed=7)/medical", "t")
    assert cell_key("base", "tunevec_math") == "base__tunevec_math"


def test_command_line_variants_tasks_and_sweeps_replace_the_grid_files(tmp_path):
    import argparse

    from tunevec.eval.commands import configure_eval, grid_from_args

    parser = argparse.ArgumentParser()
    configure_eval(parser)
    args = parser.parse_args(
        ["--grid", str(TINY_GRID), "--variant", "base", "--variant", "mlp=medical@mlp", "--tuned", "math",
         "--sweep", "medical@attention:{alpha}=0.5,2", "--tasks", "a,b", "--limit", "3", "--num-concurrent", "2"]
    )  # fmt: skip
    grid = grid_from_args(args)
    assert [v.name for v in grid.variants] == [
        "base",
        "mlp",
        "math-tuned",
        "medical@attention:0.5",
        "medical@attention:2",
    ]
    assert [(t.name, t.limit) for t in grid.tasks] == [("a", 3), ("b", 3)]
    assert grid.lm_eval.num_concurrent == 2
    assert grid.server.max_model_len == 512  # the file's server settings stay


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("", "is empty"),
        ("tasks: [toy_mcq]\nvariants: [base]\nlimt: 5\n", "unknown key(s) 'limt'"),
        ("variants: [base]\n", "`tasks` is missing"),
        ("tasks: []\nvariants: [base]\n", "`tasks` is empty"),
        ("tasks: [toy_mcq]\n", "no variants"),
        ("tasks: [toy_mcq]\nvariants: ['medical@mlpp:0.5']\n", "unknown scope 'mlpp'"),
        ("tasks: [toy_mcq]\nvariants: [{name: x, spec: medical, tuned: medical}]\n", "exactly one of spec"),
        ("tasks: [toy_mcq]\nvariants: [medical:0]\n", "only zero coefficients"),
        ("tasks: [toy_mcq]\nsweeps: [{vector: medical, alphas: [1, 1]}]\n", "repeat"),
        (
            "tasks: [toy_mcq]\nvariants: [base]\nserver: {dtype: float32, max_model_len: -1}\n",
            "max_model_len",
        ),
        ("tasks: [toy_mcq]\nvariants: [{name: a, spec: medical}, {name: a, spec: math}]\n", "named 'a'"),
        ("tasks: [toy_mcq]\nvariants: [medicl]\n", "unknown vector 'medicl'"),
        ("tasks: [toy_mcq]\nvariants: [medical+math]\nserver: {adapter_rank: 48}\n", "max_lora_rank 64"),
        ("tasks: [toy_mcq]\nvariants: [{checkpoint: nowhere}]\n", "not a model folder"),
        (
            "tasks: [toy_mcq]\nvariants: [base]\nserver: {steering: merge}\n",
            "steering must be one of lora, inject",
        ),
        (
            "tasks: [toy_mcq, nonexistent_task_xyz]\nvariants: [base]\ninclude_path: [TASKS]\n",
            "unknown lm-eval task",
        ),
        (
            "tasks: [toy_mcq]\nvariants: [base]\nserver: {enforce_eager: 1}\n",
            "enforce_eager must be a valid boolean",
        ),
        ("tasks: [toy_mcq]\nvariants: [base]\nserver: {max_lora_rank: 48}\n", "one of vLLM's LoRA ranks"),
        (
            "tasks: [toy_mcq]\nvariants: [base]\nserver: {adapter_rank: 8, adapter_energy: 0.9}\n",
            "exactly one of adapter_rank",
        ),
        (
            "tasks: [toy_mcq]\nvariants: [base]\nlm_eval: {num_concurrent: '8'}\n",
            "num_concurrent must be a valid integer",
        ),
    ],
)
def test_malformed_grid_is_refused_with_a_clear_error_before_any_server_starts(
    synthetic_world, tmp_path, capsys, no_servers, grid, message, monkeypatch
):
    monkeypatch.setattr(tunevec.eval.plan, "task_manager", _local_only_task_manager)
    path = write_grid(tmp_path, grid.replace("TASKS", str(synthetic_world / "tasks")))
    code = main(
        ["eval", "--grid", str(path), "--base", str(synthetic_world / "models" / "base"),
         "--vectors", str(synthetic_world / "vectors"), "--include_path", str(synthetic_world / "tasks"),
         "--out", str(tmp_path / "out")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "tunevec eval: error:" in err and message in err, err
    assert not (tmp_path / "out" / "cells").exists()


def _local_only_task_manager(include_path, names):
    """The include paths only: the fast tests must not spend half a minute indexing lm-eval's own tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in include_path], include_defaults=False)


def test_tuned_variant_resolves_to_the_checkpoint_recorded_in_the_vector(synthetic_world):
    grid = Grid.from_dict(
        {"tasks": ["toy_mcq"], "variants": [{"tuned": "math"}], "base": str(synthetic_world / "models" / "base"),
         "vectors": str(synthetic_world / "vectors")}
    )  # fmt: skip
    grid.check(task_index=None)
    (v,) = grid.variants
    assert v.name == "math-tuned" and v.kind == "checkpoint"
    assert v.checkpoint == (synthetic_world / "models" / "math").resolve()


def test_grid_file_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "g.yaml"
    path.write_text("tasks: [t]\nvariants: [base]\nbase: ../models/base\n")
    assert Grid.load(path).base == tmp_path / "sub" / ".." / "models" / "base"
    with pytest.raises(TunevecError, match="not valid YAML"):
        path.write_text("tasks: [t\n")
        Grid.load(path)


def test_finished_cell_is_skipped_only_while_its_config_is_unchanged(synthetic_world, tmp_path, monkeypatch):
    monkeypatch.setattr(tunevec.eval.plan, "task_manager", _local_only_task_manager)

    def plan(limit):
        grid = Grid.from_dict(
            {"tasks": ["toy_mcq"], "variants": ["base", "medical"], "limit": limit,
             "base": str(synthetic_world / "models" / "base"), "vectors": str(synthetic_world / "vectors"),
             "include_path": [str(synthetic_world / "tasks")]}
        )  # fmt: skip
        return tunevec.eval.plan.prepare(grid, tmp_path)

    first = plan(5)
    assert [c.done for c in first.cells] == [False, False]
    base = first.cells[0]
    base.path.parent.mkdir(parents=True)
    base.path.write_text(json.dumps({"config_hash": base.config_hash, "metrics": {}}))
    assert [c.done for c in plan(5).cells] == [True, False]
    assert [c.done for c in plan(4).cells] == [False, False]  # another limit: another config
    again = plan(5)
    assert again.cells[0].config_hash == base.config_hash
    assert len(tunevec.eval.plan.prepare(again.grid, tmp_path, fresh=True).todo) == 2


def test_inject_mode_gives_every_variant_its_own_server_and_lora_mode_shares_one():
    from tunevec.eval.plan import PlannedCell, group_cells

    def groups(steering):
        grid = Grid.from_dict(
            {"tasks": ["t"], "variants": [{"name": "ref", "checkpoint": "/m"}, "medical", "base", "math"],
             "server": {"steering": steering}}
        )  # fmt: skip
        cells = [PlannedCell(c, Path("x"), {}, "h") for c in grid.cells()]
        return [(g, [c.variant.name for c in cs]) for g, cs in group_cells(cells, grid)]

    assert groups("lora") == [("steering", ["medical", "base", "math"]), ("checkpoint:ref", ["ref"])]
    assert groups("inject") == [
        ("inject:medical", ["medical"]), ("inject:base", ["base"]), ("inject:math", ["math"]),
        ("checkpoint:ref", ["ref"]),
    ]  # fmt: skip


def test_every_malformed_entry_of_a_grid_is_named_in_one_error():
    with pytest.raises(TunevecError) as err:
        Grid.from_dict(
            {"tasks": ["t", {"name": "u", "limit": 1.5}], "variants": [3, {"tuned": "medical", "typo": 1}],
             "server": {"max_model_len": 8, "steering": "merge"}, "lm_eval": {"seed": True}}
        )  # fmt: skip
    message = str(err.value)
    for part in (
        "tasks[1].limit: 1.5 is neither a fraction below 1 nor a whole number of docs",
        "variants[0] must be a spec string or a mapping, got int",
        "variants[1]: unknown key(s) 'typo'; known: name, spec, tuned, checkpoint",
        "server.max_model_len must be greater than or equal to 16, got 8",
        "server.steering must be one of lora, inject, got 'merge'",
        "lm_eval.seed must be a valid integer, got True",
    ):
        assert part in message, message


def test_server_block_takes_every_engine_and_lora_setting_and_an_energy_replaces_the_default_rank(
    synthetic_world,
):
    from tunevec.server.config import EngineSettings, LoraSettings

    grid = Grid.from_dict({"tasks": ["t"], "variants": ["medical+math"], "server": {"adapter_energy": 0.9}})
    assert (grid.server.adapter_rank, grid.server.adapter_energy) == (None, 0.9)
    assert grid.server.result_key()["adapter_energy"] == 0.9
    assert set(EngineSettings.model_fields) | set(LoraSettings.model_fields) <= set(
        type(grid.server).model_fields
    )

    def check(server):
        grid = Grid.from_dict(
            {"tasks": ["t"], "variants": ["medical+math"], "server": server,
             "base": str(synthetic_world / "models" / "base"), "vectors": str(synthetic_world / "vectors")}
        )  # fmt: skip
        grid.check(task_index=None)

    with pytest.raises(TunevecError, match="above server.max_lora_rank 64"):
        check({"adapter_rank": 48})
    check({"adapter_rank": 48, "allow_truncation": True})  # the steering server re-truncates instead


def test_steering_server_gets_every_engine_and_lora_setting_through_tunevec_serve(
    synthetic_world, monkeypatch
):
    """The steering server's command line, read back by `tunevec serve` itself, gives the grid's settings."""
    import tunevec.server.commands
    from tunevec.eval.launch import steering_server
    from tunevec.eval.schema import ServerSettings
    from tunevec.server.config import EngineSettings, LoraSettings

    settings = ServerSettings(
        dtype="bfloat16", max_model_len=256, kv_cache_gib=2, reserved_cpus=0, extra_args=["--seed", "3"],
        adapter_energy=0.8, max_lora_rank=32, max_loras=2, allow_truncation=True, max_components=3,
        max_abs_alpha=2.5, max_dropped_share=0.05, cache_capacity=8,
    )  # fmt: skip
    base, vectors = synthetic_world / "models" / "base", synthetic_world / "vectors"
    command, env = steering_server(base, vectors, settings, port=12345)
    seen = {}
    monkeypatch.setattr(
        tunevec.server.commands, "prepare", lambda config: seen.update(config=config) or (["vllm"], {})
    )
    monkeypatch.setattr(tunevec.server.commands.os, "execve", lambda *a: None)
    assert command[: command.index("serve")] == [command[0], "-m", "tunevec.cli"]
    assert main(command[command.index("serve") :]) == 0
    config = seen["config"]
    assert (config.base, config.vectors, config.host, config.port) == (
        str(base),
        str(vectors),
        "127.0.0.1",
        12345,
    )
    for name in (*EngineSettings.model_fields, *LoraSettings.model_fields):
        if name != "reserved_cpus":  # not a serve option: it travels in the environment
            assert getattr(config, name) == getattr(settings, name), name
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_plain_and_injected_servers_are_vllm_commands_and_only_injection_loads_the_tunevec_loader(
    synthetic_world,
):
    import json

    from tunevec.eval.launch import checkpoint_server, injected_server
    from tunevec.eval.schema import ServerSettings
    from tunevec.steering.vllm import LOAD_FORMAT, LOADER, SETTINGS_KEY

    settings = ServerSettings(max_model_len=256, reserved_cpus=0, extra_args=["--seed", "3"])
    base, vectors = synthetic_world / "models" / "base", synthetic_world / "vectors"
    plain, plain_env = checkpoint_server(synthetic_world / "models" / "math", "math-tuned", settings, 12345)
    injected, injected_env = injected_server(base, vectors, "medical:0.5", "medical:0.5", settings, 12345)
    for command in (plain, injected):
        text = " ".join(command)
        assert "--dtype float32" in text and "--max-model-len 256" in text and "--port 12345" in text
        assert (
            "--enforce-eager" in command
            and command[-2:] == ["--seed", "3"]
            and "--enable-lora" not in command
        )
    assert plain[plain.index("--model") + 1] == str(synthetic_world / "models" / "math")
    assert "--load-format" not in plain and LOADER not in plain_env.get("VLLM_PLUGINS", "").split(",")
    assert injected[injected.index("--load-format") + 1] == LOAD_FORMAT
    loader = json.loads(injected[injected.index("--model-loader-extra-config") + 1])[SETTINGS_KEY]
    assert loader["spec"] == "medical:0.5" and set(loader["vectors"]) == {"medical", "math"}
    assert LOADER in injected_env["VLLM_PLUGINS"].split(",")
    assert plain_env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == injected_env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_bundled_grids_are_valid():
    for path in (TINY_GRID, DEMO_GRID):
        grid = Grid.load(path)
        assert grid.variants and grid.tasks and grid.sweeps


def test_lm_eval_metrics_become_value_and_stderr_and_the_declared_metric_is_primary():
    res = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25, "acc_norm_stderr,none": "N/A",
           "exact_match,strict-match": 0.3, "exact_match_stderr,strict-match": 0.05}  # fmt: skip
    metrics = metrics_of(res)
    assert metrics["acc"] == {"value": 0.5, "stderr": 0.1}
    assert metrics["acc_norm"] == {"value": 0.25, "stderr": None}
    assert metrics["exact_match,strict-match"] == {"value": 0.3, "stderr": 0.05}
    configs = {"configs": {"x": {"metric_list": [{"metric": "exact_match"}]}}}
    assert primary_metric(configs, "x", metrics) == "exact_match,strict-match"


def test_table_shows_score_and_stderr_per_variant_and_task_and_marks_missing_cells():
    grid = Grid.from_dict({"tasks": ["a", "b"], "variants": ["base", "medical"]})
    cell = {"primary_metric": "acc", "metrics": {"acc": {"value": 0.625, "stderr": 0.0625}},
            "n_samples": {"original": 8, "effective": 8}}  # fmt: skip
    rows = build_rows(grid, {cell_key("base", "a"): cell, cell_key("medical", "b"): cell})
    text = to_markdown(rows, ["a", "b"])
    assert "| `base` | base model | 0.625 ± 0.062 | — |" in text
    assert "| `medical` | base + medical | — | 0.625 ± 0.062 |" in text


# ---------------------------------------------------------------------- end to end (slow)


def run_cli(tiny_fixtures, vectors, out, *extra):
    return main(
        ["eval", "--grid", str(TINY_GRID), "--base", str(tiny_fixtures / "base"), "--vectors", str(vectors),
         "--variant", "base", "--variant", "medical", "--tasks", "tunevec_medical_mcq", "--limit", "6",
         "--out", str(out), *extra]
    )  # fmt: skip


@pytest.mark.slow
def test_grid_of_two_variants_runs_end_to_end_and_a_second_run_skips_finished_cells(
    tiny_fixtures, tiny_vectors, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    assert run_cli(tiny_fixtures, tiny_vectors, out) == 0
    printed = capsys.readouterr().out
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert set(cells) == {"base__tunevec_medical_mcq", "medical__tunevec_medical_mcq"}
    for cell in cells.values():
        assert cell["primary_metric"] == "acc" and cell["n_samples"]["effective"] == 6
        assert 0 <= cell["metrics"]["acc"]["value"] <= 1 and cell["metrics"]["acc"]["stderr"] is not None
        # lm-eval's own outputs are kept: aggregated results and one sample line per doc
        (samples,) = (out / cell["lm_eval_output"]).glob("*/samples_tunevec_medical_mcq_*.jsonl")
        lines = [json.loads(x) for x in samples.read_text().splitlines()]
        assert len(lines) == 6
        assert cell["metrics"]["acc"]["value"] == pytest.approx(sum(s["acc"] for s in lines) / 6)
        assert list((out / cell["lm_eval_output"]).glob("*/results_*.json"))
    # the spec variant really ran through a different model than the base
    lls = {}
    for key, cell in cells.items():
        (samples,) = (out / cell["lm_eval_output"]).glob("*/samples_*.jsonl")
        lls[key] = [float(r[0][0]) for r in json.loads(samples.read_text().splitlines()[0])["resps"]]
    assert lls["base__tunevec_medical_mcq"] != lls["medical__tunevec_medical_mcq"]
    assert "| `base` | base model |" in printed and "tunevec_medical_mcq (acc)" in printed
    assert (out / "results.csv").read_text().count("\n") >= 3
    assert (out / "plots" / "bars.png").stat().st_size > 0
    first = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (out / "cells").glob("*.json")}
    table = json.loads((out / "results.json").read_text())["results"]

    # Resume: delete one finished cell; only that cell runs again, with the same scores.
    (out / "cells" / "medical__tunevec_medical_mcq.json").unlink()
    ran: list[str] = []
    real_run_cell = tunevec.eval.runner.run_cell
    monkeypatch.setattr(
        tunevec.eval.runner,
        "run_cell",
        lambda run, p, *a: ran.append(p.cell.key) or real_run_cell(run, p, *a),
    )
    assert run_cli(tiny_fixtures, tiny_vectors, out) == 0
    assert ran == ["medical__tunevec_medical_mcq"]
    base_file = out / "cells" / "base__tunevec_medical_mcq.json"
    assert (base_file.stat().st_mtime_ns, base_file.read_text()) == first[base_file.name]
    assert _scores(json.loads((out / "results.json").read_text())["results"]) == _scores(table)

    # Everything finished: a third run starts no server at all.
    monkeypatch.setattr(tunevec.eval.servers, "spawn", lambda *a, **k: pytest.fail("a server was started"))
    assert run_cli(tiny_fixtures, tiny_vectors, out) == 0
    assert "2 finished, 0 to run" in capsys.readouterr().out


def _scores(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.slow
def test_inject_mode_serves_base_plus_tau_exactly_as_the_tuned_checkpoint(
    tiny_fixtures, tiny_vectors, tmp_path
):
    """steering: inject (the demo's mode) starts a plain vLLM server per spec with the delta injected at load
    time; base + 1.0·τ_medical must score every answer as the medical checkpoint does (float32)."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "tasks": [{"name": "tunevec_medical_mcq", "limit": 6}],
                "variants": ["medical", {"name": "medical-tuned", "tuned": "medical"}],
                "server": {"steering": "inject", "dtype": "float32", "max_model_len": 512},
            }
        )
    )
    out = tmp_path / "out"
    args = [
        "eval",
        "--grid",
        str(grid),
        "--base",
        str(tiny_fixtures / "base"),
        "--vectors",
        str(tiny_vectors),
    ]
    assert main([*args, "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "logs").iterdir()) == [
        "checkpoint-medical-tuned.log", "inject-medical.log"
    ]  # fmt: skip
    lls = {}
    for name in ("medical", "medical-tuned"):
        cell = json.loads((out / "cells" / f"{name}__tunevec_medical_mcq.json").read_text())
        (samples,) = (out / cell["lm_eval_output"]).glob("*/samples_*.jsonl")
        lls[name] = [
            float(r[0][0]) for line in samples.read_text().splitlines() for r in json.loads(line)["resps"]
        ]
    assert len(lls["medical"]) == 6 * 4
    worst = max(abs(a - b) for a, b in zip(lls["medical"], lls["medical-tuned"], strict=True))
    print(f"injected base + tau_medical vs the medical checkpoint: max |d loglik| = {worst:.1e} (float32)")
    assert worst < 1e-4


def test_choice_stats_read_gold_and_wrong_answer_log_likelihoods_from_the_sample_logs(tmp_path):
    from tunevec.eval.choices import choice_stats, to_markdown

    def cell(variant, docs):
        out = tmp_path / "lm-eval" / variant
        (out / "m").mkdir(parents=True)
        lines = [json.dumps({"target": t, "resps": [[[str(ll), "False"]] for ll in lls]}) for t, lls in docs]
        (out / "m" / "samples_mcq_2026.jsonl").write_text("\n".join(lines) + "\n")
        (tmp_path / "cells").mkdir(exist_ok=True)
        doc = {"variant": variant, "task": "mcq", "lm_eval_output": f"lm-eval/{variant}"}
        (tmp_path / "cells" / f"{variant}__mcq.json").write_text(json.dumps(doc))

    cell("base", [(0, [-1.0, -2.0, -4.0]), (1, [-1.0, -3.0, -2.0])])
    cell("alpha", [(0, [-0.5, -2.0, -4.0]), (1, [-1.0, -1.0, -2.0])])
    (tmp_path / "results.json").write_text(json.dumps({"variants": [{"name": "base"}, {"name": "alpha"}]}))
    base, alpha = choice_stats(tmp_path, "mcq")
    assert (base.variant, base.docs) == ("base", 2)
    assert base.gold == pytest.approx(-2.0) and base.others == pytest.approx(-2.25)
    assert base.margin == pytest.approx(((-1 + 2) + (-3 + 1)) / 2)
    assert alpha.gold == pytest.approx(-0.75) and alpha.margin == pytest.approx((1.5 + 0) / 2)
    assert "| `alpha` | 2 | -0.75 (+1.25) |" in to_markdown([base, alpha])
    with pytest.raises(TunevecError, match="no finished cell of task 'other'"):
        choice_stats(tmp_path, "other")


def test_paper_grid_passes_a_dry_run_offline(synthetic_world, tmp_path, no_servers, capsys):
    """eval/grids/paper.yaml (7B models from the hub, run on a GPU) is checked here without its models: a dry run
    with stand-in --base and --vectors validates its tasks (lm-eval's own index, no dataset is downloaded), its
    variants and sweeps against the vectors, and its server settings, and plans every cell."""
    grid = REPO / "eval" / "grids" / "paper.yaml"
    base, vectors = synthetic_world / "models" / "base", synthetic_world / "vectors"
    args = [
        "eval",
        "--grid",
        str(grid),
        "--base",
        str(base),
        "--vectors",
        str(vectors),
        "--out",
        str(tmp_path),
    ]
    assert main([*args, "--dry-run"]) == 0
    planned = [line for line in capsys.readouterr().out.splitlines() if line.endswith(": to run")]
    loaded = Grid.load(grid)
    tasks = {"medqa_4options", "medmcqa", "pubmedqa", "mmlu_clinical_knowledge", "gsm8k"}
    assert tasks <= {t.name for t in loaded.tasks}
    assert len(planned) == len(loaded.variants) * len(loaded.tasks) >= 10 * len(tasks)
    assert any(
        line.startswith("[tunevec eval] medical-tuned (tuned checkpoint of medical)") for line in planned
    )
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_under_lora_steering_a_nonlinear_spec_gets_an_injected_server_of_its_own():
    from tunevec.eval.grid import Variant
    from tunevec.eval.plan import server_group

    class G:
        class server:  # noqa: N801
            steering = "lora"

    assert server_group(Variant("m", spec="medical:0.5"), G) == "steering"
    assert server_group(Variant("t", spec="ties(density=0.5)/math+medical"), G) == "inject:t"
