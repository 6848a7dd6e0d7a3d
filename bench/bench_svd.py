"""Randomized vs full SVD on tuning-vector-sized matrices: time, speed-up and energy captured.

    .venv/bin/python bench/bench_svd.py            # 4096×11008 and 4096×4096 (a few minutes on 2 CPU cores)
    .venv/bin/python bench/bench_svd.py --quick    # 1024×2752 and 1024×1024
    .venv/bin/python bench/bench_svd.py --device cuda

Test matrices (``make_delta``): τ = c · (U_r diag(s) V_rᵀ + N), a rank-r signal with a power-law spectrum
s_i = i^(−α) (i = 1..r; U_r, V_r orthonormal, from QR of Gaussians) plus i.i.d. Gaussian full-rank noise N scaled
so it holds ``noise_share`` of ‖τ‖_F² (defaults r = 256, α = 0.5, noise 10%: a few strong directions, a slowly
decaying head and a noise floor, as fine-tuning deltas show). c sets entries to ~1e-3 (irrelevant to the ratios).

Rows, all from one run per shape:
  rank 64   — torch.linalg.svd (all triplets) vs analysis.randomized_svd(τ, 64). Energy: ‖U Uᵀ τ‖_F² of the
              randomized factors relative to the optimum Σ_{i≤64} σ_i² (Eckart–Young).
  energy E  — the smallest rank holding E of ‖τ‖_F²: full SVD (same timing; picking r is a cumsum) vs
              analysis.factorise(τ, energy=E, method="randomized", max_rank) end to end (sketch of max_rank
              triplets, choice of r, factors and the residual ‖τ − BA‖_F — the full row does not pay for the
              residual, so this ratio is conservative). Energy relative to the optimum at the rank it chose.
Randomized times are the median of ``--repeats`` runs; the full SVD runs once per shape (it dominates).
Targets: speed-up ≥ 20×, energy ≥ 99.5% of optimal.

The last line scales the rank-64 rows to a whole 7B-shaped delta (32 layers × q, k, v, o of 4096×4096 and gate,
up, down of 11008×4096 / 4096×11008: 128 + 96 = 224 matrices): an estimate from the measured per-matrix times,
printed as such, to set beside the anchor figures in the issue (full ≈ 245 s on one H200, ≈ 1,190 s on 16 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from tunevec.core.linalg import factorise, randomized_svd, rank_for_energy  # noqa: E402

SPEEDUP_TARGET = 20.0
ENERGY_TARGET = 0.995


def make_delta(
    m: int,
    n: int,
    *,
    signal_rank: int = 256,
    alpha: float = 0.5,
    noise_share: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
) -> torch.Tensor:
    """τ = c · (U_r diag(i^(−α)) V_rᵀ + N), N Gaussian holding ``noise_share`` of the energy (fp32, m × n)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = min(signal_rank, m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, device=device)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, device=device)).Q
    s = torch.arange(1, r + 1, device=device, dtype=torch.float32) ** (-alpha)
    signal = (u * s) @ v.mT
    noise = torch.randn(m, n, generator=g, device=device)
    # ‖N‖² / (‖S‖² + ‖N‖²) = noise_share; the cross term ⟨S, N⟩ is ~0 for independent Gaussian N.
    noise *= (noise_share / (1 - noise_share) * float((s**2).sum()) / float((noise**2).sum())) ** 0.5
    tau = signal + noise
    return tau * (1e-3 / float(tau.pow(2).mean().sqrt()))


