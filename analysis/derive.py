"""`tunevec derive`: an activation vector from a tuning vector, the mean residual-stream shift tau causes.

On a probe set, the base and base + tau run the same tokens; after every decoder layer ``k`` the residual stream
(the layer's output) of the two differs by ``d_k`` per token. Its mean over the probe's tokens, ``s_k``, is what
tau moves the stream by on average at that depth. ``s_k`` includes what earlier layers caused, so two ways of
steering with it are offered (``--mode``):

- ``layers`` (default): at every layer ``k``, the increment ``s_k - s_{k-1}`` (``s_{-1} = 0``); added one after the
  other, they rebuild ``s_k`` at every depth, to first order (later layers also react to what earlier additions
  changed);
- ``one``: ``s_K`` at one layer ``K`` (``--layer``; default the last layer tau changes), nothing elsewhere.

docs/fixtures.md and the README compare the two with the weight-space tau on the demo's tasks.
The result is an activation-vector artifact (``tunevec.core.activation``) with a manifest naming its source: the
vector's content digest, the probe file's sha256, the mode and the layer.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from torch import nn

from tunevec.core.errors import TunevecError

MODES = ("layers", "one")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("vector", help="the tuning-vector artifact folder")
    parser.add_argument("--base", required=True, help="the base model folder the vector was extracted from")
    parser.add_argument("--out", required=True, help="the activation-vector folder to write")
    parser.add_argument("--name", help="its name in specs (default: <vector>-act)")
    parser.add_argument(
        "--probe",
        help="JSONL of {domain, text} or {domain, messages} (chat, rendered with the base's template); "
        "default: the bundled probe sentences",
    )
    parser.add_argument("--domain", help="only the probe records of this domain")
    parser.add_argument(
        "--mode", choices=MODES, default="layers", help="increments at every layer, or one layer"
    )
    parser.add_argument("--layer", type=int, help="--mode one: the layer (default: the last one tau changes)")
    parser.add_argument("--max-probe-texts", type=int, default=240, help="texts used (default 240)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text (default 128)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.set_defaults(run=run_derive)


def run_derive(args: argparse.Namespace) -> int:
    from tunevec.core.activation import write_activation
    from tunevec.core.checkpoint import Checkpoint
    from tunevec.core.vector import TuningVector

    vector = TuningVector(args.vector)
    base = Checkpoint(args.base)
    vector.check_base(base)
    texts, probe_sha = _probe_texts(args.probe, args.max_probe_texts, args.domain, base.path)
    shifts = residual_shifts(vector, base.path, texts, args.max_length)
    directions = directions_from(
        shifts, args.mode, args.layer if args.layer is not None else last_layer(vector)
    )
    source = {
        "kind": "derived",
        "vector": vector.name,
        "vector_digest": vector.content_digest,
        "probe_sha256": probe_sha,
        "probe_texts": len(texts),
        "probe_domain": args.domain,
        "mode": args.mode,
        "layer": args.layer if args.mode == "one" else None,
        "shift_norms": {str(k): float(s.norm()) for k, s in shifts.items()},
    }
    name = args.name or f"{vector.name}-act"
    out = write_activation(args.out, name, directions, base, source, replace=args.force)
    print(f"wrote activation vector {out.name!r} to {args.out}: layers {out.layers} ({args.mode})")
    return 0


def _probe_texts(path: str | None, max_texts: int, domain: str | None, base: Path) -> tuple[list[str], str]:
    """The probe texts: plain ``text`` records, or chat ``messages`` rendered with the base's chat template."""
    import json

    from tunevec.analysis.probe import BUILTIN_PROBE, select_texts

    if path is None:
        records = list(BUILTIN_PROBE)
    else:
        try:
            lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as exc:
            raise TunevecError(f"--probe {path}: {exc}") from exc
        records, tok = [], None
        for rec in lines:
            if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                if tok is None:
                    from transformers import AutoTokenizer

                    tok = AutoTokenizer.from_pretrained(base)
                text = tok.apply_chat_template(rec["messages"], tokenize=False)
            elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
                text = rec["text"]
            else:
                raise TunevecError(f"--probe {path}: each line needs `text` or `messages`")
            records.append({"domain": str(rec.get("domain", "all")), "text": text})
    if domain is not None:
        records = [r for r in records if r["domain"] == domain]
        if not records:
            raise TunevecError(f"no probe record of domain {domain!r}")
    texts = [r["text"] for r in select_texts(records, max_texts)]
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    return texts, digest


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: the one ``ModuleList`` named ``layers`` as long as the config says."""
    count = model.config.get_text_config().num_hidden_layers
    found = [m for n, m in model.named_modules() if n.endswith("layers") and isinstance(m, nn.ModuleList)]
    found = [m for m in found if len(m) == count]
    if len(found) != 1:
        raise TunevecError(
            f"cannot tell the decoder layers of {type(model).__name__} apart ({len(found)} lists)"
        )
    return found[0]


@torch.no_grad()
def residual_streams(model: nn.Module, batches: list[dict]) -> dict[int, torch.Tensor]:
    """Per decoder layer ``k``, the sum over every non-pad token of the layer's output (float64) and the count."""
    layers = decoder_layers(model)
    sums: dict[int, torch.Tensor] = {}
    masks: list[torch.Tensor] = []

    def hook(k: int):  # noqa: ANN202
        def record(_module, _inputs, output):  # noqa: ANN001, ANN202
            stream = output[0] if isinstance(output, tuple) else output
            total = stream[masks[-1]].double().sum(0)
            sums[k] = total if k not in sums else sums[k] + total

        return record

    handles = [layer.register_forward_hook(hook(k)) for k, layer in enumerate(layers)]
    try:
        for batch in batches:
            masks.append(batch["attention_mask"].bool())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    count = sum(int(m.sum()) for m in masks)
    return {k: s / count for k, s in sums.items()}


