"""The grouped LoRA op against vLLM's reference torch ops, on random adapters in vLLM's stacked layout.

Every case mixes tokens of several slots with tokens that use no adapter (id 0), pads each slot's weights to the
maximum rank with zeros at its own real rank (some slices rank 0), and compares ``add_lora_linear`` /
``add_lora_embedding`` with ``vllm.lora.ops.torch_ops`` applied to the adapter tokens only.
"""

from __future__ import annotations

import random

import pytest
import torch
from vllm.lora.layers import LoRAMapping
from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_expand_slice, bgmv_shrink

from tunevec.steering.punica_grouped import STACKED_MAX_TOKENS, PunicaWrapperGrouped, plan_runs

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
        buf = torch.zeros(rows.numel(), MAX_RANK)
        bgmv_shrink(x[rows], a_stk[i], buf, idx, 1.0)
        bgmv_expand_slice(buf, b_stk[i], sub, idx, offset, size, True)
        offset += size
    out[rows] = sub
    return out


def wrapper_for(token_ids: list[int], lora_index_to_id: list[int | None]) -> PunicaWrapperGrouped:
    wrapper = PunicaWrapperGrouped(256, 32, "cpu")
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


class SharedFactors:
    """A FactoredAdapters provider: two shared factor sets, each slot's adapter alpha1 * F1 + alpha2 * F2."""

    def __init__(self, slices, gen, alphas: dict[int, tuple[float, float] | None]):
        self.slices = slices
        self.alphas = (
            alphas  # lora id -> (alpha1, alpha2), None: not factored (its slot keeps its own weights)
        )
        self.factors = [
            [(torch.randn(r, IN, generator=gen), torch.randn(out, r, generator=gen)) for out in slices]
            for r in (3, 5)
        ]
        blocks, self.columns, col = [], [], 0
        for v, per_slice in enumerate(self.factors):
            row = 0
            for i, (a, b) in enumerate(per_slice):
                blocks.append((row, a, b))
                self.columns.append((v, col, col + a.shape[0]))
                col += a.shape[0]
                row += slices[i]
        b_all = torch.zeros(sum(slices), col)
        for (row, _a, b), (_, c0, c1) in zip(blocks, self.columns, strict=True):
            b_all[row : row + b.shape[0], c0:c1] = b
        from tunevec.steering.punica_grouped import _Pack

        self._stack = _Pack(torch.cat([a for _, a, _ in blocks]), b_all)
        self.calls = 0

    def stack(self, module, dtype):
        self.calls += 1
        return self._stack

    def coefficients(self, lora_id, module, dtype):
        pair = self.alphas.get(lora_id)
        if pair is None:
            return None
        coef = torch.zeros(self._stack.rank)
        for v, c0, c1 in self.columns:
            coef[c0:c1] = pair[v]
        return coef

    def slot_weights(self, slot_of: dict[int, int], own: dict[int, tuple]):
        """vLLM's stacked layout holding each slot's composed adapter (what vLLM would have copied in)."""
        a_stk = tuple(torch.zeros(MAX_LORAS, 1, MAX_RANK, IN) for _ in self.slices)
        b_stk = tuple(torch.zeros(MAX_LORAS, 1, out, MAX_RANK) for out in self.slices)
        for lora_id, slot in slot_of.items():
            pair = self.alphas.get(lora_id)
            for i in range(len(self.slices)):
                if pair is None:
                    a, b = own[lora_id][i]
                else:
                    a = torch.cat([self.factors[v][i][0] for v in (0, 1)])
                    b = torch.cat([pair[v] * self.factors[v][i][1] for v in (0, 1)], dim=1)
                a_stk[i][slot, 0, : a.shape[0]] = a
                b_stk[i][slot, 0, :, : b.shape[1]] = b
        return a_stk, b_stk


@pytest.mark.parametrize(
    "case", ["prefill, several requests and base tokens", "decode, interleaved adapters"]
)
@pytest.mark.parametrize("slices", [QKV, (48,)], ids=["qkv", "single"])
def test_factored_slots_served_from_shared_factors_match_vllm_reference_ops(case, slices):
    gen = torch.Generator().manual_seed(5)
    # Ids 11 and 22 are mixtures of the shared factors (one scoped out of factor 2); 33 is an ordinary adapter.
    shared = SharedFactors(slices, gen, {11: (0.8, 0.4), 22: (-1.5, 0.0), 33: None})
    own = {33: [(torch.randn(4, IN, generator=gen), torch.randn(out, 4, generator=gen)) for out in slices]}
    a_stk, b_stk = shared.slot_weights({11: 0, 22: 2, 33: 3}, own)
    ids = CASES[case]
    x = torch.randn(len(ids), IN, generator=gen)
    y = torch.randn(len(ids), sum(slices), generator=gen)
    want = reference_linear(y, x, a_stk, b_stk, torch.tensor([SLOT_OF[i] for i in ids]), slices)

    wrapper = wrapper_for(ids, SLOT_IDS)

    class Layer:
        lora_a_stacked = a_stk

    wrapper.bind({"model.layers.0.self_attn.qkv_proj": Layer}, shared)
    got = y.clone()
    wrapper.add_lora_linear(got, x, a_stk, b_stk, 1.0, slices)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert shared.calls > 0  # the two mixtures were served from the shared factors, not from their slots
