"""Memory options: gradient checkpointing per family, 8-bit AdamW with exact resume, frozen-module
offload, half-precision frozen weights with float32 trainable ones."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

from mmalign.config import ConfigError, TrainConfig, VLMModelConfig, load_config
from mmalign.models import diffusion
from mmalign.models.diffusion import DiffusionModel
from mmalign.models.families import Conditioning
from mmalign.models.tiny_vlm import build_tiny_vlm
from mmalign.train import checkpoint as ckpt
from mmalign.train.optim import build_optimizer
from mmalign.vlm.method import load_vlm

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@contextlib.contextmanager
def counting_calls(module: torch.nn.Module):
    """Count forward calls of every submodule of `module` inside the block (a recomputed layer counts twice)."""
    count = [0]
    handles = [m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1)) for m in module.modules()]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def denoiser_inputs(model: DiffusionModel, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    generator = torch.Generator().manual_seed(0)
    resolution = (32, 32) if model.is_video else model.default_resolution
    shape = model.latent_shape(batch, resolution, num_frames=5 if model.is_video else None)
    x0 = torch.randn(shape, generator=generator)
    t = model.noise.sample_timesteps(batch, generator)
    x_t = model.noise.add_noise(x0, torch.randn(shape, generator=generator), t)
    return x_t, t, model.encode_prompt(["a red ball", "a blue cube"], resolution)


def denoiser_grads(model: DiffusionModel, inputs) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of a squared-output loss on the trainable weights, and the number of module calls it took."""
    with counting_calls(model.base_denoiser) as calls:
        model.predict(*inputs).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.base_denoiser.named_parameters() if p.requires_grad}
    model.base_denoiser.zero_grad(set_to_none=True)
    return grads, calls[0]


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "wan", "animatediff"])
def test_gradient_checkpointing_recomputes_and_leaves_gradients_unchanged(family, tiny_pipelines, tiny_video_pipelines):
    path = {**tiny_pipelines, **tiny_video_pipelines}[family]
    torch.manual_seed(0)
    model = DiffusionModel.from_pretrained(path, lora_rank=4, reference=False, gradient_checkpointing=True)
    inputs = denoiser_inputs(model)
    checkpointed, calls_checkpointed = denoiser_grads(model, inputs)
    model.base_denoiser.disable_gradient_checkpointing()
    plain, calls_plain = denoiser_grads(model, inputs)
    assert calls_checkpointed > calls_plain  # blocks ran again in backward
    assert checkpointed.keys() == plain.keys() and len(plain) > 0
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_tiny_vlm("qwen2.5-vl", tmp_path_factory.mktemp("vlm") / "qwen2.5-vl")


def vlm_logprob_grads(vlm, prompts, completion, mask) -> tuple[dict[str, torch.Tensor], int]:
    with counting_calls(vlm.model) as calls:
        logp, _ = vlm.token_logprobs(prompts, completion, mask)
        (-(logp * mask).sum()).backward()
    grads = {n: p.grad.clone() for n, p in vlm.model.named_parameters() if p.requires_grad}
    vlm.model.zero_grad(set_to_none=True)
    return grads, calls[0]


@pytest.mark.parametrize("lora_rank", [4, None])
def test_vlm_gradient_checkpointing_recomputes_and_leaves_gradients_unchanged(tiny_qwen, lora_rank):
    from tests.test_vlm_model import _ask, _image

    torch.manual_seed(0)
    vlm = load_vlm(VLMModelConfig(path=str(tiny_qwen), lora_rank=lora_rank, gradient_checkpointing=True), "cpu")
    prompts = vlm.encode([_ask("How many red shapes?", _image(0)), _ask("What colour?", _image(1))])
    completion, mask = vlm.completion_tokens(["two", "red and blue"])
    checkpointed, calls_checkpointed = vlm_logprob_grads(vlm, prompts, completion, mask)
    assert not vlm.model.training  # only the checkpointed layers were in training mode, and only during the call
    vlm.gradient_checkpointing = False
    plain, calls_plain = vlm_logprob_grads(vlm, prompts, completion, mask)
    assert calls_checkpointed > calls_plain
    assert checkpointed.keys() == plain.keys() and len(plain) > 0
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------- 8-bit AdamW
def quadratic_steps(params: list[torch.nn.Parameter], optimizer, steps: range) -> None:
    for i in steps:
        noise = torch.Generator().manual_seed(i)
        loss = sum((p * torch.randn(p.shape, generator=noise)).sum() + p.square().sum() for p in params)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@needs_bnb
