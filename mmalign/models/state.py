"""The trainable state of a module, for checkpoints: the parameters that require grad, by name."""

from __future__ import annotations

import torch


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`{name: weight}` of the parameters of `module` that require grad, detached, on CPU (views of CPU
    weights: write them before training goes on)."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (written by `trainable_state`) into `module`; names missing on either side are a
    `KeyError` naming a few of them, a tensor of another shape a `ValueError` naming it (`copy_` would
    broadcast it silently)."""
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unexpected = [n for n in state if n not in params]
    if missing or unexpected:
        raise KeyError(f"trainable state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, value in state.items():
        if value.shape != params[name].shape:
            raise ValueError(f"trainable state {name!r} has shape {tuple(value.shape)}, the model's "
                             f"{tuple(params[name].shape)}")  # fmt: skip
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
