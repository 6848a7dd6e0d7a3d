"""Throughputs the cost estimates divide work by, per device kind: measured, with where and when.

Each rate is a kind of work per second (``analysis/estimate.py`` counts the work from the shapes and settings):

  io          bytes of checkpoint and vector tensors read and moved to the compute device
  extract     bytes of both checkpoints through ``tunevec extract`` (read, subtract, hash, write)
  hash        bytes of a vector checked against its manifest on first open
  load        bytes of a checkpoint loaded as a float32 model by transformers
  svd         flops of randomized SVDs (Halko et al.; sketch, power iterations, QR)
  svd_full    flops of exact SVDs (LAPACK / cuSOLVER, 4mn² + 22n³ with vectors, 4mn² − 4n³/3 values only)
  matmul      flops of the other dense products of the weights walk (projections on W's subspaces, τ − BA)
  forward     flops of float32 model passes (2 · parameters · tokens, plus attention and the LM head)
  forward_tf32  the same with ``tunevec attribute --tf32`` (CUDA only)
  stats       fp64 flops of the probe's per-layer statistics (Gram matrices, eigendecompositions)

``cpu`` rates were fitted by ``bench/bench_scaling.py`` on random SmolLM2-135M, SmolLM2-360M and Llama-3.2-1B
shaped pairs (docs/scaling.md) with ``CPU_THREADS`` torch thread; a process with more threads gets its compute
rates scaled by its thread count (a rough rule: matrix work scales with cores, reading does not). ``cuda`` rates come from
``bench/device_check.sh`` on one H200 (a 7B-shaped pair). An estimate is a guide to within a factor of about two,
not a promise; docs/scaling.md compares estimates with measured runs.
"""

from __future__ import annotations

CPU_THREADS = 1
CPU_MEASURED = "2026-12-04, 2-core AMD EPYC (AVX512-BF16), one thread, shared with other jobs (load 2-5)"
CUDA_MEASURED = "2026-12-04, one NVIDIA H200 (torch 2.11, transformers 5.17)"

RATES: dict[str, dict[str, float]] = {
    "cpu": {  # bench/bench_scaling.py --threads 1, 2026-12-04 (docs/scaling.md): 1 / slope of seconds vs work
        "io": 1.06e9,
        "extract": 0.31e9,
        "hash": 0.94e9,
        "load": 1.6e9,
        "svd": 83e9,
        "svd_full": 49e9,
        "matmul": 31e9,
        "forward": 96e9,
        "forward_tf32": 96e9,  # --tf32 is refused on a CPU; the entry keeps the table uniform
        "stats": 41e9,
    },
    "cuda": {  # the llama7b run of bench/device_check.sh (docs/scaling.md); svd_full was not measured there
        "io": 9.0e9,
        "extract": 1.4e9,
        "hash": 1.0e9,
        "load": 3.7e9,
        "svd": 4.8e12,
        "svd_full": 0.5e12,
        "matmul": 11e12,
        "forward": 43e12,
        "forward_tf32": 180e12,
        "stats": 6.2e12,
    },
}
# Kinds of work that do not speed up with more CPU threads.
IO_KINDS = ("io", "extract", "hash", "load")

# Anonymous memory of the process itself, beside the tensors a stage holds: torch and transformers imported and a
# tokenizer loaded (0.36 GiB measured after the imports; with rounding up for what loading a model adds), and on
# CUDA the host side of the driver's context.
HOST_BASELINE = {"cpu": 512 * 2**20, "cuda": 1536 * 2**20}
