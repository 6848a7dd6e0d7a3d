"""Merge methods on small tensors, their registry, and delta_for applying a spec per checkpoint tensor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunevec.core.errors import TunevecError
from tunevec.steering.delta import delta_for
from tunevec.steering.merge import dare_generator, merge_dare, merge_linear, merge_ties, trim
from tunevec.steering.spec import Spec

UP0 = "model.layers.0.mlp.up_proj.weight"
Q3 = "model.layers.3.self_attn.q_proj.weight"


def _taus(k: int, shape=(8, 16), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(k)]


def test_linear_merge_equals_weighted_sum():
    taus = _taus(3)
    alphas = [0.8, -0.4, 1.5]
    expected = 0.8 * taus[0] - 0.4 * taus[1] + 1.5 * taus[2]
    torch.testing.assert_close(merge_linear(taus, alphas), expected)


def test_merges_compute_in_float32_from_low_precision_inputs():
    taus = [t.to(torch.bfloat16) for t in _taus(2)]
    out = merge_linear(taus, [0.5, 0.25])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, 0.5 * taus[0].float() + 0.25 * taus[1].float())
    assert merge_ties(taus, [1, 1], 0.5).dtype == torch.float32
    assert merge_dare(taus, [1, 1], 0.5, dare_generator(0, "x")).dtype == torch.float32


def test_trim_keeps_top_density_magnitudes_and_breaks_ties_by_position():
    tau = torch.tensor([0.5, -3.0, 1.0, 2.0])
    assert trim(tau, 0.5).tolist() == [0.0, -3.0, 0.0, 2.0]
    assert trim(torch.tensor([1.0, -1.0, 1.0, -1.0]), 0.5).tolist() == [1.0, -1.0, 0.0, 0.0]
    assert trim(tau, 0.01).tolist() == [0.0, -3.0, 0.0, 0.0]  # at least one entry survives
    assert trim(tau, 1.0).tolist() == tau.tolist()


def test_ties_on_a_hand_computed_example():
    taus = [
        torch.tensor([3.0, -2.0, 1.0, 0.5]),
        torch.tensor([-1.0, -4.0, 2.0, 0.1]),
        torch.tensor([2.0, 1.0, -3.0, 0.2]),
    ]
    # trim to top 2:   [3, -2, 0, 0], [0, -4, 2, 0], [2, 0, -3, 0]
    # times α:         [3, -2, 0, 0], [0, -2, 1, 0], [2, 0, -3, 0]
    # summed mass:     [5, -4, -2, 0]  -> elected signs [+, -, -, +]
    # agreeing means:  (3+2)/2, (-2-2)/2, -3/1, nothing agrees -> 0
    out = merge_ties(taus, [1.0, 0.5, 1.0], density=0.5)
    assert out.tolist() == [2.5, -2.0, -3.0, 0.0]


def test_ties_keeps_alpha_as_a_strength_and_negative_alpha_subtracts():
    tau = torch.tensor([3.0, -2.0, 1.0, 0.5])
    assert merge_ties([tau], [0.5], 0.5).tolist() == [1.5, -1.0, 0.0, 0.0]
    assert merge_ties([tau], [-1.0], 0.5).tolist() == [-3.0, 2.0, 0.0, 0.0]


def test_ties_with_unit_alphas_and_full_density_is_the_disjoint_mean():
    a, b = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, -1.0, -3.0])
    assert merge_ties([a, b], [1, 1], 1.0).tolist() == [2.0, 2.0, -2.0]


def test_dare_expectation_matches_linear():
    taus = _taus(2, shape=(64,))
    alphas = [0.7, -0.3]
    draws = torch.stack([merge_dare(taus, alphas, 0.3, dare_generator(seed, "t")) for seed in range(4000)])
    # Per entry, the mean of 4000 draws has standard error below 0.03 for these magnitudes.
    torch.testing.assert_close(draws.mean(dim=0), merge_linear(taus, alphas), atol=0.15, rtol=0)


def test_dare_keeps_about_density_of_entries_and_rescales_them():
    tau = torch.ones(100_000)
    out = merge_dare([tau], [1.0], 0.3, dare_generator(7, "t"))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.3))


def test_dare_with_full_density_equals_linear():
    taus = _taus(2)
    torch.testing.assert_close(
        merge_dare(taus, [1, 2], 1.0, dare_generator(0, "t")), merge_linear(taus, [1, 2])
    )


def test_dare_mask_is_determined_by_seed_and_tensor_name():
    taus = _taus(2)

    def run(seed: int, name: str) -> torch.Tensor:
        return merge_dare(taus, [1, 1], 0.5, dare_generator(seed, name))

    assert torch.equal(run(7, UP0), run(7, UP0))
    assert not torch.equal(run(7, UP0), run(8, UP0))
    assert not torch.equal(run(7, UP0), run(7, Q3))


def test_dare_deltas_do_not_depend_on_streaming_order():
    spec = Spec.parse("dare(density=0.5;seed=3)/medical+math:0.5")
    inputs = {
        UP0: dict(zip(("medical", "math"), _taus(2, seed=1), strict=True)),
        Q3: dict(zip(("medical", "math"), _taus(2, seed=2), strict=True)),
    }
    forward = {name: delta_for(spec, name, inputs[name]) for name in (UP0, Q3)}
    backward = {name: delta_for(spec, name, inputs[name]) for name in (Q3, UP0)}
    for name in inputs:
        assert torch.equal(forward[name], backward[name])


def test_dare_deltas_are_bit_identical_in_another_process():
    code = (
        "import torch, sys\n"
        "from tunevec.steering.delta import delta_for\n"
        "from tunevec.steering.spec import Spec\n"
        "g = torch.Generator().manual_seed(1)\n"
        "taus = {'medical': torch.randn(8, 16, generator=g), 'math': torch.randn(8, 16, generator=g)}\n"
        f"d = delta_for(Spec.parse('dare(density=0.5;seed=3)/medical+math:0.5'), {UP0!r}, taus)\n"
        "sys.stdout.write(d.numpy().tobytes().hex())\n"
    )
    here_g = torch.Generator().manual_seed(1)
    taus = {"medical": torch.randn(8, 16, generator=here_g), "math": torch.randn(8, 16, generator=here_g)}
    here = delta_for(Spec.parse("dare(density=0.5;seed=3)/medical+math:0.5"), UP0, taus)
    there = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    ).stdout
    assert there == here.numpy().tobytes().hex()


@pytest.mark.parametrize("merge", [merge_linear, lambda t, a: merge_ties(t, a, 0.5)])
def test_merges_reject_mismatched_inputs(merge):
    with pytest.raises(TunevecError, match="share one shape"):
        merge([torch.zeros(2, 3), torch.zeros(3, 2)], [1, 1])
    with pytest.raises(TunevecError, match="2 tensors but 1 coefficients"):
        merge([torch.zeros(2), torch.zeros(2)], [1])
    with pytest.raises(TunevecError, match="at least one"):
        merge([], [])


# --- delta_for ------------------------------------------------------------------------------------------------


def test_delta_for_linear_spec_is_the_weighted_sum():
    medical, math = _taus(2)
    delta = delta_for(Spec.parse("medical:0.8+math:-0.4"), UP0, {"medical": medical, "math": math})
    torch.testing.assert_close(delta, 0.8 * medical - 0.4 * math)


def test_delta_for_skips_components_whose_scope_excludes_the_tensor():
    medical, math = _taus(2)
    spec = Spec.parse("medical@mlp[0:2]:0.5+math@attention")
    taus = {"medical": medical, "math": math}
    torch.testing.assert_close(delta_for(spec, UP0, taus), 0.5 * medical)
    torch.testing.assert_close(delta_for(spec, Q3, taus), math)
    assert delta_for(spec, "model.layers.5.mlp.up_proj.weight", taus) is None
    assert delta_for(spec, "model.embed_tokens.weight", taus) is None


def test_delta_for_same_vector_with_disjoint_scopes_uses_each_scopes_alpha():
    (tau,) = _taus(1)
    spec = Spec.parse("medical@mlp:2+medical@attention:-1")
    torch.testing.assert_close(delta_for(spec, UP0, {"medical": tau}), 2 * tau)
    torch.testing.assert_close(delta_for(spec, Q3, {"medical": tau}), -tau)


def test_delta_for_treats_a_missing_vector_as_zero():
    (medical,) = _taus(1)
    spec = Spec.parse("medical:0.5+math")
    torch.testing.assert_close(delta_for(spec, UP0, {"medical": medical}), 0.5 * medical)
    assert delta_for(spec, UP0, {}) is None


def test_delta_for_ties_merges_only_the_components_that_apply():
    medical, math = _taus(2)
    spec = Spec.parse("ties(density=0.3)/medical@mlp:0.8+math:0.4")
    taus = {"medical": medical, "math": math}
    # Canonical order is math, medical; the merge follows it.
    torch.testing.assert_close(delta_for(spec, UP0, taus), merge_ties([math, medical], [0.4, 0.8], 0.3))
    torch.testing.assert_close(delta_for(spec, Q3, taus), merge_ties([math], [0.4], 0.3))


# --- the registry (issue 13 point 4) -----------------------------------------------------------------------------


def test_one_registry_record_holds_each_methods_name_parameters_and_function():
    from tunevec.steering.merge import METHODS

    assert list(METHODS) == ["linear", "ties", "dare"]
    assert [(p.name, p.type, p.default) for p in METHODS["dare"].params] == [
        ("density", float, 0.5),
        ("seed", int, 0),
    ]
    taus = _taus(2)
    torch.testing.assert_close(
        METHODS["ties"].merge(taus, [1.0, 0.5], {"density": 0.3}, UP0), merge_ties(taus, [1.0, 0.5], 0.3)
    )
    torch.testing.assert_close(
        METHODS["dare"].merge(taus, [1.0, 0.5], {"density": 0.3, "seed": 4}, UP0),
        merge_dare(taus, [1.0, 0.5], 0.3, dare_generator(4, UP0)),
    )


def test_parameters_are_checked_by_type_and_range_from_the_record():
    from tunevec.steering.merge import DENSITY, SEED

    assert DENSITY.requirement == "density must be a number in (0, 1] (the fraction of each vector kept)"
    assert SEED.requirement.startswith("seed must be an integer in [0, 2^63)")
    assert [DENSITY.accepts(v) for v in (1, 1.0, 0.5, 1e-9)] == [True] * 4
    for bad in (0, 0.0, 1.5, -0.1, float("nan"), float("inf"), True, "0.5", None, 10**400):
        assert not DENSITY.accepts(bad), bad
    assert [SEED.accepts(v) for v in (0, 7, 2**63 - 1)] == [True] * 3
    for bad in (-1, 2**63, 1.0, True, "7", 10**5000):
        assert not SEED.accepts(bad), bad
    assert DENSITY.convert(1) == 1.0 and isinstance(DENSITY.convert(1), float)


def test_delta_for_dispatches_through_the_registry(monkeypatch):
    from tunevec.steering import merge

    seen = {}

    def fake(taus, alphas, params, tensor):
        seen.update(params=params, tensor=tensor, alphas=list(alphas))
        return torch.zeros(1)

    record = merge.METHODS["ties"]
    monkeypatch.setitem(merge.METHODS, "ties", type(record)(record.name, record.params, fake, record.doc))
    delta_for(Spec.parse("ties(density=0.25)/medical:0.5"), UP0, {"medical": torch.ones(2)})
    assert seen == {"params": {"density": 0.25}, "tensor": UP0, "alphas": [0.5]}


def test_parsing_a_spec_does_not_import_torch():
    code = (
        "import sys\n"
        "import tunevec.steering.spec as s\n"
        "s.Spec.parse('dare(density=0.3;seed=7)/medical@mlp[0:4]:0.5+math').validate(['medical', 'math'])\n"
        "s.Spec.from_json({'method': 'ties', 'components': [{'vector': 'medical'}]})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
