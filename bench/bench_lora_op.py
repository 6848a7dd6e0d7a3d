"""The LoRA op alone, in plain torch: one decoder layer's linears with and without a mixture, grouped op vs vLLM's.

    .venv/bin/python bench/bench_lora_op.py [--dtype float32|bfloat16] [--threads 1] [--rank 32]

SmolLM2-135M's shapes (hidden 576, 9 query / 3 KV heads of 64, MLP 1536): qkv (three slices), o, gate_up (two
slices), down. The base is each linear as vLLM's CPU backend runs it (oneDNN with prepacked weights where
available, else ``F.linear``). Cells:

  base / base again   the layer's four linears (the second is the A/A control)
  grouped             + ``PunicaWrapperGrouped.add_lora_linear`` for one rank-``--rank`` adapter on every token
  grouped, 8 slots    + eight unrelated adapters, tokens spread over them request by request (decode: one each)
  8 mixtures          + eight mixtures of the same two vectors (rank ``--rank``/2 each, different alphas), served
                        from the shared factors (``FactoredAdapters``), tokens spread as above
  vllm torch ops      + vLLM's ``PunicaWrapperCPU.add_lora_linear`` (max rank 64) for the same single adapter

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

from tunevec.steering.punica_grouped import PunicaWrapperGrouped

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


class TwoVectorMixtures:
    """FactoredAdapters over two shared vectors per module; slot k's mixture is alpha_k1 V1 + alpha_k2 V2."""

    def __init__(self, mods, rank: int, dtype: torch.dtype, gen: torch.Generator):
        from tunevec.steering.punica_grouped import _Pack

        self.stacks, self.coefs = {}, {}
        half = rank // 2
        for name, fan_in, slices, _, _a_stk, _b_stk in mods:
            a_blocks, cols, col = [], [], 0
            b_all = torch.zeros(sum(slices), 2 * half * len(slices), dtype=dtype)
            for v in range(2):
                row = 0
                for out in slices:
                    a_blocks.append(torch.randn(half, fan_in, generator=gen).to(dtype) * 0.02)
                    b_all[row : row + out, col : col + half] = (
                        torch.randn(out, half, generator=gen).to(dtype) * 0.02
                    )
                    cols.append((v, col, col + half))
                    col += half
                    row += out
            self.stacks[name] = _Pack(torch.cat(a_blocks), b_all)
            for lora_id in range(1, MAX_LORAS + 1):
                coef = torch.zeros(col, dtype=dtype)
                for v, c0, c1 in cols:
                    coef[c0:c1] = 0.1 * lora_id if v == 0 else 1 - 0.1 * lora_id
                self.coefs[(lora_id, name)] = coef

    def stack(self, module, dtype):
        return self.stacks[module]

    def coefficients(self, lora_id, module, dtype):
        return self.coefs.get((lora_id, module))


def mapping(n: int, slots: int, decode: bool) -> tuple[tuple[int, ...], list[int]]:
    """Token lora ids: one adapter (id 1) for every token, or ``slots`` adapters request by request."""
    ids = list(range(1, slots + 1))
    if slots == 1:
        return (1,) * n, ids
    if decode:
        return tuple(ids[i % slots] for i in range(n)), ids
    per = n // slots
    return tuple(ids[min(i // per, slots - 1)] for i in range(n)), ids


def run_cell(mods, xs, wrapper) -> None:  # noqa: ANN001
    for (_, _, slices, lin, a_stk, b_stk), x in zip(mods, xs, strict=True):
        y = lin(x)
        if wrapper is not None:
            wrapper.add_lora_linear(y, x, a_stk, b_stk, 1.0, slices)


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
        cells = {"base": None, "base again (A/A)": None}
        for label, slots, cls in (("grouped", 1, PunicaWrapperGrouped), ("grouped, 8 slots", 8, PunicaWrapperGrouped),
                                  ("8 mixtures", 8, PunicaWrapperGrouped),
                                  ("vllm torch ops", 1, PunicaWrapperCPU)):  # fmt: skip
            wrapper = cls(4096, 256, "cpu")
            token_ids, slot_ids = mapping(n, slots, decode)
            wrapper.update_metadata(
                LoRAMapping(token_ids, token_ids, is_prefill=True), slot_ids, MAX_LORAS + 1, 100
            )
            if label == "8 mixtures":
                layers = {name: type("Layer", (), {"lora_a_stacked": a}) for name, _, _, _, a, _ in mods}
                wrapper.bind(layers, shared)
            cells[label] = wrapper
        times = {k: [] for k in cells}
        names = list(cells)
        for rnd in range(args.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                run_cell(mods, xs, cells[name])  # warm (packs built on first use)
                best = float("inf")
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    run_cell(mods, xs, cells[name])
                    best = min(best, time.perf_counter() - t0)
                times[name].append(best)
        base = statistics.median(times["base"])
        print(f"\n{n} tokens ({'decode, 8 requests' if decode else 'prefill'}):")
        for name in names:
            t = statistics.median(times[name])
            print(f"  {name:<18} {t * 1e3:8.3f} ms   base/cell {base / t:.3f}")


if __name__ == "__main__":
    main()
