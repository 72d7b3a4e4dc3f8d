"""ReNoise inversion invariants (as SmPO uses it) on toy noise estimators and a tiny model."""

from __future__ import annotations

import torch

from mmalign.models.inversion import implied_noise, renoise_invert
from mmalign.models.noise import FlowMatching, VariancePreserving

VP = VariancePreserving({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})


def test_constant_estimator_inverts_exactly_and_implied_noise_recovers_it():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps_star = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    flow = FlowMatching({"shift": 1.0})
    for process, t in ((VP, torch.tensor([1, 370, 999])), (flow, torch.tensor([5.0, 370.0, 990.0]))):
        x_t = renoise_invert(lambda z, level: eps_star, process, x0, t, steps=5, renoise_iterations=2)
        assert torch.allclose(x_t, process.add_noise(x0, eps_star, t), atol=1e-9)
        assert torch.allclose(implied_noise(process, x_t, x0, t), eps_star, atol=1e-7)


def test_more_renoise_iterations_shrink_the_fixed_point_residual():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    a_matrix = 0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64)

    def estimate(z, level):  # a linear toy denoiser ε(z) = A z (channel mixing)
        return torch.einsum("ij,bjhw->bihw", a_matrix, z)

    t = torch.tensor([600, 600])
    residuals = []
    for k in (0, 1, 2, 4):
        z_b = renoise_invert(estimate, VP, x0, t, steps=1, renoise_iterations=k, average_window=(k, k + 1))
        target = VP.add_noise(x0, estimate(z_b, t), t)  # Inv(z_a = x0, ε(z_b, b)) from the clean start
        residuals.append((z_b - target).norm().item())
    assert residuals == sorted(residuals, reverse=True) and residuals[-1] < 0.1 * residuals[0]


def test_levels_end_at_each_samples_t_and_t_zero_is_the_clean_latent():
    x0 = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    eps = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    seen = []

    def estimate(z, level):
        seen.append(level.clone())
        return eps

    x_t = renoise_invert(estimate, VP, x0, torch.tensor([0, 400, 1000 - 1]), steps=4, renoise_iterations=0)
    assert torch.equal(x_t[0], x0[0])
    assert seen[-1].tolist() == [0, 400, 999]
    official = []
    renoise_invert(
        lambda z, level: official.append(level.clone()) or eps,
        VP,
        x0,
        torch.tensor([0, 450, 999]),
        steps=5,
        renoise_iterations=0,
        official_grid=True,
    )
    assert official[-1].tolist() == [0, 401, 801]  # SmPO's grid {1, 201, …, 801}: the last point below t
