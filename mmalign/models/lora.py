"""Loading a diffusers LoRA folder into a pipeline, checking that every tensor found its layer.

`pipe.load_lora_weights` skips keys it cannot place (another format, another architecture) with a
log line at most, so a pipeline can run with part of an adapter. `load_lora` loads the same way
and then checks each saved tensor against the pipeline: a tensor that no LoRA layer holds is an
error naming the first few.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from mmalign.errors import UserInputError
from mmalign.models.weights import reading_weights, refuse_pickled, use_safetensors

LORA_FILE = "pytorch_lora_weights.safetensors"
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight")


class LoraLoadError(UserInputError):
    """An adapter whose tensors the pipeline cannot place; the message names them."""


def adapter_keys(directory: str | Path, allow_pickle: bool = False) -> list[str]:
    """The tensor names of the LoRA folder's safetensors file; a pickled `pytorch_lora_weights.bin`
    only with `allow_pickle` (read with `weights_only=True`)."""
    file = Path(directory) / LORA_FILE
    if file.is_file():
        with safe_open(str(file), framework="pt") as opened:
            return list(opened.keys())
    pickled = file.with_suffix(".bin")
    if pickled.is_file():
        if not allow_pickle:
            raise refuse_pickled(pickled, "LoRA weights")
        with reading_weights(pickled, allow_pickle):
            return list(torch.load(pickled, map_location="cpu", weights_only=True))
    raise LoraLoadError(f"{directory}: no {LORA_FILE} (a LoRA folder written by a run: run_dir/final/lora)")


def unplaced(pipe, keys: list[str]) -> list[str]:
    """The keys whose layer in `pipe` holds no LoRA adapter (`<component>.<module path>.<lora suffix>`)."""
    missing = []
    for key in keys:
        component, _, rest = key.partition(".")
        suffix = next((s for s in _SUFFIXES if rest.endswith(s)), None)
        module = getattr(pipe, component, None)
        if suffix is None or module is None:
            missing.append(key)
            continue
        try:
            layer = module.get_submodule(rest[: -len(suffix)])
        except AttributeError:
            missing.append(key)
            continue
        if not getattr(layer, "lora_A", None):
            missing.append(key)
    return missing


def load_lora(pipe, directory: str | Path, allow_pickle: bool = False) -> None:
    """`pipe.load_lora_weights(directory)`, then a `LoraLoadError` if any saved tensor was not placed.

    A pickled adapter (`pytorch_lora_weights.bin`) is read only with `allow_pickle`."""
    keys = adapter_keys(directory, allow_pickle)
    with reading_weights(directory, allow_pickle):
        pipe.load_lora_weights(str(directory), use_safetensors=use_safetensors(allow_pickle))
    missing = unplaced(pipe, keys)
    if missing:
        raise LoraLoadError(
            f"{directory}: {len(missing)} of {len(keys)} LoRA tensors have no layer in this "
            f"{type(pipe).__name__}: {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
        )
