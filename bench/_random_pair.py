"""Random base/tuned checkpoint pairs of real model shapes, built locally from transformers configs (no downloads).

Used by bench/bench_scaling.py (CPU, growing sizes) and bench/device_check.sh (a 7B pair on a GPU). A pair is

    OUT/base/     Llama-shaped bf16 checkpoint, one safetensors shard per decoder layer, word-level tokenizer
    OUT/tuned/    base + tau on every linear of the changed layers (tau: a rank-8 part and Gaussian noise, each
                  about 1% of the weights' scale), everything else identical
    OUT/probe.jsonl, OUT/heldout.jsonl   texts for `tunevec analyze` (probe) and `tunevec attribute` (domain "bench")

Weights are drawn like Llama's initialisation (normal, std 0.02; norms 1), layer by layer on the chosen device, so
memory holds one layer of each model. The texts are made of pseudo-words, one token each, so a text of N words is
N tokens and the token counts of the benchmarks are known exactly.

    python bench/_random_pair.py --shape llama7b --out /tmp/pair --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

# Real shapes (their transformers configs' values); "tiny" is for dry runs of the scripts.
SHAPES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True,
    ),
    "smol135m": dict(  # HuggingFaceTB/SmolLM2-135M
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
    ),
    "smol360m": dict(  # HuggingFaceTB/SmolLM2-360M
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
    ),
    "llama1b": dict(  # meta-llama/Llama-3.2-1B (without its rope scaling, which changes no cost)
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0, head_dim=64,
    ),
    "llama7b": dict(  # meta-llama/Llama-2-7b-hf
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
    ),
}  # fmt: skip
INIT_STD = 0.02
TAU_SCALE = 2e-4  # std of tau's entries: about 1% of the weights'
TAU_RANK = 8


def config_for(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=1,
        pad_token_id=0, dtype="bfloat16",
    )  # fmt: skip


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every persistent tensor of the model, as save_pretrained writes it (a tied head left out)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def _words(n: int) -> list[str]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    return [a + b + c for a in syllables for b in syllables for c in syllables[:2]][:n]


WORDS = _words(4000)


def texts(count: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )
    fast.save_pretrained(path)


def build_pair(
    shape: str,
    out: Path,
    *,
    device: torch.device,
    changed: str = "all",
    probe_texts: int = 24,
    heldout_texts: int = 64,
    seed: int = 0,
) -> dict:
    """Write OUT/base, OUT/tuned, OUT/probe.jsonl, OUT/heldout.jsonl; returns a description (sizes, seconds).

    ``changed``: "all" (every decoder layer's linears), or "top-quarter" (the last quarter of the layers, as a
    fine-tune of the top layers would).
    """
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    config = config_for(shape)
    shapes = tensor_shapes(config)
    n_layers = config.num_hidden_layers
    first_changed = 0 if changed == "all" else n_layers - max(1, n_layers // 4)
    gen = torch.Generator(device=device).manual_seed(seed)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        layer = _layer_of(name)
        groups.setdefault("rest" if layer is None else f"{layer:05d}", []).append(name)
    files = {
        key: f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i, key in enumerate(sorted(groups))
    }
    for side in ("base", "tuned"):
        (out / side).mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    params = changed_params = 0
    for key in sorted(groups):
        base_part, tuned_part = {}, {}
        for name in groups[key]:
            dims = shapes[name]
            if name.endswith("norm.weight"):
                w = torch.ones(dims, device=device)
            else:
                w = torch.randn(dims, generator=gen, device=device) * INIT_STD
            layer = _layer_of(name)
            t = w
            if layer is not None and layer >= first_changed and len(dims) == 2:
                m, n = dims
                low = torch.randn(m, TAU_RANK, generator=gen, device=device) @ torch.randn(
                    TAU_RANK, n, generator=gen, device=device
                )
                noise = torch.randn(dims, generator=gen, device=device)
                t = w + TAU_SCALE * (low / math.sqrt(TAU_RANK) + noise) / math.sqrt(2)
                changed_params += m * n
            params += math.prod(dims)
            base_part[name] = w.to(torch.bfloat16).cpu()
            tuned_part[name] = t.to(torch.bfloat16).cpu()
            weight_map[name] = files[key]
        save_file(base_part, out / "base" / files[key], metadata={"format": "pt"})
        save_file(tuned_part, out / "tuned" / files[key], metadata={"format": "pt"})
    index = {"metadata": {"total_size": params * 2}, "weight_map": weight_map}
    for side in ("base", "tuned"):
        config.save_pretrained(out / side)
        (out / side / "model.safetensors.index.json").write_text(json.dumps(index))
        write_tokenizer(out / side)
    probe = [
        {"domain": ("general", "bench")[i % 2], "text": t}
        for i, t in enumerate(texts(probe_texts, 140, seed))
    ]
    (out / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probe))
    held = [{"domain": "bench", "text": t} for t in texts(heldout_texts, 80, seed + 1)]
    (out / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    return {
        "shape": shape,
        "params": params,
        "changed_params": changed_params,
        "changed_layers": [first_changed, n_layers],
        "bytes_per_checkpoint": params * 2,
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--changed", choices=["all", "top-quarter"], default="all")
    ap.add_argument("--probe-texts", type=int, default=24)
    ap.add_argument("--heldout-texts", type=int, default=64)
    args = ap.parse_args()
    info = build_pair(
        args.shape,
        args.out,
        device=torch.device(args.device),
        changed=args.changed,
        probe_texts=args.probe_texts,
        heldout_texts=args.heldout_texts,
    )
    print(json.dumps(info))


if __name__ == "__main__":
    main()
