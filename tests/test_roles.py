"""Module roles per family: every tensor of every supported architecture gets its role, layer and module.

The names come from the real transformers classes (tests/archs.py builds each family's model), so a table that
drifts from what transformers saves fails here, not in a spec scope that silently selects nothing.
"""

from __future__ import annotations

import re

import pytest
from archs import FAMILIES, pair

from tunevec.core import roles
from tunevec.core.checkpoint import Checkpoint, TensorInfo
from tunevec.core.roles import classify, family_of
from tunevec.steering.spec import Spec

# Per family, what a few telling tensors must be: name -> (role, layer, module).
EXPECTED: dict[str, dict[str, tuple[str, int | None, str | None]]] = {
    "llama": {
        "model.embed_tokens.weight": ("embedding", None, None),
        "lm_head.weight": ("head", None, None),
        "model.norm.weight": ("norm", None, None),
        "model.layers.1.self_attn.k_proj.weight": ("attention", 1, "k_proj"),
        "model.layers.0.mlp.gate_proj.weight": ("mlp", 0, "gate_proj"),
        "model.layers.1.post_attention_layernorm.weight": ("norm", 1, None),
    },
    "qwen2": {
        "model.layers.0.self_attn.q_proj.bias": ("attention", 0, "q_proj"),
        "model.layers.1.self_attn.v_proj.bias": ("attention", 1, "v_proj"),
        "model.layers.1.mlp.down_proj.weight": ("mlp", 1, "down_proj"),
    },
    "mistral": {
        "model.layers.1.self_attn.o_proj.weight": ("attention", 1, "o_proj"),
        "model.layers.0.input_layernorm.weight": ("norm", 0, None),
    },
    "qwen3": {
        "model.layers.0.self_attn.q_norm.weight": ("norm", 0, None),
        "model.layers.1.self_attn.k_norm.weight": ("norm", 1, None),
        "model.layers.1.self_attn.q_proj.weight": ("attention", 1, "q_proj"),
    },
    "phi3": {
        "model.layers.0.self_attn.qkv_proj.weight": ("attention", 0, "qkv_proj"),
        "model.layers.1.mlp.gate_up_proj.weight": ("mlp", 1, "gate_up_proj"),
        "model.layers.1.mlp.down_proj.weight": ("mlp", 1, "down_proj"),
        "lm_head.weight": ("head", None, None),
    },
    "gemma2": {
        "model.layers.0.pre_feedforward_layernorm.weight": ("norm", 0, None),
        "model.layers.1.post_feedforward_layernorm.weight": ("norm", 1, None),
        "model.layers.1.post_attention_layernorm.weight": ("norm", 1, None),
        "model.embed_tokens.weight": ("embedding", None, None),
    },
    "gpt_neox": {
        "gpt_neox.embed_in.weight": ("embedding", None, None),
        "embed_out.weight": ("head", None, None),
        "gpt_neox.final_layer_norm.bias": ("norm", None, None),
        "gpt_neox.layers.1.attention.query_key_value.weight": ("attention", 1, "query_key_value"),
        "gpt_neox.layers.1.attention.query_key_value.bias": ("attention", 1, "query_key_value"),
        "gpt_neox.layers.0.attention.dense.weight": ("attention", 0, "dense"),
        "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": ("mlp", 0, "dense_h_to_4h"),
        "gpt_neox.layers.1.mlp.dense_4h_to_h.bias": ("mlp", 1, "dense_4h_to_h"),
        "gpt_neox.layers.0.input_layernorm.bias": ("norm", 0, None),
    },
    "olmo2": {
        "model.layers.0.self_attn.q_norm.weight": ("norm", 0, None),
        "model.layers.0.post_feedforward_layernorm.weight": ("norm", 0, None),
        "model.layers.1.mlp.up_proj.weight": ("mlp", 1, "up_proj"),
    },
}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_tensors(request, tmp_path_factory) -> tuple[str, str, dict[str, TensorInfo]]:
    """The tensors of the family's saved checkpoint: the names tunevec reads, which are not always the names
    transformers uses in memory (GPT-NeoX's head is embed_out on disk, lm_head in a transformers 5 model)."""
    fam = FAMILIES[request.param]
    base, _ = pair(fam.name, tmp_path_factory.getbasetemp() / "archs")
    return fam.name, fam.architecture, Checkpoint(base).tensors


