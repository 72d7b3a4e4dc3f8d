"""The optimizer a run trains with (`train.optimizer`): AdamW, or bitsandbytes' 8-bit AdamW.

`adamw8bit` keeps both Adam moments of every tensor with at least 4096 elements in 8 bits
(block-wise dynamic quantisation, one float32 scale per block of 256 values), a quarter of AdamW's
float32 state; smaller tensors (biases, norms, small LoRA matrices) keep float32 state, as
bitsandbytes decides. Its state dict holds `uint8` moments, float32 block scales and quantisation
maps, which `mmalign.train.checkpoint` writes to safetensors and restores bit for bit.
bitsandbytes runs it on CUDA and on the CPU; there is no silent fallback to float32 AdamW: a
missing package or an unsupported device is an error naming the option.
"""

from __future__ import annotations

import importlib.util

import torch

from mmalign.config import ConfigError, TrainConfig


def build_optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """The `train.optimizer` optimizer over `params` with the run's learning rate, betas, ε and weight decay."""
    kwargs = dict(
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_epsilon,
        weight_decay=train.weight_decay,
    )
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "config key 'train.optimizer' is adamw8bit, which needs bitsandbytes: `pip install bitsandbytes` "
            "(or `pip install mmalign[memory]`), or set train.optimizer=adamw"
        )
    import bitsandbytes as bnb

    devices = sorted({p.device.type for p in params})
    supported = ("cpu", "cuda", "xpu")
    if unsupported := [d for d in devices if d not in supported]:
        raise ConfigError(
            f"config key 'train.optimizer' is adamw8bit, which bitsandbytes runs on {', '.join(supported)}, "
            f"not on {unsupported[0]}; set train.optimizer=adamw"
        )
    return bnb.optim.AdamW8bit(params, **kwargs)
