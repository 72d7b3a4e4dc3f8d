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
#: the low-noise expert's adapter of a two-expert pipeline (Wan 2.2 A14B), beside `LORA_FILE`
EXPERT_LORA_FILE = "pytorch_lora_weights_transformer_2.safetensors"
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight")


class LoraLoadError(UserInputError):
    """An adapter whose tensors the pipeline cannot place; the message names them."""


def adapter_keys(directory: str | Path, allow_pickle: bool = False, weight_name: str = LORA_FILE) -> list[str]:
    """The tensor names of the LoRA folder's safetensors file `weight_name`; a pickled
    `pytorch_lora_weights.bin` only with `allow_pickle` (read with `weights_only=True`)."""
    file = Path(directory) / weight_name
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


def unplaced(pipe, keys: list[str], into: str | None = None) -> list[str]:
    """The keys whose layer in `pipe` holds no LoRA adapter (`<component>.<module path>.<lora suffix>`),
    looked up in the component `into` instead where given (an adapter loaded into `transformer_2`)."""
    missing = []
    for key in keys:
        component, _, rest = key.partition(".")
        suffix = next((s for s in _SUFFIXES if rest.endswith(s)), None)
        module = getattr(pipe, into or component, None)
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

    A folder that also holds `EXPERT_LORA_FILE` (a two-expert pipeline's low-noise adapter) loads it
    into `transformer_2`. A pickled adapter (`pytorch_lora_weights.bin`) is read only with `allow_pickle`."""
    keys = adapter_keys(directory, allow_pickle)
    with reading_weights(directory, allow_pickle):
        pipe.load_lora_weights(str(directory), use_safetensors=use_safetensors(allow_pickle))
    _check_placed(pipe, directory, keys, None)
    if (Path(directory) / EXPERT_LORA_FILE).is_file():
        if getattr(pipe, "transformer_2", None) is None:
            raise LoraLoadError(f"{directory}: {EXPERT_LORA_FILE} is a second expert's adapter; "
                                f"this {type(pipe).__name__} has no transformer_2")  # fmt: skip
        keys = adapter_keys(directory, weight_name=EXPERT_LORA_FILE)
        pipe.load_lora_weights(str(directory), weight_name=EXPERT_LORA_FILE, load_into_transformer_2=True)
        _check_placed(pipe, directory, keys, "transformer_2")


def _check_placed(pipe, directory: str | Path, keys: list[str], into: str | None) -> None:
    missing = unplaced(pipe, keys, into)
    if missing:
        raise LoraLoadError(
            f"{directory}: {len(missing)} of {len(keys)} LoRA tensors have no layer in this "
            f"{type(pipe).__name__}: {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
        )
