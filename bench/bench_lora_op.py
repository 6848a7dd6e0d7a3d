"""The LoRA op alone, in plain torch: one decoder layer's linears with and without a mixture, grouped op vs vLLM's.

    .venv/bin/python bench/bench_lora_op.py [--dtype float32|bfloat16] [--threads 1] [--rank 32]

SmolLM2-135M's shapes (hidden 576, 9 query / 3 KV heads of 64, MLP 1536): qkv (three slices), o, gate_up (two
slices), down. The base is each linear as vLLM's CPU backend runs it (oneDNN with prepacked weights where
available, else ``F.linear``). Cells:

  base / base again   the layer's four linears (the second is the A/A control)
  grouped             + ``PunicaWrapperGrouped.add_lora_linear`` for one mixture of two vectors (rank ``--rank``/2
                        each) on every token: the slot holds the factors unscaled, alpha applied in float32
  grouped, 8 slots    + eight unrelated adapters (rank ``--rank``), tokens spread over them request by request
                        (decode: one each)
  8 mixtures          + eight mixtures of the same two vectors (different alphas), served from one shared stack
                        (``MixtureState``), tokens spread as above
  vllm torch ops      + vLLM's ``PunicaWrapperCPU.add_lora_linear`` (max rank 64) for one rank-``--rank`` adapter

Token counts: 8 (decode steps of 8 requests) and 256 / 960 (prefill chunks). Every cell is timed in every round,
order rotated; the reported time is the median over rounds of the best of ``--reps`` calls. Ratios are base time /
cell time (1.0 = free).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from vllm.lora.layers import LoRAMapping
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from tunevec.steering.lora import LoraAdapter
from tunevec.steering.spec import Spec
from tunevec.steering.vllm.compose import compose_mixture
from tunevec.steering.vllm.punica import PunicaWrapperGrouped
from tunevec.steering.vllm.state import MixtureState, Target

HIDDEN, HEAD, QH, KVH, INTER = 576, 64, 9, 3, 1536
# (name, input size, output slices)
MODULES = [
    ("qkv", HIDDEN, (QH * HEAD, KVH * HEAD, KVH * HEAD)),
    ("o", QH * HEAD, (HIDDEN,)),
    ("gate_up", HIDDEN, (INTER, INTER)),
    ("down", INTER, (HIDDEN,)),
]
MAX_LORAS, MAX_RANK = 8, 64


def base_linear(weight: torch.Tensor):  # noqa: ANN201
    """The base GEMM as vLLM's CPU backend runs it (vllm/model_executor/layers/utils.py)."""
    try:
        from vllm import _custom_ops as ops

        if ops._supports_onednn:
            handler = ops.create_onednn_mm(weight.t(), 32)
            return lambda x: ops.onednn_mm(handler, x, None)
    except Exception:
        pass
    return lambda x: torch.nn.functional.linear(x, weight)


def layer(dtype: torch.dtype, rank: int, gen: torch.Generator):  # noqa: ANN201
    mods = []
    for name, fan_in, slices in MODULES:
        w = torch.randn(sum(slices), fan_in, generator=gen, dtype=torch.float32).to(dtype) * 0.02
        a_stk = tuple(torch.zeros(MAX_LORAS, 1, MAX_RANK, fan_in, dtype=dtype) for _ in slices)
        b_stk = tuple(torch.zeros(MAX_LORAS, 1, out, MAX_RANK, dtype=dtype) for out in slices)
        for slot in range(MAX_LORAS):
            for i, out in enumerate(slices):
                a_stk[i][slot, 0, :rank] = torch.randn(rank, fan_in, generator=gen).to(dtype) * 0.02
                b_stk[i][slot, 0, :, :rank] = torch.randn(out, rank, generator=gen).to(dtype) * 0.02
        mods.append((name, fan_in, slices, base_linear(w), a_stk, b_stk))
    return mods


# The checkpoint tensors behind each module's slices (what a vector's factors are keyed by).
TENSORS = {
    "qkv": ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight"),
    "o": ("model.layers.0.self_attn.o_proj.weight",),
    "gate_up": ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    "down": ("model.layers.0.mlp.down_proj.weight",),
}  # fmt: skip


