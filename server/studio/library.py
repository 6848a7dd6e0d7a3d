"""What the studio shows of the server's vectors: one *card* per vector, built by its kind, and the analysis reports
that cover it.

A card is plain data the page renders without knowing the kind: a name to write in a spec, a kind label, the
norm, the base fingerprint, the layers touched, the scopes a component may take (each marked servable or not,
with the reason), a list of labelled facts, and the report link. Today every vector is a weight-space tuning
vector (``kind: "weight"``); activation vectors, a later kind in the same spec grammar, add one entry to
``KINDS`` with their own card function, and the page shows them in the same list without a change.

Reports are ``tunevec analyze`` output folders (``report.json`` + ``summary.md`` + PNGs). The studio finds them
under ``VECTORS/reports/`` (any depth up to three; ``tunevec analyze ... --out VECTORS/reports/NAME``) and in the
server's ``reports`` folders when its settings have them. A report covers a vector when it analysed that very
artifact (same resolved path) or one of the same name extracted from the same base (same fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunevec.core.vector import TuningVector
from tunevec.steering.spec import SCOPES

REPORT_FILE = "report.json"
REPORT_DEPTH = 3  # VECTORS/reports/<name>/report.json is depth 2; one more level for grouping
# The files of a report folder the studio serves: the summary, the JSON and the plots, nothing else.
REPORT_FILE_NAME = re.compile(r"[A-Za-z0-9_.\-]+\.(?:md|json|png)")
REPORT_MAX_BYTES = (
    64 * 1024 * 1024
)  # a report.json larger than this is not read (the studio only needs its head)


@dataclass(frozen=True)
class Report:
    """One analysis report folder: its id in URLs (a digest of its path, so no server path is shown)."""

    id: str
    folder: Path
    base_fingerprint: str | None
    vectors: dict[str, str]  # name -> the artifact path it analysed
    created: str
    paths: tuple[str, ...] = ()  # server paths the report mentions (base, vectors, tuned models, itself)

    def redact(self, text: str) -> str:
        """``text`` with the server paths it mentions replaced (a server hides its paths unless --expose-paths)."""
        for path in sorted(self.paths, key=len, reverse=True):
            text = text.replace(path, "[server path]")
        return text

    def covers(self, name: str, vec: TuningVector) -> bool:
        if name not in self.vectors:
            return False
        if self.vectors[name] == str(vec.path.resolve()):
            return True
        return self.base_fingerprint is not None and self.base_fingerprint == vec.manifest.base.get(
            "fingerprint"
        )

    def files(self) -> list[str]:
        return sorted(
            p.name for p in self.folder.iterdir() if p.is_file() and REPORT_FILE_NAME.fullmatch(p.name)
        )


_REPORT_CACHE: dict[tuple[str, int], Report | None] = {}


def _read_report(path: Path) -> Report | None:
    """The report at ``path`` (a report.json), or None for a file that is not one; cached by modification time."""
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path), stat.st_mtime_ns)
    if key not in _REPORT_CACHE:
        report = None
        if stat.st_size <= REPORT_MAX_BYTES:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None
            if isinstance(data, dict) and data.get("format") == "tunevec.analysis-report":
                vectors = {
                    n: str(v.get("path", ""))
                    for n, v in (data.get("vectors") or {}).items()
                    if isinstance(v, dict)
                }
                folder = path.parent.resolve()
                mentioned = {str(folder), str((data.get("base") or {}).get("path") or "")}
                for v in (data.get("vectors") or {}).values():
                    if isinstance(v, dict):
                        mentioned |= {str(v.get("path") or ""), str((v.get("tuned") or {}).get("path") or "")}
                report = Report(
                    id=hashlib.sha256(str(folder).encode()).hexdigest()[:16],
                    folder=folder,
                    base_fingerprint=(data.get("base") or {}).get("fingerprint"),
                    vectors=vectors,
                    created=str(data.get("created", "")),
                    paths=tuple(p for p in mentioned if len(p) > 1),
                )
        _REPORT_CACHE[key] = report
    return _REPORT_CACHE[key]


def find_reports(folders: Iterable[Path]) -> list[Report]:
    """Every analysis report under ``folders`` (depth ≤ REPORT_DEPTH), newest first."""
    found: dict[str, Report] = {}
    for root in folders:
        if not root.is_dir():
            continue
        for depth in range(1, REPORT_DEPTH + 1):
            for path in root.glob("/".join(["*"] * (depth - 1) + [REPORT_FILE])):
                report = _read_report(path)
                if report is not None:
                    found[report.id] = report
    return sorted(found.values(), key=lambda r: r.created, reverse=True)


def report_folders(config: Any) -> list[Path]:
    """Where the studio looks for reports: ``VECTORS/reports`` and the server's ``reports`` setting, if any."""
    folders = [Path(config.vectors) / "reports"]
    folders += [Path(p) for p in (getattr(config, "reports", None) or [])]
    return folders


