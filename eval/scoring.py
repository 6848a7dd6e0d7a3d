"""How `tunevec tune` scores a mixture: lm-eval on the validation or test view of each task, against the
steering server (the one given with ``--server-url``, or one started for the run), and the checks made of that
server before the first trial."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunevec.core.errors import TunevecError
from tunevec.eval.search import Score, Space, say


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