class TwoVectorMixtures:
    """Two resident vectors over every module; lora id k holds the mixture ``medical:a_k + math:1-a_k``: its slot
    holds the two vectors' factors unscaled (vLLM's layout), its coefficients are the worker state's."""

    def __init__(self, mods, rank: int, dtype: torch.dtype, gen: torch.Generator):
        half = rank // 2
        targets: dict[str, Target] = {}
        factors: dict[str, dict] = {"medical": {}, "math": {}}
        for name, fan_in, slices, *_ in mods:
            row = 0
            for i, (tensor, out) in enumerate(zip(TENSORS[name], slices, strict=True)):
                targets[tensor] = Target(name, i, row, out)
                row += out
                for vector in factors:
                    b = torch.randn(out, half, generator=gen) * 0.02
                    factors[vector][tensor] = (b, torch.randn(half, fan_in, generator=gen) * 0.02)
        self.state = MixtureState({}, dtype, resident={v: LoraAdapter(f) for v, f in factors.items()})
        self.state.bind_modules(targets.get, shared_stacks=True)
        self.slots: dict[str, tuple[tuple, tuple]] = {}
        for name, fan_in, slices, *_ in mods:
            a_stk = tuple(torch.zeros(MAX_LORAS, 1, MAX_RANK, fan_in, dtype=dtype) for _ in slices)
            b_stk = tuple(torch.zeros(MAX_LORAS, 1, out, MAX_RANK, dtype=dtype) for out in slices)
            self.slots[name] = (a_stk, b_stk)
        for lora_id in range(1, MAX_LORAS + 1):
            spec = Spec.parse(f"medical:{0.1 * lora_id:.1f}+math:{1 - 0.1 * lora_id:.1f}")
            mixed = compose_mixture(spec, self.state.adapters(spec.vectors), max_rank=MAX_RANK, fold=False)
            self.state.record(lora_id, mixed.composition, keep=set(range(1, MAX_LORAS + 1)))
            for name, *_ in mods:
                for i, tensor in enumerate(TENSORS[name]):
                    b, a = mixed.factors[tensor]
                    self.slots[name][0][i][lora_id - 1, 0, : a.shape[0]] = a
                    self.slots[name][1][i][lora_id - 1, 0, :, : b.shape[1]] = b

    def layers(self) -> dict:
        return {name: type("Layer", (), {"lora_a_stacked": a}) for name, (a, _) in self.slots.items()}


def mapping(n: int, slots: int, decode: bool) -> tuple[tuple[int, ...], list[int]]:
    """Token lora ids: one adapter (id 1) for every token, or ``slots`` adapters request by request."""
    ids = list(range(1, slots + 1))
    if slots == 1:
        return (1,) * n, ids
    if decode:
        return tuple(ids[i % slots] for i in range(n)), ids
    per = n // slots
    return tuple(ids[min(i // per, slots - 1)] for i in range(n)), ids


def run_cell(mods, xs, wrapper, weights=None) -> None:  # noqa: ANN001
    for (name, _, slices, lin, a_stk, b_stk), x in zip(mods, xs, strict=True):
        y = lin(x)
        if wrapper is not None:
            a, b = (a_stk, b_stk) if weights is None else weights[name]
            wrapper.add_lora_linear(y, x, a, b, 1.0, slices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--rank", type=int, default=32, help="adapter rank per module (a two-vector rank-16 mixture: 32)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    mods = layer(dtype, args.rank, gen)
    shared = TwoVectorMixtures(mods, args.rank, dtype, gen)
    print(
        f"== bench_lora_op: SmolLM2 layer linears, {args.dtype}, {args.threads} thread(s), adapter rank {args.rank} =="
    )
    for n in (8, 256, 960):
        decode = n == 8
        xs = [torch.randn(n, fan_in, generator=gen).to(dtype) for _, fan_in, _, _, _, _ in mods]
        cells = {"base": (None, None), "base again (A/A)": (None, None)}
        for label, slots, cls in (("grouped", 1, PunicaWrapperGrouped), ("grouped, 8 slots", 8, PunicaWrapperGrouped),
                                  ("8 mixtures", 8, PunicaWrapperGrouped),
                                  ("vllm torch ops", 1, PunicaWrapperCPU)):  # fmt: skip
            wrapper = cls(4096, 256, "cpu")
            mixtures = label in ("grouped", "8 mixtures")
            if mixtures:
                wrapper.bind(shared.state, shared.layers())
            token_ids, slot_ids = mapping(n, slots, decode)
            wrapper.update_metadata(
                LoRAMapping(token_ids, token_ids, is_prefill=True), slot_ids, MAX_LORAS + 1, 100
            )
            cells[label] = (wrapper, shared.slots if mixtures else None)
        times = {k: [] for k in cells}
        names = list(cells)
        for rnd in range(args.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                run_cell(mods, xs, *cells[name])  # warm (packs built on first use)
                best = float("inf")
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    run_cell(mods, xs, *cells[name])
                    best = min(best, time.perf_counter() - t0)
                times[name].append(best)
        base = statistics.median(times["base"])
        print(f"\n{n} tokens ({'decode, 8 requests' if decode else 'prefill'}):")
        for name in names:
            t = statistics.median(times[name])
            print(f"  {name:<18} {t * 1e3:8.3f} ms   base/cell {base / t:.3f}")


if __name__ == "__main__":
    main()
