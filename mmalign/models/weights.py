"""Which weight files mmalign reads: safetensors, and pickled files only when the user allows them.

A pickled weight file (`pytorch_model.bin`, `diffusion_pytorch_model.bin`, `adapter_model.bin`,
`open_clip_pytorch_model.bin`, a LoRA `.bin`) can run arbitrary code when unpickled, so every loader
refuses it unless the caller passes `allow_pickle=True` (`model.allow_pickle=true` in a recipe,
`--allow-pickle` on the CLI, `load_reward(..., allow_pickle=True)` in Python). Even then it is read
with `torch.load(weights_only=True)`: `reading_weights` sets torch's `TORCH_FORCE_WEIGHTS_ONLY_LOAD`
for the duration of the load, which overrides any `weights_only=False` a library might pass, and a
file holding anything but tensors and plain containers is a one-line error naming it.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmalign.errors import UserInputError

PICKLE_HINT = (
    "allow pickled weights (model.allow_pickle=true, --allow-pickle, allow_pickle=True) to read them with "
    "torch.load(weights_only=True)"
)
_FORCE_SAFE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_UNSAFE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class PickledWeightsError(UserInputError):
    """Pickled weights met without `allow_pickle`, or a pickle holding more than tensors."""


def use_safetensors(allow_pickle: bool) -> bool | None:
    """The `use_safetensors` argument of diffusers/transformers `from_pretrained`: `True` forbids
    pickled files, `None` prefers safetensors and falls back to `.bin`."""
    return None if allow_pickle else True


def refuse_pickled(source: str | Path, what: str = "weights") -> PickledWeightsError:
    """The error for a folder or file whose `what` exist only as a pickle."""
    return PickledWeightsError(f"{source}: the {what} are pickled, which can run code when read; {PICKLE_HINT}")


def pickled_only_folder(folder: str | Path) -> Path | None:
    """The first folder under a local `folder` (itself included) whose weight files are all pickled
    (`.bin`, `.pt`, `.pth` and no `.safetensors`), or `None`. A pipeline's components are checked
    one by one; a Hub id (not a local folder) is left to the loader."""
    root = Path(folder)
    if not root.is_dir():
        return None
    suffixes: dict[Path, set[str]] = {}
    for file in sorted(root.rglob("*")):
        if file.suffix in (".bin", ".pt", ".pth", ".safetensors") and file.is_file():
            suffixes.setdefault(file.parent, set()).add(file.suffix)
    return next((d for d, found in suffixes.items() if ".safetensors" not in found), None)


@contextmanager
def reading_weights(source: str | Path, allow_pickle: bool) -> Iterator[None]:
    """Run a load: without `allow_pickle` a folder holding only pickled weights is refused before any
    library sees it; with it, every `torch.load` inside is forced to `weights_only=True`.

    The override is an environment variable torch reads at each `torch.load`, restored afterwards.
    """
    if not allow_pickle:
        pickled = pickled_only_folder(source)
        if pickled is not None:
            raise refuse_pickled(pickled)
        yield
        return
    saved = {name: os.environ.pop(name, None) for name in (_FORCE_SAFE, _FORCE_UNSAFE)}
    os.environ[_FORCE_SAFE] = "1"
    try:
        yield
    except (pickle.UnpicklingError, OSError) as exc:
        refused = _unpickling_error(exc)
        if refused is None:
            raise
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(refused))
        raise PickledWeightsError(
            f"{source}: a pickled weight file holds more than tensors"
            + (f" (it calls {named.group(1)})" if named else "")
            + "; refused with weights_only=True"
        ) from exc
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _unpickling_error(exc: BaseException) -> pickle.UnpicklingError | None:
    """The `UnpicklingError` behind `exc` (diffusers and transformers re-raise it as an `OSError`)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, pickle.UnpicklingError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def read_state_dict(file: str | Path, allow_pickle: bool, key: str | None = None) -> dict:
    """Tensors of one weight file: `.safetensors` always; a pickled `.pt`/`.pth`/`.bin` only with
    `allow_pickle`, read with `torch.load(weights_only=True)`.

    `key` picks a nested state dict out of a pickled checkpoint (`"state_dict"` in HPSv2's release);
    a pickle without that key is read as the state dict itself.
    """
    import torch

    file = Path(file)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    if not allow_pickle:
        raise refuse_pickled(file)
    with reading_weights(file, allow_pickle=True):
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    if key is not None and isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
        loaded = loaded[key]
    if not isinstance(loaded, dict):
        raise PickledWeightsError(f"{file}: expected a state dict, found a {type(loaded).__name__}")
    return loaded


def find_weight_file(source: str | Path, release_names: tuple[str, ...]) -> Path:
    """The weight file of `source`: itself if it is a file, else the first of `release_names` found in
    the folder, each preferred as its converted `.safetensors` twin (same stem) over the pickled release."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise UserInputError(f"{source}: no such file or folder")
    candidates = [source / Path(n).with_suffix(".safetensors").name for n in release_names]
    candidates += [source / n for n in release_names]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserInputError(f"{source}: holds none of {', '.join(c.name for c in candidates)}")
