"""`tunevec tune`: choose each vector's α on data, through the running endpoint, and judge the choice on docs the
search never saw.

1. **Plan.** Each objective task yields a validation view and a test view (``eval/splits.py``). The search space
   is one α per vector (or per vector and scope with ``--scopes``), on a grid of ``--alpha-step``.
2. **Search** (optuna's TPE sampler, multivariate, seeded; study kept in ``OUT/study.sqlite3``, so a stopped run
   resumes). The first trial is every α = 1, the plain sum, so the choice is never worse on validation than the
   mixture people would try first. Each trial scores its mixture on the validation docs of every task with
   lm-eval against the server; the trial's value is the weighted mean of the ``--maximize`` tasks' primary
   metrics, and each ``--floor TASK=VALUE`` is a constraint (TPE samples away from infeasible trials; the chosen
   trial must satisfy every floor). A mixture already scored is not scored again. The search stops at
   ``--trials`` or before a trial would overrun ``--budget-minutes``.
3. **Report.** The best feasible trial (first among equals), the comparison mixtures (by default every vector at
   α = 1) and the base are scored on the test docs, with lm-eval's standard errors; the chosen mixture is written
   into ``--config`` (``tunevec.yaml``) as the named variant ``--name``.

Why one scalar objective (a weighted mean) and floors, not a Pareto front: a search must end in one variant to
write into the config, and weights and floors are the two ways people state a trade-off before seeing results
(docs/tune.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunevec.core.errors import TunevecError

ALL_SCOPES = ("attention", "mlp", "embeddings", "norm")


def say(message: str) -> None:
    print(f"[tunevec tune] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ objective


@dataclass(frozen=True)
class Score:
    """One task's primary metric on one split, as lm-eval reports it."""

    value: float
    stderr: float | None
    metric: str
    n: int | None

    def text(self) -> str:
        return f"{self.value:.3f}" + (f" ± {self.stderr:.3f}" if self.stderr is not None else "")


@dataclass(frozen=True)
class Objective:
    """Maximise the weighted mean of some tasks' primary metrics, subject to floors on (other or the same) tasks.

    ``floors`` holds the text as given: a number, ``base`` (the base model's validation score), or ``base-0.05``.
    """

    maximize: dict[str, float]
    floors: dict[str, str] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys([*self.maximize, *self.floors]))

    def value(self, scores: dict[str, Score]) -> float:
        total = sum(self.maximize.values())
        return sum(w * scores[t].value for t, w in self.maximize.items()) / total

    def stderr(self, scores: dict[str, Score]) -> float | None:
        """Of the weighted mean, the tasks' errors taken as independent (different docs)."""
        errs = [scores[t].stderr for t in self.maximize]
        if any(e is None for e in errs):
            return None
        total = sum(self.maximize.values())
        return math.sqrt(sum((w * e) ** 2 for w, e in zip(self.maximize.values(), errs, strict=True))) / total

    def floor_values(self, base: dict[str, Score] | None) -> dict[str, float]:
        out = {}
        for task, text in self.floors.items():
            if text.startswith("base"):
                if base is None:
                    raise TunevecError("a floor relative to the base needs the base's validation scores")
                offset = float(text[4:] or 0)
                out[task] = base[task].value + offset
            else:
                out[task] = float(text)
        return out

    def describe(self) -> str:
        parts = [" + ".join(f"{w:g}·{t}" if w != 1 else t for t, w in self.maximize.items())]
        if len(self.maximize) > 1:
            parts[0] = (
                f"mean({parts[0]})" if len(set(self.maximize.values())) == 1 else f"weighted mean({parts[0]})"
            )
        parts += [f"{t} ≥ {v}" for t, v in self.floors.items()]
        return "maximise " + parts[0] + ("; subject to " + ", ".join(parts[1:]) if len(parts) > 1 else "")


