"""What leaving out the part of tau no LoRA slot carries does to a model's predictions, measured in nats.

A per-request mixture serves each vector's carried part (``steering.lora.carried``: attention and MLP projections,
the input embedding, the output head) and leaves out bias and norm deltas. ``uncarried_effect`` runs the base with
all of tau and with the carried part only on probe texts, and reports the mean and the largest change of a token's
log-probability. It is the measurement behind the server's ``--max-dropped-share`` default (docs/serving.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from tunevec.core.checkpoint import Checkpoint
from tunevec.core.vector import TuningVector
from tunevec.steering.lora import carried


def uncarried_effect(
    base_dir: str | os.PathLike[str], vector: TuningVector, texts: Sequence[str], *, alpha: float = 1.0
) -> dict[str, float]:
    """``{"share", "mean_nats", "max_nats", "vector_mean_nats", "tokens"}`` for base + alpha * tau on ``texts``.

    ``share`` is the left-out part of ||tau||^2; the nats compare next-token log-probabilities of the tokens of
    ``texts`` under base + alpha * tau against base + alpha * (carried part of tau), in float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entries = vector.manifest.tensors
    total = sum(e.norm**2 for e in entries.values())
    left = [n for n, e in entries.items() if not carried(n, e.shape) and e.norm > 0]
    share = sum(entries[n].norm ** 2 for n in left) / total if total else 0.0
    base = Checkpoint(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    full = {n: base.read(n).float() + alpha * tau.float() for n, tau in vector.stream()}
    partial = {n: (base.read(n).float() if n in left else t) for n, t in full.items()}
    logps = []
    plain = {n: base.read(n).float() for n in full}
    for state in (full, partial, plain):
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:  # a checkpoint name transformers renames on load would silently not be applied
            raise ValueError(f"tensors transformers does not know by these names: {unexpected[:3]}")
        per_text = []
        with torch.no_grad():
            for text in texts:
                ids = torch.tensor([tok(text)["input_ids"][:256]])
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
                per_text.append(logp.gather(1, ids[0, 1:, None])[:, 0])
        logps.append(torch.cat(per_text))
    diff = (logps[0] - logps[1]).abs()
    whole = (logps[0] - logps[2]).abs()
    return {
        "share": share,
        "mean_nats": float(diff.mean()),
        "max_nats": float(diff.max()),
        "vector_mean_nats": float(whole.mean()),  # how far the whole vector moves the base, for scale
        "tokens": diff.numel(),
    }
