"""``tunevec extract | analyze | attribute`` without the other commands' imports.

``tunevec.cli`` builds every command's parser, which imports the server layer (pydantic, vLLM's settings); a
machine that has only torch and transformers (the GPU of bench/device_check.sh) cannot run it. This builds the
parsers of the three analysis commands from the same ``COMMANDS`` table and runs the same functions.

    python bench/_cli.py analyze VECTOR --base BASE --out REPORT --device cuda
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tunevec.cli import COMMANDS
from tunevec.core.errors import TunevecError

NAMES = ("extract", "analyze", "attribute")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunevec")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in NAMES:
        target, help_text = COMMANDS[name]
        module, func = target.split(":")
        getattr(importlib.import_module(module), func)(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except TunevecError as exc:
        print(f"tunevec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