def parse_objective(maximize: list[str], floors: list[str]) -> Objective:
    weights: dict[str, float] = {}
    for text in maximize:
        task, sep, weight = text.partition("=")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            w = -1.0
        if not task or w <= 0 or not math.isfinite(w):
            raise TunevecError(f"--maximize {text!r}: write TASK or TASK=WEIGHT with a positive weight")
        weights[task] = w
    if not weights:
        raise TunevecError(
            "give at least one --maximize TASK (an lm-eval task whose primary metric to raise)"
        )
    out: dict[str, str] = {}
    for text in floors:
        task, sep, value = text.partition("=")
        value = value.replace(" ", "")
        ok = bool(task and sep)
        if ok:
            try:
                float(value[4:] or 0) if value.startswith("base") else float(value)
            except ValueError:
                ok = False
        if not ok:
            raise TunevecError(f"--floor {text!r}: write TASK=VALUE, TASK=base or TASK=base-0.05")
        out[task] = value
    return Objective(weights, out)


# ------------------------------------------------------------------------------------------------ search space


@dataclass(frozen=True)
class Space:
    """One α per (vector, scope); ``scope`` None is the whole vector."""

    vectors: tuple[str, ...]
    scopes: tuple[str, ...] | None
    low: float
    high: float
    step: float

    @property
    def params(self) -> list[tuple[str, str | None]]:
        return [(v, s) for v in self.vectors for s in (self.scopes or (None,))]

    @staticmethod
    def key(vector: str, scope: str | None) -> str:
        return vector if scope is None else f"{vector}@{scope}"

    def spec(self, alphas: dict[str, float]) -> str | None:
        """The canonical spec of these α (components at 0 left out); None when every α is 0 (the base)."""
        from tunevec.steering.spec import Component, Spec

        comps = [
            Component(vector=v, alpha=alphas[self.key(v, s)], scope=s or "all")
            for v, s in self.params
            if alphas[self.key(v, s)] != 0
        ]
        return Spec(tuple(comps)).canonical() if comps else None

    def ones(self) -> dict[str, float]:
        """Every α = 1 (or the middle of the range when 1 is outside it): the first trial."""
        start = (
            1.0 if self.low <= 1 <= self.high else round((self.low + self.high) / 2 / self.step) * self.step
        )
        return {self.key(v, s): start for v, s in self.params}


# ------------------------------------------------------------------------------------------------ evaluation


