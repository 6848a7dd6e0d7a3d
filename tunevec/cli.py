"""The `tunevec` console script: one subcommand per job, each defined next to the code it runs.

Each entry names ``module:function``; the function takes the subcommand's parser, adds its arguments and sets
``parser.set_defaults(run=callable)``. Command modules import heavy libraries (torch, vllm) inside ``run`` so that
``tunevec --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tunevec.core.errors import TunevecError

COMMANDS: dict[str, tuple[str, str]] = {
    "fixtures": (
        "tunevec.fixtures.cli:configure",
        "build the offline base/tuned model fixtures and lm-eval tasks",
    ),
    "extract": (
        "tunevec.analysis.commands:configure_extract",
        "extract a tuning vector tau = tuned - base, streamed",
    ),
    "analyze": (
        "tunevec.analysis.commands:configure_analyze",
        "analyse tuning vectors: size, rank, alignment, CKA, similarity",
    ),
    "attribute": (
        "tunevec.analysis.attribution:configure",
        "attribution patching: which layers' blocks carry tau's gain",
    ),
    "derive": (
        "tunevec.analysis.derive:configure",
        "an activation vector from a tuning vector: the residual-stream shift it causes",
    ),
    "activation": (
        "tunevec.steering.commands:configure_activation",
        "import or export activation vectors (repeng / llama.cpp control-vector GGUF)",
    ),
    "merge": ("tunevec.steering.commands:configure_merge", "write base + spec as a plain HF checkpoint"),
    "lora": (
        "tunevec.steering.commands:configure_lora",
        "factorise a tuning vector into a PEFT LoRA adapter vLLM loads",
    ),
    "serve": (
        "tunevec.server.commands:configure_serve",
        "OpenAI-compatible server with per-request vector mixing",
    ),
    "eval": ("tunevec.eval.commands:configure_eval", "lm-eval over a grid of variants x tasks, resumable"),
    "tune": (
        "tunevec.eval.tune:configure_tune",
        "choose each vector's alpha on validation docs (optuna), report it on test docs",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported and configured (all of them when None), so a command
    needs only its own dependencies (``tunevec analyze`` on a machine without vLLM or pydantic)."""
    parser = argparse.ArgumentParser(
        prog="tunevec",
        description="Tuning vectors: extract, analyse, merge, serve and evaluate domain fine-tuning deltas.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (target, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            module, func = target.split(":")
            getattr(importlib.import_module(module), func)(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else "").parse_args(argv)
    try:
        result = args.run(args)
    except TunevecError as exc:
        print(f"tunevec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
