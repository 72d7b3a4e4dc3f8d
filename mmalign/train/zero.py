"""DeepSpeed ZeRO-1/2 optimizer state, read and written as the state dict of an unsharded optimizer.

ZeRO (`DeepSpeedZeroOptimizer`) keeps, for each parameter group, one flat float32 partition of the
group's trained parameters on each process (`single_partition_of_fp32_groups[g]`, the masters) and the
base optimizer's state of that partition (AdamW: `step`, and `exp_avg` / `exp_avg_sq` shaped like the
partition). DeepSpeed's tensor-fragment API reads one parameter's slice of a state whole
(`deepspeed.utils.safe_get_full_optimizer_state`, a collective: every process calls it) and writes this
process's fragment of it (`safe_set_full_optimizer_state`).

`optimizer_state` therefore returns what `torch.optim.AdamW.state_dict()` returns on one process
(integer ids numbering the trained parameters group by group, in the order the optimizer was built
with), and `restore_optimizer` takes it back: a ZeRO run resumes from its own checkpoints, and from
those of a one-process, DDP or FSDP run of the same recipe, on any number of processes.
"""

from __future__ import annotations

from typing import Any

import torch


def is_zero_optimizer(optimizer: Any) -> bool:
    """Whether `optimizer` is DeepSpeed's ZeRO-1/2 optimizer (the `.optimizer` of accelerate's wrapper)."""
    return hasattr(optimizer, "single_partition_of_fp32_groups") and hasattr(optimizer, "bit16_groups")


def _per_element(value: Any) -> bool:
    """Whether an optimizer state entry holds one value per element (AdamW's moments, shaped like the
    parameter or the flat partition), not one for the whole tensor (its step count, a 0-d tensor)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0


def optimizer_state(zero: Any) -> dict[str, Any]:
    """The state dict of an unsharded optimizer over the same parameters: `{"state": {"<id>": {name:
    tensor}}, "param_groups": [{hyper-parameters, "params": [ids]}]}`, whole on every process (every
    process calls it)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = zero.optimizer
    state: dict[str, Any] = {}
    groups = []
    index = 0
    for group, params, partition in zip(base.param_groups, zero.bit16_groups, zero.single_partition_of_fp32_groups):
        flat_state = base.state.get(partition, {})
        ids = []
        for param in params:
            if flat_state:
                state[str(index)] = {
                    key: safe_get_full_optimizer_state(param, key).detach().cpu().clone()
                    if _per_element(value)
                    else (value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value)
                    for key, value in flat_state.items()
                }
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def restore_optimizer(zero: Any, saved: dict[str, Any]) -> None:
    """Load `saved` (`optimizer_state`, or an unsharded optimizer's state dict with integer or string ids)
    into ZeRO: each process writes its fragment of every per-parameter tensor, the group's scalars (AdamW's
    `step`) and the groups' hyper-parameters (the learning rate the scheduler last set among them)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    base = zero.optimizer
    entries = {int(k): v for k, v in saved["state"].items()}
    saved_groups = saved["param_groups"]
    sizes = [len(params) for params in zero.bit16_groups]
    if sizes != [len(g["params"]) for g in saved_groups]:
        raise ValueError("the optimizer state does not hold this run's trainable parameters")
    for group, saved_group, partition in zip(base.param_groups, saved_groups, zero.single_partition_of_fp32_groups):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved_group.items() if k != "params"})
        states = [entries.get(i) for i in saved_group["params"]]
        if not any(states):
            continue
        first = next(s for s in states if s)
        # the base optimizer's state of the flat partition: per-element tensors are filled below, one
        # parameter's fragment at a time; the rest (AdamW's step count) is shared by the group
        base.state[partition] = {
            key: torch.zeros_like(partition)
            if _per_element(value)
            else (value.clone() if isinstance(value, torch.Tensor) else value)
            for key, value in first.items()
        }
    # ZeRO links each parameter's fragment to the partition's state at its first step; link it now
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
    for saved_group, params in zip(saved_groups, zero.bit16_groups):
        for i, param in zip(saved_group["params"], params):
            for key, value in (entries.get(i) or {}).items():
                if _per_element(value):
                    safe_set_full_optimizer_state(param, value.to(torch.float32), key)
