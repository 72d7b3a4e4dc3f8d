"""Two denoisers that split the timestep range, as Wan 2.2 A14B's `WanPipeline` runs them.

The pipeline holds `transformer` (the high-noise expert) and `transformer_2` (the low-noise expert)
and a `boundary_ratio`: a step at timestep `t ≥ boundary_ratio · num_train_timesteps` runs on
`transformer`, every other step on `transformer_2`. `TimestepExperts` is one module over both, so
the wrapper trains, references, checkpoints and saves them as one denoiser: each row of a batch goes
to the expert of its own timestep.
"""

from __future__ import annotations

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

EXPERT_NAMES = ("transformer", "transformer_2")


class TimestepExperts(torch.nn.Module):
    """`transformer` for timesteps ≥ `boundary` (in the scheduler's 0…1000 units), `transformer_2` below."""

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module, boundary: float):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary = float(boundary)

    @property
    def experts(self) -> dict[str, torch.nn.Module]:
        """The experts by their pipeline attribute."""
        return {"transformer": self.transformer, "transformer_2": self.transformer_2}

    @property
    def config(self):
        """The high-noise expert's config (both share the latent layout)."""
        return self.transformer.config

    def add_adapter(self, config) -> None:
        for expert in self.experts.values():
            expert.add_adapter(config)

    def disable_adapters(self) -> None:
        for expert in self.experts.values():
            expert.disable_adapters()

    def enable_adapters(self) -> None:
        for expert in self.experts.values():
            expert.enable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        for expert in self.experts.values():
            expert.enable_gradient_checkpointing()

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True, **kwargs):
        """Each row of `hidden_states (B, …)` through the expert of its `timestep` (a scalar or `(B,)`);
        tensor keyword arguments with B rows (the text states) are split alike."""
        batch = hidden_states.shape[0]
        high = (timestep >= self.boundary).expand(batch) if timestep.ndim == 0 else timestep >= self.boundary
        if high.all() or not high.any():
            expert, idle = (
                (self.transformer, self.transformer_2) if high.all() else (self.transformer_2, self.transformer)
            )
            out = expert(hidden_states, timestep=timestep, return_dict=False, **kwargs)[0]
            if torch.is_grad_enabled():
                # the idle expert's trainable weights join the graph with weight 0: data-parallel
                # training reduces every parameter's gradient each step, used on this rank or not
                out = out + sum(p.sum() for p in idle.parameters() if p.requires_grad) * 0
            return Transformer2DModelOutput(sample=out) if return_dict else (out,)
        times = timestep.expand(batch) if timestep.ndim == 0 else timestep
        parts = []
        for expert, rows in ((self.transformer, high), (self.transformer_2, ~high)):
            index = rows.nonzero().flatten()
            rows_kwargs = {
                k: v[index] if torch.is_tensor(v) and v.ndim and v.shape[0] == batch else v for k, v in kwargs.items()
            }
            out = expert(hidden_states[index], timestep=times[index], return_dict=False, **rows_kwargs)[0]
            parts.append((index, out))
        first = parts[0][1]
        joined = first.new_zeros(batch, *first.shape[1:])
        for index, out in parts:
            joined = joined.index_copy(0, index, out)
        return Transformer2DModelOutput(sample=joined) if return_dict else (joined,)


def timestep_experts(pipe) -> TimestepExperts | None:
    """The pipeline's two experts as one module (a `transformer_2` and a `boundary_ratio`), else None."""
    second = getattr(pipe, "transformer_2", None)
    if second is None:
        return None
    ratio = pipe.config.get("boundary_ratio")
    if ratio is None:
        raise ValueError(f"{type(pipe).__name__} has a transformer_2 but no boundary_ratio to split the timesteps")
    if getattr(pipe, "transformer", None) is None:
        raise ValueError(f"{type(pipe).__name__} has a transformer_2 but no transformer (the high-noise expert)")
    return TimestepExperts(pipe.transformer, second, ratio * pipe.scheduler.config.num_train_timesteps)
