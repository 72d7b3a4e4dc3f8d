"""Atomic, pickle-free checkpoints that resume a run exactly.

A checkpoint is a folder `checkpoints/step-000100/` holding

- `trainable.safetensors`      the method's trainable weights (LoRA matrices or the denoiser);
- `optimizer.safetensors/.json` optimizer tensors and the rest of its state dict;
- `scheduler.json`             the learning-rate scheduler's state dict;
- `rng-rank{r}.safetensors/.json` torch (CPU and CUDA), NumPy and Python RNG states per process;
- `trainer_state.json`         step, epoch, data position, evaluation history (written last).

It is written into a temporary sibling and renamed into place, so a folder named `step-*` is
always complete; a run killed while writing leaves only a `.tmp-*` folder, removed at the next
start, and an old checkpoint is renamed to a `.tmp-*` name before it is deleted. A checkpoint that
cannot be read (a truncated file, a disk error) is passed over for the newest intact one, and one
whose recorded step disagrees with its folder name is refused (`read_newest_intact`). Nothing is
unpickled: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmalign.errors import UserInputError
from mmalign.io import atomic_write_json
from mmalign.models.state import is_sharded, named_parameters
from mmalign.train import zero

PREFIX = "step-"


def _flatten_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested dict/list by `{"__tensor__": key}` and collect them."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "_"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {str(k): _flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k), tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten_tensors(v, f"{prefix}.{i}" if prefix else str(i), tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _unflatten_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten_tensors(v, tensors) for v in obj]
    return obj


def _copy_shared(tensors: dict[str, torch.Tensor]) -> None:
    """Give each tensor that shares storage with an earlier one its own copy (safetensors refuses shared
    storage; bitsandbytes' 8-bit optimizer states share one quantisation map per optimizer)."""
    seen: set[int] = set()
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensors[key] = tensor.clone()
        elif tensor.numel():
            seen.add(storage)


def save_state(directory: Path, name: str, state: Any) -> None:
    """A nested state (dicts, lists, tensors, numbers) as `name.safetensors` + `name.json`."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten_tensors(state, "", tensors)
    _copy_shared(tensors)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(directory: Path, name: str) -> Any:
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return _unflatten_tensors(json.loads((directory / f"{name}.json").read_text()), tensors)


def optimizer_state(optimizer: torch.optim.Optimizer, module: torch.nn.Module | None = None) -> dict[str, Any]:
    """The optimizer state dict with integer parameter keys made JSON-safe (restored on load).

    With `module`, a module sharded by FSDP2 that `optimizer` trains: the state is gathered whole onto
    the main process (`get_optimizer_state_dict(full_state_dict=True, cpu_offload=True)`, a collective:
    every process calls it, the others get an empty state) and keyed by the integer ids an unsharded
    optimizer uses, so the checkpoint is the one a single process writes. DeepSpeed ZeRO's partitioned
    state is gathered the same way (`mmalign.train.zero`; every process calls it)."""
    if zero.is_zero_optimizer(optimizer):
        return zero.optimizer_state(optimizer)
    if module is None or not is_sharded(module):
        state = optimizer.state_dict()
        return {"state": {str(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_optimizer_state_dict(module, optimizer, options=options)
    ids = {name: i for i, name in enumerate(n for group in full.get("param_groups", []) for n in group["params"])}
    groups = [{**g, "params": [ids[n] for n in g["params"]]} for g in full.get("param_groups", [])]
    return {"state": {str(ids[n]): v for n, v in full.get("state", {}).items()}, "param_groups": groups}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, saved: dict[str, Any], module: torch.nn.Module | None = None
) -> None:
    """Load what `optimizer_state` wrote; with an FSDP2-sharded `module`, each process takes its shard
    (every process calls it with the same `saved`), as does DeepSpeed ZeRO's optimizer."""
    if zero.is_zero_optimizer(optimizer):
        zero.restore_optimizer(optimizer, saved)
        return
    state = {int(k): v for k, v in saved["state"].items()}
    for group in saved["param_groups"]:
        for key in ("betas",):
            if key in group and isinstance(group[key], list):
                group[key] = tuple(group[key])
    if module is None or not is_sharded(module):
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in named_parameters(module).items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(params) != sum(len(g["params"]) for g in saved["param_groups"]) or any(id(p) not in names for p in params):
        raise ValueError("the optimizer state does not hold this run's trainable parameters")
    order = [names[id(p)] for p in params]  # the integer ids' names
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
    full = {"state": {order[i]: v for i, v in state.items()}, "param_groups": groups}
    set_optimizer_state_dict(module, optimizer, full, options=StateDictOptions(full_state_dict=True))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


class CheckpointError(UserInputError):
    """A checkpoint that must not be resumed from; the message names it."""


def remove_partial(root: Path) -> None:
    """Delete what a killed run left half-written or half-deleted under `root`: `.tmp-*` folders (a
    checkpoint or an atomic folder being written, a checkpoint being deleted) and `.old-*` ones (a
    folder being replaced)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{PREFIX}{step:06d}"


def write_checkpoint(
    root: Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler,
    trainer_state: dict[str, Any],
    process_index: int,
    is_main: bool,
    barrier,
) -> Path:
    """Write every part into a temporary folder, then (main process) rename it to `step-N`. `trainable`
    and `optimizer` (`optimizer_state`) are read on the main process only.

    `barrier()` synchronises processes: every rank writes its RNG state before the rename.
    """
    tmp = tmp_dir(root, step)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_state(tmp, f"rng-rank{process_index}", rng_state())
    if is_main:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        save_state(tmp, "optimizer", optimizer)
        atomic_write_json(tmp / "scheduler.json", scheduler.state_dict())
    barrier()
    final = root / f"{PREFIX}{step:06d}"
    if is_main:
        atomic_write_json(tmp / "trainer_state.json", trainer_state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints; each is renamed out of the `step-*` names first,
    so a kill during the deletion leaves a `.tmp-*` folder, never a partial `step-*` one."""
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        doomed = root / f".tmp-delete-{old.name}"
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def read_newest_intact(root: Path, process_index: int, say) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint under `root` that reads back whole, and its contents; None if none does.

    A damaged one (truncated or unreadable file) is reported through `say(message)` and passed over;
    one whose `trainer_state.json` records another step than its folder name is a `CheckpointError`.
    """
    for directory in reversed(checkpoint_dirs(root)):
        try:
            saved = read_checkpoint(directory, process_index)
        except CheckpointError:
            raise
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
            say(f"checkpoint {directory} is damaged ({type(exc).__name__}: {exc}); trying the one before it")
            continue
        step = saved["trainer_state"].get("step")
        if step != int(directory.name[len(PREFIX) :]):
            raise CheckpointError(
                f"{directory / 'trainer_state.json'} records step {step}, not the folder's; refusing to resume "
                "from a checkpoint that was moved or edited (remove it to resume from an earlier one)"
            )
        return directory, saved
    return None


def read_checkpoint(directory: Path, process_index: int) -> dict[str, Any]:
    """Everything `write_checkpoint` wrote, as Python objects (weights-only, no pickle)."""
    rng_name = f"rng-rank{process_index}"
    if not (directory / f"{rng_name}.json").exists():
        rng_name = "rng-rank0"  # resumed with more processes than saved: reuse rank 0's state
    saved = {
        "trainable": load_file(str(directory / "trainable.safetensors")),
        "optimizer": load_state(directory, "optimizer"),
        "scheduler": json.loads((directory / "scheduler.json").read_text()),
        "rng": load_state(directory, rng_name),
        "trainer_state": json.loads((directory / "trainer_state.json").read_text()),
    }
    optimizer = saved["optimizer"]
    layouts = {
        "optimizer.json": isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list),
        "scheduler.json": isinstance(saved["scheduler"], dict),
        "trainer_state.json": isinstance(saved["trainer_state"], dict),
    }
    for name, whole in layouts.items():
        if not whole:
            raise CheckpointError(
                f"{directory / name} does not hold what a checkpoint writes there (edited?); refusing to resume "
                "from it (remove the checkpoint to resume from an earlier one)"
            )
    return saved