class Evaluator:
    """Scores a served model on the validation or test view of the objective tasks, with lm-eval."""

    def __init__(
        self, grid: Any, url: str, task_manager: Any, plans: list[Any], concurrency: int, base_name: str
    ):
        self.grid = grid
        self.base_name = base_name
        self.url = url
        self.tm = task_manager
        self.plans = plans
        self.concurrency = concurrency
        by_name = {t.name: t for t in grid.tasks}
        self.task_specs = [by_name[p.name] for p in plans]

    def score(self, model: str, split: str, limit: int | None, save: Path | None = None) -> dict[str, Score]:
        import lm_eval
        from lm_eval.loggers import EvaluationTracker

        from tunevec.eval.grid import Variant
        from tunevec.eval.harness import _quiet_lm_eval, lm_eval_model, metrics_of, primary_metric
        from tunevec.eval.splits import views

        spec = self.task_specs[0]
        variant = Variant(name=model, spec=None if model == self.base_name else model)
        model_type, model_args = lm_eval_model(self.grid, variant, spec, self.url, self.concurrency, model)
        tracker = EvaluationTracker(output_path=str(save)) if save else None
        settings = self.grid.lm_eval
        with _quiet_lm_eval():
            results = lm_eval.simple_evaluate(
                model=model_type,
                model_args=model_args,
                tasks=views(self.tm, self.plans, split),
                num_fewshot=spec.num_fewshot,
                limit=limit,
                batch_size=settings.batch_size,
                log_samples=save is not None,
                evaluation_tracker=tracker,
                apply_chat_template=bool(spec.chat),
                fewshot_as_multiturn=bool(spec.chat),
                bootstrap_iters=settings.bootstrap_iters,
                random_seed=settings.seed,
            )
        if tracker is not None:
            samples = results.pop("samples")
            tracker.save_results_aggregated(results=results, samples=samples)
            for task_name in results["configs"]:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        out = {}
        for plan in self.plans:
            res = results["results"].get(plan.name)
            if res is None:
                raise TunevecError(f"lm-eval returned no results for {plan.name!r}")
            metrics = metrics_of(res)
            name = primary_metric(results, plan.name, metrics)
            if name is None:
                raise TunevecError(f"lm-eval reported no metric for {plan.name!r}")
            n = (results.get("n-samples") or {}).get(plan.name, {})
            out[plan.name] = Score(
                metrics[name]["value"], metrics[name]["stderr"], name, n.get("effective") if n else None
            )
        return out


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class Trial:
    number: int
    alphas: dict[str, float]
    spec: str | None
    validation: dict[str, Score]
    objective: float
    feasible: bool
    seconds: float
    reused: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["model"] = self.spec or "base"
        return d


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def open_study(out: Path, *, fresh: bool, settings: dict, seed: int, trials: int | None) -> Any:
    """The optuna study of ``out`` (created, or resumed when its settings are these), its sampler seeded."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "study.sqlite3"
    if fresh and db.exists():
        db.unlink()
    fingerprint = _settings_hash(settings)
    startup = max(2, min(10, (trials or 30) // 3))
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)
    study = optuna.create_study(
        study_name="tune",
        storage=f"sqlite:///{db}",
        direction="maximize",
        sampler=sampler,
        load_if_exists=True,
    )
    known = study.user_attrs.get("settings")
    if known is None:
        study.set_user_attr("settings", fingerprint)
    elif known != fingerprint:
        raise TunevecError(
            f"{db} holds a search with other settings (vectors, tasks, range, limits or server); give --fresh to "
            "start over, or another --out"
        )
    return study


def scored(study: Any, evaluator: Evaluator, model: str, split: str, limit: int | None, **kw: Any) -> dict:
    """``evaluator.score``, kept in the study: a resumed run does not score a model twice on the same docs."""
    key = f"scores:{split}:{limit}:{model}"
    if key in study.user_attrs:
        return {t: Score(**v) for t, v in study.user_attrs[key].items()}
    scores = evaluator.score(model, split, limit, **kw)
    study.set_user_attr(key, {t: asdict(v) for t, v in scores.items()})
    return scores


def search(
    study: Any,
    evaluator: Evaluator,
    space: Space,
    objective: Objective,
    *,
    trials: int | None,
    budget: float | None,
    limit: int | None,
    base_name: str,
) -> tuple[list[Trial], dict[str, Score] | None]:
    """Run the search; returns every trial (in order) and the base's validation scores (when a floor needs them)."""
    import optuna

    started = time.monotonic()
    base_scores = None
    if any(v.startswith("base") for v in objective.floors.values()):
        base_scores = scored(study, evaluator, base_name, "validation", limit)
        say("the base on the validation docs (a floor is relative to it): "
            + ", ".join(f"{t} {s.text()}" for t, s in base_scores.items()))  # fmt: skip
    floors = objective.floor_values(base_scores)
    done: list[Trial] = []
    by_spec: dict[str | None, Trial] = {}
    for ft in study.trials:  # a resumed study: its finished trials count
        if ft.state == optuna.trial.TrialState.COMPLETE and "trial" in ft.user_attrs:
            t = _trial_from_json(ft.user_attrs["trial"])
            done.append(t)
            by_spec.setdefault(t.spec, t)
    if done:
        say(f"resuming the study: {len(done)} trial(s) already scored")
    if not done and not study.trials:
        study.enqueue_trial(space.ones())
    durations = [t.seconds for t in done if not t.reused]
    while True:
        elapsed = time.monotonic() - started
        mean = sum(durations) / len(durations) if durations else 0.0
        if trials is not None and len(done) >= trials:
            break
        if budget is not None and done and elapsed + mean > budget:
            say(
                f"budget: another trial (~{_clock(mean)}) would overrun {_clock(budget)}; stopping the search"
            )
            break
        trial = study.ask()
        alphas = {
            space.key(v, s): trial.suggest_float(space.key(v, s), space.low, space.high, step=space.step)
            for v, s in space.params
        }
        alphas = {k: round(a, 6) for k, a in alphas.items()}  # 0.1 * 3 -> 0.3, as the spec text writes it
        spec = space.spec(alphas)
        t0 = time.monotonic()
        if spec in by_spec:
            prior = by_spec[spec]
            scores, reused = prior.validation, True
        else:
            scores, reused = evaluator.score(spec or base_name, "validation", limit), False
        seconds = time.monotonic() - t0
        value = objective.value(scores)
        feasible = all(scores[t].value >= v - 1e-12 for t, v in floors.items())
        for task, floor in floors.items():
            trial.set_constraint(task, floor - scores[task].value)
        record = Trial(len(done), alphas, spec, scores, value, feasible, round(seconds, 2), reused)
        trial.set_user_attr("trial", record.to_json())
        study.tell(trial, value)
        done.append(record)
        by_spec.setdefault(spec, record)
        if not reused:
            durations.append(seconds)
        best = choose(done)
        left_trials = (trials - len(done)) if trials is not None else None
        mean = sum(durations) / len(durations) if durations else 0.0
        elapsed = time.monotonic() - started
        if budget is not None:
            left = max(0.0, budget - elapsed)
            if left_trials is not None:
                left = min(left, left_trials * mean)
        else:
            left = (left_trials or 0) * mean
        scores_text = ", ".join(f"{task} {s.value:.3f}" for task, s in scores.items())
        line = f"trial {len(done)}{f'/{trials}' if trials else ''}: {spec or 'base'} -> {value:.4f} ({scores_text})"
        line += " [below a floor]" if not feasible else ""
        line += " [scored before]" if reused else f" in {_clock(seconds)}"
        if best is not None:
            line += f" · best {best.objective:.4f} = {best.spec or 'base'} (trial {best.number + 1})"
        say(line + f" · ~{_clock(left)} of search left")
    return done, base_scores