def test_every_tensor_of_every_family_has_a_role_layer_and_module(family_tensors):
    family, arch, state = family_tensors
    assert family_of(arch) is not None and family_of(arch).name == family
    for name, tensor in state.items():
        r = classify(name, arch)
        assert r.role != "other", f"{family}: {name} is unclassified"
        layer = _LAYER.search(name)
        assert r.layer == (int(layer.group(1)) if layer else None), name
        # Matrices inside the attention and MLP blocks are the linear modules; everything else has no module.
        linear = r.role in ("attention", "mlp")
        assert r.is_linear == linear, name
        if linear:
            assert name.split(".")[-2] == r.module
            assert r.param == name.split(".")[-1]
        assert len(tensor.shape) == 1 or r.role in ("attention", "mlp", "embedding", "head"), name
    for name, want in EXPECTED[family].items():
        assert name in state, f"{family}: transformers no longer names a tensor {name}"
        r = classify(name, arch)
        assert (r.role, r.layer, r.module) == want, name


def test_an_unhinted_lookup_agrees_with_the_family_table(family_tensors):
    _, arch, state = family_tensors
    for name in state:
        assert classify(name) == classify(name, arch), name


def test_names_no_table_knows_are_other_with_their_layer():
    assert classify("model.layers.3.self_attn.rotary_emb.inv_freq").role == "other"
    assert classify("model.layers.3.self_attn.rotary_emb.inv_freq").layer == 3
    # Old GPT-NeoX checkpoints store the causal mask as attention.bias: a buffer, not a bias parameter.
    assert classify("gpt_neox.layers.0.attention.bias", "GPTNeoXForCausalLM").role == "other"
    # MoE experts are not in the tables (no supported family has them): never mistaken for the dense MLP.
    expert = classify("model.layers.0.mlp.experts.3.gate_proj.weight")
    assert (expert.role, expert.module) == ("other", None)


def test_prefixes_before_the_layers_and_model_modules_are_accepted():
    assert classify("model.language_model.layers.2.mlp.up_proj.weight") == classify(
        "model.layers.2.mlp.up_proj.weight"
    )
    assert classify("layers.0.self_attn.q_proj.weight").role == "attention"
    assert classify("embed_tokens.weight").role == "embedding"
    assert classify("transformer.norm.weight").role == "norm"


def test_a_hint_restricts_the_lookup_to_that_family():
    name = "model.layers.0.self_attn.q_norm.weight"
    assert classify(name).role == "norm"
    assert classify(name, "Qwen3ForCausalLM").role == "norm"
    assert classify(name, "LlamaForCausalLM").role == "other"  # Llama has no q_norm
    # An architecture without a table falls back to every table (Llama-shaped names are common).
    assert classify("model.layers.0.mlp.up_proj.weight", "InternLM3ForCausalLM").role == "mlp"


def test_two_families_giving_one_path_different_roles_fail_at_import(monkeypatch):
    clash = roles.Family("clash", ("ClashForCausalLM",), {"mlp.up_proj": ("attention", True)}, {})
    monkeypatch.setattr(roles, "FAMILIES", (*roles.FAMILIES, clash))
    with pytest.raises(ValueError, match="ambiguous"):
        roles._union()


@pytest.mark.parametrize(
    "spec, name, selected",
    [
        ("v@mlp", "model.layers.0.mlp.gate_up_proj.weight", True),  # Phi-3 fused MLP
        ("v@attention", "model.layers.0.mlp.gate_up_proj.weight", False),
        ("v@attention", "model.layers.1.self_attn.qkv_proj.weight", True),  # Phi-3 fused attention
        ("v@attention", "gpt_neox.layers.1.attention.query_key_value.bias", True),
        ("v@mlp[1:]", "gpt_neox.layers.1.mlp.dense_h_to_4h.weight", True),
        ("v@mlp[1:]", "gpt_neox.layers.0.mlp.dense_h_to_4h.weight", False),
        ("v@embeddings", "gpt_neox.embed_in.weight", True),
        ("v@embeddings", "embed_out.weight", True),
        ("v@norm", "model.layers.0.self_attn.k_norm.weight", True),  # Qwen3 / OLMo 2 key norm
        ("v@norm", "model.layers.0.pre_feedforward_layernorm.weight", True),  # Gemma 2
        ("v@attention", "model.layers.0.self_attn.k_norm.weight", False),
        ("v[0:1]", "gpt_neox.final_layer_norm.weight", False),  # a layer range never selects the final norm
    ],
)
def test_spec_scopes_select_each_familys_tensors(spec, name, selected):
    (component,) = Spec.parse(spec).components
    assert component.applies_to(name) is selected
