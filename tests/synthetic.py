"""Small synthetic Llama-shaped checkpoints for tests that need files but not a trained model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_like(seed: int, vocab: int = 32, hidden: int = 8, layers: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
        "model.norm.weight": torch.ones(hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{proj}.weight"] = torch.randn(hidden, hidden, generator=g)
        t[p + "mlp.gate_proj.weight"] = torch.randn(2 * hidden, hidden, generator=g)
        t[p + "mlp.up_proj.weight"] = torch.randn(2 * hidden, hidden, generator=g)
        t[p + "mlp.down_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=g)
        t[p + "input_layernorm.weight"] = torch.ones(hidden)
    return t


def write_model(
    path: Path, tensors: dict[str, torch.Tensor], *, shards: int = 1, arch="LlamaForCausalLM", tied=True
):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": [arch],
        "model_type": "llama",
        "tie_word_embeddings": tied,
        "num_hidden_layers": 2,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
        return path
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, path / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def perturbed(base: dict[str, torch.Tensor], seed: int = 1, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in base.items()}
