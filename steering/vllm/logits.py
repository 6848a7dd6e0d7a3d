"""Which adapter slot each logits row belongs to: ``route_logits_rows``, the one function that decides it.

vLLM computes logits in two ways with LoRA on:

- **sampling**: one row per request of the step; its slot is the request's (the punica wrapper's
  ``sampler_indices``);
- **prompt logprobs** (``echo`` + ``logprobs`` completions: lm-eval's scoring traffic):
  ``GPUModelRunner._get_prompt_logprobs_dict`` (inherited by ``CPUModelRunner``) calls ``model.compute_logits``
  once per request on that request's prompt-token rows, ``hidden_states[offset : offset + num_logits]``. vLLM's
  own ops route those rows by ``sampler_indices`` too: wrong rows, an engine crash, or, when the counts happen to
  match, another request's output-head delta without a word (docs/cpu-lora-logprobs.md).

``install_prompt_logprob_routing`` wraps that runner method so that, around each such call, the worker's
``MixtureState.logits_rows`` holds the per-token slots of exactly those rows (recovered from the view's offset
into the step's hidden states). When the patch is not in effect (another vLLM build, or a source shape it does not
recognise), the worker says so (``tunevec_capabilities``) and the server refuses every mixture that carries an
output-head delta: base and mixture rows could otherwise be mixed up in any batch.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

# MixtureState.logits_rows inside a prompt-logprob call whose rows could not be located in the step.
UNROUTED = "unrouted"
_MARK = "_tunevec_prompt_logprob_routing"


class UnroutableLogits(RuntimeError):
    """Logits rows whose slots are unknown while an adapter with an output-head delta is active."""


def route_logits_rows(state: Any, sampler_indices: torch.Tensor, rows: int) -> list[int] | None:
    """Each logits row's adapter slot (-1: none), or None when the rows cannot be attributed.

    Inside a prompt-logprob call (``state.logits_rows`` set by the runner patch) the rows are that request's prompt
    tokens; otherwise they are the step's sampled rows, one per request. Nothing is guessed from counts.
    """
    routed = None if state is None else state.logits_rows
    if isinstance(routed, torch.Tensor):
        return routed.tolist() if routed.numel() == rows else None
    if routed is not None:  # UNROUTED
        return None
    return sampler_indices.tolist() if sampler_indices.numel() == rows else None


# --------------------------------------------------------------------------- the runner patch


def install_prompt_logprob_routing(runner_cls: type, state_of: Callable[[Any], Any]) -> str | None:
    """Wrap ``runner_cls._get_prompt_logprobs_dict`` so ``state_of(runner).logits_rows`` routes each call's rows.

    Returns None when the routing is in effect (now or already), else why it is not (the method's source no longer
    has the shape this wrapper relies on). Idempotent.
    """
    current = getattr(runner_cls, "_get_prompt_logprobs_dict", None)
    if current is None:
        return f"{runner_cls.__name__} has no _get_prompt_logprobs_dict"
    if getattr(current, _MARK, False):
        return None
    problem = _shape_problem(runner_cls)
    if problem:
        return problem
    runner_cls._get_prompt_logprobs_dict = _routing(current, state_of)
    return None


def routes_prompt_logprobs(runner_cls: type) -> bool:
    """Whether ``install_prompt_logprob_routing`` is in effect on ``runner_cls``."""
    return bool(getattr(getattr(runner_cls, "_get_prompt_logprobs_dict", None), _MARK, False))


def _shape_problem(runner_cls: type) -> str | None:
    method = runner_cls._get_prompt_logprobs_dict
    try:
        src = inspect.getsource(method)
    except (OSError, TypeError):
        return "the source of _get_prompt_logprobs_dict is not readable"
    for marker in (
        "hidden_states[offset : offset + num_logits]",
        "self.model.compute_logits(prompt_hidden_states)",
    ):
        if marker not in src:
            return f"_get_prompt_logprobs_dict lacks {marker!r}"
    if list(inspect.signature(method).parameters) != ["self", "hidden_states", "num_scheduled_tokens"]:
        return "_get_prompt_logprobs_dict's signature changed"
    return None


def _row_slice(sub: torch.Tensor, full: torch.Tensor) -> slice | None:
    """If ``sub`` is ``full[a:b]`` (a row-slice view), ``slice(a, b)``."""
    try:
        if sub.dim() != 2 or full.dim() != 2 or sub.shape[1] != full.shape[1] or sub.dtype != full.dtype:
            return None
        if sub.untyped_storage().data_ptr() != full.untyped_storage().data_ptr():
            return None
        if sub.shape[0] > 1 and sub.stride() != full.stride():
            return None
        delta = sub.storage_offset() - full.storage_offset()
        row = full.stride(0)
        if delta < 0 or row <= 0 or delta % row:
            return None
        start = delta // row
        stop = start + sub.shape[0]
        return slice(start, stop) if stop <= full.shape[0] else None
    except Exception:
        return None


def _routing(orig, state_of):  # noqa: ANN001, ANN202
    @functools.wraps(orig)
    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):  # noqa: ANN001, ANN202
        state = state_of(self)
        if state is None or not self.num_prompt_logprobs or state.token_slots is None:
            return orig(self, hidden_states, num_scheduled_tokens)
        model = self.model
        inner = model.compute_logits

        def compute_logits(prompt_hidden_states, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            rows = _row_slice(prompt_hidden_states, hidden_states)
            token_slots = state.token_slots()
            located = rows is not None and token_slots.numel() == hidden_states.shape[0]
            state.logits_rows = token_slots[rows] if located else UNROUTED
            try:
                return inner(prompt_hidden_states, *args, **kwargs)
            finally:
                state.logits_rows = None

        # An instance attribute for the length of this call only: the runner's method reads self.model.compute_logits.
        had = "compute_logits" in model.__dict__
        previous = model.__dict__.get("compute_logits")
        model.__dict__["compute_logits"] = compute_logits
        try:
            return orig(self, hidden_states, num_scheduled_tokens)
        finally:
            if had:
                model.__dict__["compute_logits"] = previous
            else:
                model.__dict__.pop("compute_logits", None)

    setattr(_get_prompt_logprobs_dict, _MARK, True)
    return _get_prompt_logprobs_dict
