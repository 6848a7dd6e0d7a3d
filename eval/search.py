"""The search of `tunevec tune`: the objective, the space of α, and optuna's loop over it.

- **Objective**: the weighted mean of some tasks' primary metrics on validation docs, with floors on tasks as
  constraints (a number, or relative to the base's validation score).
- **Space**: one α per vector, or per vector and scope, on a grid (``--alpha-step``); a point is a canonical spec.
- **Search**: optuna's TPE sampler (multivariate: the α's of a mixture interact; seeded), the first trial every
  α = 1, each trial scored through the endpoint (``eval/scoring.py``), floors set as optuna constraints, a spec
  already scored not scored again, stopped at ``--trials`` or before a trial would overrun the budget. The study is
  an SQLite file, so a stopped run resumes, and the report's scores are kept in it too.
- **Choice**: the best feasible trial, the first among equals (the plain sum wins ties).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunevec.core.errors import TunevecError


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


# ------------------------------------------------------------------------------------------------ the loop


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


def clock(seconds: float) -> str:
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


def scored(study: Any, evaluator: Any, model: str, split: str, limit: int | None, **kw: Any) -> dict:
    """``evaluator.score``, kept in the study: a resumed run does not score a model twice on the same docs."""
    key = f"scores:{split}:{limit}:{model}"
    if key in study.user_attrs:
        return {t: Score(**v) for t, v in study.user_attrs[key].items()}
    scores = evaluator.score(model, split, limit, **kw)
    study.set_user_attr(key, {t: asdict(v) for t, v in scores.items()})
    return scores


def search(
    study: Any,
    evaluator: Any,
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
            say(f"budget: another trial (~{clock(mean)}) would overrun {clock(budget)}; stopping the search")
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
        line += " [scored before]" if reused else f" in {clock(seconds)}"
        if best is not None:
            line += f" · best {best.objective:.4f} = {best.spec or 'base'} (trial {best.number + 1})"
        say(line + f" · ~{clock(left)} of search left")
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
