"""Running only the top decoder layers of a model, from the input of layer ``first`` computed once per example.

When layers below ``first`` (and the embeddings) are the same in every model a computation needs -- a fine-tune
of the top layers, base + tau where tau is zero below ``first``, attribution patches of the top layers -- they
compute the same activations for an example every time, so they are run once (``prefix_states``) and every
later pass runs only layers ``first..`` (``suffix_loss``). The LM head
(SmolLM2's is 49k x 576) is applied only at the positions the loss scores (an assistant turn), not at the prompt.
The loss is the same function of the top layers' weights as the full model's loss; only the work differs. Works on
any Hugging Face decoder whose body is ``model.model`` with ``layers`` and ``norm``, and whose head is ``lm_head``.
Used by the smol fixture fine-tunes (tunevec.fixtures.smol) and by attribution patching (analysis/attribution.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from transformers import LlamaForCausalLM

IGNORE = -100  # a label that is not scored (the convention of transformers' loss)
Example = tuple[list[int], list[int]]  # (input_ids, labels); labels IGNORE where not scored
Batch = dict[str, torch.Tensor]


@contextlib.contextmanager
def _layers(model: LlamaForCausalLM, part: slice, final_norm: bool) -> Iterator[None]:
    """Run ``model.model`` with only ``layers[part]`` (and without its final norm unless ``final_norm``)."""
    inner = model.model
    layers, norm = inner.layers, inner.norm
    inner.layers = torch.nn.ModuleList(list(layers)[part])
    if not final_norm:
        inner.norm = torch.nn.Identity()
    try:
        yield
    finally:
        inner.layers, inner.norm = layers, norm


@torch.no_grad()
def prefix_states(
    model: LlamaForCausalLM, examples: Sequence[Example], first: int, batch_size: int = 16
) -> list[torch.Tensor]:
    """The input of decoder layer ``first`` for each example, as a [len, hidden] float32 tensor on the model's device.

    Right padding leaves the real positions unchanged (causal attention), so batching is exact.
    """
    model.eval()
    device = next(model.parameters()).device
    states: list[torch.Tensor] = []
    with _layers(model, slice(0, first), final_norm=False):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)  # pad id 0: masked, never attended
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, (x, _) in enumerate(chunk):
                ids[j, : len(x)] = torch.tensor(x)
                mask[j, : len(x)] = 1
            hidden = model.model(
                input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
            ).last_hidden_state
            states.extend(hidden[j, : len(x)].clone() for j, (x, _) in enumerate(chunk))
    return states


@torch.no_grad()
def advance_states(
    model: LlamaForCausalLM,
    states: Sequence[torch.Tensor],
    examples: Sequence[Example],
    start: int,
    stop: int,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """The inputs of decoder layer ``stop`` for each example, from ``states``, the inputs of layer ``start``
    (layers start..stop-1 run, no final norm): what ``prefix_states(model, examples, stop)`` returns when the
    layers below ``start`` gave ``states``."""
    model.eval()
    out: list[torch.Tensor] = []
    with _layers(model, slice(start, stop), final_norm=False):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            batch = suffix_batch(states[i : i + batch_size], chunk)
            hidden = model.model(
                inputs_embeds=batch["hidden"], attention_mask=batch["attention_mask"], use_cache=False
            ).last_hidden_state
            out.extend(hidden[j, : len(ids)].clone() for j, (ids, _) in enumerate(chunk))
    return out


def suffix_batch(states: Sequence[torch.Tensor], examples: Sequence[Example]) -> Batch:
    """Right-padded prefix states, next-token labels (already shifted) and the attention mask."""
    width = max(len(ids) for ids, _ in examples)
    device = states[0].device
    hidden = torch.zeros(len(examples), width, states[0].shape[-1], device=device)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (state, (ids, labels)) in enumerate(zip(states, examples, strict=True)):
        hidden[i, : len(ids)] = state
        targets[i, : len(labels) - 1] = torch.tensor(labels[1:])
        mask[i, : len(ids)] = 1
    return {"hidden": hidden, "targets": targets.to(device), "attention_mask": mask.to(device)}


def suffix_loss(model: LlamaForCausalLM, first: int, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the scored positions, running only layers ``first..``, the norm and the head.

    Equal to ``model(input_ids, labels=...).loss`` for the same example (checked in tests/test_fixtures.py).
    """
    with _layers(model, slice(first, None), final_norm=True):
        out = model.model(
            inputs_embeds=batch["hidden"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
    scored = batch["targets"] != IGNORE
    logits = model.lm_head(out[scored]).float()
    return torch.nn.functional.cross_entropy(logits, batch["targets"][scored], reduction=reduction)


def suffix_batches(
    states: Sequence[torch.Tensor],
    examples: Sequence[Example],
    steps: int,
    batch_size: int,
    generator: torch.Generator,
) -> Iterator[Batch]:
    """``steps`` batches drawn as successive seeded permutations of the examples (epochs without repeats)."""
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order.extend(torch.randperm(len(examples), generator=generator).tolist())
        take, order = order[:batch_size], order[batch_size:]
        yield suffix_batch([states[i] for i in take], [examples[i] for i in take])
