"""What the scripts that pretrain the embedded models share: one plain optimizer step."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def optimizer_step(
    loss: torch.Tensor,
    params: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_norm: float = 1.0,
) -> None:
    """Backward, clip the gradient norm of `params` to `max_norm`, step the optimizer and the schedule."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
