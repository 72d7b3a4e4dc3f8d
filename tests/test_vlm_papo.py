"""PAPO: the masking operator, the loss's reductions and detach semantics, the method's masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmalign
from mmalign.config import load_config
from mmalign.losses import grpo_loss, papo_loss
from mmalign.models.tiny_vlm import build_tiny_vlm
from mmalign.vlm import world
from mmalign.vlm.papo import PAPO, mask_patches

ROOT = Path(__file__).resolve().parents[1]


def _picture(size=448, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(1, 256, (size, size, 3), dtype=np.uint8))


def test_mask_patches_drops_aligned_squares_at_the_given_rate():
    image = _picture()
    original = np.array(image)
    masked = np.array(mask_patches(image, 14, 0.6, np.random.default_rng(0)))
    assert np.array_equal(np.array(image), original)  # the input is untouched
    assert masked.shape == original.shape
    blocks = masked.reshape(32, 14, 32, 14, 3).transpose(0, 2, 1, 3, 4).reshape(32, 32, -1)
    kept = original.reshape(32, 14, 32, 14, 3).transpose(0, 2, 1, 3, 4).reshape(32, 32, -1)
    dropped = (blocks == 0).all(-1)
    assert (dropped | (blocks == kept).all(-1)).all()  # every square is either black or untouched
    n, p = dropped.size, 0.6
    assert abs(dropped.sum() - n * p) < 5 * (n * p * (1 - p)) ** 0.5
    assert np.array_equal(np.array(mask_patches(image, 14, 0.6, np.random.default_rng(0))), masked)  # seeded
    assert np.array(mask_patches(image, 14, 1.0, np.random.default_rng(1))).max() == 0
    assert np.array_equal(np.array(mask_patches(image, 14, 0.0, np.random.default_rng(1))), original)
    edge = mask_patches(_picture(50), 14, 1.0, np.random.default_rng(2))  # partial edge squares
    assert edge.size == (50, 50) and edge.mode == "RGB" and np.array(edge).max() == 0


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 3, 7, generator=g, requires_grad=True)
    tokens = torch.randint(0, 7, (4, 3), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    return logits, tokens, mask


def _logp(logits, tokens):
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]


def test_papo_reduces_to_grpo_with_zero_weights_or_an_unmasked_image():
    logits, tokens, mask = _toy()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    logp = _logp(logits, tokens)
    policy, _ = grpo_loss(logp, logp.detach(), adv, mask)
    (grpo_grad,) = torch.autograd.grad(policy, logits, retain_graph=True)
    masked_other = _logp(logits.detach() + torch.randn_like(logits), tokens)
    loss, _ = papo_loss(policy, logp, masked_other, mask, gamma=0.0)
    assert loss.item() == policy.item()
    # mask ratio 0: the masked image is the real one, κ ≡ 0 and ∂κ/∂ℓ ≡ 0
    loss, metrics = papo_loss(policy, logp, logp.detach(), mask, gamma=0.5)
    assert metrics["perception_kl"].item() == 0.0 and metrics["perception_kl_var"].item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    torch.testing.assert_close(grad, grpo_grad)


def test_masked_entropy_term_has_no_gradient_when_masked_logprobs_are_detached():
    logits, tokens, mask = _toy(1)
    masked_logits = (logits.detach() + 0.3 * torch.randn_like(logits)).requires_grad_()
    policy = torch.zeros(())

    def grads(eta2: float, detach: bool):
        logp, logp_m = _logp(logits, tokens), _logp(masked_logits, tokens)
        loss, _ = papo_loss(
            policy,
            logp,
            logp_m.detach() if detach else logp_m,
            mask,
            gamma=0.01,
            entropy_weight=0.03,
            masked_entropy_weight=eta2,
        )
        return torch.autograd.grad(loss, [logits, masked_logits], allow_unused=True, materialize_grads=True)

    detached_0, detached_5 = grads(0.0, True), grads(0.5, True)
    torch.testing.assert_close(detached_0[0], detached_5[0])  # the released default's quirk
    live_0, live_5 = grads(0.0, False), grads(0.5, False)
    assert not torch.allclose(live_0[1], live_5[1])  # recompute_masked: the η₂ term trains π(·|masked)


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> Path:
    return build_tiny_vlm("qwen2-vl", tmp_path_factory.mktemp("papo") / "qwen2-vl", corpus=world.corpus())


def _papo(policy: Path, out: Path, *extra: str) -> PAPO:
    run = load_config(
        ROOT / "configs/vlm/papo.yaml",
        [
            f"model.path={policy}",
            f"output_dir={out}",
            "train.max_steps=2",
            "train.batch_size=2",
            "eval.every=0",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "papo.num_generations=3",
            "papo.max_new_tokens=5",
            "data.embedded.eval_per_kind=2",
            "data.embedded.eval_kinds=[count,arith]",
            *extra,
        ],
    )
    return PAPO(run)


class _CPU:
    device, num_processes, process_index = torch.device("cpu"), 1, 0


def test_one_mask_per_prompt_shared_by_its_group_and_identical_prompt_tokens(tiny_policy, tmp_path):
    method = _papo(tiny_policy, tmp_path / "run")
    method.setup(_CPU())
    torch.manual_seed(0)
    batch = method.next_batch(0, 0)
    masked = batch.extras["masked_prompts"]
    assert torch.equal(masked.input_ids, batch.rollout.prompts.input_ids)
    pictures = [np.array(c.images[0]) for c in masked.conversations]
    assert np.array_equal(pictures[0], pictures[1]) and np.array_equal(pictures[1], pictures[2])
    assert not np.array_equal(pictures[0], pictures[3])  # the next prompt has its own image and mask
    assert not np.array_equal(pictures[0], np.array(batch.rollout.prompts.conversations[0].images[0]))
    loss, metrics = method.compute_loss(batch, 0, 0)
    assert metrics["perception_kl"].item() > 0  # random weights still read the image a little
    assert {"perception_kl_var", "nll", "nll_masked", "entropy", "entropy_masked"} <= set(metrics)


def test_an_image_blind_policy_earns_no_perception_bonus(tiny_policy, tmp_path):
    method = _papo(tiny_policy, tmp_path / "blind", "papo.recompute_masked=true")
    method.setup(_CPU())
    with torch.no_grad():  # zero the vision merger's output: visual embeddings carry nothing
        for p in method.vlm.model.model.visual.merger.mlp[-1].parameters():
            p.zero_()
    torch.manual_seed(0)
    batch = method.next_batch(0, 0)
    _, metrics = method.compute_loss(batch, 0, 0)
    assert metrics["perception_kl"].item() == 0.0


def test_papo_recipe_runs_from_the_cli_with_its_monitors(tiny_policy, tmp_path):
    report = mmalign.train(
        ROOT / "configs/vlm/papo.yaml",
        f"model.path={tiny_policy}",
        f"output_dir={tmp_path / 'r'}",
        "train.max_steps=2",
        "train.batch_size=2",
        "eval.every=0",
        "train.log_every=1",
        "papo.num_generations=3",
        "papo.max_new_tokens=5",
        "data.embedded.eval_per_kind=2",
        "data.embedded.eval_kinds=[count,arith]",
    )
    assert report["method"] == "papo" and "blind_accuracy/count" in report["metrics"]["after"]
    assert {"perception_kl", "perception_kl_var", "entropy_masked"} <= set(report["train"])


def test_mask_ratio_zero_gives_zero_perception_kl_and_grpos_loss(tiny_policy, tmp_path):
    method = _papo(
        tiny_policy, tmp_path / "p0", "papo.mask_ratio=0", "papo.entropy_weight=0", "papo.masked_entropy_weight=0"
    )
    method.setup(_CPU())
    torch.manual_seed(0)
    batch = method.next_batch(0, 0)
    loss, metrics = method.compute_loss(batch, 0, 0)
    assert metrics["perception_kl"].item() == 0.0
    policy_loss, _, _ = method.policy_loss(batch)
    assert loss.item() == policy_loss.item()
