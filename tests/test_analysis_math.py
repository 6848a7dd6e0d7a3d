"""Known-answer tests of analysis/ math on small tensors (no model, no files)."""

from __future__ import annotations

import math

import pytest
import torch

from tunevec.analysis import (
    SimilarityAccumulator,
    alignment_summary,
    allocate_ranks,
    amplification_split,
    change_dimensions,
    cosine,
    effective_rank,
    energy_at_ranks,
    factorise,
    linear_cka,
    principal_angles,
    principal_directions,
    randomized_svd,
    rank_for_energy,
    sign_agreement,
    singular_values,
    stable_rank,
    subspace_share,
)
from tunevec.analysis.similarity import pair_sums
from tunevec.core.errors import TunevecError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q


def matrix_with_spectrum(s: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthonormal U (m×r), V (n×r); fp64 so the spectrum is exact to ~1e-15."""
    g = gen(seed)
    return orthonormal(m, s.numel(), g) * s.double() @ orthonormal(n, s.numel(), g).mT


# ---------------------------------------------------------------- decompose: spectra and ranks


def test_singular_values_match_known_spectrum_full_and_randomized() -> None:
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    tau = matrix_with_spectrum(s, 40, 30).float()
    full = singular_values(tau)
    assert full.shape == (30,) and full.dtype == torch.float32
    torch.testing.assert_close(full[:5], s, rtol=1e-5, atol=1e-5)
    assert full[5:].abs().max() < 1e-5
    torch.testing.assert_close(singular_values(tau, method="randomized", rank=3), s[:3], rtol=1e-5, atol=1e-5)


def test_singular_values_upcast_bf16_and_reject_vectors() -> None:
    tau = torch.randn(6, 4, generator=gen()).bfloat16()
    assert singular_values(tau).dtype == torch.float32
    with pytest.raises(TunevecError, match="2-D"):
        singular_values(torch.ones(5))
    with pytest.raises(TunevecError, match="rank="):
        singular_values(tau, method="randomized")


def test_effective_rank_is_count_for_flat_spectrum_and_one_for_single_direction() -> None:
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, exp(H) = 2^1.5
    assert effective_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(2**1.5)
    assert effective_rank(torch.zeros(4)) == 0.0


def test_stable_rank_is_frobenius_over_spectral_norm_squared() -> None:
    assert stable_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(6 / 4)
    assert stable_rank(torch.ones(5)) == pytest.approx(5.0)
    assert stable_rank(torch.zeros(3)) == 0.0


def test_energy_at_ranks_and_rank_for_energy_on_known_spectrum() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0])  # energies 9, 4, 1, 1, 1 of 16
    assert energy_at_ranks(s, [0, 1, 2, 5, 9]) == pytest.approx([0.0, 9 / 16, 13 / 16, 1.0, 1.0])
    assert rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 13 / 16) == 2
    assert rank_for_energy(s, 0.9) == 4
    assert rank_for_energy(s, 1.0) == 5
    assert rank_for_energy(torch.zeros(3), 0.9) == 0


def test_truncated_spectrum_shares_use_the_given_total_energy() -> None:
    s = torch.tensor([3.0, 2.0])  # top 2 of the spectrum above; total energy 16
    assert energy_at_ranks(s, [1, 2], total_energy=16.0) == pytest.approx([9 / 16, 13 / 16])
    assert rank_for_energy(s, 0.8, total_energy=16.0) == 2
    with pytest.raises(TunevecError, match="compute more"):
        rank_for_energy(s, 0.9, total_energy=16.0)


def test_randomized_svd_is_deterministic_for_a_seed_and_leaves_global_rng_alone() -> None:
    tau = torch.randn(60, 50, generator=gen(1))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    u1, s1, v1 = randomized_svd(tau, 5, seed=7, n_iter=0, oversample=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    u2, s2, v2 = randomized_svd(tau, 5, seed=7, n_iter=0, oversample=0)
    assert torch.equal(u1, u2) and torch.equal(s1, s2) and torch.equal(v1, v2)
    # Without power iterations a flat random spectrum is only approximated, so another seed gives other values.
    _, s3, _ = randomized_svd(tau, 5, seed=8, n_iter=0, oversample=0)
    assert not torch.equal(s1, s3)
    assert u1.shape == (60, 5) and s1.shape == (5,) and v1.shape == (50, 5)


# ---------------------------------------------------------------- decompose: factorisation


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_rank_r_tau_is_recovered_exactly_at_rank_r(method: str) -> None:
    s = torch.tensor([5.0, 3.0, 2.0, 0.7])
    tau = matrix_with_spectrum(s, 48, 36, seed=3).float()
    low = factorise(tau, rank=4, method=method)
    assert low.rank == 4 and low.B.shape == (48, 4) and low.A.shape == (4, 36)
    assert low.rel_error < 1e-5
    assert low.energy == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(low.dense(), tau, atol=1e-5, rtol=0)


def test_factorise_splits_scale_evenly_between_b_and_a() -> None:
    tau = matrix_with_spectrum(torch.tensor([9.0, 4.0]), 20, 10).float()
    low = factorise(tau, rank=2, method="full")
    # B = U √S and A = √S Vᵀ: column norms of B equal row norms of A, both √σ.
    torch.testing.assert_close(low.B.norm(dim=0), torch.tensor([3.0, 2.0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low.A.norm(dim=1), torch.tensor([3.0, 2.0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_factorise_by_energy_picks_smallest_rank_reaching_target(method: str) -> None:
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.25])  # energies 16, 9, 4, 1, .25, .0625 of 30.3125
    tau = matrix_with_spectrum(s, 50, 40, seed=5).float()
    low = factorise(tau, energy=0.9, method=method, max_rank=6)
    assert low.rank == 3  # 29/30.31 = 0.957 ≥ 0.9 > 25/30.31 = 0.825
    assert low.energy == pytest.approx(29 / 30.3125, abs=1e-5)
    assert low.rel_error == pytest.approx(math.sqrt(1 - 29 / 30.3125), abs=1e-4)


def test_factorise_randomized_sketch_too_small_reports_energy_reached() -> None:
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.25])
    tau = matrix_with_spectrum(s, 50, 40, seed=5).float()
    low = factorise(tau, energy=0.99, method="randomized", max_rank=2)
    assert low.rank == 2
    assert low.energy == pytest.approx(25 / 30.3125, abs=1e-5)


def test_factorise_rejects_both_or_neither_target() -> None:
    tau = torch.randn(5, 4, generator=gen())
    with pytest.raises(TunevecError, match="exactly one"):
        factorise(tau)
    with pytest.raises(TunevecError, match="exactly one"):
        factorise(tau, rank=1, energy=0.5)


def test_factorise_zero_tau_gives_rank_zero_and_no_error() -> None:
    low = factorise(torch.zeros(6, 4), energy=0.9, method="full")
    assert low.rank == 0 and low.rel_error == 0.0 and low.B.shape == (6, 0) and low.A.shape == (0, 4)


def test_allocate_ranks_buys_largest_energy_per_parameter_within_budget() -> None:
    spectra = {"big": torch.tensor([10.0, 1.0, 0.5]), "small": torch.tensor([4.0, 3.0, 0.0])}
    shapes = {"big": (30, 20), "small": (5, 5)}  # unit cost 50 and 10
    # energy per param: big 100/50=2, 1/50=.02, .25/50=.005; small 16/10=1.6, 9/10=.9, 0 (never bought)
    assert allocate_ranks(spectra, shapes, param_budget=70) == {"big": 1, "small": 2}
    # After big's first unit (50) and small's two (20), 9 left: nothing more fits.
    assert allocate_ranks(spectra, shapes, param_budget=79) == {"big": 1, "small": 2}
    # Budget 40: big's first unit does not fit, so the greedy skips it and buys what fits.
    assert allocate_ranks(spectra, shapes, param_budget=40) == {"big": 0, "small": 2}
    assert allocate_ranks(spectra, shapes, param_budget=10_000) == {"big": 3, "small": 2}
    assert allocate_ranks(spectra, shapes, param_budget=0) == {"big": 0, "small": 0}


def test_allocate_ranks_prefers_energy_per_parameter_over_raw_energy() -> None:
    # big's σ² = 100 costs 50 params (2/param); small's 81 and 64 cost 10 each (8.1 and 6.4/param).
    spectra = {"big": torch.tensor([10.0]), "small": torch.tensor([9.0, 8.0])}
    shapes = {"big": (25, 25), "small": (5, 5)}
    # 50 params: two small units capture 145, the single big unit only 100.
    assert allocate_ranks(spectra, shapes, param_budget=50) == {"big": 0, "small": 2}


def test_allocate_ranks_spends_within_budget_and_ranks_are_spectrum_prefixes() -> None:
    g = gen(4)
    shapes = {f"m{i}": (int(torch.randint(4, 40, (1,), generator=g)), 16) for i in range(6)}
    spectra = {
        name: torch.sort(torch.rand(min(shape), generator=g), descending=True).values
        for name, shape in shapes.items()
    }
    budget = 500
    ranks = allocate_ranks(spectra, shapes, param_budget=budget)
    spent = sum(r * sum(shapes[name]) for name, r in ranks.items())
    assert 0 < spent <= budget
    assert all(0 <= r <= min(shapes[name]) for name, r in ranks.items())
    # Nothing left over would buy another unit of any module.
    left = budget - spent
    assert all(ranks[n] == min(shapes[n]) or sum(shapes[n]) > left for n in shapes)


# ---------------------------------------------------------------- alignment


def base_weight(m: int = 40, n: int = 30, seed: int = 0) -> torch.Tensor:
    s = torch.linspace(10.0, 0.5, min(m, n))
    return matrix_with_spectrum(s, m, n, seed=seed).float()


def test_tau_inside_top_subspace_scores_as_amplification() -> None:
    W = base_weight()
    U, S, V = principal_directions(W, 5)
    gains = torch.tensor([0.5, -0.2, 0.3, 0.1, 0.05])
    tau = U * (gains * S) @ V.mT  # σ_i → σ_i (1 + gain_i) along W's own (u_i, v_i)
    split = amplification_split(tau, W, 5)
    assert split["amplification_share"] == pytest.approx(1.0, abs=1e-5)
    assert split["new_share"] == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(split["rel_sigma_change"].float(), gains, atol=1e-5, rtol=1e-5)
    shares = subspace_share(tau, U, V)
    assert shares["two_sided_share"] == pytest.approx(1.0, abs=1e-5)
    assert shares["two_sided_ratio"] == pytest.approx(40 * 30 / 25, rel=1e-4)


def test_tau_orthogonal_to_top_subspaces_scores_as_new_directions() -> None:
    W = base_weight()
    U_full, _, Vh_full = torch.linalg.svd(W)
    k = 5
    g = gen(2)
    # A random matrix living only in the complements of W's top-5 left and right subspaces.
    tau = U_full[:, k:] @ torch.randn(40 - k, 30 - k, generator=g) @ Vh_full[k:]
    split = amplification_split(tau, W, k)
    assert split["new_share"] == pytest.approx(1.0, abs=1e-5)
    assert split["amplification_share"] + split["rotation_share"] + split["mixed_share"] < 1e-5
    shares = subspace_share(tau, U_full[:, :k], Vh_full[:k].mT)
    assert shares["left_share"] < 1e-5 and shares["right_share"] < 1e-5


def test_tau_within_subspace_coupling_other_directions_scores_as_rotation() -> None:
    W = base_weight()
    U, S, V = principal_directions(W, 4)
    mix = torch.tensor([[0.0, 1.0, 0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 2.0], [0, 0, 0.5, 0]])
    split = amplification_split(U @ mix @ V.mT, W, 4)
    assert split["rotation_share"] == pytest.approx(1.0, abs=1e-5)
    assert split["amplification_share"] == pytest.approx(0.0, abs=1e-6)


def test_tau_one_sided_in_subspace_scores_as_mixed() -> None:
    W = base_weight()
    U_full, _, Vh_full = torch.linalg.svd(W)
    tau = U_full[:, :3] @ torch.randn(3, 30 - 3, generator=gen(3)) @ Vh_full[3:]  # old outputs, new inputs
    split = amplification_split(tau, W, 3)
    assert split["mixed_share"] == pytest.approx(1.0, abs=1e-5)


def test_random_tau_lands_near_random_subspace_baselines() -> None:
    m, n, k = 120, 90, 12
    W = base_weight(m, n, seed=1)
    tau = torch.randn(m, n, generator=gen(9))
    summary = alignment_summary(tau, W, k)
    for side in ("left", "right", "two_sided"):
        assert 0.75 < summary[f"{side}_ratio"] < 1.25, (side, summary[f"{side}_ratio"])
    for part in ("rotation", "mixed", "new"):
        assert summary[f"{part}_share"] == pytest.approx(summary[f"{part}_baseline"], rel=0.25), part
    # The diagonal part is a sum of only k squared entries; its baseline k/(mn) is tiny, check the scale.
    assert summary["amplification_share"] < 5 * summary["amplification_baseline"]


def test_energy_split_shares_sum_to_one() -> None:
    W = base_weight(50, 35, seed=2)
    # A mixture of every kind of component plus noise.
    U, S, V = principal_directions(W, 6)
    tau = U * S @ V.mT * 0.1 + 0.3 * torch.randn(50, 35, generator=gen(5))
    split = amplification_split(tau, W, 6)
    total = sum(split[f"{p}_share"] for p in ("amplification", "rotation", "mixed", "new"))
    assert total == pytest.approx(1.0, abs=1e-6)
    assert all(split[f"{p}_share"] >= 0 for p in ("amplification", "rotation", "mixed", "new"))
    baselines = sum(split[f"{p}_baseline"] for p in ("amplification", "rotation", "mixed", "new"))
    assert baselines == pytest.approx(1.0)


def test_default_k_is_rank_for_90_percent_of_w_energy_capped() -> None:
    s = torch.tensor([10.0, 5.0, 1.0] + [0.1] * 37)  # 90% of energy at k=2
    W = matrix_with_spectrum(s, 60, 40).float()
    U, S, V = principal_directions(W)
    assert U.shape == (60, 2) and V.shape == (40, 2)
    U, _, _ = principal_directions(W, energy=0.999)
    assert U.shape[1] == 40 // 4  # the cap min(m, n) // 4
    U, _, _ = principal_directions(W, energy=0.9, method="randomized")
    assert U.shape[1] == 2


def test_alignment_summary_is_flat_and_reports_relative_sigma_change() -> None:
    W = base_weight()
    U, S, V = principal_directions(W, 3)
    tau = 0.1 * U * S @ V.mT  # every top-3 σ grows by 10%
    summary = alignment_summary(tau, W, 3)
    assert all(isinstance(v, (int, float)) for v in summary.values())
    assert summary["k"] == 3
    assert summary["mean_rel_sigma_change"] == pytest.approx(0.1, abs=1e-5)
    assert summary["mean_abs_rel_sigma_change"] == pytest.approx(0.1, abs=1e-5)
    assert summary["amplification_share"] == pytest.approx(1.0, abs=1e-5)
    expected_rel_norm = 0.1 * S.norm() / W.norm()
    assert summary["tau_rel_norm"] == pytest.approx(float(expected_rel_norm), rel=1e-5)


def test_zero_tau_alignment_shares_are_nan() -> None:
    summary = alignment_summary(torch.zeros(40, 30), base_weight(), 3)
    assert math.isnan(summary["left_share"]) and math.isnan(summary["new_share"])


def test_alignment_rejects_mismatched_shapes() -> None:
    with pytest.raises(TunevecError, match="same shape"):
        alignment_summary(torch.zeros(30, 40), base_weight(), 3)


# ---------------------------------------------------------------- representation


def test_linear_cka_is_one_for_rotated_scaled_shifted_copies() -> None:
    g = gen(11)
    X = torch.randn(200, 16, generator=g, dtype=torch.float64)
    Q = orthonormal(16, 16, g)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, 3.0 * X @ Q + 5.0) == pytest.approx(1.0, abs=1e-12)
    # The n ≤ d branch (Gram matrices over inputs) gives the same invariance.
    Xw = torch.randn(10, 30, generator=g, dtype=torch.float64)
    assert linear_cka(Xw, -0.5 * Xw @ orthonormal(30, 30, g)) == pytest.approx(1.0, abs=1e-12)


def test_linear_cka_both_branches_agree_and_stay_low_for_independent_features() -> None:
    g = gen(12)
    X, Y = torch.randn(500, 20, generator=g), torch.randn(500, 20, generator=g)
    value = linear_cka(X, Y)
    assert value < 0.1  # chance level ≈ d/n = 0.04
    # Same pair through the n × n branch: pad the features wide enough to switch branch.
    Xp = torch.cat([X, torch.zeros(500, 600)], dim=1)
    assert linear_cka(Xp, torch.cat([Y, torch.zeros(500, 600)], dim=1)) == pytest.approx(value, rel=1e-9)
    # Not invariant to anisotropic scaling: stretching one feature lowers CKA.
    Z = X.clone()
    Z[:, 0] *= 20
    assert linear_cka(X, Z) < 0.9


def test_principal_angles_zero_for_same_subspace_and_ninety_for_orthogonal() -> None:
    g = gen(13)
    basis = orthonormal(12, 12, g).float()
    coeff = torch.randn(300, 3, generator=g) * torch.tensor([5.0, 3.0, 2.0])
    X = coeff @ basis[:, :3].mT
    Y = torch.randn(250, 3, generator=g) * torch.tensor([4.0, 2.5, 1.5]) @ basis[:, :3].mT + 7.0
    same = principal_angles(X, Y, 3)
    assert same.degrees.max() < 1e-3
    Z = coeff @ basis[:, 3:6].mT
    orth = principal_angles(X, Z, 3)
    torch.testing.assert_close(orth.degrees, torch.full((3,), 90.0, dtype=torch.float64), atol=1e-4, rtol=0)


def test_principal_angles_known_angle_between_planes() -> None:
    e = torch.eye(3, dtype=torch.float64)
    theta = math.radians(30)
    g = gen(14)
    X = torch.randn(400, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0]) @ e[:2]
    tilted = torch.stack([e[0], math.cos(theta) * e[1] + math.sin(theta) * e[2]])
    Y = torch.randn(400, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0]) @ tilted
    angles = principal_angles(X, Y, 2).degrees
    torch.testing.assert_close(angles, torch.tensor([0.0, 30.0], dtype=torch.float64), atol=1e-4, rtol=0)


def test_change_dimensions_counts_directions_of_the_hidden_state_change() -> None:
    g = gen(15)
    H = torch.randn(400, 32, generator=g)
    basis = orthonormal(32, 2, g).float()
    # The change lives in 2 directions with variance 9:1.
    delta = torch.randn(400, 2, generator=g) * torch.tensor([3.0, 1.0]) @ basis.mT
    out = change_dimensions(H, H + delta, energy=0.8)
    assert out["dims_for_energy"] == 1
    assert change_dimensions(H, H + delta, energy=0.99)["dims_for_energy"] == 2
    assert out["top1_share"] == pytest.approx(0.9, abs=0.03)
    assert out["top5_share"] == pytest.approx(1.0, abs=1e-9)
    assert out["rel_change"] == pytest.approx(float(delta.norm() / H.norm()), rel=1e-6)
    assert out["mean_shift_share"] < 0.02


def test_change_dimensions_separates_a_constant_offset() -> None:
    H = torch.randn(100, 8, generator=gen(16))
    out = change_dimensions(H, H + torch.ones(8))
    assert out["mean_shift_share"] == pytest.approx(1.0, abs=1e-9)
    assert out["dims_for_energy"] == 0 and math.isnan(out["top1_share"])


# ---------------------------------------------------------------- similarity


def test_cosine_known_values() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert cosine(a, 2 * a) == pytest.approx(1.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(a, torch.tensor([[0.0, 1.0], [0.0, 0.0]])) == pytest.approx(0.0)
    assert cosine(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(cosine(torch.zeros(3), torch.ones(3)))


def test_sign_agreement_zeros_abstain_or_disagree() -> None:
    a = torch.tensor([1.0, -2.0, 3.0, 0.0, 5.0, -1.0])
    b = torch.tensor([2.0, -1.0, -1.0, 4.0, 0.0, -3.0])
    # Both non-zero at 0, 1, 2, 5; agree at 0, 1, 5.
    assert sign_agreement(a, b) == pytest.approx(3 / 4)
    assert sign_agreement(a, b, zeros="disagree") == pytest.approx(3 / 6)
    mask = torch.tensor([True, False, True, True, True, False])
    assert sign_agreement(a, b, mask=mask) == pytest.approx(1 / 2)
    assert math.isnan(sign_agreement(torch.zeros(3), torch.ones(3)))


def test_sign_agreement_is_half_for_independent_signs() -> None:
    g = gen(17)
    assert sign_agreement(
        torch.randn(20_000, generator=g), torch.randn(20_000, generator=g)
    ) == pytest.approx(0.5, abs=0.02)


def test_accumulator_overall_cosine_equals_cosine_of_concatenation() -> None:
    g = gen(18)
    pairs = {
        f"t{i}": (torch.randn(5 + i, 7, generator=g), torch.randn(5 + i, 7, generator=g)) for i in range(4)
    }
    # Make one module strongly aligned so the overall value is not near 0 by chance.
    pairs["t0"] = (pairs["t0"][0] * 10, pairs["t0"][0] * 10 + 0.1 * pairs["t0"][1])
    acc = SimilarityAccumulator()
    for name, (a, b) in pairs.items():
        module = acc.add(name, a, b)
        assert module["cosine"] == pytest.approx(cosine(a, b))
    flat_a = torch.cat([a.flatten() for a, _ in pairs.values()])
    flat_b = torch.cat([b.flatten() for _, b in pairs.values()])
    overall = acc.overall()
    assert overall["cosine"] == pytest.approx(cosine(flat_a, flat_b), rel=1e-9)
    assert overall["sign_agreement"] == pytest.approx(sign_agreement(flat_a, flat_b), rel=1e-12)
    assert overall["numel"] == flat_a.numel()
    assert overall["cosine"] > 0.5
    assert set(acc.per_module()) == set(pairs)
    grouped = acc.grouped(lambda name: "first" if name == "t0" else "rest")
    assert grouped["first"]["cosine"] == pytest.approx(cosine(*pairs["t0"]))
    with pytest.raises(TunevecError, match="already added"):
        acc.add("t0", *pairs["t0"])


def test_pair_sums_chunking_matches_direct_fp64_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    import tunevec.analysis.similarity as similarity

    g = gen(19)
    a, b = torch.randn(1000, generator=g).bfloat16(), torch.randn(1000, generator=g)
    direct = pair_sums(a, b)
    monkeypatch.setattr(similarity, "_CHUNK", 64)  # many chunks, with a ragged last one
    chunked = pair_sums(a, b)
    assert chunked.count == direct.count == 1000
    assert chunked.dot == pytest.approx(float(a.double() @ b.double()), rel=1e-12)
    assert chunked.agree == direct.agree and chunked.both_nonzero == direct.both_nonzero
