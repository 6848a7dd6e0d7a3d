"""`tunevec tune`: choose each vector's α on data, through the running endpoint, and judge the choice on docs the
search never saw.

1. **Plan.** Each objective task yields a validation view and a test view (``eval/splits.py``). The search space
   is one α per vector (or per vector and scope with ``--scopes``), on a grid of ``--alpha-step``.
2. **Search** (``eval/search.py``): optuna's TPE sampler, multivariate and seeded, the first trial every α = 1;
   each trial scores its mixture on the validation docs of every task with lm-eval against the server
   (``eval/scoring.py``); the value is the weighted mean of the ``--maximize`` tasks' primary metrics, each
   ``--floor`` a constraint. The study is kept in ``OUT/study.sqlite3``, so a stopped run resumes.
3. **Report** (here). The best feasible trial, the comparison mixtures (by default every vector at α = 1) and the
   base are scored on the test docs, with lm-eval's standard errors; the chosen mixture is written into
   ``--config`` (``tunevec.yaml``) as the named variant ``--name`` (``eval/variants_file.py``).

Why one scalar objective and floors, not a Pareto front: a search must end in one variant to write into the
config, and weights and floors are the two ways people state a trade-off before seeing results (docs/tune.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunevec.core.errors import TunevecError
from tunevec.eval.search import Space, Trial, choose, clock, open_study, parse_objective, say, scored, search

ALL_SCOPES = ("attention", "mlp", "embeddings", "norm")


def _cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), for the record of where a result was measured."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------ output


def results_markdown(result: dict) -> str:
    tasks = result["objective"]["tasks"]
    lines = [
        f"# tunevec tune: {result['name']}",
        "",
        f"{result['objective']['text']}; {len(result['trials'])} trials on the validation docs "
        f"({result['seconds']['search']:.0f} s); chosen: `{result['chosen']['model']}` (trial "
        f"{result['chosen']['number'] + 1}).",
        "",
        "| model | role | " + " | ".join(f"{t} validation" for t in tasks) + " | "
        + " | ".join(f"{t} test" for t in tasks) + " |",
        "|---|---|" + "---:|" * (2 * len(tasks)),
    ]  # fmt: skip
    for row in result["table"]:
        val = [row["validation"].get(t) for t in tasks]
        test = [row["test"].get(t) for t in tasks]
        cells = [_cell(x) for x in val] + [_cell(x) for x in test]
        lines.append(f"| `{row['model']}` | {row['role']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Scores are each task's primary metric ± lm-eval's standard error; n: "
        + ", ".join(
            f"{t} {result['docs'][t]['validation']} validation / {result['docs'][t]['test']} test"
            for t in tasks
        )
        + " docs. Test docs were never seen by the search.",
        "",
        "## Trials",
        "",
        "| # | model | objective | " + " | ".join(tasks) + " | feasible | s |",
        "|---:|---|---:|" + "---:|" * len(tasks) + "---|---:|",
    ]
    for t in result["trials"]:
        vals = " | ".join(f"{t['validation'][task]['value']:.3f}" for task in tasks)
        lines.append(
            f"| {t['number'] + 1} | `{t['model']}` | {t['objective']:.4f} | {vals} | "
            f"{'yes' if t['feasible'] else 'no'} | {t['seconds']:.0f}{' (cached)' if t['reused'] else ''} |"
        )
    return "\n".join(lines) + "\n"


def _cell(score: dict | None) -> str:
    if not score:
        return "—"
    return f"{score['value']:.3f}" + (f" ± {score['stderr']:.3f}" if score.get("stderr") is not None else "")


# ------------------------------------------------------------------------------------------------ command line


def configure_tune(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  tunevec tune --grid eval/grids/demo.yaml --base F/base --vectors V --vector medical --vector math \\\n"
        "      --maximize tunevec_medical_mcq --maximize tunevec_math --trials 16 --name medical-math \\\n"
        "      --config tunevec.yaml\n"
        "  tunevec tune --server-url http://127.0.0.1:8000 --base F/base --vector medical \\\n"
        "      --maximize tunevec_medical_mcq --floor tunevec_instructions=base --budget-minutes 30\n"
        "See docs/tune.md."
    )
    g = parser.add_argument_group("what to tune")
    g.add_argument(
        "--vector", action="append", required=True, help="a vector whose α is searched (repeatable)"
    )
    g.add_argument(
        "--scopes",
        help="one α per vector and scope, e.g. mlp,attention (the mixture then holds only these scopes)",
    )
    g.add_argument("--alpha-min", type=float, default=0.0, help="lowest α searched (default 0)")
    g.add_argument("--alpha-max", type=float, default=2.0, help="highest α searched (default 2)")
    g.add_argument("--alpha-step", type=float, default=0.05, help="α grid (default 0.05)")
    o = parser.add_argument_group("objective")
    o.add_argument(
        "--maximize",
        action="append",
        default=[],
        metavar="TASK[=WEIGHT]",
        help="raise this lm-eval task's primary metric; several: their weighted mean (repeatable)",
    )
    o.add_argument(
        "--floor",
        action="append",
        default=[],
        metavar="TASK=VALUE|base|base-D",
        help="keep this task's primary metric at or above VALUE (or the base's score, minus D) on validation",
    )
    b = parser.add_argument_group("budget and data")
    b.add_argument(
        "--trials", type=int, help="number of trials (default 20 unless --budget-minutes is given)"
    )
    b.add_argument("--budget-minutes", type=float, help="stop starting trials that would end after this")
    b.add_argument("--limit", type=int, help="validation docs per task per trial (default: all)")
    b.add_argument("--test-limit", type=int, help="test docs per task in the final report (default: all)")
    b.add_argument(
        "--carve-validation",
        type=float,
        metavar="F",
        help="for tasks without both splits: a share F of the eval docs (by content hash) is validation",
    )
    b.add_argument(
        "--compare",
        action="append",
        metavar="SPEC",
        help="also report this spec on the test docs (default: every tuned vector at α = 1)",
    )
    b.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    s = parser.add_argument_group("server and lm-eval (as tunevec eval)")
    s.add_argument(
        "--grid", help="take base, vectors, chat, include_path, server: and lm_eval: from this grid"
    )
    s.add_argument("--base", help="base model folder (for the server started here, and the tokenizer)")
    s.add_argument("--vectors", help="folder of tuning-vector artifacts (for the server started here)")
    s.add_argument("--server-url", help="use this running tunevec server instead of starting one")
    s.add_argument("--include_path", "--include-path", action="append", dest="include_path")
    s.add_argument("--chat", nargs="?", const="true", choices=["true", "server"])
    s.add_argument("--num_fewshot", "--num-fewshot", type=int, dest="num_fewshot")
    s.add_argument("--dtype")
    s.add_argument("--max-model-len", type=int)
    s.add_argument("--adapter-rank", type=int)
    s.add_argument("--max-lora-rank", type=int)
    s.add_argument("--num-concurrent", type=int)
    s.add_argument("--batch-size", type=int)
    r = parser.add_argument_group("result")
    r.add_argument("--name", help="the variant's name (default: tuned-<vectors>)")
    r.add_argument("--config", help="write the chosen mixture into this tunevec.yaml as variant --name")
    r.add_argument("--out", help="output folder (default artifacts/tune/<name>)")
    r.add_argument("--fresh", action="store_true", help="start the search over (default: resume OUT's study)")
    parser.set_defaults(run=run_tune)


def held_out(
    study: Any,
    evaluator: Any,
    best: Trial,
    done: list[Trial],
    compare: list[str],
    base_name: str,
    base_val: dict | None,
    limit: int | None,
    test_limit: int | None,
    out: Path,
) -> list[dict]:
    """The report's rows: the chosen mixture, the compared specs and the base, each on validation and test docs."""
    models = [(best.spec or base_name, "chosen")]
    models += [(c, "compared") for c in compare if c != best.spec]
    models += [(base_name, "base")] if best.spec is not None else []
    known_val = {t.spec or base_name: t.validation for t in done}
    if base_val is not None:
        known_val.setdefault(base_name, base_val)
    rows = []
    for model, role in models:
        if model not in known_val:  # the compared mixtures and the base, on the docs the search saw
            known_val[model] = scored(study, evaluator, model, "validation", limit)
        save = out / "lm-eval" / "test" / hashlib.sha256(model.encode()).hexdigest()[:12]
        test = scored(study, evaluator, model, "test", test_limit, save=save)
        say(f"test: {model} ({role}): " + ", ".join(f"{t} {s.text()}" for t, s in test.items()))
        rows.append({
            "model": model, "role": role,
            "validation": {t: asdict(s) for t, s in known_val[model].items()},
            "test": {t: asdict(s) for t, s in test.items()},
            "lm_eval_output": str(save),
        })  # fmt: skip
    return rows