def _timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _median_time(fn: Callable[[], object], device: str, repeats: int) -> tuple[float, object]:
    runs = [_timed(fn, device) for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def _captured(tau: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> float:
    """‖τ‖² − ‖τ − U diag(S) Vᵀ‖²: the energy a rank-r factorisation captures, measured, not assumed."""
    total = float(torch.linalg.vector_norm(tau, dtype=torch.float64) ** 2)
    resid = float(torch.linalg.vector_norm(tau - (u * s) @ v.mT, dtype=torch.float64) ** 2)
    return total - resid


def bench_shape(
    m: int, n: int, *, rank: int, energy: float, max_rank: int, device: str, repeats: int, gen_kw: dict
) -> list[dict]:
    tau = make_delta(m, n, device=device, **gen_kw)
    total = float(torch.linalg.vector_norm(tau, dtype=torch.float64) ** 2)
    t_full, (_, sigma, _) = _timed(lambda: torch.linalg.svd(tau, full_matrices=False), device)
    optimal = torch.cumsum(sigma.double() ** 2, 0)

    t_rand, (u, s, v) = _median_time(lambda: randomized_svd(tau, rank), device, repeats)
    rows = [
        {
            "shape": f"{m}x{n}",
            "what": f"rank {rank}",
            "full_s": t_full,
            "rand_s": t_rand,
            "ranks": f"{rank} / {rank}",
            "energy_opt": float(optimal[rank - 1]) / total,
            "energy_rand": _captured(tau, u, s, v) / total,
            "ratio": _captured(tau, u, s, v) / float(optimal[rank - 1]),
        }
    ]

    r_full = rank_for_energy(sigma, energy, total_energy=total)
    t_fact, low = _median_time(
        lambda: factorise(tau, energy=energy, method="randomized", max_rank=max_rank), device, repeats
    )
    rand_energy = 1.0 - low.rel_error**2  # measured residual, not the sketch's Σ S²
    rows.append(
        {
            "shape": f"{m}x{n}",
            "what": f"energy {energy:.2f}",
            "full_s": t_full,
            "rand_s": t_fact,
            "ranks": f"{r_full} / {low.rank}",
            "energy_opt": float(optimal[r_full - 1]) / total,
            "energy_rand": rand_energy,
            "ratio": rand_energy / (float(optimal[low.rank - 1]) / total),
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="1024×2752 and 1024×1024 instead of 4096×11008, 4096×4096"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--energy", type=float, default=0.8, help="energy target for the energy-chosen rank row")
    p.add_argument("--max-rank", type=int, default=256, help="randomized sketch size for the energy row")
    p.add_argument("--repeats", type=int, default=3, help="randomized runs per row (median reported)")
    p.add_argument("--signal-rank", type=int, default=256)
    p.add_argument("--alpha", type=float, default=0.5, help="signal spectrum s_i = i^-alpha")
    p.add_argument("--noise-share", type=float, default=0.1, help="share of ‖τ‖² in full-rank noise")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch")

    shapes = [(1024, 2752), (1024, 1024)] if args.quick else [(4096, 11008), (4096, 4096)]
    gen_kw = {"signal_rank": args.signal_rank, "alpha": args.alpha, "noise_share": args.noise_share}
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, device {args.device}, {threads} threads; τ = rank-{args.signal_rank} "
        f"signal s_i = i^-{args.alpha} + {args.noise_share:.0%} Gaussian noise (fp32); randomized: oversample 10, "
        f"4 power iterations, median of {args.repeats}"
    )
    # First calls pay one-off start-up (thread pools, LAPACK / cuSOLVER handles): not SVD time, keep it out.
    warm = torch.randn(256, 512, device=args.device)
    torch.linalg.svd(warm, full_matrices=False)
    randomized_svd(warm, 16)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    header = (
        f"{'shape':<11} {'row':<12} {'full SVD':>9} {'randomized':>11} {'speed-up':>9} {'rank full/rand':>15} "
        f"{'E optimal':>10} {'E rand':>8} {'rand/opt':>9}  verdict"
    )
    print(header)
    print("-" * len(header))
    ok = True
    rank_rows = {}
    for m, n in shapes:
        rows = bench_shape(
            m,
            n,
            rank=args.rank,
            energy=args.energy,
            max_rank=args.max_rank,
            device=args.device,
            repeats=args.repeats,
            gen_kw=gen_kw,
        )
        rank_rows[(m, n)] = rows[0]
        for row in rows:
            speedup = row["full_s"] / row["rand_s"]
            good = speedup >= SPEEDUP_TARGET and row["ratio"] >= ENERGY_TARGET
            ok &= good
            print(
                f"{row['shape']:<11} {row['what']:<12} {row['full_s']:>8.2f}s {row['rand_s']:>10.3f}s "
                f"{speedup:>8.1f}x {row['ranks']:>15} {row['energy_opt']:>10.4f} {row['energy_rand']:>8.4f} "
                f"{row['ratio']:>8.3%}  {'ok' if good else 'MISS'}"
            )
    if not args.quick:
        counts = {(4096, 11008): 96, (4096, 4096): 128}  # 7B: 3 MLP and 4 attention matrices × 32 layers
        full = sum(rank_rows[s]["full_s"] * c for s, c in counts.items())
        rand = sum(rank_rows[s]["rand_s"] * c for s, c in counts.items())
        print(
            f"7B-shaped delta (224 matrices), estimated from the rows above: full SVD {full:.0f}s, "
            f"rank-{args.rank} randomized {rand:.1f}s ({full / rand:.0f}x)"
        )
    print(f"targets: speed-up >= {SPEEDUP_TARGET:.0f}x and rand/opt energy >= {ENERGY_TARGET:.1%}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