def choose(trials: list[Trial]) -> Trial | None:
    """The best feasible trial; the first among equal values (the enqueued α = 1 trial wins ties)."""
    feasible = [t for t in trials if t.feasible]
    if not feasible:
        return None
    return max(feasible, key=lambda t: (t.objective, -t.number))


def _trial_from_json(d: dict) -> Trial:
    return Trial(
        number=d["number"],
        alphas=d["alphas"],
        spec=d["spec"],
        validation={k: Score(**v) for k, v in d["validation"].items()},
        objective=d["objective"],
        feasible=d["feasible"],
        seconds=d["seconds"],
        reused=d.get("reused", False),
    )


# ------------------------------------------------------------------------------------------------ server


@contextmanager
def served(grid: Any, server_url: str | None, out: Path) -> Iterator[tuple[str, int]]:
    """(URL, concurrency) of the steering server: the given one, or one started here for the run."""
    concurrency = grid.lm_eval.num_concurrent
    if server_url:
        yield server_url.rstrip("/"), concurrency
        return
    from tunevec.eval.launch import free_port, lora_prompt_logprobs_safe, spawn, steering_server
    from tunevec.eval.servers import ManagedServer

    def start() -> Any:
        port = free_port()
        command, env = steering_server(grid.base, grid.vectors, grid.server, port)
        return spawn(command, port, out / "logs" / "steering.log", "steering server", env)

    say(f"starting the steering server (log {out / 'logs' / 'steering.log'})")
    t0 = time.monotonic()
    server = ManagedServer(start, grid.server.startup_timeout)
    try:
        say(f"steering server ready in {time.monotonic() - t0:.0f}s at {server.url}")
        if concurrency > 1 and not lora_prompt_logprobs_safe(server.process):
            concurrency = 1
            say("concurrent prompt-logprob requests are not safe on this vLLM build: num_concurrent=1")
        yield server.url, concurrency
    finally:
        server.stop()


