"""`tunevec eval`: lm-eval over a grid of variants and tasks, against a tunevec server (started, or given).

The grid comes from a YAML file (``--grid``), from the command line, or both: scalars on the command line
override the file's; any of ``--variant/--tuned/--checkpoint/--sweep`` replaces the file's variants and sweeps,
and ``--tasks`` replaces its tasks.
"""

from __future__ import annotations

import argparse
import re
import signal
from pathlib import Path
from typing import Any

from tunevec.core.errors import TunevecError

_NAMED = re.compile(r"^([A-Za-z0-9_.\-]+)=(.+)$")  # NAME=VALUE where NAME has no spec punctuation


def configure_eval(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  tunevec eval --grid eval/grids/demo.yaml --base F/base --vectors V --out artifacts/eval/demo\n"
        "  tunevec eval --base F/base --vectors V --tasks tunevec_medical_mcq --variant base --variant medical \\\n"
        "      --tuned medical --sweep medical=0.5,1,2 --limit 50\n"
        "  tunevec eval --server-url http://127.0.0.1:8000 --base F/base --tasks medqa_4options \\\n"
        "      --variant base --variant medical:0.8\n"
        "See docs/eval.md for the grid file format."
    )
    g = parser.add_argument_group("grid")
    g.add_argument(
        "--grid", help="grid YAML file (see docs/eval.md; bundled: eval/grids/demo.yaml, tiny.yaml)"
    )
    g.add_argument("--base", help="base model folder (for the steering server and the tokenizer)")
    g.add_argument("--vectors", help="folder of tuning-vector artifacts")
    g.add_argument(
        "--variant",
        action="append",
        metavar="[NAME=]SPEC",
        help="a variant: `base`, or a spec such as medical:0.5 or medical@mlp, optionally named (repeatable)",
    )
    g.add_argument(
        "--tuned", action="append", metavar="VECTOR", help="the tuned checkpoint VECTOR was extracted from"
    )
    g.add_argument(
        "--checkpoint", action="append", metavar="NAME=PATH", help="any model folder, served as is"
    )
    g.add_argument(
        "--sweep",
        action="append",
        metavar="VECTOR=A,B,..|TEMPLATE=A,B,..",
        help="an alpha sweep: medical=0.25,0.5,1 or 'medical@mlp:{alpha}=0.5,1' (alpha 0 is the base)",
    )
    g.add_argument(
        "--tasks",
        action="append",
        metavar="T[,T...]",
        help="lm-eval task names (bundled fixture tasks or any)",
    )
    g.add_argument(
        "--include_path",
        "--include-path",
        action="append",
        dest="include_path",
        help="extra lm-eval task folder",
    )
    g.add_argument("--limit", type=float, help="docs per task (a fraction below 1 = share of the docs)")
    g.add_argument("--num_fewshot", "--num-fewshot", type=int, dest="num_fewshot")
    g.add_argument(
        "--chat",
        nargs="?",
        const="true",
        choices=["true", "server"],
        help="apply the chat template (lm-eval applies it; `--chat server`: the server's chat API, generation only)",
    )
    s = parser.add_argument_group("servers")
    s.add_argument(
        "--server-url", help="use this running tunevec server (http://host:port) for base and spec variants"
    )
    from tunevec.eval.schema import ServerSettings
    from tunevec.server.config import add_setting_arguments

    servers = ["steering", "dtype", "max_model_len", "adapter_rank", "max_lora_rank", "enforce_eager"]
    add_setting_arguments(s, ServerSettings, servers)
    r = parser.add_argument_group("run")
    r.add_argument("--out", help="output folder (default: artifacts/eval/<grid name>)")
    r.add_argument("--num-concurrent", type=int, help="requests in flight per cell (default 8)")
    r.add_argument("--batch-size", type=int, help="prompts per request (default 1)")
    r.add_argument("--max-retries", type=int, help="lm-eval's retries per request (default 3)")
    r.add_argument("--fresh", action="store_true", help="re-run finished cells too")
    r.add_argument(
        "--dry-run", action="store_true", help="validate, list the cells and stop (starts nothing)"
    )
    parser.set_defaults(run=run_eval)