def test_adamw8bit_runs_on_cpu_and_its_checkpoint_resumes_exactly(tmp_path):
    import bitsandbytes as bnb

    train = TrainConfig(optimizer="adamw8bit", learning_rate=1e-2)

    def fresh() -> list[torch.nn.Parameter]:
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(10))]

    straight = fresh()
    optimizer = build_optimizer(straight, train)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    quadratic_steps(straight, optimizer, range(4))

    first = fresh()
    optimizer = build_optimizer(first, train)
    quadratic_steps(first, optimizer, range(2))
    quantised = optimizer.state[first[0]]
    assert quantised["state1"].dtype == torch.uint8 and quantised["state2"].dtype == torch.uint8  # 8-bit moments
    assert optimizer.state[first[1]]["state1"].dtype == torch.float32  # under 4096 elements: float32 state
    ckpt.save_state(tmp_path, "optimizer", ckpt.optimizer_state(optimizer))

    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    optimizer = build_optimizer(resumed, train)
    ckpt.restore_optimizer(optimizer, ckpt.load_state(tmp_path, "optimizer"))
    assert torch.equal(optimizer.state[resumed[0]]["state1"], quantised["state1"])
    quadratic_steps(resumed, optimizer, range(2, 4))
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_optimizer_choice_is_checked_and_a_missing_bitsandbytes_is_named(monkeypatch):
    with pytest.raises(ConfigError, match="'train.optimizer' must be one of adamw, adamw8bit"):
        load_config(None, ["train.optimizer=sgd"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ConfigError, match="adamw8bit, which needs bitsandbytes"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig(optimizer="adamw8bit"))


@needs_bnb
def test_trainer_with_adamw8bit_checkpoints_uint8_state(tiny_pipelines, tmp_path):
    from safetensors.torch import load_file

    from mmalign.train import run
    from tests.conftest import write_pair_folder

    pairs = write_pair_folder(tmp_path / "pairs", n=4)
    config = load_config(
        None,
        [f"model={tiny_pipelines['sd']}", f"data={pairs}", "model.lora_rank=null", f"output_dir={tmp_path / 'run'}",
         "train.optimizer=adamw8bit", "train.max_steps=1", "train.batch_size=2", "train.threads=1",
         "eval.rewards=[jpeg-compressibility]", "eval.gold=null", "eval.num_prompts=1", "eval.num_steps=2"],
    )  # fmt: skip
    run(config)
    saved = load_file(str(tmp_path / "run/checkpoints/step-000001/optimizer.safetensors"))
    assert torch.uint8 in {tensor.dtype for tensor in saved.values()}


# ---------------------------------------------------------------------------- offload
def test_offload_keeps_frozen_modules_on_the_cpu_between_uses(tiny_pipelines):
    """Where each frozen module is sent, and when it runs: a CPU-only machine cannot tell two devices apart, so
    every `.to()` is recorded as a move to the offload device (the constant itself) or to the denoiser's."""
    model = DiffusionModel.from_pretrained(tiny_pipelines["sdxl"], lora_rank=4, offload_frozen=True)
    events: list[tuple[str, str]] = []
    for name in ("text_encoder", "text_encoder_2", "vae"):
        module = getattr(model.pipe, name)
        move = module.to

        def recorded(*args, _name=name, _move=move, **kwargs):
            target = args[0] if args else kwargs.get("device")
            events.append((_name, "to cpu" if target is diffusion.OFFLOAD_DEVICE else "to device"))
            return _move(*args, **kwargs)

        module.to = recorded
        module.register_forward_pre_hook(lambda *_, _name=name: events.append((_name, "runs")))
    model.pipe.vae.encoder.register_forward_pre_hook(lambda *_: events.append(("vae", "encodes")))

    model.to("cpu")
    assert events == [("text_encoder", "to cpu"), ("text_encoder_2", "to cpu"), ("vae", "to cpu")]
    events.clear()
    model.encode_prompt(["a red ball"])
    assert events == [
        ("text_encoder", "to device"), ("text_encoder_2", "to device"), ("text_encoder", "runs"),
        ("text_encoder_2", "runs"), ("text_encoder", "to cpu"), ("text_encoder_2", "to cpu"),
    ]  # fmt: skip
    events.clear()
    model.encode_images(torch.zeros(1, 3, 32, 32))
    assert events == [("vae", "to device"), ("vae", "encodes"), ("vae", "to cpu")]
    events.clear()
    with pytest.raises(RuntimeError):
        model.decode_latents(torch.zeros(1, 7, 4, 4))  # wrong channels: the VAE fails, and still goes back
    assert events[0] == ("vae", "to device") and events[-1] == ("vae", "to cpu")


def test_without_offload_to_moves_the_whole_pipeline(tiny_pipelines):
    model = DiffusionModel.from_pretrained(tiny_pipelines["sd"], lora_rank=4)
    moved = []
    model.pipe.text_encoder.to = lambda *a, **k: moved.append(a)
    model.to("cpu")
    model.encode_prompt(["a red ball"])
    assert len(moved) == 1  # once by pipe.to, never around the encoder's use


# ---------------------------------------------------------------------------- half-precision frozen weights
@pytest.mark.parametrize("lora_rank", [4, None])
def test_bf16_frozen_weights_with_fp32_trainable_ones_train(tiny_pipelines, lora_rank):
    torch.manual_seed(0)
    model = DiffusionModel.from_pretrained(tiny_pipelines["sd3"], torch_dtype=torch.bfloat16, lora_rank=lora_rank)
    frozen = [p for p in model.base_denoiser.parameters() if not p.requires_grad]
    if lora_rank is None:
        frozen = list(model.reference_denoiser.parameters())
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in model.pipe.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.pipe.vae.parameters()} == {torch.float32}
    trainable = model.trainable_parameters()
    assert {p.dtype for p in trainable} == {torch.float32}
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    x_t, t, cond = denoiser_inputs(model)
    prediction = model.predict(x_t, t, cond)
    assert prediction.dtype == torch.float32
    loss = (prediction - model.predict_reference(x_t, t, cond)).square().mean() + prediction.square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, trainable))