def _grid(args: argparse.Namespace, tasks: list[str]) -> Any:
    """The grid machinery of `tunevec eval` (paths, server and lm-eval settings, chat), for these tasks."""
    from tunevec.eval.commands import grid_from_args

    eval_args = argparse.Namespace(
        grid=args.grid, base=args.base, vectors=args.vectors, tasks=[",".join(tasks)],
        include_path=args.include_path, limit=None, num_fewshot=args.num_fewshot, chat=args.chat,
        variant=["base"], tuned=None, checkpoint=None, sweep=None, steering=None, dtype=args.dtype,
        max_model_len=args.max_model_len, adapter_rank=args.adapter_rank, max_lora_rank=args.max_lora_rank,
        enforce_eager=None, num_concurrent=args.num_concurrent, batch_size=args.batch_size, max_retries=None,
    )  # fmt: skip
    return grid_from_args(eval_args)


def run_tune(args: argparse.Namespace) -> int:
    from tunevec.eval.scoring import Evaluator, preflight, served
    from tunevec.eval.splits import plan_tasks
    from tunevec.eval.tasks import default_include_path, task_manager

    started = time.monotonic()
    # lm-eval's per-request progress bars would bury the trial lines; tqdm reads this when a bar is made
    os.environ.setdefault("TQDM_DISABLE", "1")
    objective = parse_objective(args.maximize, args.floor)
    vectors = tuple(dict.fromkeys(args.vector))
    scopes = None
    if args.scopes:
        scopes = tuple(s.strip() for s in args.scopes.split(",") if s.strip())
        bad = [s for s in scopes if s not in ALL_SCOPES]
        if bad or not scopes:
            raise TunevecError(f"--scopes {args.scopes!r}: use some of {', '.join(ALL_SCOPES)}")
    if not args.alpha_min < args.alpha_max or args.alpha_step <= 0:
        raise TunevecError("give --alpha-min < --alpha-max and a positive --alpha-step")
    space = Space(vectors, scopes, args.alpha_min, args.alpha_max, args.alpha_step)
    trials = args.trials if args.trials is not None else (None if args.budget_minutes else 20)
    if trials is not None and trials < 1:
        raise TunevecError("--trials must be at least 1")
    budget = args.budget_minutes * 60 if args.budget_minutes else None
    name = args.name or "tuned-" + "-".join(vectors)
    out = Path(args.out) if args.out else Path("artifacts") / "tune" / name
    grid = _grid(args, objective.tasks)
    if not args.server_url and (grid.base is None or grid.vectors is None):
        raise TunevecError(
            "give --server-url, or --base and --vectors (or a --grid with them) to start a server"
        )
    tm = task_manager(default_include_path(grid), objective.tasks)
    plans = plan_tasks(tm, objective.tasks, args.carve_validation)
    for plan in plans:
        say(f"{plan.name}: chosen on {plan.describe()}")
    compare = args.compare or [space.spec(dict.fromkeys(space.ones(), 1.0))]
    settings = {
        "vectors": vectors, "scopes": scopes, "range": [space.low, space.high, space.step], "tasks": objective.tasks,
        "objective": asdict(objective), "limit": args.limit, "seed": args.seed, "carve": args.carve_validation,
        "server": args.server_url or grid.server.model_dump(), "chat": [t.chat for t in grid.tasks],
    }  # fmt: skip
    say(f"{objective.describe()}; α in [{space.low:g}, {space.high:g}] step {space.step:g} for "
        f"{', '.join(space.key(v, s) for v, s in space.params)}; "
        f"{f'{trials} trials' if trials else ''}{' within ' + clock(budget) if budget else ''}")  # fmt: skip
    with served(grid, args.server_url, out) as (url, concurrency):
        base_name = preflight(url, space)
        evaluator = Evaluator(grid, url, tm, plans, concurrency, base_name)
        search_started = time.monotonic()
        study = open_study(out, fresh=args.fresh, settings=settings, seed=args.seed, trials=trials)
        done, base_val = search(
            study,
            evaluator,
            space,
            objective,
            trials=trials,
            budget=budget,
            limit=args.limit,
            base_name=base_name,
        )
        search_seconds = time.monotonic() - search_started
        best = choose(done)
        if best is None:
            raise TunevecError(
                f"no trial met every floor ({', '.join(f'{t} ≥ {v}' for t, v in objective.floors.items())}); "
                f"lower a floor or widen the α range. Trials: {out / 'study.sqlite3'}"
            )
        say(f"chosen: {best.spec or 'base'} (trial {best.number + 1}, validation {best.objective:.4f}); scoring it, "
            f"{', '.join(compare)} and the base on the test docs")  # fmt: skip
        test_started = time.monotonic()
        rows = held_out(
            study, evaluator, best, done, compare, base_name, base_val, args.limit, args.test_limit, out
        )
        test_seconds = time.monotonic() - test_started
    docs = {
        p.name: {
            "validation": best.validation[p.name].n,
            "test": next((r["test"][p.name]["n"] for r in rows if r["role"] == "chosen"), None),
        }
        for p in plans
    }
    result = {
        "format": "tunevec.tune-result",
        "version": 1,
        "name": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count()},
        "objective": {**asdict(objective), "text": objective.describe(), "tasks": objective.tasks},
        "space": asdict(space),
        "plans": [asdict(p) for p in plans],
        "settings": settings,
        "trials": [t.to_json() for t in done],
        "chosen": best.to_json(),
        "base_validation": {t: asdict(s) for t, s in (base_val or {}).items()},
        "table": rows,
        "docs": docs,
        "seconds": {
            "search": round(search_seconds, 1),
            "test": round(test_seconds, 1),
            "total": round(time.monotonic() - started, 1),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    markdown = results_markdown(result)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    print()
    print(markdown)
    if args.config:
        from tunevec.eval.variants_file import write_variant

        if best.spec is None:
            say(f"the chosen mixture is the base itself: nothing written to {args.config}")
        else:
            chosen = rows[0]["test"]
            comment = f"tunevec tune {result['date'][:10]}: test " + ", ".join(
                f"{t} {s['value']:.3f}" for t, s in chosen.items()
            )
            write_variant(Path(args.config), name, best.spec, comment)
            say(f"wrote variant {name!r} = {best.spec!r} into {args.config} (serve it: tunevec serve --config "
                f"{args.config}; request model={name!r})")  # fmt: skip
    say(f"results: {out / 'results.md'}, {out / 'tune.json'}; study: {out / 'study.sqlite3'}")
    return 0