def residual_shifts(vector, base_path: Path, texts: list[str], max_length: int) -> dict[int, torch.Tensor]:  # noqa: ANN001
    """``s_k``: the mean residual-stream shift after every decoder layer, base + tau against base (float32)."""
    from transformers import AutoModelForCausalLM

    from tunevec.analysis.probe import ProbeSettings, encode, load_tokenizer

    tokenizer = load_tokenizer(base_path)
    batches = encode(tokenizer, texts, ProbeSettings(max_length=max_length))
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    before = residual_streams(model, batches)
    params = dict(model.named_parameters())
    for name, tau in vector.stream():
        target = params.get(name)
        if target is None and name.endswith("embed_out.weight"):
            target = params.get("lm_head.weight")  # transformers' name of GPT-NeoX's head
        if target is None:
            raise TunevecError(f"tensor {name!r} of the vector is not a parameter of the base model")
        target.data += tau.to(target.dtype)  # a tied head is this same parameter: moved with it, once
    after = residual_streams(model, batches)
    return {k: (after[k] - before[k]).float() for k in sorted(before)}


def directions_from(shifts: dict[int, torch.Tensor], mode: str, layer: int) -> dict[int, torch.Tensor]:
    """What to add at which layer (see the module docstring)."""
    if mode == "one":
        if layer not in shifts:
            raise TunevecError(f"--layer {layer}: the model has decoder layers 0..{max(shifts)}")
        return {layer: shifts[layer]}
    out, previous = {}, None
    for k in sorted(shifts):
        step = shifts[k] if previous is None else shifts[k] - previous
        previous = shifts[k]
        if float(step.abs().max()) > 0:
            out[k] = step
    if not out:
        raise TunevecError("the vector moves no residual stream on the probe texts (is tau zero?)")
    return out


def last_layer(vector) -> int:  # noqa: ANN001
    """The deepest decoder layer tau changes."""
    layers = [e.layer for e in vector.manifest.tensors.values() if e.layer is not None and e.norm > 0]
    if not layers:
        raise TunevecError(f"vector {vector.name!r} changes no decoder layer; give --layer")
    return max(layers)
