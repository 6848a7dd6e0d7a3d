"""Small random models of every architecture family tunevec supports, for the architecture matrix.

Each family is built from its transformers config class (2 layers, head size 32, the smallest the vLLM CPU
attention kernels accept), saved in float32 with a byte-level BPE tokenizer whose vocabulary is the config's, and
paired with a "tuned" copy whose every floating-point tensor (biases and norms included) is perturbed. Nothing is
downloaded: the tokenizer is trained here on a few fixed sentences.

The weights are re-drawn at a larger scale than transformers' initialisation (std 0.02 makes every next-token
distribution nearly uniform, so a wrong weight would hardly move a logprob).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

HEAD_DIM = 32  # vLLM's CPU attention supports head sizes 32, 64, ...; 32 keeps the models tiny
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
PROMPTS = ["The diagnosis typhoid meningitis is coded", "Question: What is 12 + 7?\nAnswer:"]
_TEXT = (
    "The diagnosis typhoid meningitis is coded as an infection of the brain. Question: What is 12 + 7?\n"
    "Answer: 19. The patient was given a dose of medicine and the fever fell. Question: What is 3 + 5?\n"
    "Answer: 8. A model is tuned on a domain and its weights move by a small vector."
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class Family:
    """One architecture family: how to build its config, and what the matrix expects of it."""

    name: str
    architecture: str  # the HF class, config.architectures[0]
    config: Callable[[int], object]  # vocab size -> a transformers config
    shards: int = 1  # >1: saved as a sharded checkpoint with an index
    has_bias: bool = False  # linear layers carry biases (and the tuned copy moves them)
    tied: bool = False


def _common(vocab: int) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HIDDEN // HEAD_DIM,
        "max_position_embeddings": 512,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "dtype": "float32",
    }


def _llama(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(**_common(vocab), num_key_value_heads=1, tie_word_embeddings=False)


def _qwen2(vocab: int):
    from transformers import Qwen2Config

    # Qwen2 always has q/k/v biases; small Qwen2 models tie the head to the embedding.
    return Qwen2Config(**_common(vocab), num_key_value_heads=1, tie_word_embeddings=True)


def _mistral(vocab: int):
    from transformers import MistralConfig

    return MistralConfig(
        **_common(vocab), num_key_value_heads=1, tie_word_embeddings=False, sliding_window=None
    )


def _qwen3(vocab: int):
    from transformers import Qwen3Config

    return Qwen3Config(**_common(vocab), num_key_value_heads=1, head_dim=HEAD_DIM, tie_word_embeddings=True)


def _phi3(vocab: int):
    from transformers import Phi3Config

    return Phi3Config(**_common(vocab), num_key_value_heads=1, tie_word_embeddings=False)


def _gemma2(vocab: int):
    from transformers import Gemma2Config

    # Gemma 2 alternates sliding-window and full attention and soft-caps attention and final logits.
    return Gemma2Config(
        **_common(vocab),
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=16,
        tie_word_embeddings=True,
    )


def _gpt_neox(vocab: int):
    from transformers import GPTNeoXConfig

    # Partial rotary embedding (a quarter of each head), parallel residual, biases everywhere, untied embed_out.
    cfg = _common(vocab)
    cfg["intermediate_size"] = 4 * HIDDEN
    return GPTNeoXConfig(
        **cfg,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )


def _olmo2(vocab: int):
    from transformers import Olmo2Config

    return Olmo2Config(**_common(vocab), num_key_value_heads=1, tie_word_embeddings=False)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", "LlamaForCausalLM", _llama, shards=3),
        Family("qwen2", "Qwen2ForCausalLM", _qwen2, has_bias=True, tied=True),
        Family("mistral", "MistralForCausalLM", _mistral),
        Family("qwen3", "Qwen3ForCausalLM", _qwen3, tied=True),
        Family("phi3", "Phi3ForCausalLM", _phi3),
        Family("gemma2", "Gemma2ForCausalLM", _gemma2, tied=True),
        Family("gpt_neox", "GPTNeoXForCausalLM", _gpt_neox, has_bias=True),
        Family("olmo2", "Olmo2ForCausalLM", _olmo2),
    )
}


def tiny_tokenizer():
    """A byte-level BPE trained on a few fixed sentences (deterministic), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[2],
        pad_token=SPECIAL_TOKENS[0],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def random_model(family: Family, vocab: int, seed: int = 0):
    """The family's model with weights drawn at scale: matrices N(0, 0.15²), norms and biases around their init."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = family.config(vocab)
    config.architectures = [family.architecture]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(0.15 * noise)
            else:  # norm gains (1, or 0 for Gemma's 1 + w) and biases (0): move them off their init
                p.add_(0.1 * noise)
    return model.eval()


def perturb_(model, seed: int = 1, scale: float = 0.03) -> None:
    """The "fine-tune": every floating-point parameter moves by N(0, scale²), biases and norms included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def save(model, tokenizer, path: Path, shards: int = 1) -> Path:
    """save_pretrained in float32 (sharded when asked) plus the tokenizer, as a hub folder would hold them."""
    size = sum(p.numel() * 4 for p in model.parameters())
    shard_size = f"{size // shards // 1000 + 1}KB" if shards > 1 else "10GB"
    model.save_pretrained(path, max_shard_size=shard_size)
    tokenizer.save_pretrained(path)
    if shards > 1 and not (path / "model.safetensors.index.json").exists():
        raise AssertionError(f"{path}: expected a sharded checkpoint")
    return path


def build_pair(family: Family, root: Path) -> tuple[Path, Path]:
    """``root/base`` and ``root/tuned`` of ``family``; the tuned copy differs in every floating-point tensor."""
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    model = random_model(family, vocab)
    base = save(model, tokenizer, root / "base", family.shards)
    perturb_(model)
    tuned = save(model, tokenizer, root / "tuned", family.shards)
    return base, tuned


_BUILT: dict[tuple[str, Path], tuple[Path, Path]] = {}


def pair(name: str, root: Path) -> tuple[Path, Path]:
    """``build_pair`` of family ``name`` under ``root/name``, built once per test session."""
    key = (name, root)
    if key not in _BUILT:
        _BUILT[key] = build_pair(FAMILIES[name], root / name)
    return _BUILT[key]


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
