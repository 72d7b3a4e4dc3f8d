"""Noise processes against diffusers' own schedulers and their algebraic identities."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from mmalign.models.noise import FlowMatching, VariancePreserving, noise_process

SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def test_variance_preserving_matches_diffusers_add_noise_and_velocity():
    ddpm = DDPMScheduler(**SD_SCHEDULE, prediction_type="v_prediction")
    vp = VariancePreserving(dict(ddpm.config))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 3, 8, 8, generator=g), torch.randn(5, 4, 3, 8, 8, generator=g)  # frame axis
    t = torch.tensor([0, 10, 500, 900, 999])
    assert torch.allclose(vp.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t), atol=1e-5)
    assert torch.allclose(vp.target(x0, noise, t), ddpm.get_velocity(x0, noise, t), atol=1e-5)


def test_v_mse_is_eps_mse_over_alpha_bar():
    """ε − ε̂ = √ᾱ (v − v̂): the v-prediction error is the ε error divided by ᾱ_t."""
    vp_v = VariancePreserving({**SD_SCHEDULE, "prediction_type": "v_prediction"})
    g = torch.Generator().manual_seed(1)
    x0, noise = (
        torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([50, 300, 600, 950])
    x_t = vp_v.add_noise(x0, noise, t)
    v_hat = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    eps_hat = vp_v.predicted_noise(x_t, v_hat, t)
    v_mse = (v_hat - vp_v.target(x0, noise, t)).pow(2).flatten(1).mean(1)
    eps_mse = (eps_hat - noise).pow(2).flatten(1).mean(1)
    abar = vp_v.alphas_cumprod[t]
    assert torch.allclose(v_mse, eps_mse / abar, rtol=1e-6)


def test_predictions_invert_the_forward_process():
    g = torch.Generator().manual_seed(2)
    x0, noise = (
        torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64),
    )
    for process, t in (
        (VariancePreserving({**SD_SCHEDULE, "prediction_type": "epsilon"}), torch.tensor([1, 400, 998])),
        (VariancePreserving({**SD_SCHEDULE, "prediction_type": "v_prediction"}), torch.tensor([1, 400, 998])),
        (FlowMatching({"shift": 3.0}), torch.tensor([10.0, 400.0, 990.0])),
    ):
        x_t = process.add_noise(x0, noise, t)
        exact = process.target(x0, noise, t)
        assert torch.allclose(process.predicted_noise(x_t, exact, t), noise, atol=1e-8)
        assert torch.allclose(process.predicted_x0(x_t, exact, t), x0, atol=1e-8)


def test_flow_matching_interpolates_and_targets_velocity():
    flow = FlowMatching({"num_train_timesteps": 1000, "shift": 1.0})
    x0, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    t = torch.tensor([0.0, 250.0])
    assert torch.allclose(flow.add_noise(x0, noise, t)[1], torch.full((1, 2, 2), 0.25))
    assert torch.allclose(flow.target(x0, noise, t), noise - x0)


def test_flow_timesteps_lie_in_range_and_shift_moves_them_up():
    g = torch.Generator().manual_seed(0)
    plain = FlowMatching({"shift": 1.0}).sample_timesteps(4000, g)
    shifted = FlowMatching({"shift": 3.0}).sample_timesteps(4000, torch.Generator().manual_seed(0))
    assert (plain > 0).all() and (plain < 1000).all()
    assert shifted.mean() > plain.mean() + 100  # shift > 1 moves mass to high noise
    uniform = FlowMatching({"shift": 1.0}, sampling="uniform").sample_timesteps(4000, g)
    assert abs(uniform.mean().item() - 500) < 30


def test_noise_process_follows_the_pipeline_scheduler():
    assert isinstance(noise_process(FlowMatchEulerDiscreteScheduler(shift=3.0)), FlowMatching)
    vp = noise_process(DDPMScheduler(**SD_SCHEDULE, prediction_type="v_prediction"))
    assert isinstance(vp, VariancePreserving) and vp.prediction_type == "v_prediction"
    timesteps = vp.sample_timesteps(1000, torch.Generator().manual_seed(0))
    assert timesteps.min() >= 0 and timesteps.max() <= 999 and timesteps.dtype == torch.int64