def _cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), for the record of where a result was measured."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _api_headers() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY") or os.environ.get("TUNEVEC_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def preflight(url: str, space: Space) -> str:
    """Check the server serves these vectors and the widest mixture of the search; returns the base's name."""
    import httpx

    headers = _api_headers()
    try:
        models = httpx.get(url + "/v1/models", headers=headers, timeout=60)
        vectors = httpx.get(url + "/v1/tunevec/vectors", headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        raise TunevecError(f"the server at {url} does not answer ({exc}); is it running?") from exc
    if vectors.status_code == 401:
        raise TunevecError(f"the server at {url} needs its API key: set OPENAI_API_KEY (or TUNEVEC_API_KEY)")
    if vectors.status_code != 200:
        raise TunevecError(f"{url} is not a tunevec server (GET /v1/tunevec/vectors: {vectors.status_code})")
    known = {v["name"] for v in vectors.json()["data"]}
    missing = [v for v in space.vectors if v not in known]
    if missing:
        raise TunevecError(
            f"the server has no vector {', '.join(missing)}; it serves {', '.join(sorted(known))}"
        )
    widest = space.spec({k: (space.high if space.high != 0 else space.low) for k in space.ones()})
    for extreme in {widest, space.spec({k: space.low for k in space.ones()})} - {None}:
        r = httpx.post(url + "/v1/tunevec/describe", json={"spec": extreme}, headers=headers, timeout=60)
        if r.status_code != 200:
            raise TunevecError(
                f"the server refuses {extreme!r}, a corner of the search: {r.json()['error']['message']}"
            )
        d = r.json()
        if d["needs_truncation"] and not d["truncation_allowed"]:
            raise TunevecError(
                f"{extreme!r} stacks to rank {d['rank']}, above the server's max LoRA rank {d['max_rank']}: start "
                "it with a larger --max-lora-rank (or a smaller --adapter-rank)"
            )
    base = next((m["id"] for m in models.json()["data"] if not m.get("parent")), None)
    return base or "base"


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


def _grid(args: argparse.Namespace, tasks: list[str]) -> Any:
    """The grid machinery of `tunevec eval` (paths, server and lm-eval settings, chat), for these tasks."""
    from tunevec.eval.commands import grid_from_args

    eval_args = argparse.Namespace(
        grid=args.grid, base=args.base, vectors=args.vectors, tasks=[",".join(tasks)],
        include_path=args.include_path, limit=None, num_fewshot=args.num_fewshot, chat=args.chat,
        variant=["base"], tuned=None, checkpoint=None, sweep=None, steering=None, dtype=args.dtype,
        max_model_len=args.max_model_len, adapter_rank=args.adapter_rank, max_lora_rank=args.max_lora_rank,
        compile=False, num_concurrent=args.num_concurrent, batch_size=args.batch_size, max_retries=None,
    )  # fmt: skip
    return grid_from_args(eval_args)


def run_tune(args: argparse.Namespace) -> int:
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
        f"{f'{trials} trials' if trials else ''}{' within ' + _clock(budget) if budget else ''}")  # fmt: skip
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
        rows: list[dict] = []
        models = [(best.spec or base_name, "chosen")]
        models += [(c, "compared") for c in compare if c != best.spec]
        models += [(base_name, "base")] if best.spec is not None else []
        known_val = {t.spec or base_name: t.validation for t in done}
        if base_val is not None:
            known_val.setdefault(base_name, base_val)
        test_started = time.monotonic()
        for model, role in models:
            if model not in known_val:  # the compared mixtures and the base, on the docs the search saw
                known_val[model] = scored(study, evaluator, model, "validation", args.limit)
            save = out / "lm-eval" / "test" / hashlib.sha256(model.encode()).hexdigest()[:12]
            test = scored(study, evaluator, model, "test", args.test_limit, save=save)
            say(f"test: {model} ({role}): " + ", ".join(f"{t} {s.text()}" for t, s in test.items()))
            rows.append({
                "model": model, "role": role,
                "validation": {t: asdict(s) for t, s in known_val.get(model, {}).items()},
                "test": {t: asdict(s) for t, s in test.items()},
                "lm_eval_output": str(save),
            })  # fmt: skip
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
