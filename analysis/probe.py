"""Representation change: run the base and each tuned model on probe texts and compare hidden states per layer.

Hidden states are token-level: every non-pad token of every probe text is one row (n × d per layer). Per layer
we report linear CKA (base vs tuned, same tokens), principal angles between the top-k PCA subspaces, and how many
directions hold the change ΔH = H_tuned − H_base (``tunevec.analysis.representation``). Layer index i follows
transformers' ``hidden_states``: 0 is the embedding output, i ≥ 1 the output of decoder layer i − 1, and the last
one is taken after the final norm.

The probe file is JSONL with {"domain", "text"} per line (the fixtures write ``DIR/probe.jsonl``); without one,
a few bundled sentences per domain are used.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tunevec.analysis.representation import change_dimensions, linear_cka, principal_angles
from tunevec.core.errors import TunevecError

# A small bundled probe set for when no probe file is given: plain sentences from the three fixture domains.
BUILTIN_PROBE: tuple[dict, ...] = tuple(
    {"domain": d, "text": t}
    for d, texts in {
        "general": (
            "The function returns a new list that contains every element of the input in sorted order.",
            "Open the file in binary mode, read the header, and close it before processing the data.",
            "A dictionary maps each key to a value; looking a key up takes constant time on average.",
            "The library keeps a cache of recent results so that repeated calls return immediately.",
            "Call the method with a timeout so that a slow server cannot block the whole program.",
            "Each thread takes a lock before it changes the shared counter and releases it afterwards.",
        ),
        "medical": (
            "Type 2 diabetes mellitus without complications is coded as E11.9 in ICD-10-CM.",
            "Essential (primary) hypertension is classified under the code I10.",
            "The brand name Lipitor refers to the generic drug atorvastatin, a statin that lowers cholesterol.",
            "Acute bronchitis due to respiratory syncytial virus is a disease of the respiratory system.",
            "Metformin is the generic name of Glucophage, used as first-line therapy for type 2 diabetes.",
            "Fracture of the lower end of the left radius, initial encounter for closed fracture.",
        ),
        "math": (
            "Question: What is 17 plus 25? Answer: 17 + 25 = 42. The answer is 42.",
            "A shop sells 6 boxes with 12 pens each. How many pens is that? 6 * 12 = 72 pens.",
            "If x + 7 = 19, then x = 19 - 7 = 12.",
            "Question: What is 144 divided by 12? Answer: 144 / 12 = 12. The answer is 12.",
            "Tom has 35 apples and gives away 18. He has 35 - 18 = 17 apples left.",
            "The area of a rectangle with sides 8 and 9 is 8 * 9 = 72.",
        ),
    }.items()
    for t in texts
)


@dataclass(frozen=True)
class ProbeSettings:
    max_texts: int | None = 240  # texts used, taken round-robin across domains so each stays represented
    max_length: int = 128  # tokens per text (longer ones are truncated)
    max_tokens: int = (
        6000  # token rows kept per layer (beyond this, at most max_tokens / n_domains per domain)
    )
    batch_size: int = 8
    angle_k: int = 16  # principal angles between the top-k PCA subspaces
    change_energy: float = 0.9  # dims_for_energy: components holding this share of the change's variance
    min_domain_tokens: int = 16  # per-domain CKA only for domains with at least this many tokens

    def __post_init__(self) -> None:
        if self.max_texts is not None and self.max_texts < 1:
            raise TunevecError(f"--max-probe-texts must be at least 1, got {self.max_texts}")
        if self.max_length < 2 or self.batch_size < 1 or self.angle_k < 1 or self.max_tokens < 2:
            raise TunevecError("probe settings: max_length, max_tokens ≥ 2 and batch_size, angle_k ≥ 1")


def load_probe(path: str | os.PathLike[str]) -> list[dict]:
    """Read a JSONL probe file of {"domain", "text"} records."""
    path = Path(path)
    if not path.is_file():
        raise TunevecError(
            f"probe file {path} not found; pass --probe FILE (JSONL with domain, text) or --no-probe"
        )
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            text, domain = rec["text"], rec.get("domain", "all")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TunevecError(
                f"{path}:{lineno}: expected a JSON object with 'text' (and 'domain'): {exc}"
            ) from exc
        if isinstance(text, str) and text.strip():
            records.append({"domain": str(domain), "text": text})
    if not records:
        raise TunevecError(f"probe file {path} holds no texts")
    return records


def select_texts(records: list[dict], max_texts: int | None) -> list[dict]:
    """At most ``max_texts`` records, round-robin across domains in file order (deterministic)."""
    if max_texts is None or len(records) <= max_texts:
        return list(records)
    by_domain: dict[str, list[dict]] = {}
    for r in records:
        by_domain.setdefault(r["domain"], []).append(r)
    out: list[dict] = []
    queues = [list(reversed(v)) for v in by_domain.values()]
    while len(out) < max_texts:
        for q in queues:
            if q and len(out) < max_texts:
                out.append(q.pop())
    return out


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise TunevecError(
                f"tokenizer of {path} has neither a pad nor an eos token to pad probe batches with"
            )
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def encode(tokenizer, texts: list[str], settings: ProbeSettings) -> list[dict]:
    """Tokenised batches (input_ids, attention_mask), shared by every model so all see the same tokens."""
    batches = []
    for start in range(0, len(texts), settings.batch_size):
        chunk = texts[start : start + settings.batch_size]
        batches.append(
            tokenizer(
                chunk, return_tensors="pt", padding=True, truncation=True, max_length=settings.max_length
            )
        )
    return batches


@torch.no_grad()
def hidden_states(
    model: Any, batches: list[dict], keep: torch.Tensor | None, layers: Sequence[int] | None = None
) -> list[torch.Tensor]:
    """Per kept layer, the (n_tokens × d) fp32 hidden states of the non-pad tokens, in batch order, on the model's
    device. ``keep`` (bool, one entry per non-pad token of all batches) selects a token subsample batch by batch,
    so the full set is never held; ``layers`` picks hidden-state indices (default: all)."""
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] | None = None
    offset = 0
    for batch in batches:
        mask = batch["attention_mask"].to(device)
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask, output_hidden_states=True)
        real = mask.bool()
        n = int(real.sum())
        rows = None if keep is None else keep[offset : offset + n].to(device)
        offset += n
        wanted = range(len(out.hidden_states)) if layers is None else layers
        if per_layer is None:
            per_layer = [[] for _ in wanted]
        for slot, lay in enumerate(wanted):
            h = out.hidden_states[lay][real].float()
            per_layer[slot].append(h if rows is None else h[rows])
        del out
    return [torch.cat(rows) for rows in per_layer or []]


def probe_work(base_path: str | os.PathLike[str], records: list[dict], settings: ProbeSettings) -> Any:
    """The probe's size for a cost estimate (``analysis/estimate.py:ProbeWork``): texts, tokens run and kept.

    Tokenises the texts as the probe will, which takes a fraction of a second."""
    from tunevec.analysis.estimate import ProbeWork

    records = select_texts(records, settings.max_texts)
    batches = encode(load_tokenizer(Path(base_path)), [r["text"] for r in records], settings)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(int(b["attention_mask"].numel()) for b in batches)
    width = max((int(b["attention_mask"].shape[1]) for b in batches), default=1)
    return ProbeWork(
        texts=len(records),
        tokens=tokens,
        padded_tokens=padded,
        kept_tokens=min(tokens, settings.max_tokens),
        max_length=width,
        batch_size=settings.batch_size,
    )


def _token_subsample(domains: list[str], max_tokens: int) -> torch.Tensor | None:
    """Rows to keep (sorted indices): at most max_tokens // n_domains tokens per domain, evenly spaced within each
    domain, so long texts of one domain do not crowd out the others. None when everything fits."""
    if len(domains) <= max_tokens:
        return None
    names = sorted(set(domains))
    cap = max(1, max_tokens // len(names))
    keep = []
    for d in names:
        rows = torch.tensor([i for i, x in enumerate(domains) if x == d])
        if rows.numel() > cap:
            rows = rows[torch.linspace(0, rows.numel() - 1, cap).round().long().unique()]
        keep.append(rows)
    return torch.cat(keep).sort().values


def representation_change(
    base_path: str | os.PathLike[str],
    tuned: Mapping[str, str | os.PathLike[str] | Any],
    records: list[dict],
    settings: ProbeSettings | None = None,
    *,
    progress: bool = True,
    device: torch.device | None = None,
    layers: tuple[int, int] | None = None,
) -> dict:
    """Per-layer CKA, principal angles and change dimensions of each tuned model against the base.

    ``tuned`` maps a name to a TuningVector (the model is base + τ) or to a tuned checkpoint folder. Only the base
    model is loaded (``analysis/resident.py``); each vector's τ, or each tuned checkpoint's weights, is streamed
    into it, its hidden states taken, and the base's weights streamed back. Everything runs on ``device``
    (default cpu). ``layers`` = (start, end) keeps hidden-state indices start..end only (decoder layers
    start..end-1 and the input of the first), which bounds the stored states.

    Returns {"settings", "n_texts", "n_tokens", "domains", "layers", "layer_note", "vectors": {name:
    {"layers": [per-layer dict], "by_domain": {domain: [cka per layer]}, "summary": {...}}}}.
    """
    from tqdm import tqdm

    from tunevec.analysis.resident import ResidentModel

    device = device if device is not None else torch.device("cpu")
    settings = settings or ProbeSettings()
    records = select_texts(records, settings.max_texts)
    if not records:
        raise TunevecError("no probe texts to run")
    tokenizer = load_tokenizer(Path(base_path))
    batches = encode(tokenizer, [r["text"] for r in records], settings)
    domains_per_token = []
    for b_idx, batch in enumerate(batches):
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for row, length in enumerate(lengths):
            domains_per_token += [records[b_idx * settings.batch_size + row]["domain"]] * int(length)
    keep = _token_subsample(domains_per_token, settings.max_tokens)
    keep_mask = None
    if keep is not None:
        keep_mask = torch.zeros(len(domains_per_token), dtype=torch.bool)
        keep_mask[keep] = True
        domains_per_token = [domains_per_token[i] for i in keep.tolist()]
    domains = sorted(set(domains_per_token))
    dom_index = {d: torch.tensor([x == d for x in domains_per_token], device=device) for d in domains}

    timing = dict.fromkeys(("load", "forward", "stream", "statistics"), 0.0)
    t0 = time.perf_counter()
    resident = ResidentModel(base_path, device)
    timing["load"] = _since(t0, device)
    n_states = resident.model.config.num_hidden_layers + 1
    indices = list(range(n_states))
    if layers is not None:
        start, end = layers
        indices = [i for i in indices if start <= i <= end]
        if not indices:
            raise TunevecError(
                f"--layers {start}:{end} selects no hidden state of a {n_states - 1}-layer model"
            )
    t0 = time.perf_counter()
    base_h = hidden_states(resident.model, batches, keep_mask, indices)
    timing["forward"] += _since(t0, device)
    n, d = base_h[0].shape
    k = max(1, min(settings.angle_k, d, n - 1))
    result: dict = {
        "settings": asdict(settings),
        "n_texts": len(records),
        "n_tokens": n,
        "hidden_size": d,
        "angle_k": k,
        "domains": {dom: int(m.sum()) for dom, m in dom_index.items()},
        "layers": indices,
        "layer_note": "0 = embedding output; i = output of decoder layer i-1; the last is after the final norm",
        "vectors": {},
    }
    for name, source in tuned.items():
        t0 = time.perf_counter()
        if isinstance(source, str | os.PathLike):
            resident.load_checkpoint(source)
            subject = str(source)
        else:
            resident.add_vector(source)
            subject = f"base + tau of {source.path}"
        timing["stream"] += _since(t0, device)
        t0 = time.perf_counter()
        tuned_h = hidden_states(resident.model, batches, keep_mask, indices)
        timing["forward"] += _since(t0, device)
        t0 = time.perf_counter()
        resident.restore()
        timing["stream"] += _since(t0, device)
        t0 = time.perf_counter()
        if len(tuned_h) != len(base_h) or tuned_h[0].shape != base_h[0].shape:
            raise TunevecError(f"tuned model {subject} does not produce hidden states shaped like the base's")
        rows, by_domain = [], {dom: [] for dom in domains}
        for slot in tqdm(range(len(base_h)), desc=f"probe {name}", unit="layer", disable=not progress):
            X, Y = base_h[slot], tuned_h[slot]
            angles = principal_angles(X, Y, k)
            change = change_dimensions(X, Y, settings.change_energy)
            rows.append(
                {
                    "layer": indices[slot],
                    "cka": linear_cka(X, Y),
                    "angles_deg": [float(a) for a in angles.degrees],
                    "mean_angle_deg": float(angles.degrees.mean()),
                    "max_angle_deg": float(angles.degrees.max()),
                    **change,
                }
            )
            for dom, m in dom_index.items():
                ok = int(m.sum()) >= settings.min_domain_tokens
                by_domain[dom].append(linear_cka(X[m], Y[m]) if ok else float("nan"))
        del tuned_h
        timing["statistics"] += _since(t0, device)
        ckas = [row["cka"] for row in rows]
        result["vectors"][name] = {
            "tuned_path": subject,
            "layers": rows,
            "by_domain": by_domain,
            "summary": {
                "min_cka": min(ckas),
                "min_cka_layer": rows[ckas.index(min(ckas))]["layer"],
                "mean_cka": sum(ckas) / len(ckas),
                "final_cka": ckas[-1],
                "max_mean_angle_deg": max(row["mean_angle_deg"] for row in rows),
                "max_dims_for_energy": max(row["dims_for_energy"] for row in rows),
                "max_rel_change": max(row["rel_change"] for row in rows),
            },
        }
    resident.release()
    result["timing_seconds"] = {k: round(v, 3) for k, v in timing.items()}
    return result


def _since(t0: float, device: torch.device) -> float:
    """Seconds since ``t0``, once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
