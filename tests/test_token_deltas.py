"""NormWithDeltas: each token is normalised with its own mixture's weights, ``w + dw`` (and ``b + db``), and base
tokens are left exactly as the engine's own norm left them. Checked in float32 against norms built with the summed
weights, for an RMS norm, a LayerNorm and vLLM's fused add + norm shape ``(out, residual)``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tunevec.steering.vllm.token_deltas import NormWithDeltas, norm_kind

DIM = 16
EPS = 1e-6


@dataclass
class Run:
    start: int
    stop: int
    slot: int


@dataclass
class Plan:
    runs: list[Run]
    num_rows: int


class FakeState:
    """What NormWithDeltas reads of the worker's MixtureState: the step's plan and each slot's norm deltas."""

    def __init__(self, plan: Plan, deltas: dict[int, tuple[torch.Tensor, torch.Tensor | None]]):
        self._plan, self._deltas = plan, deltas

    def plan(self) -> Plan:
        return self._plan

    def norm_deltas(self, plan: Plan, name: str) -> dict:
        return {r.slot: self._deltas[r.slot] for r in plan.runs if r.slot in self._deltas}


class FusedAddRMSNorm(nn.Module):
    """vLLM's RMSNorm called with a residual: returns (norm(x + residual), x + residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM))
        self.variance_epsilon = EPS

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x + residual
        return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * self.weight, s


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


# Tokens 0-2 slot 0, 3-4 base (no run), 5-7 slot 1 (a mixture that moves nothing here), 8-9 slot 2.
PLAN = Plan([Run(0, 3, 0), Run(5, 8, 1), Run(8, 10, 2)], num_rows=10)


def _deltas(with_bias: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    out = {}
    for slot in (0, 2):
        dw = 0.1 * torch.randn(DIM, generator=g)
        db = 0.1 * torch.randn(DIM, generator=g) if with_bias else None
        out[slot] = (dw, db)
    return out


def _expected(x: torch.Tensor, base_out: torch.Tensor, deltas: dict, norm) -> torch.Tensor:  # noqa: ANN001
    want = base_out.clone()
    for run in PLAN.runs:
        if run.slot in deltas:
            dw, db = deltas[run.slot]
            want[run.start : run.stop] = norm(x[run.start : run.stop], dw, db)
    return want


def _rms_norm() -> nn.Module:
    return nn.RMSNorm(DIM, eps=EPS)


def _layer_norm() -> nn.Module:
    return nn.LayerNorm(DIM, eps=EPS)


def _with_summed_weights(base: nn.Module):  # noqa: ANN202
    """The norm ``base`` would be with its weight moved by ``dw`` and its bias (if any) by ``db``."""
    if isinstance(base, nn.LayerNorm):
        return lambda xs, dw, db: nn.functional.layer_norm(xs, (DIM,), base.weight + dw, base.bias + db, EPS)
    return lambda xs, dw, db: _rms(xs, base.weight + dw)


@pytest.mark.parametrize(("make", "kind"), [(_rms_norm, "rms"), (_layer_norm, "layer")], ids=["rms", "layer"])
def test_a_norm_uses_each_tokens_own_weights_and_bias(make, kind):
    base = make()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(DIM))
    assert norm_kind(base) == kind
    deltas = _deltas(with_bias=kind == "layer")  # an RMS norm has no bias
    wrapped = NormWithDeltas(base, "model.layers.0.input_layernorm", FakeState(PLAN, deltas))
    x = torch.randn(PLAN.num_rows, DIM)
    base_out = base(x)
    got = wrapped(x)
    torch.testing.assert_close(
        got, _expected(x, base_out, deltas, _with_summed_weights(base)), atol=1e-5, rtol=1e-5
    )
    assert torch.equal(got[3:8], base_out[3:8])  # base tokens and a slot without deltas: untouched


def test_the_fused_add_and_norm_normalises_the_new_residual():
    base = FusedAddRMSNorm()
    assert norm_kind(base) == "rms"
    deltas = _deltas(with_bias=False)
    wrapped = NormWithDeltas(base, "model.layers.0.post_attention_layernorm", FakeState(PLAN, deltas))
    x, residual = torch.randn(PLAN.num_rows, DIM), torch.randn(PLAN.num_rows, DIM)
    base_out, summed = base(x, residual)
    got, got_residual = wrapped(x, residual)
    want = _expected(summed, base_out, deltas, lambda xs, dw, db: _rms(xs, base.weight + dw))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_residual, summed)


@pytest.mark.parametrize("rows", [9, 0])
def test_rows_that_match_no_token_count_are_refused(rows):
    wrapped = NormWithDeltas(nn.RMSNorm(DIM, eps=EPS), "model.norm", FakeState(PLAN, _deltas(False)))
    with pytest.raises(RuntimeError, match="cannot tell which token"):
        wrapped(torch.randn(rows, DIM))
