"""SmPO: soft labels, the smoothed DPO loss and the method on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from mmalign.config import load_config
from mmalign.image.diffusion_dpo import DiffusionDPO
from mmalign.image.smpo import SmPO
from mmalign.losses import diffusion_dpo_loss, smpo_pair_scale, soft_preference
from mmalign.models.inversion import ddim_reconstruct


def _errors(b: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, generator=g, dtype=torch.float64) * 0.2 for _ in range(4)]


def test_soft_label_is_a_sigmoid_of_the_score_gap():
    w, lo = torch.tensor([0.30, 0.20, 0.25]), torch.tensor([0.20, 0.30, 0.25])
    p = soft_preference(w, lo, tau=0.1667)
    assert torch.allclose(p, torch.tensor([1 / (1 + math.exp(-0.1 / 0.1667)), 1 / (1 + math.exp(0.1 / 0.1667)), 0.5]))
    assert torch.allclose(soft_preference(lo, w, tau=0.1667), 1 - p)
    with pytest.raises(ValueError, match="tau"):
        soft_preference(w, lo, tau=0.0)


def test_half_preference_gives_log2_and_no_gradient():
    pw, pl, rw, rl = _errors()
    pw.requires_grad_(True), pl.requires_grad_(True)
    scale = smpo_pair_scale(torch.full((6,), 0.5, dtype=torch.float64), gamma=10.0)
    loss, _ = diffusion_dpo_loss(pw, pl, rw, rl, beta=2500.0, pair_scale=scale)
    assert loss.item() == math.log(2)
    loss.backward()
    assert torch.count_nonzero(pw.grad) == 0 and torch.count_nonzero(pl.grad) == 0


def test_unit_scale_is_diffusion_dpo_bit_for_bit():
    errors = _errors(seed=1)
    scale = smpo_pair_scale(torch.ones(6, dtype=torch.float64), gamma=1.0)
    assert torch.equal(scale, torch.ones(6, dtype=torch.float64))
    smoothed, _ = diffusion_dpo_loss(*errors, beta=2500.0, pair_scale=scale)
    plain, _ = diffusion_dpo_loss(*errors, beta=2500.0)
    assert torch.equal(smoothed, plain)


def test_gradient_at_the_reference_grows_linearly_with_2p_minus_1():
    pw, pl, _, _ = _errors(seed=2)
    grads = []
    for p in (0.6, 0.7, 0.8):
        w, lo = pw.clone().requires_grad_(True), pl.clone().requires_grad_(True)
        scale = smpo_pair_scale(torch.full((6,), p, dtype=torch.float64), gamma=10.0)
        loss, _ = diffusion_dpo_loss(w, lo, pw, pl, beta=2500.0, pair_scale=scale)  # policy == reference
        loss.backward()
        grads.append(w.grad.norm().item())
        assert (w.grad > 0).all() and (lo.grad < 0).all()  # lower the winner's error, raise the loser's
    assert grads[1] / grads[0] == pytest.approx(2.0) and grads[2] / grads[0] == pytest.approx(3.0)


def test_swapping_a_pair_and_its_label_changes_nothing():
    pw, pl, rw, rl = _errors(seed=3)
    p = torch.tensor([0.9, 0.2, 0.55, 0.5, 0.7, 0.4], dtype=torch.float64)
    a, _ = diffusion_dpo_loss(pw, pl, rw, rl, beta=2500.0, pair_scale=smpo_pair_scale(p, 10.0))
    b, _ = diffusion_dpo_loss(pl, pw, rl, rw, beta=2500.0, pair_scale=smpo_pair_scale(1 - p, 10.0))
    assert torch.allclose(a, b, rtol=1e-12)


# ---------------------------------------------------------------------------------------- the method
def _method(cls, model_dir, pair_folder, *extra: str):
    method_name = "smpo" if cls is SmPO else "diffusion-dpo"
    run = load_config(
        None,
        [
            f"method={method_name}",
            f"model={model_dir}",
            f"data={pair_folder}",
            "eval.rewards=[]",
            "model.lora_rank=4",
            *extra,
        ],
    )
    method = cls(run)
    method.setup(Accelerator(cpu=True))
    return method


@pytest.mark.parametrize("family", ["sd", "sd-v", "sd3"])
def test_renoise_step_per_family_has_one_graph(family, tiny_pipelines, pair_folder):
    method = _method(SmPO, tiny_pipelines[family], pair_folder, "smpo.inversion_steps=3")
    batch = method.collate([method.dataset[i] for i in range(4)])
    calls = []
    invert = method.model.invert
    method.model.invert = lambda *a, **k: calls.append(out := invert(*a, **k)) or out
    loss, metrics = method.compute_loss(batch, step=0, micro=0)
    assert len(calls) == 1 and not calls[0].requires_grad  # no graph through the inversion
    assert torch.isfinite(loss) and loss.requires_grad and float(metrics["pair_scale"]) > 0.0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.model.trainable_parameters())


def test_soft_labels_come_from_the_label_reward(tiny_pipelines, pair_folder):
    method = _method(SmPO, tiny_pipelines["sd"], pair_folder)
    # the fixture's winners are clean renders, its losers uniform noise: the toy CLIP agrees
    assert (method.score_w > method.score_l).all() and (method.p > 0.5).all()
    scores = torch.cat([method.score_w, method.score_l])
    assert method.tau == pytest.approx(float(scores.max() - scores.min()))
    fixed = _method(SmPO, tiny_pipelines["sd"], pair_folder, "smpo.tau=1e9")
    assert torch.allclose(fixed.p, torch.full_like(fixed.p, 0.5), atol=1e-6)
    fixed.p = torch.full_like(fixed.p, 0.5)  # equally good pairs: exactly log 2, exactly no gradient
    batch = fixed.collate([fixed.dataset[i] for i in range(4)])
    loss, _ = fixed.compute_loss(batch, step=0, micro=0)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in fixed.model.trainable_parameters())


def test_forward_mode_with_unit_scale_is_diffusion_dpo(tiny_pipelines, pair_folder):
    smpo = _method(SmPO, tiny_pipelines["sd"], pair_folder, "smpo.inversion=forward", "smpo.gamma=1")
    smpo.p = torch.ones_like(smpo.p)
    dpo = _method(DiffusionDPO, tiny_pipelines["sd"], pair_folder)
    dpo.model.load_trainable_state_dict(smpo.model.trainable_state_dict())
    batch = smpo.collate([smpo.dataset[i] for i in range(4)])
    assert torch.equal(smpo.compute_loss(batch, 3, 0)[0], dpo.compute_loss(batch, 3, 0)[0])


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_inversion_reconstructs_and_renoise_helps(family, tiny_pipelines, pair_folder):
    method = _method(SmPO, tiny_pipelines[family], pair_folder)
    model = method.model
    batch = method.collate([method.dataset[i] for i in range(4)])
    x0 = model.encode_images(batch["pixels_w"])
    cond = model.encode_prompt(batch["prompt"])
    t = torch.full((4,), 400) if family == "sd" else torch.full((4,), 400.0)
    estimate = model.noise_estimator(cond)
    errors = []
    for k in (0, 1, 4):
        x_t = model.invert(x0, t, cond, steps=10, renoise_iterations=k, average_window=(k, k + 1))
        rebuilt = ddim_reconstruct(estimate, model.noise, x_t, t, steps=10)
        errors.append(((rebuilt - x0).norm() / x0.norm()).item())
    assert errors[-1] < 0.1, errors  # close to the input latent
    assert errors[2] < errors[1] < errors[0], errors
