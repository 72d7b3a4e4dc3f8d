"""The trainable state of a module, for checkpoints: the parameters that require grad, by name.

A module sharded with FSDP2 (`fully_shard`, as accelerate's FSDP prepares it) holds each parameter
as a DTensor shard. Its state is read whole with `torch.distributed.checkpoint.state_dict`
(`get_model_state_dict(full_state_dict=True, cpu_offload=True)`) and written back with
`set_model_state_dict`; both are collectives, so every process calls them.

Under DeepSpeed ZeRO-1/2 every process holds whole weights, but the float32 master copy of each trained
parameter is partitioned over the processes with the optimizer state; it is read whole with DeepSpeed's
tensor-fragment API (`deepspeed.utils.safe_get_full_fp32_param`, a collective) and written with
`safe_set_full_fp32_param`, so a checkpoint holds the weights the optimizer steps from.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether `module` (or a submodule) is sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def reshard(module: torch.nn.Module) -> None:
    """Drop the whole copies FSDP2 gathered for a forward (local, no communication): the module's
    registered parameters are its shards again, and its next forward gathers them anew."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def named_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """`{name: parameter}` of `module`, a sharded module's in their sharded form, named as in the unwrapped
    module (without the prefixes of activation-checkpoint or compile wrappers)."""
    from accelerate.utils.fsdp_utils import fsdp2_canonicalize_names

    reshard(module)
    return fsdp2_canonicalize_names(dict(module.named_parameters()))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole, detached, on CPU: a DTensor shard is gathered (a collective: every process calls it)."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def is_zero_managed(module: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO keeps the float32 masters of `module`'s trained parameters (ZeRO links each
    trained parameter to its fragment of the partitioned masters as `_hp_mapping`)."""
    return any(hasattr(p, "_hp_mapping") for p in module.parameters())


def holds_whole_state(module: torch.nn.Module) -> bool:
    """Whether this process receives whole tensors from `trainable_state(module)`: always, unless the
    module is sharded, where only the main process (rank 0) does."""
    return not is_sharded(module) or torch.distributed.get_rank() == 0


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor, the same on every process) as `like` holds it: this process's shard of a
    DTensor `like` (a collective), else `value` itself."""
    if isinstance(like, DTensor):
        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements)
    return value


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`{name: weight}` of the parameters of `module` that require grad, detached, on CPU (views of CPU
    weights: write them before training goes on). A sharded module's weights are gathered whole onto
    the main process (every process calls this; the others get an empty dict). Under DeepSpeed ZeRO the
    float32 masters are gathered whole onto every process (every process calls this)."""
    if is_zero_managed(module):
        from deepspeed.utils import safe_get_full_fp32_param

        trained = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        return {n: safe_get_full_fp32_param(p).detach().cpu().contiguous() for n, p in trained}
    if not is_sharded(module):
        return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
    names = [n for n, p in named_parameters(module).items() if p.requires_grad]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    full = get_model_state_dict(module, options=options)
    return {n: full[n] for n in names if n in full}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (written by `trainable_state`) into `module`; names missing on either side are a
    `KeyError` naming a few of them, a tensor of another shape a `ValueError` naming it (`copy_` would
    broadcast it silently). A sharded module takes each process's shard of the whole tensors (every
    process calls this with the same `state`); under DeepSpeed ZeRO each process writes the whole weight
    and its own fragment of the float32 master."""
    params = named_parameters(module)
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unexpected = [n for n in state if n not in params]
    if missing or unexpected:
        raise KeyError(f"trainable state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, value in state.items():
        if value.shape != params[name].shape:
            raise ValueError(f"trainable state {name!r} has shape {tuple(value.shape)}, the model's "
                             f"{tuple(params[name].shape)}")  # fmt: skip
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))
        return
    if is_zero_managed(module):
        from deepspeed.utils import safe_set_full_fp32_param

        for name, value in state.items():
            safe_set_full_fp32_param(params[name], value.to(torch.float32))
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
