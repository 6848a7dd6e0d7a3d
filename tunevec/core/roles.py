"""Module roles as data: which tensor names are attention, MLP, embedding, norm or head, per model family.

Nothing else in tunevec tests tensor names with ad-hoc substrings; it asks ``classify(name)``. Each family is a
table of its Hugging Face module paths (the part after ``layers.N.`` inside a decoder layer, the last components
outside one), so adding a family means adding a table, not a branch. The tables are the names of the HF
checkpoints; docs/architectures.md lists the families and how each is tested.

Without an architecture hint a name is looked up in the union of all tables. The union is checked when this
module is imported: a module path that two families give different roles would make an unhinted lookup
ambiguous, so it fails loudly here instead of classifying one family's tensors by another's rules.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

ROLES = ("attention", "mlp", "embedding", "norm", "head", "other")


@dataclass(frozen=True)
class TensorRole:
    role: str  # one of ROLES
    layer: int | None  # decoder layer index, None for embeddings, final norm, head
    module: str | None  # a linear layer's own name (q_proj, qkv_proj, dense_h_to_4h, ...); None for the rest
    param: str | None = None  # "weight" or "bias" for the modules the tables know, else None

    @property
    def is_linear(self) -> bool:
        return self.module is not None


# Shorthands for the tables: (role, linear?). A linear module's `module` is the last component of its path,
# which is also the name PEFT's target_modules and vLLM's LoRA layers use.
_ATT, _MLP, _NORM = ("attention", True), ("mlp", True), ("norm", False)


@dataclass(frozen=True)
class Family:
    """One model family's tensor names. ``layer``: path inside ``<layers>.N.``; ``model``: path outside."""

    name: str
    architectures: tuple[str, ...]  # config.json `architectures` values that use this table
    layer: Mapping[str, tuple[str, bool]]
    model: Mapping[str, str]
    layers: str = "layers"  # the decoder-layer container (GPT-2 would say "h")
    params: tuple[str, ...] = field(default=("weight", "bias"))


_LLAMA_LAYER = {
    "self_attn.q_proj": _ATT,
    "self_attn.k_proj": _ATT,
    "self_attn.v_proj": _ATT,
    "self_attn.o_proj": _ATT,
    "mlp.gate_proj": _MLP,
    "mlp.up_proj": _MLP,
    "mlp.down_proj": _MLP,
    "input_layernorm": _NORM,
    "post_attention_layernorm": _NORM,
}
_DECODER_MODEL = {"embed_tokens": "embedding", "lm_head": "head", "norm": "norm"}
_QK_NORM = {"self_attn.q_norm": _NORM, "self_attn.k_norm": _NORM}

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM",), _LLAMA_LAYER, _DECODER_MODEL),
    Family("mistral", ("MistralForCausalLM",), _LLAMA_LAYER, _DECODER_MODEL),
    # Qwen2's q/k/v biases are the `bias` params of the same modules.
    Family("qwen2", ("Qwen2ForCausalLM",), _LLAMA_LAYER, _DECODER_MODEL),
    # Qwen3 normalises each head's queries and keys (RMSNorm over head_dim) before RoPE.
    Family("qwen3", ("Qwen3ForCausalLM",), {**_LLAMA_LAYER, **_QK_NORM}, _DECODER_MODEL),
    # Phi-3 stores fused projections: q, k, v stacked in qkv_proj; gate and up stacked in gate_up_proj.
    Family(
        "phi3",
        ("Phi3ForCausalLM",),
        {
            "self_attn.qkv_proj": _ATT,
            "self_attn.o_proj": _ATT,
            "mlp.gate_up_proj": _MLP,
            "mlp.down_proj": _MLP,
            "input_layernorm": _NORM,
            "post_attention_layernorm": _NORM,
        },
        _DECODER_MODEL,
    ),
    # Gemma 2 norms both sides of the MLP (and post_attention_layernorm is the attention's output norm).
    Family(
        "gemma2",
        ("Gemma2ForCausalLM",),
        {**_LLAMA_LAYER, "pre_feedforward_layernorm": _NORM, "post_feedforward_layernorm": _NORM},
        _DECODER_MODEL,
    ),
    # OLMo 2 has no input norm: it norms each sublayer's output, plus queries and keys over all heads.
    Family(
        "olmo2",
        ("Olmo2ForCausalLM",),
        {
            **{k: v for k, v in _LLAMA_LAYER.items() if k != "input_layernorm"},
            **_QK_NORM,
            "post_feedforward_layernorm": _NORM,
        },
        _DECODER_MODEL,
    ),
    # GPT-NeoX (Pythia): fused query_key_value, `dense` as the attention output, LayerNorms with biases.
    Family(
        "gpt_neox",
        ("GPTNeoXForCausalLM",),
        {
            "attention.query_key_value": _ATT,
            "attention.dense": _ATT,
            "mlp.dense_h_to_4h": _MLP,
            "mlp.dense_4h_to_h": _MLP,
            "input_layernorm": _NORM,
            "post_attention_layernorm": _NORM,
        },
        # Hub checkpoints name the head embed_out; transformers 5 calls it lm_head in memory.
        {"embed_in": "embedding", "embed_out": "head", "lm_head": "head", "final_layer_norm": "norm"},
    ),
)

