"""Invariants of `mmalign.losses.cs_divergence` and an independent reference."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from mmalign.losses import cs_divergence


def _sets(n: int = 12, m: int = 9, d: int = 4, shift: float = 0.7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) + shift
    return x, y


def _rotation(d: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def _reference(x: list[list[float]], y: list[list[float]], sigma: float | None = None) -> float:
    """Float64 double loops over explicit kernel sums; σ by an exact weighted median with fractions."""
    pooled = [(p, Fraction(1, 2 * len(x))) for p in x] + [(p, Fraction(1, 2 * len(y))) for p in y]

    def dist(a: list[float], b: list[float]) -> float:
        return math.sqrt(sum((ai - bi) ** 2 for ai, bi in zip(a, b)))

    if sigma is None:
        pairs = sorted((dist(a, b), wa * wb) for a, wa in pooled for b, wb in pooled)
        total = Fraction(0)
        for d, w in pairs:
            total += w
            if total >= Fraction(1, 2):
                sigma = d
                break

    def mean_kernel(a_set: list[list[float]], b_set: list[list[float]]) -> float:
        s = 0.0
        for a in a_set:
            for b in b_set:
                s += math.exp(-(dist(a, b) ** 2) / (2 * sigma**2))
        return s / (len(a_set) * len(b_set))

    return -math.log(mean_kernel(x, y) ** 2 / (mean_kernel(x, x) * mean_kernel(y, y)))


@pytest.mark.parametrize("bandwidth", [None, 0.8])
@pytest.mark.parametrize("sizes", [(5, 7), (6, 6), (1, 4)])
def test_matches_independent_reference(bandwidth, sizes):
    x, y = _sets(*sizes, d=3, seed=sum(sizes))
    expected = _reference(x.tolist(), y.tolist(), bandwidth)
    assert cs_divergence(x, y, bandwidth).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_median_bandwidth_is_the_plain_pooled_median_when_sets_have_equal_size():
    x, y = _sets(8, 8, seed=3)
    pooled = torch.cat([x, y])
    sigma = torch.cdist(pooled, pooled).reshape(-1).median().item()  # torch's median is the lower median
    assert cs_divergence(x, y).item() == pytest.approx(cs_divergence(x, y, bandwidth=sigma).item(), rel=1e-10)


def test_zero_for_identical_sets():
    x, _ = _sets()
    assert abs(cs_divergence(x, x.clone()).item()) < 1e-6
    assert abs(cs_divergence(x.float(), x.float().clone(), bandwidth=0.3).item()) < 1e-6


def test_symmetric_and_non_negative_with_unequal_sizes():
    for seed in range(5):
        x, y = _sets(n=7 + seed, m=15 - seed, shift=0.1 * seed, seed=seed)
        d_xy, d_yx = cs_divergence(x, y), cs_divergence(y, x)
        assert d_xy.item() == pytest.approx(d_yx.item(), rel=1e-10, abs=1e-14)
        assert d_xy.item() >= 0.0
        assert cs_divergence(x, y, bandwidth=0.5).item() >= 0.0


@pytest.mark.parametrize("bandwidth", [None, 1.3])
def test_duplicating_a_set_leaves_it_unchanged(bandwidth):
    x, y = _sets(n=6, m=11)
    base = cs_divergence(x, y, bandwidth).item()
    assert cs_divergence(torch.cat([x, x]), y, bandwidth).item() == pytest.approx(base, rel=1e-10)
    assert cs_divergence(torch.cat([x, x]), torch.cat([y, y, y]), bandwidth).item() == pytest.approx(base, rel=1e-10)


@pytest.mark.parametrize("bandwidth", [None, 1.3])
def test_common_rotation_and_translation_leave_it_unchanged(bandwidth):
    x, y = _sets(d=5)
    q = _rotation(5)
    t = torch.tensor([3.0, -1.0, 0.5, 10.0, -7.0], dtype=torch.float64)
    moved = cs_divergence(x @ q.T + t, y @ q.T + t, bandwidth).item()
    assert moved == pytest.approx(cs_divergence(x, y, bandwidth).item(), rel=1e-8)


def test_global_scale_invariance_holds_with_median_bandwidth_only():
    x, y = _sets()
    base = cs_divergence(x, y).item()
    for scale in (0.01, 3.0, 250.0):
        assert cs_divergence(scale * x, scale * y).item() == pytest.approx(base, rel=1e-8)
    # The pitfall the median heuristic removes: with a fixed σ, scaling the embeddings up raises D.
    fixed = [cs_divergence(scale * x, scale * y, bandwidth=1.0).item() for scale in (1.0, 3.0, 10.0)]
    assert fixed[0] < fixed[1] < fixed[2]
    assert fixed[2] > 2 * base


@pytest.mark.parametrize("bandwidth", [None, 1.0])
def test_grows_as_the_sets_separate(bandwidth):
    x, y = _sets(shift=0.0)
    direction = torch.zeros(x.shape[1], dtype=torch.float64)
    direction[0] = 1.0
    values = [cs_divergence(x, y + s * direction, bandwidth).item() for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_vanishes_as_bandwidth_grows():
    x, y = _sets(shift=2.0)
    values = [cs_divergence(x, y, bandwidth=s).item() for s in (1.0, 10.0, 100.0, 1e4)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clusters_far_apart_give_finite_value_and_gradients(dtype):
    g = torch.Generator().manual_seed(4)
    x = (0.01 * torch.randn(10, 3, generator=g)).to(dtype).requires_grad_(True)
    y = (0.01 * torch.randn(8, 3, generator=g) + torch.tensor([100.0, 0.0, 0.0])).to(dtype).requires_grad_(True)
    # σ = 1 puts the clusters 100σ apart: every cross kernel is exp(−5000), 0 in floating point.
    for bandwidth in (1.0, None):
        d = cs_divergence(x, y, bandwidth)
        (gx, gy) = torch.autograd.grad(d, (x, y))
        assert torch.isfinite(d) and d.item() > 0
        assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    assert cs_divergence(x, y, 1.0).item() == pytest.approx(100.0**2, rel=1e-3)  # −2 log mean κ(x, y) ≈ d²/σ²


def test_permutations_do_not_change_it():
    x, y = _sets()
    base = cs_divergence(x, y).item()
    g = torch.Generator().manual_seed(5)
    px, py = torch.randperm(x.shape[0], generator=g), torch.randperm(y.shape[0], generator=g)
    assert cs_divergence(x[px], y).item() == pytest.approx(base, rel=1e-10)
    assert cs_divergence(x, y[py]).item() == pytest.approx(base, rel=1e-10)
    assert cs_divergence(x[px], y[py], bandwidth=0.9).item() == pytest.approx(
        cs_divergence(x, y, bandwidth=0.9).item(), rel=1e-10
    )


@pytest.mark.parametrize("bandwidth", [None, 1.0])
def test_a_gradient_step_on_minus_d_increases_d(bandwidth):
    x, y = _sets(shift=0.2)
    x, y = x.float().requires_grad_(True), y.float().requires_grad_(True)
    before = cs_divergence(x, y, bandwidth)
    (-before).backward()
    with torch.no_grad():
        after = cs_divergence(x - 0.1 * x.grad, y - 0.1 * y.grad, bandwidth)
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    assert after.item() > before.item()


def test_half_precision_inputs_are_computed_in_float32():
    x, y = _sets(shift=0.5)
    half = cs_divergence(x.bfloat16().requires_grad_(True), y.bfloat16())
    assert half.dtype == torch.float32
    reference = cs_divergence(x.bfloat16().double(), y.bfloat16().double()).item()  # the same rounded inputs
    assert half.item() == pytest.approx(reference, rel=1e-4)


def test_collapsed_embeddings_give_zero_and_finite_gradients():
    x = torch.ones(4, 3, requires_grad=True)
    y = torch.ones(5, 3, requires_grad=True)
    d = cs_divergence(x, y)
    d.backward()
    assert d.item() == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


def test_rejects_bad_shapes_and_bandwidths():
    x, y = _sets()
    with pytest.raises(ValueError, match="expected x"):
        cs_divergence(x, y[:, :2])
    with pytest.raises(ValueError, match="expected x"):
        cs_divergence(x[0], y)
    with pytest.raises(ValueError, match="non-empty"):
        cs_divergence(x[:0], y)
    with pytest.raises(ValueError, match="bandwidth"):
        cs_divergence(x, y, bandwidth=0.0)
