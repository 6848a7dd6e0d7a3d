"""Write a named variant into a server config file (``tunevec.yaml``, ``tunevec serve --config``), keeping the file.

A person's config file has comments and an order of its own, so the variant is written by editing text, not by
loading and dumping the YAML: the ``NAME:`` line under the top-level ``variants:`` block is replaced, or added at
the end of that block, or a ``variants:`` block is appended. The result is parsed again and must hold the spec
under that name; anything else (a flow-style ``variants: {...}``, a file that is not a mapping) is refused with a
message rather than rewritten.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tunevec.core.errors import TunevecError
from tunevec.core.files import write_file_atomically

_TOP_KEY = re.compile(r"^([A-Za-z_][\w-]*)\s*:(.*)$")


def _entry(name: str, spec: str, indent: str, comment: str | None) -> str:
    # JSON strings are valid YAML double-quoted scalars; specs may hold ':' '[' '@', so they are always quoted
    line = f"{indent}{name}: {json.dumps(spec)}"
    return line + (f"  # {comment}" if comment else "")


def write_variant(path: Path, name: str, spec: str, comment: str | None = None) -> None:
    """Set ``variants[name] = spec`` in the YAML file at ``path`` (created if missing), keeping everything else."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
        raise TunevecError(f"variant name {name!r}: use letters, digits, _ . - (starting with a letter or _)")
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise TunevecError(f"{path}: not valid YAML ({exc}); fix it, or give another --config") from exc
    if not isinstance(data, dict):
        raise TunevecError(f"{path}: expected a mapping at the top level (as `tunevec serve --config` reads)")
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^variants\s*:", line)), None)
    if start is None:
        block = ["", "variants:", _entry(name, spec, "  ", comment)]
        lines = [*lines, *block] if lines else block[1:]
    else:
        rest = _TOP_KEY.match(lines[start]).group(2).split("#", 1)[0].strip()
        if rest:
            raise TunevecError(
                f"{path}: `variants:` is written on one line ({rest[:40]}...); write it as a block, one "
                "`name: spec` per line, so the variant can be added without rewriting your file"
            )
        end = start + 1
        indent = None
        replaced = False
        while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
            line = lines[end]
            if line.strip() and not line.lstrip().startswith("#"):
                indent = indent or line[: len(line) - len(line.lstrip())]
                key = line.strip().split(":", 1)[0].strip().strip("'\"")
                if key == name:
                    lines[end] = _entry(name, spec, indent, comment)
                    replaced = True
            end += 1
        if not replaced:
            while end > start + 1 and not lines[end - 1].strip():
                end -= 1  # after the block's last entry, not after trailing blank lines
            lines.insert(end, _entry(name, spec, indent or "  ", comment))
    new_text = "\n".join(lines) + "\n"
    check = yaml.safe_load(new_text)
    if not isinstance(check, dict) or (check.get("variants") or {}).get(name) != spec:
        raise TunevecError(f"{path}: could not add variant {name!r} without changing the rest of the file")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, new_text)