@pytest.mark.parametrize("lora_rank", [4, None])
def test_vlm_bf16_frozen_weights_with_fp32_trainable_ones_train(tiny_qwen, lora_rank):
    from tests.test_vlm_model import _ask, _image

    vlm = load_vlm(VLMModelConfig(path=str(tiny_qwen), lora_rank=lora_rank, dtype="bfloat16"), "cpu", True)
    trainable = [p for p in vlm.model.parameters() if p.requires_grad]
    frozen = [p for p in vlm.model.parameters() if not p.requires_grad]
    if lora_rank is None:  # full fine-tuning: the frozen weights are the reference copy's
        with vlm.reference() as reference:
            frozen = list(reference.parameters())
    assert {p.dtype for p in trainable} == {torch.float32} and {p.dtype for p in frozen} == {torch.bfloat16}
    assert vlm.autocast_dtype == torch.bfloat16
    prompts = vlm.encode([_ask("How many red shapes?", _image(0))])
    completion, mask = vlm.completion_tokens(["two"])
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    before = [p.detach().clone() for p in trainable]
    logp, _ = vlm.token_logprobs(prompts, completion, mask)
    reference_logp, _ = vlm.token_logprobs(prompts, completion, mask, reference=True)
    (-(logp * mask).sum() + (logp - reference_logp).square().sum()).backward()
    optimizer.step()
    assert all(p.grad.dtype == torch.float32 for p in trainable if p.grad is not None)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable))
