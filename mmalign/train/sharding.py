"""Sharded training through accelerate: which kind a launch asked for, and whole weights for saving.

`accelerate launch --config_file configs/accelerate/fsdp.yaml …` asks for FSDP; accelerate's
`prepare` then shards the trainable module in place with FSDP2's `fully_shard` and points the
optimizer at the shards. The trainer reads and writes the sharded state whole through
`torch.distributed.checkpoint.state_dict` (`mmalign.models.state`, `mmalign.train.checkpoint`),
so checkpoints and saved results are the files a single process writes.

- `use_fsdp_on_cpu`: accelerate selects FSDP on accelerator devices only and leaves CPU processes
  (gloo) as plain data-parallel; FSDP2 runs there too, so a CPU launch with an FSDP config gets it.
- `check_supported`: FSDP1 and DeepSpeed are refused with a one-line error naming what to use.
- `whole_state_dicts`: inside it, `state_dict()` of the sharded module returns whole tensors, so a
  method's `save_final` (diffusers / peft / transformers `save_pretrained`, `save_lora_weights`)
  writes the same files as unsharded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from mmalign.config import ConfigError
from mmalign.models.state import full_tensor, is_sharded


def use_fsdp_on_cpu(accelerator) -> None:
    """Select FSDP in accelerate's state for CPU processes launched with an FSDP config (accelerate keeps
    them as MULTI_CPU), with the plugin that config describes (`FSDP_*` environment variables)."""
    state = accelerator.state
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    # as `AcceleratorState.__init__` does: every later `AcceleratorState()` copies the partial state
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def check_supported(accelerator) -> None:
    """Refuse the accelerate setups whose state the trainer cannot checkpoint whole."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError(
            "the accelerate config asks for FSDP version 1; mmalign trains with FSDP2: set fsdp_version: 2 "
            "in its fsdp_config (configs/accelerate/fsdp.yaml)"
        )
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError(
            "the accelerate config asks for DeepSpeed, whose partitioned optimizer state mmalign's checkpoints "
            "cannot gather; use FSDP2 (configs/accelerate/fsdp.yaml) to shard weights, gradients and optimizer "
            "state (docs/distributed.md)"
        )


@contextlib.contextmanager
def whole_state_dicts(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block, `state_dict()` of FSDP2-sharded `module` (or of a module holding it) returns whole
    tensors instead of DTensor shards, and its modules have their own classes (for saving, not for
    forwards). Each gather is a collective: every process must run the same
    code inside the block (the same `state_dict()` calls in the same order)."""
    if not is_sharded(module):
        yield
        return

    def gather(owner: torch.nn.Module, state: dict, prefix: str, local_metadata) -> None:
        for name, value in list(owner._parameters.items()) + list(owner._buffers.items()):
            key = prefix + name
            if value is not None and key in state:
                state[key] = full_tensor(state[key])

    from torch.distributed.fsdp import FSDPModule

    handles = [m.register_state_dict_post_hook(gather) for m in module.modules()]
    # FSDP2 gives each sharded module a subclass `FSDP<Class>`; saved configs (`model_index.json`,
    # `config.json`) must name the model's own class
    sharded = {m: type(m) for m in module.modules() if isinstance(m, FSDPModule)}
    for m, cls in sharded.items():
        m.__class__ = next(base for base in cls.__bases__ if base is not FSDPModule)
    try:
        yield
    finally:
        for m, cls in sharded.items():
            m.__class__ = cls
        for handle in handles:
            handle.remove()