# ------------------------------------------------------------------------------------------------ vector cards


def layer_ranges(layers: Iterable[int]) -> str:
    """``[24, 25, 26, 29]`` -> ``"24–26, 29"``; empty -> ``"none"``."""
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in runs) or "none"


def _weight_card(name: str, vec: TuningVector, summary: dict, reports: list[Report]) -> dict:
    """A weight-space tuning vector (τ = θ_tuned − θ_base): norms per role, layers with a non-zero τ, and the
    scopes a component can take, servable where the server's adapters carry that part."""
    entries = [e for e in vec.manifest.tensors.values() if e.norm > 0]
    layers = sorted({e.layer for e in entries if e.layer is not None})
    roles = {e.role for e in entries}
    dropped = (summary.get("adapter") or {}).get("dropped") or {}
    scopes = []
    for scope, covered in SCOPES.items():
        if covered is not None and not roles & covered:
            continue  # the vector does not touch that part: nothing to select
        # every part is carried per request (norms and biases whole); what an engine cannot carry, the server's
        # own refusal names when the spec is described
        scopes.append({"name": scope, "servable": True, "why": None})
    norm_by_role = summary.get("norm_by_role") or {}
    facts = [
        {"label": f"‖τ‖ {role}", "value": f"{value:.4g}"} for role, value in norm_by_role.items() if value > 0
    ]
    rank = (summary.get("adapter") or {}).get("rank")
    if rank:
        facts.append({"label": "adapter rank", "value": str(rank)})
    for kind, share in sorted(dropped.items()):
        if share > 0:
            facts.append({"label": f"left out ({kind})", "value": f"{share:.4%} of ‖τ‖²"})
    covering = [r for r in reports if r.covers(name, vec)]
    return {
        "name": name,
        "kind": "weight",
        "kind_label": "tuning vector τ = θ_tuned − θ_base",
        "norm": summary.get("norm"),
        "base_fingerprint": summary.get("base_fingerprint"),
        "content_digest": summary.get("content_digest"),
        "layers": layers,
        "layers_text": layer_ranges(layers),
        "scopes": scopes,
        "facts": facts,
        "tuned_from": (vec.manifest.tuned or {}).get("hub_id")
        or (vec.manifest.tuned or {}).get("fingerprint"),
        "report": (
            {"id": covering[0].id, "created": covering[0].created, "files": covering[0].files()}
            if covering
            else None
        ),
    }


def _activation_card(name: str, vec: Any, summary: dict, reports: list[Report]) -> dict:
    """An activation vector: directions added to the residual stream after the layers it steers; a component
    takes a layer range, never a scope."""
    source = summary.get("source") or {}
    facts = [{"label": "steers layers", "value": layer_ranges(vec.layers)}]
    if source.get("kind") == "derived":
        facts.append({"label": "derived from", "value": f"{source.get('vector')} ({source.get('mode')})"})
    elif source.get("kind") == "gguf":
        facts.append({"label": "imported from", "value": str(source.get("file"))})
    return {
        "name": name,
        "kind": "activation",
        "kind_label": "activation vector: residual-stream directions",
        "norm": summary.get("norm"),
        "base_fingerprint": summary.get("base_fingerprint"),
        "content_digest": summary.get("content_digest"),
        "layers": vec.layers,
        "layers_text": layer_ranges(vec.layers),
        "scopes": [{"name": "all", "servable": True, "why": None}],
        "facts": facts,
        "tuned_from": None,
        "report": None,
    }


# The server's vector kinds (VectorLibrary.kind) -> their card function.
KINDS: dict[str, Callable[[str, Any, dict, list[Report]], dict]] = {
    "weights": _weight_card,
    "activation": _activation_card,
}


def vector_cards(state: Any) -> list[dict]:
    """One card per vector the server holds, in name order."""
    # imported here, not at the top: the plugin imports this package to mount the studio
    from tunevec.server.plugin import vector_summary

    config, library, router = state.tunevec_config, state.tunevec_library, state.tunevec_router
    reports = find_reports(report_folders(config))
    cards = []
    for name in library.names():
        summary = vector_summary(name, library, router, False)
        cards.append(KINDS[library.kind(name)](name, library[name], summary, reports))
    return cards


def report_by_id(state: Any, report_id: str) -> Report | None:
    for report in find_reports(report_folders(state.tunevec_config)):
        if report.id == report_id:
            return report
    return None