def grid_from_args(args: argparse.Namespace) -> Any:
    """The grid file (if any) with the command line applied, validated for shape and spec syntax."""
    from tunevec.eval.grid import Grid

    top: dict[str, Any] = {}
    if args.base:
        top["base"] = str(Path(args.base).resolve())
    if args.vectors:
        top["vectors"] = str(Path(args.vectors).resolve())
    if args.tasks:
        top["tasks"] = [t.strip() for group in args.tasks for t in group.split(",") if t.strip()]
    if args.include_path:
        top["include_path"] = [str(Path(p).resolve()) for p in args.include_path]
    if args.limit is not None:
        top["limit"] = int(args.limit) if args.limit >= 1 and args.limit.is_integer() else args.limit
    if args.num_fewshot is not None:
        top["num_fewshot"] = args.num_fewshot
    if args.chat is not None:
        top["chat"] = True if args.chat == "true" else args.chat
    if args.variant or args.tuned or args.checkpoint or args.sweep:
        top["variants"] = _variants(args)
        top["sweeps"] = [_sweep(s) for s in args.sweep or []]
    server = {
        k: v
        for k, v in {
            name: getattr(args, name, None)
            for name in (
                "steering",
                "dtype",
                "max_model_len",
                "adapter_rank",
                "max_lora_rank",
                "enforce_eager",
            )
        }.items()
        if v is not None
    }
    lm = {
        k: v
        for k, v in {
            "num_concurrent": args.num_concurrent,
            "batch_size": args.batch_size,
            "max_retries": args.max_retries,
        }.items()
        if v is not None
    }
    if args.grid:
        import yaml

        try:
            data = yaml.safe_load(Path(args.grid).read_text(encoding="utf-8"))
        except OSError:
            data = None  # Grid.load reports the missing file
        if isinstance(data, dict):
            for key, extra in (("server", server), ("lm_eval", lm)):
                if extra:
                    top[key] = (
                        {**(data.get(key) or {}), **extra} if isinstance(data.get(key), dict) else extra
                    )
        return Grid.load(args.grid, top)
    if server:
        top["server"] = server
    if lm:
        top["lm_eval"] = lm
    if "tasks" not in top:
        raise TunevecError("no tasks: give --tasks (or a --grid file with `tasks:`)")
    return Grid.from_dict(top)


def _variants(args: argparse.Namespace) -> list[Any]:
    out: list[Any] = []
    for text in args.variant or []:
        m = _NAMED.match(text)
        out.append({"name": m.group(1), "spec": m.group(2)} if m else text)
    out += [{"tuned": v} for v in args.tuned or []]
    for text in args.checkpoint or []:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise TunevecError(f"--checkpoint {text!r}: write NAME=PATH")
        out.append({"name": name, "checkpoint": str(Path(path).resolve())})
    return out


def _sweep(text: str) -> dict[str, Any]:
    head, sep, tail = text.rpartition("=")
    try:
        alphas = [float(a) for a in tail.split(",") if a.strip()]
    except ValueError:
        alphas = []
    if not sep or not head or not alphas:
        raise TunevecError(f"--sweep {text!r}: write VECTOR=A,B,... or 'SPEC_WITH_{{alpha}}=A,B,...'")
    return {"spec": head, "alphas": alphas} if "{alpha}" in head else {"vector": head, "alphas": alphas}


def evaluate(
    grid: Any, out: Path, *, server_url: str | None = None, fresh: bool = False, dry_run: bool = False
) -> dict[str, Any]:
    """Validate, run the unfinished cells, write tables and plots; returns paths, table text and failures."""
    from tunevec.eval.harness import load_cells
    from tunevec.eval.plan import GridRun, prepare
    from tunevec.eval.plots import write_plots
    from tunevec.eval.progress import say
    from tunevec.eval.runner import run_grid
    from tunevec.eval.table import build_rows, to_markdown, write_tables

    run: GridRun = prepare(grid, out, server_url=server_url, fresh=fresh)
    if dry_run:
        for c in run.cells:
            state = "finished" if c.done else "to run"
            say(f"{c.variant.name} ({c.variant.describe()}) x {c.cell.task.name}: {state}")
        return {"table": None, "paths": {}, "plots": [], "failures": [], "run": run}
    _stop_on_sigterm()
    run_grid(run)
    finished = load_cells(run.out)
    valid = {c.cell.key: finished[c.cell.key] for c in run.cells if c.done and c.cell.key in finished}
    tasks = [t.name for t in grid.tasks]
    rows = build_rows(grid, valid)
    table = to_markdown(rows, tasks)
    paths = write_tables(rows, tasks, run.out, grid)
    plots = write_plots(rows, tasks, grid, run.out / "plots") if valid else []
    with paths["md"].open("a", encoding="utf-8") as f:
        for p in plots:
            f.write(f"\n![{p.stem}](plots/{p.name})\n")
        f.write("\nlm-eval's own results and per-sample logs: `lm-eval/<cell>/`; cell files: `cells/`.\n")
    return {"table": table, "paths": paths, "plots": plots, "failures": run.failures, "run": run}


def run_eval(args: argparse.Namespace) -> int:
    from tunevec.eval.progress import say

    grid = grid_from_args(args)
    out = Path(args.out) if args.out else Path("artifacts") / "eval" / grid.name
    result = evaluate(grid, out, server_url=args.server_url, fresh=args.fresh, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    print()
    print(result["table"])
    print()
    say(f"table: {result['paths']['md']} (also .csv, .json)")
    for p in result["plots"]:
        say(f"plot: {p}")
    say(f"lm-eval results and samples: {out / 'lm-eval'}; server logs: {out / 'logs'}")
    if result["failures"]:
        say(f"{len(result['failures'])} cell(s) failed; re-run the same command to retry only those:")
        for key, reason in result["failures"]:
            say(f"  {key}: {reason}")
        return 1
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM -> SystemExit, so the `finally` blocks that stop started servers run."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
