"""Module roles as data: which tensor names are attention, MLP, embedding, norm or head, per model family.

Nothing else in tunevec tests tensor names with ad-hoc substrings; it asks ``classify(name)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROLES = ("attention", "mlp", "embedding", "norm", "head", "other")

# Llama-family names (Llama, Mistral, Qwen2, SmolLM2 share them). Order matters: first match wins.
_LLAMA_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(^|\.)embed_tokens\.weight$", "embedding"),
    (r"(^|\.)lm_head\.weight$", "head"),
    (r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$", "attention"),
    (r"\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)$", "mlp"),
    (r"(layernorm|norm)\.weight$", "norm"),
)
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_PROJ = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.")


@dataclass(frozen=True)
class TensorRole:
    role: str  # one of ROLES
    layer: int | None  # decoder layer index, None for embeddings, final norm, head
    module: str | None  # projection name (q_proj, ..., down_proj) for linear layers, else None

    @property
    def is_linear(self) -> bool:
        return self.module is not None


def classify(name: str) -> TensorRole:
    """Role, layer and projection of a checkpoint tensor name (``model.layers.3.mlp.up_proj.weight`` ...)."""
    role = "other"
    for pattern, r in _LLAMA_PATTERNS:
        if re.search(pattern, name):
            role = r
            break
    layer = _LAYER.search(name)
    proj = _PROJ.search(name)
    return TensorRole(
        role=role, layer=int(layer.group(1)) if layer else None, module=proj.group(1) if proj else None
    )
