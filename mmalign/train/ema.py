"""An exponential moving average of trained weights, and a way to evaluate or save with it.

`ema = EMA(params)`; after each optimizer step `ema.update(step)` moves the average towards the
weights with decay `min(max_decay, (1 + step) / (10 + step))` (the warm-up of diffusers'
`EMAModel`: early steps forget the random start quickly); `with ema.applied():` swaps the average
into the parameters and restores the trained weights on exit.

Under FSDP2 the parameters are the shards each process holds, and so is the average; `module` (the
sharded module) has its gathered copies dropped around a swap, so that its next forward gathers
the weights now in the shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from mmalign.models.state import reshard


class EMA:
    """An average of `params` (kept as detached copies on their devices); `module`: the module holding
    them when it may be sharded by FSDP2."""

    def __init__(
        self, params: Sequence[torch.nn.Parameter], max_decay: float = 0.999, module: torch.nn.Module | None = None
    ):
        self.params = list(params)
        self.module = module
        self.max_decay = max_decay
        self.average = [p.detach().clone() for p in self.params]

    def decay(self, step: int) -> float:
        return min(self.max_decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """`average ← average + (1 − decay(step)) · (weights − average)`."""
        weight = 1 - self.decay(step)
        for average, param in zip(self.average, self.params):
            average.lerp_(param.detach(), weight)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The parameters hold the average inside the block and their trained values after it."""
        trained = [p.detach().clone() for p in self.params]
        self._drop_gathered()
        with torch.no_grad():
            for average, param in zip(self.average, self.params):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for value, param in zip(trained, self.params):
                    param.copy_(value)
            self._drop_gathered()

    def _drop_gathered(self) -> None:
        if self.module is not None:
            reshard(self.module)
