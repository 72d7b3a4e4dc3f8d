"""Sharded training through accelerate: which kind a launch asked for, and whole weights for saving.

`accelerate launch --config_file configs/accelerate/fsdp.yaml …` asks for FSDP; accelerate's
`prepare` then shards the trainable module in place with FSDP2's `fully_shard` and points the
optimizer at the shards. The trainer reads and writes the sharded state whole through
`torch.distributed.checkpoint.state_dict` (`mmalign.models.state`, `mmalign.train.checkpoint`),
so checkpoints and saved results are the files a single process writes.

- `use_fsdp_on_cpu`: accelerate selects FSDP on accelerator devices only and leaves CPU processes
  (gloo) as plain data-parallel; FSDP2 runs there too, so a CPU launch with an FSDP config gets it.
- `accelerator_options`: what `Accelerator` needs for the launch; DeepSpeed on CPU processes gets a
  gloo group (accelerate would run each process alone).
- `configure_deepspeed`: the DeepSpeed config's batch sizes, gradient accumulation and clipping, from
  the recipe (DeepSpeed steps, accumulates and clips inside `accelerator.backward`).
- `check_supported`: FSDP1, DeepSpeed ZeRO-3 and ZeRO offload are refused with a one-line error naming
  what to use.
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
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

from mmalign.config import ConfigError, TrainConfig
from mmalign.models.state import full_tensor, is_sharded


def deepspeed_asked() -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_options(has_accelerator: bool) -> dict:
    """`Accelerator` keyword arguments for this launch. Without an accelerator device, processes launched
    by torchrun form a gloo group through accelerate's CPU mode; a DeepSpeed launch instead keeps the
    device mode (DeepSpeed's CPU accelerator) and names gloo as the backend, since accelerate's CPU mode
    turns DeepSpeed off."""
    if has_accelerator:
        return {"cpu": False}
    if deepspeed_asked():
        return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def configure_deepspeed(accelerator, train: TrainConfig) -> None:
    """Write the recipe's batch sizes, gradient accumulation and clipping into the DeepSpeed config before
    `prepare` (the trainer passes no data loader for accelerate to read them from). `train.batch_size` is
    the global batch: each process's micro-batch is `batch_size / processes`."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    micro = max(train.batch_size // accelerator.num_processes, 1)
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = train.gradient_accumulation_steps
    config["train_batch_size"] = micro * train.gradient_accumulation_steps * accelerator.num_processes
    config["gradient_clipping"] = train.max_grad_norm if train.max_grad_norm is not None else 0.0


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


def check_supported(accelerator, train: TrainConfig) -> None:
    """Refuse the accelerate setups the trainer cannot train, checkpoint or resume exactly."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError(
            "the accelerate config asks for FSDP version 1; mmalign trains with FSDP2: set fsdp_version: 2 "
            "in its fsdp_config (configs/accelerate/fsdp.yaml)"
        )
    if kind != DistributedType.DEEPSPEED:
        return
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage not in (1, 2):
        raise ConfigError(
            f"the accelerate config asks for DeepSpeed ZeRO stage {stage}; mmalign trains with ZeRO-1 or ZeRO-2 "
            "(configs/accelerate/zero2.yaml); to shard the weights too use FSDP2 (configs/accelerate/fsdp.yaml), "
            "and without sharding DDP (configs/accelerate/ddp.yaml)"
        )
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") != "none":
            raise ConfigError(
                f"the accelerate config asks for DeepSpeed {key} (ZeRO offload), which mmalign does not train "
                "with; set it to none, or use FSDP2 with fsdp_offload_params: true (configs/accelerate/fsdp.yaml)"
            )
    if train.optimizer != "adamw":
        raise ConfigError(
            f"config key 'train.optimizer' is {train.optimizer}, which DeepSpeed ZeRO does not partition; "
            "set train.optimizer=adamw, or launch with FSDP2 (configs/accelerate/fsdp.yaml)"
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
