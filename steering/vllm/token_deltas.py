"""What a mixture changes outside its LoRA modules, token by token: norm deltas and residual-stream directions.

**Norms.** Each token is normalised with its own mixture's weights, ``w + sum_i alpha_i delta_i``.

A norm layer computes ``n(x) * w (+ b)``, ``n`` the normalisation (RMS, or mean-centred for LayerNorm). A mixture
that moves ``w`` and ``b`` by ``dw = sum_i alpha_i delta_w_i`` and ``db`` changes the output, token by token, by
``n(x) * dw + db``: exactly what ``NormWithDeltas`` adds, after the engine's own norm has run, to the rows of the
tokens whose adapter slot holds such a mixture. Tokens of the base model and of mixtures that leave this norm
alone are in no run of the step's plan and get nothing; a step with no such slot costs one lookup.

The wrappers replace the model's norm modules the way vLLM's LoRA manager replaces its linear layers
(``replace_submodule``), only for the norms some served vector moves, once the weights are loaded; each keeps
the original module and calls it first, so the base computation is vLLM's own. Supported: RMS norms (vLLM's
``RMSNorm`` and ``GemmaRMSNorm``, transformers' ``*RMSNorm``; Gemma's ``1 + w`` moves by the same ``dw``) and
LayerNorms (``torch.nn.LayerNorm``, vLLM's ``LayerNorm``); any other norm's delta is reported as not carried.

**Residual stream** (activation vectors, ``tunevec.core.activation``). ``SteeredLayer`` wraps a decoder layer and
adds ``sum_i alpha_i v_i`` to its output, on the rows of the tokens whose mixture names activation vectors for that
layer: the residual stream after the layer, as a transformers forward hook on ``model.layers[k]`` would add it.
vLLM's decoder layers return ``(hidden_states, residual)`` with the stream their sum (the next norm adds them), so
the direction is added to ``hidden_states``; a transformers layer (vLLM's Transformers backend) returns the stream
itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def norm_kind(module: nn.Module) -> str | None:
    """``"rms"`` or ``"layer"`` for a norm this file can move per token, else None."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    if "RMSNorm" in name and name != "RMSNormGated":
        if getattr(module, "variance_size_override", None) is not None or not getattr(
            module, "has_weight", True
        ):
            return None
        return "rms" if _eps(module) is not None else None
    if isinstance(module, nn.LayerNorm) or name == "LayerNorm":
        return "layer" if _eps(module) is not None else None
    return None


def _eps(module: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, float | int):
            return float(value)
    return None


class NormWithDeltas(nn.Module):
    """A norm module and, per token, its mixture's delta (see the module docstring)."""

    def __init__(self, base: nn.Module, name: str, state: Any):
        super().__init__()
        self.base_layer = base
        self.tunevec_name = name
        self.kind = norm_kind(base)
        self.eps = _eps(base)
        self._state = state

    @property
    def weight(self) -> torch.Tensor:  # models that read their norm's weight directly keep finding it
        return self.base_layer.weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(x, *args, **kwargs)
        plan = self._state.plan()
        if plan is None or not plan.runs:
            return out
        deltas = self._state.norm_deltas(plan, self.tunevec_name)
        if not deltas:
            return out
        if isinstance(out, tuple):
            # vLLM's fused add + norm: the normalised input is the new residual, returned beside the output
            self._add(out[0], out[1], plan, deltas)
        else:
            self._add(out, x, plan, deltas)
        return out

    def _add(self, y: torch.Tensor, x: torch.Tensor, plan: Any, deltas: dict) -> None:
        dim = y.shape[-1]
        ys, xs = y.view(-1, dim), x.reshape(-1, dim)
        per_token = rows_per_token(ys.shape[0], plan, self.tunevec_name)
        for run in plan.runs:
            delta = deltas.get(run.slot)
            if delta is None:
                continue
            rows = slice(run.start * per_token, run.stop * per_token)
            ys[rows] += self._change(xs[rows].float(), *delta).to(ys.dtype)

    def _change(self, x: torch.Tensor, dw: torch.Tensor, db: torch.Tensor | None) -> torch.Tensor:
        """``n(x) * dw + db`` in float32, one fused torch op per norm (this runs per norm and per step)."""
        if self.kind == "rms":
            change = F.rms_norm(x, (x.shape[-1],), dw, self.eps)
            return change if db is None else change.add_(db)
        return F.layer_norm(x, (x.shape[-1],), dw, db, self.eps)


def rows_per_token(rows: int, plan: Any, where: str) -> int:
    """How many consecutive rows each token of the step has in a tensor of ``rows`` rows (heads, a batch dim...)."""
    per_token, rest = divmod(rows, max(plan.num_rows, 1))
    if rest or per_token == 0:
        raise RuntimeError(
            f"tunevec: {where} saw {rows} rows for {plan.num_rows} tokens; cannot tell which token each row is"
        )
    return per_token


class SteeredLayer(nn.Module):
    """A decoder layer and, per token, its mixture's residual-stream direction (see the module docstring)."""

    def __init__(self, base: nn.Module, name: str, state: Any):
        super().__init__()
        self.base_layer = base
        self.tunevec_name = name
        self._state = state

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes models read off their layers (an index, a sliding window ...)
            return getattr(super().__getattr__("base_layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        plan = self._state.plan()
        if plan is None or not plan.runs:
            return out
        directions = self._state.steer_deltas(plan, self.tunevec_name)
        if not directions:
            return out
        stream = out[0] if isinstance(out, tuple) else out
        dim = stream.shape[-1]
        rows = stream.view(-1, dim)
        per_token = rows_per_token(rows.shape[0], plan, self.tunevec_name)
        for run in plan.runs:
            direction = directions.get(run.slot)
            if direction is not None:
                rows[run.start * per_token : run.stop * per_token] += direction.to(rows.dtype)
        return out
