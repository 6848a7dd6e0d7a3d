"""The grouped LoRA op against vLLM's reference torch ops, on random adapters in vLLM's stacked layout.

Two kinds of slot are checked:

- **foreign adapters** (any LoRA vLLM loaded; weights carry their own scale): each slot padded to the maximum rank
  with zeros at its own real rank (some slices rank 0);
- **tunevec mixtures**: the slot holds the vectors' factors unscaled, their coefficients come from the worker's
  ``MixtureState`` (``compose.py``), and mixtures that share a step are served from one stack of the shared
  factors. The reference is vLLM's ops on the same weights with the coefficients folded in (float64 folding).

Every case mixes tokens of several slots with tokens that use no adapter (id 0), which must be left exactly as
they were.
"""

from __future__ import annotations

import random

import pytest
import torch
from vllm.lora.layers import LoRAMapping
from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_expand_slice, bgmv_shrink

from tunevec.steering.lora import LoraAdapter
from tunevec.steering.spec import Spec
from tunevec.steering.vllm.compose import compose_mixture
from tunevec.steering.vllm.logits import route_logits_rows
from tunevec.steering.vllm.punica import STACKED_MAX_TOKENS, PunicaWrapperGrouped, plan_runs
from tunevec.steering.vllm.state import MixtureState, Target

MAX_LORAS = 4
MAX_RANK = 16
IN = 24
QKV = (32, 8, 8)  # sliced outputs, like q, k, v
GATE_UP = (40, 40)


def stacked_weights(slices, gen, ranks):
    """vLLM's layout: per slice A [slots, 1, r_max, in], B [slots, 1, out, r_max], zero beyond each real rank."""
    a_stk = tuple(torch.zeros(MAX_LORAS, 1, MAX_RANK, IN) for _ in slices)
    b_stk = tuple(torch.zeros(MAX_LORAS, 1, out, MAX_RANK) for out in slices)
    for slot in range(MAX_LORAS):
        for i, out in enumerate(slices):
            r = ranks[(slot, i)]
            a_stk[i][slot, 0, :r] = torch.randn(r, IN, generator=gen)
            b_stk[i][slot, 0, :, :r] = torch.randn(out, r, generator=gen)
    return a_stk, b_stk


def reference_linear(y, x, a_stk, b_stk, slots: torch.Tensor, slices):
    """vLLM's torch ops on the tokens that have an adapter (index -1 would wrongly select the last slot)."""
    out = y.clone()
    rows = torch.nonzero(slots >= 0).flatten()
    if rows.numel() == 0:
        return out
    idx = slots[rows]
    sub = out[rows]
    offset = 0
    for i, size in enumerate(slices):
        buf = torch.zeros(rows.numel(), MAX_RANK, dtype=x.dtype)
        bgmv_shrink(x[rows], a_stk[i], buf, idx, 1.0)
        bgmv_expand_slice(buf, b_stk[i], sub, idx, offset, size, True)
        offset += size
    out[rows] = sub
    return out


def wrapper_for(token_ids: list[int], lora_index_to_id: list[int | None], state=None, modules=None):
    wrapper = PunicaWrapperGrouped(256, 32, "cpu")
    if state is not None:
        wrapper.bind(state, modules)
    mapping = LoRAMapping(tuple(token_ids), tuple(token_ids), is_prefill=True)
    wrapper.update_metadata(mapping, lora_index_to_id, MAX_LORAS + 1, 100)
    return wrapper


def layout(requests: list[tuple[int, int]]) -> list[int]:
    """Token lora ids for requests given as (lora id, token count), laid out one request after another."""
    return [lora_id for lora_id, n in requests for _ in range(n)]


