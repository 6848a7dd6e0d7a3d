"""The device check's figures in one table (bench/device_check.sh): per stage its wall time and peak GPU memory,
the parts the commands measured themselves, and analyze + attribute against the 2-minute goal of issue 20.

    python bench/_device_summary.py OUT     # reads OUT/stages.tsv and the JSON files beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOAL_S = 120.0


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def main(out: Path) -> None:
    walls = {}
    for line in (out / "stages.tsv").read_text().splitlines():
        name, ms, rc = line.split("\t")
        walls[name] = (int(ms) / 1000, int(rc))
    docs = {}
    for name in ("report", "attribution-tf32", "attribution"):
        path = out / f"{name}.json"
        if path.exists():
            docs[name] = json.loads(path.read_text())
    summary: dict = {"stages": {k: {"wall_s": w, "exit": rc} for k, (w, rc) in walls.items()}, "parts": {}}
    print("\n| stage | wall s | exit | part (measured by the command) | s | peak GPU | peak RSS |")
    print("|---|---:|---:|---|---:|---:|---:|")
    sources = {"analyze": "report", "attribute_tf32": "attribution-tf32", "attribute": "attribution"}
    for name, (wall, rc) in walls.items():
        print(f"| {name} | {wall:.1f} | {rc} | | | | |")
        doc = docs.get(sources.get(name, ""))
        if doc is None:
            continue
        for part, s in doc.get("resources", {}).get("stages", {}).items():
            print(
                f"| | | | {part} | {s['seconds']:.1f} | {gib(s.get('peak_device_bytes'))} | "
                f"{gib(s.get('peak_rss_bytes'))} |"
            )
            summary["parts"][f"{name}.{part}"] = s
    rep = docs.get("report")
    if rep:
        print(f"\nanalyze parts (s): {rep['timing_seconds']}")
        probe = (rep.get("representation") or {}).get("timing_seconds")
        print(f"probe parts (s): {probe}")
        print(
            f"estimate for analyze: {rep['estimate']['seconds']:.0f} s, {gib(rep['estimate']['device_bytes'])}"
        )
    for name in ("attribution-tf32", "attribution"):
        doc = docs.get(name)
        if doc:
            v = next(iter(doc["vectors"].values()))
            print(
                f"{name}: parts {v['timing_seconds']}, work {v['work']}, loss {v['loss']}; estimate "
                f"{doc['estimate']['seconds']:.0f} s, {gib(doc['estimate']['device_bytes'])}"
            )
    if {"attribution-tf32", "attribution"} <= docs.keys():
        a, b = (next(iter(docs[n]["vectors"].values())) for n in ("attribution", "attribution-tf32"))
        same = a["ranking"] == b["ranking"]
        diff = max(abs(x["recovered"] - y["recovered"]) for x, y in zip(a["curve"], b["curve"], strict=True))
        print(f"float32 vs tf32: same ranking {same}, largest difference in recovered share {diff:.2e}")
        print(f"  losses float32 {a['loss']}, tf32 {b['loss']}")
        summary["tf32_vs_float32"] = {"same_ranking": same, "max_recovered_diff": diff}
    for variant in ("attribute_tf32", "attribute"):
        if "analyze" in walls and variant in walls:
            total = walls["analyze"][0] + walls[variant][0]
            verdict = "meets" if total <= GOAL_S else f"misses by {total - GOAL_S:.0f} s"
            print(f"analyze + {variant}: {total:.0f} s wall against the {GOAL_S:.0f} s goal: {verdict}")
            summary[f"analyze+{variant}"] = total
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