_BY_ARCHITECTURE = {arch: fam for fam in FAMILIES for arch in fam.architectures}


def _union() -> Family:
    layer: dict[str, tuple[str, bool]] = {}
    model: dict[str, str] = {}
    for fam in FAMILIES:
        for table, merged in ((fam.layer, layer), (fam.model, model)):
            for path, what in table.items():
                if merged.setdefault(path, what) != what:
                    raise ValueError(
                        f"roles: {path!r} means {merged[path]} in one family and {what} in {fam.name}; an "
                        "unhinted classify() would be ambiguous; give the families distinct paths"
                    )
    layers = {fam.layers for fam in FAMILIES}
    if len(layers) != 1:
        raise ValueError(f"roles: families use several layer containers {sorted(layers)}; extend _union")
    return Family("any", (), layer, model, layers.pop())


_ANY = _union()
_LAYER_PATTERNS: dict[str, re.Pattern[str]] = {}


def family_of(architecture: str | None) -> Family | None:
    """The family whose table covers ``architecture`` (config.json ``architectures[0]``), if tunevec knows it."""
    return _BY_ARCHITECTURE.get(architecture or "")


@functools.lru_cache(maxsize=1 << 16)  # pure, and asked again for the same names by every mixture composed
def classify(name: str, architecture: str | None = None) -> TensorRole:
    """Role, layer and linear module of a checkpoint tensor name (``model.layers.3.mlp.up_proj.weight`` ...).

    ``architecture`` (the checkpoint's ``architectures[0]``) restricts the lookup to that family's table; without
    it, or for an architecture tunevec has no table for, every family's table is searched (they never disagree,
    see the module docstring). Names no table knows (rotary buffers, MoE experts, unknown families) are "other".
    Any prefix before the decoder layers or the model-level modules is accepted (``model.``, ``gpt_neox.``,
    ``model.language_model.``).
    """
    fam = family_of(architecture) or _ANY
    path, _, param = name.rpartition(".")
    layer_re = _LAYER_PATTERNS.get(fam.layers)
    if layer_re is None:
        layer_re = _LAYER_PATTERNS[fam.layers] = re.compile(rf"(?:^|\.){re.escape(fam.layers)}\.(\d+)\.(.+)$")
    m = layer_re.search(path)
    if m is not None:
        layer, inner = int(m.group(1)), m.group(2)
        found = fam.layer.get(inner) if param in fam.params else None
        if found is None:
            return TensorRole("other", layer, None)
        role, linear = found
        return TensorRole(role, layer, inner.rpartition(".")[2] if linear else None, param)
    if param in fam.params:
        for module, role in fam.model.items():
            if path == module or path.endswith("." + module):
                return TensorRole(role, None, None, param)
    return TensorRole("other", None, None)