# lora ids 11, 22, 33 sit in slots 0, 2, 3; slot 1 is free. Id 0 = no adapter.
SLOT_IDS = [11, None, 22, 33]
SLOT_OF = {11: 0, 22: 2, 33: 3, 0: -1}
CASES = {
    "prefill, several requests and base tokens": layout([(11, 30), (0, 9), (22, 41), (11, 7), (33, 20)]),
    "prefill, one adapter": layout([(22, 90)]),
    "decode, interleaved adapters": [11, 22, 0, 33, 11, 11, 0, 22, 33],
    "decode, one adapter and base": [22, 0, 22, 22, 0],
    "base only": [0] * 12,
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("slices", [QKV, GATE_UP, (48,)], ids=["qkv", "gate_up", "single"])
def test_grouped_linear_matches_vllm_reference_ops(case: str, slices: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(hash((case, slices)) % 2**31)
    rng = random.Random(hash((case, slices)))
    ranks = {(s, i): rng.choice([0, 1, 5, 8, 16]) for s in range(MAX_LORAS) for i in range(len(slices))}
    ranks[(0, 0)] = 7  # slot 0 is never all zero
    a_stk, b_stk = stacked_weights(slices, gen, ranks)
    ids = CASES[case]
    x = torch.randn(len(ids), IN, generator=gen)
    y = torch.randn(len(ids), sum(slices), generator=gen)
    slots = torch.tensor([SLOT_OF[i] for i in ids])
    want = reference_linear(y, x, a_stk, b_stk, slots, slices)

    wrapper = wrapper_for(ids, SLOT_IDS)
    got = y.clone()
    wrapper.add_lora_linear(got, x, a_stk, b_stk, 1.0, slices)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Base tokens are left exactly as they were.
    base = slots < 0
    assert torch.equal(got[base], y[base])


def test_both_strategies_are_exercised() -> None:
    decode = wrapper_for(CASES["decode, interleaved adapters"], SLOT_IDS)
    prefill = wrapper_for(CASES["prefill, several requests and base tokens"], SLOT_IDS)
    assert decode._plan.stacked and len(decode._plan.runs) > 1
    assert (
        not prefill._plan.stacked
        and len(CASES["prefill, several requests and base tokens"]) > STACKED_MAX_TOKENS
    )


def test_all_zero_module_costs_no_pack_and_changes_nothing() -> None:
    a_stk = (torch.zeros(MAX_LORAS, 1, MAX_RANK, IN),)
    b_stk = (torch.zeros(MAX_LORAS, 1, 48, MAX_RANK),)
    ids = layout([(11, 5), (22, 5)])
    wrapper = wrapper_for(ids, SLOT_IDS)
    y = torch.randn(len(ids), 48)
    got = y.clone()
    wrapper.add_lora_linear(got, torch.randn(len(ids), IN), a_stk, b_stk, 1.0, (48,))
    assert torch.equal(got, y)
    assert all(p is None for p in wrapper._packs[id(a_stk)][1].values())


def test_new_weights_in_a_slot_are_used_after_invalidation() -> None:
    gen = torch.Generator().manual_seed(0)
    ranks = {(s, 0): 4 for s in range(MAX_LORAS)}
    a_stk, b_stk = stacked_weights((48,), gen, ranks)
    ids = layout([(11, 6)])
    x = torch.randn(len(ids), IN, generator=gen)
    wrapper = wrapper_for(ids, SLOT_IDS)
    wrapper.add_lora_linear(torch.zeros(len(ids), 48), x, a_stk, b_stk, 1.0, (48,))
    # The same id reloaded in place: new weights in slot 0, lora_index_to_id unchanged.
    a_stk[0][0].normal_(generator=gen)
    wrapper.invalidate_slot(0)
    got = torch.zeros(len(ids), 48)
    wrapper.add_lora_linear(got, x, a_stk, b_stk, 1.0, (48,))
    want = reference_linear(
        torch.zeros(len(ids), 48), x, a_stk, b_stk, torch.zeros(len(ids), dtype=torch.long), (48,)
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_slot_reassigned_to_another_adapter_drops_old_packs() -> None:
    gen = torch.Generator().manual_seed(1)
    a_stk, b_stk = stacked_weights((48,), gen, {(s, 0): 4 for s in range(MAX_LORAS)})
    wrapper = wrapper_for(layout([(11, 4)]), SLOT_IDS)
    x = torch.randn(4, IN, generator=gen)
    wrapper.add_lora_linear(torch.zeros(4, 48), x, a_stk, b_stk, 1.0, (48,))
    a_stk[0][0].normal_(generator=gen)  # slot 0 now holds adapter 44
    mapping = LoRAMapping((44,) * 4, (44,), is_prefill=True)
    wrapper.update_metadata(mapping, [44, None, 22, 33], MAX_LORAS + 1, 100)
    got = torch.zeros(4, 48)
    wrapper.add_lora_linear(got, x, a_stk, b_stk, 1.0, (48,))
    want = reference_linear(torch.zeros(4, 48), x, a_stk, b_stk, torch.zeros(4, dtype=torch.long), (48,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case", ["prefill, several requests and base tokens", "decode, interleaved adapters"]
)
def test_grouped_embedding_matches_vllm_reference_ops(case: str) -> None:
    gen = torch.Generator().manual_seed(7)
    dim = 20
    b_stk = torch.zeros(MAX_LORAS, 1, dim, MAX_RANK)
    for slot, r in enumerate([6, 0, 16, 3]):
        b_stk[slot, 0, :, :r] = torch.randn(dim, r, generator=gen)
    ids = CASES[case]
    slots = torch.tensor([SLOT_OF[i] for i in ids])
    # What the embedding layer hands over: each token's row of its slot's A (zero beyond the slot's rank).
    x = torch.randn(len(ids), MAX_RANK, generator=gen)
    y = torch.randn(len(ids), dim, generator=gen)
    want = y.clone()
    rows = torch.nonzero(slots >= 0).flatten()
    sub = want[rows]
    masked = x[rows].clone()
    for j, s in enumerate(slots[rows].tolist()):
        r = [6, 0, 16, 3][s]
        masked[j, r:] = 0
    bgmv_expand(masked, b_stk, sub, slots[rows], True)
    want[rows] = sub
    wrapper = wrapper_for(ids, SLOT_IDS)
    got = y.clone()
    wrapper.add_lora_embedding(got, x, b_stk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_plan_runs_cuts_at_every_change_and_skips_base_tokens() -> None:
    runs = plan_runs([11, 11, 0, 22, 22, 22, 11], [11, None, 22])
    assert [(r.start, r.stop, r.slot) for r in runs] == [(0, 2, 0), (3, 6, 2), (6, 7, 0)]
    assert plan_runs([], [11]) == []


# --- tunevec mixtures: unscaled slot factors, float32 coefficients, shared stacks ---------------------------------

MODULE = "model.layers.0.self_attn.qkv_proj"
TENSORS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight")


class Mixtures:
    """Two vectors over q and k of one qkv module; ids 11 and 22 are tunevec mixtures, 33 a foreign adapter."""

    SPECS = {11: "medical:0.8+math:0.4", 22: "medical:-1.5"}

    def __init__(self, gen: torch.Generator, lora_dtype: torch.dtype = torch.float32):
        def factors(r: int) -> dict:
            return {
                t: (torch.randn(out, r, generator=gen), torch.randn(r, IN, generator=gen))
                for t, out in zip(TENSORS, QKV, strict=False)
            }

        self.vectors = {"medical": LoraAdapter(factors(3)), "math": LoraAdapter(factors(5))}
        self.state = MixtureState({}, lora_dtype, resident=self.vectors)
        self.state.bind_modules(self.target, shared_stacks=True)
        self.modules = {MODULE: type("Layer", (), {})}
        self.composed = {}
        for lora_id, text in self.SPECS.items():
            spec = Spec.parse(text)
            mixed = compose_mixture(spec, self.state.adapters(spec.vectors), max_rank=MAX_RANK, fold=False)
            self.state.record(lora_id, mixed.composition, keep=set(self.SPECS))
            self.composed[lora_id] = mixed
        self.foreign = [
            (torch.randn(4, IN, generator=gen), torch.randn(out, 4, generator=gen)) for out in QKV
        ]

    @staticmethod
    def target(tensor: str) -> Target | None:
        if tensor not in TENSORS:
            return None
        i = TENSORS.index(tensor)
        return Target(MODULE, i, sum(QKV[:i]), QKV[i])

    def slot_weights(self, scaled: bool) -> tuple[tuple, tuple]:
        """What vLLM copies into the slots: the compositions' factors (``scaled``: coefficients folded in, in
        float64, for the reference), and the foreign adapter's."""
        a_stk = tuple(torch.zeros(MAX_LORAS, 1, MAX_RANK, IN) for _ in QKV)
        b_stk = tuple(torch.zeros(MAX_LORAS, 1, out, MAX_RANK) for out in QKV)
        for lora_id, mixed in self.composed.items():
            slot = SLOT_OF[lora_id]
            for i, tensor in enumerate(TENSORS):
                b, a = mixed.factors[tensor]
                if scaled:
                    b = (b.double() * mixed.composition.coefficients(tensor).double()).to(b.dtype)
                a_stk[i][slot, 0, : a.shape[0]] = a
                b_stk[i][slot, 0, :, : b.shape[1]] = b
        for i, (a, b) in enumerate(self.foreign):
            a_stk[i][SLOT_OF[33], 0, :4] = a
            b_stk[i][SLOT_OF[33], 0, :, :4] = b
        return a_stk, b_stk


@pytest.mark.parametrize("case", list(CASES))
def test_tunevec_mixtures_match_vllm_reference_ops_on_folded_weights(case: str) -> None:
    gen = torch.Generator().manual_seed(11)
    mixtures = Mixtures(gen)
    unscaled = mixtures.slot_weights(scaled=False)
    folded = mixtures.slot_weights(scaled=True)
    ids = CASES[case]
    x = torch.randn(len(ids), IN, generator=gen)
    y = torch.randn(len(ids), sum(QKV), generator=gen)
    want = reference_linear(y, x, *folded, torch.tensor([SLOT_OF[i] for i in ids]), QKV)

    mixtures.modules[MODULE].lora_a_stacked = unscaled[0]
    wrapper = wrapper_for(ids, SLOT_IDS, mixtures.state, mixtures.modules)
    got = y.clone()
    wrapper.add_lora_linear(got, x, *unscaled, 1.0, QKV)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[torch.tensor(ids) == 0], y[torch.tensor(ids) == 0])
    both = {11, 22} <= set(ids)
    assert bool(wrapper._plan.shared) == both, "two tunevec mixtures in a step must share the stack"


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16], ids=["lora-fp32", "lora-bf16"])
def test_a_mixture_alone_and_beside_another_gives_the_same_rows(lora_dtype) -> None:
    """The shared stack and the slot hold the same numbers: in float32 activations, with LoRA weights in any
    dtype, a request's rows agree to float32 rounding whether its mixture runs alone or shares the step. (Before,
    a bfloat16 LoRA dtype under a float32 engine found no stack in the activation dtype and dropped the delta.)"""
    gen = torch.Generator().manual_seed(3)
    mixtures = Mixtures(gen, lora_dtype)
    a_stk, b_stk = mixtures.slot_weights(scaled=False)
    a_stk = tuple(t.to(lora_dtype) for t in a_stk)
    b_stk = tuple(t.to(lora_dtype) for t in b_stk)
    mixtures.modules[MODULE].lora_a_stacked = a_stk
    x = torch.randn(6, IN, generator=gen)
    y = torch.randn(6, sum(QKV), generator=gen)
    alone = y[:3].clone()
    wrapper_for([11] * 3, SLOT_IDS, mixtures.state, mixtures.modules).add_lora_linear(
        alone, x[:3], a_stk, b_stk, 1.0, QKV
    )
    together = y.clone()
    shared = wrapper_for([11] * 3 + [22] * 3, SLOT_IDS, mixtures.state, mixtures.modules)
    assert shared._plan.shared
    shared.add_lora_linear(together, x, a_stk, b_stk, 1.0, QKV)
    moved = (alone - y[:3]).abs().max()
    assert moved > 0.1
    torch.testing.assert_close(together[:3], alone, rtol=1e-5, atol=1e-5)


def test_coefficients_stay_exact_in_a_bfloat16_step() -> None:
    """alpha is applied in float32: 0.8 stays 0.8 (rounded to bfloat16 it would be 0.80078)."""
    gen = torch.Generator().manual_seed(5)
    mixtures = Mixtures(gen, torch.bfloat16)
    exact = torch.tensor(0.8, dtype=torch.float32).item()
    assert torch.tensor(0.8, dtype=torch.bfloat16).item() != exact
    coef = mixtures.state.layout(11, MODULE, 3).coef
    assert coef.dtype == torch.float32 and exact in coef.tolist()
    mixtures.state.stack(MODULE, ("math", "medical"), sum(QKV), torch.bfloat16)
    table = mixtures.state.table(MODULE, ("math", "medical"), (11, 22), torch.bfloat16)
    assert table.dtype == torch.float32 and exact in table[1].tolist()


def test_compositions_are_bounded_by_what_vllm_holds() -> None:
    gen = torch.Generator().manual_seed(6)
    mixtures = Mixtures(gen)
    spec = Spec.parse("math:0.5")
    mixed = compose_mixture(spec, mixtures.state.adapters(spec.vectors), max_rank=MAX_RANK, fold=False)
    for lora_id in range(100, 400):  # vLLM keeps two adapters: every earlier composition is forgotten
        mixtures.state.record(lora_id, mixed.composition, keep={lora_id - 1})
    assert mixtures.state.held() == 2


def test_logits_rows_are_routed_only_from_what_is_known() -> None:
    class State:
        logits_rows = None

    state = State()
    sampled = torch.tensor([0, -1, 2])
    assert route_logits_rows(state, sampled, 3) == [0, -1, 2]
    assert route_logits_rows(state, sampled, 5) is None  # never guessed from counts
    state.logits_rows = torch.tensor([2, 2, 2, 2, 2])
    assert route_logits_rows(state, sampled, 5) == [2] * 5
    assert route_logits_rows(state, sampled, 3) is None  # prompt rows of another length: not attributable
    state.logits_rows = "unrouted"
    assert route_logits_rows(state, sampled, 3) is None  # inside a prompt-logprob call: counts prove nothing
