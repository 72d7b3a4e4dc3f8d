"""Precomputed autoencoder posteriors and prompt embeddings of preference pairs (`data.cache_latents`).

Offline pair methods would otherwise run the autoencoder on both images of every pair, and the text
encoders on every prompt, at every step. `cached_pairs` encodes the pair set once and stores it under
`<cache root>/latents/<key>/`:

- `shard-NNNNN.safetensors`: for pairs `[start, start + rows)`, tensors `w` and `l` `(rows, 2C, h, w)`
  holding the winner's and the loser's posterior, mean and log-variance along channels (diffusers'
  `DiagonalGaussianDistribution.parameters`), and with `random_flip` also `w_flip` and `l_flip`, the
  same of the mirrored images;
- `prompts.safetensors`: the `Conditioning` of every distinct prompt and of the empty prompt (prompt
  dropout), rows in the order of `prompts.json`;
- `manifest.json`: the key, the shapes and each file's size, written last.

Each step still draws a fresh posterior sample from the stored mean and variance with the sample's
keyed generator, so a cached run trains on the same latents as an uncached one (within the float
differences of encoding in other batches) and resumes exactly. (The diffusers SDXL fine-tuning script
stores one posterior sample per image instead, freezing that noise; Diffusion-DPO's reference script
encodes at every step.) The price is twice the storage of one sample.

The key covers the data (each pair's prompt and image: file path, size and modification time, or the
`datasets` fingerprint and row), the model (pipeline family, the autoencoder's and text encoders'
configs and weights, the tokenizers), the resolution, the flips and the weight dtype. Any change
gives another key, so another folder, built anew. Random crops cannot be cached (every epoch draws new
ones) and are refused. One process builds a folder while the others wait on its lock; a folder found
incomplete or damaged (missing file, wrong size, unreadable header, wrong shapes) is rebuilt.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mmalign.data.pairs import PreferencePairs
from mmalign.io import atomic_directory, atomic_write_json, cache_lock
from mmalign.models.families import Conditioning

FORMAT = 1
MANIFEST = "manifest.json"
PROMPTS_FILE = "prompts.safetensors"
PROMPTS_INDEX = "prompts.json"
SHARD_BYTES = 256 * 2**20  # a shard holds about this much (at least one pair)
BATCH_PIXELS = 8 * 512 * 512  # pixels the autoencoder encodes at once while building (at least one pair)
CONDITIONING_FIELDS = ("embeds", "pooled", "time_ids")


class CacheDamaged(Exception):
    """A cache folder that is incomplete or does not match its manifest (it is rebuilt)."""


# ---------------------------------------------------------------------------- the key
def _digest(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def data_identity(pairs: PreferencePairs) -> str:
    """A digest of the pairs in order: each prompt and its two images (a file's resolved path, size and
    modification time in ns; a `datasets` row by the set's fingerprint, column and row)."""
    fingerprint = getattr(pairs.dataset, "_fingerprint", None)

    def image(ref: Any) -> Any:
        if isinstance(ref, tuple):
            return [fingerprint, *ref]
        path = Path(ref)
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]

    h = hashlib.sha256()
    for record in pairs.records:
        h.update(json.dumps([record.prompt, image(record.image_w), image(record.image_l)]).encode())
    return h.hexdigest()


def _config_dict(module: Any) -> dict[str, Any]:
    """A module's config without what records where and by which library version it was saved."""
    config = module.config
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in values.items() if not k.startswith("_") and k != "transformers_version"}


def module_identity(module: torch.nn.Module) -> str:
    """A digest of a module's class, config and every weight (name, dtype, shape and bytes)."""
    h = hashlib.sha256(json.dumps([type(module).__name__, _config_dict(module)], sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_identity(tokenizer: Any) -> str:
    """A digest of a tokenizer: its serialisation when it is a fast one (without the truncation and padding
    state that each call sets), else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        described = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:
        described = tokenizer.get_vocab()
    return _digest([type(tokenizer).__name__, getattr(tokenizer, "model_max_length", None), described])


def model_identity(model) -> dict[str, str]:
    """`{component: digest}` of what encoding reads: the autoencoder, the text encoders and tokenizers."""
    parts = {"family": model.family.name, "pipeline": type(model.pipe).__name__}
    for name, component in model.pipe.components.items():
        if component is None:
            continue
        if name == "vae" or name.startswith("text_encoder"):
            parts[name] = module_identity(component)
        elif name.startswith("tokenizer"):
            parts[name] = tokenizer_identity(component)
    return parts


def cache_key(pairs: PreferencePairs, model, weight_dtype: str) -> dict[str, Any]:
    """Everything a cached pair set depends on (`cached_pairs` stores it in the manifest)."""
    if pairs.random_crop:
        raise ValueError("random crops cannot be cached: every epoch draws new ones")
    return {
        "format": FORMAT,
        "data": data_identity(pairs),
        "pairs": len(pairs),
        "model": model_identity(model),
        "resolution": pairs.resolution,
        "random_flip": pairs.random_flip,
        "dtype": weight_dtype,
    }


# ---------------------------------------------------------------------------- building
def _variants(random_flip: bool) -> tuple[str, ...]:
    return ("w", "l", "w_flip", "l_flip") if random_flip else ("w", "l")


def _encode_pairs(pairs: PreferencePairs, model, rows: range, batch_size: int) -> dict[str, torch.Tensor]:
    """The posteriors of pairs `rows`, one tensor `(len(rows), 2C, h, w)` per variant."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in _variants(pairs.random_flip)}
    for start in range(rows.start, rows.stop, batch_size):
        indices = range(start, min(rows.stop, start + batch_size))
        pixels = [pairs.centred_pixels(i) for i in indices]
        images = {"w": torch.stack([w for w, _ in pixels]), "l": torch.stack([lo for _, lo in pixels])}
        if pairs.random_flip:
            images.update(w_flip=images["w"].flip(-1), l_flip=images["l"].flip(-1))
        names = list(out)
        posterior = model.encode_posterior(torch.cat([images[name] for name in names])).cpu()
        for name, part in zip(names, posterior.chunk(len(names))):
            out[name].append(part)
    return {name: torch.cat(parts).contiguous() for name, parts in out.items()}


def _encode_prompts(pairs: PreferencePairs, model, batch_size: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Every distinct prompt and the empty one, and their conditioning tensors by field."""
    prompts = sorted({record.prompt for record in pairs.records} | {""})
    resolution = (pairs.resolution, pairs.resolution)
    parts = [model.encode_prompt(prompts[i : i + batch_size], resolution) for i in range(0, len(prompts), batch_size)]
    cond = Conditioning.cat(parts)
    tensors = {name: getattr(cond, name) for name in CONDITIONING_FIELDS if getattr(cond, name) is not None}
    return prompts, {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def build_cache(directory: Path, pairs: PreferencePairs, model, key: dict[str, Any]) -> None:
    """Encode `pairs` with `model` into `directory` (see the module doc); the folder appears complete or not at all."""
    n = len(pairs)
    variants = _variants(pairs.random_flip)
    batch_size = max(1, BATCH_PIXELS // (pairs.resolution**2 * len(variants)))
    side = -(-pairs.resolution // model.vae_scale_factor)
    pair_bytes = 4 * 2 * model.pipe.vae.config.latent_channels * side * side * len(variants)  # float32
    per_shard = max(1, SHARD_BYTES // pair_bytes)
    shards, shape = [], None
    with atomic_directory(directory) as tmp:
        bar = tqdm(total=n, desc="caching latents", unit="pair")
        for number, start in enumerate(range(0, n, per_shard)):
            rows = range(start, min(n, start + per_shard))
            name = f"shard-{number:05d}.safetensors"
            tensors = _encode_pairs(pairs, model, rows, batch_size)
            shape = list(tensors["w"].shape[1:])
            save_file(tensors, str(tmp / name))
            shards.append({"file": name, "start": rows.start, "rows": len(rows), "bytes": (tmp / name).stat().st_size})
            bar.update(len(rows))
        bar.close()
        prompts, cond = _encode_prompts(pairs, model, batch_size=64)
        save_file(cond, str(tmp / PROMPTS_FILE))
        atomic_write_json(tmp / PROMPTS_INDEX, prompts)
        manifest = {
            "key": key,
            "variants": list(variants),
            "posterior_shape": shape,
            "shards": shards,
            "prompts": {"file": PROMPTS_FILE, "count": len(prompts), "bytes": (tmp / PROMPTS_FILE).stat().st_size},
        }
        atomic_write_json(tmp / MANIFEST, manifest)


# ---------------------------------------------------------------------------- reading
def _open(path: Path, size: int) -> Any:
    """A lazily read safetensors file whose size is `size` bytes (`CacheDamaged` otherwise)."""
    if not path.is_file():
        raise CacheDamaged(f"{path.name} is missing")
    if path.stat().st_size != size:
        raise CacheDamaged(f"{path.name} has {path.stat().st_size} bytes, the manifest says {size}")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise CacheDamaged(f"{path.name} is not a readable safetensors file ({exc})") from None


def _check_shape(handle: Any, name: str, shape: list[int], file: str) -> None:
    if name not in set(handle.keys()):
        raise CacheDamaged(f"{file} lacks tensor {name!r}")
    found = list(handle.get_slice(name).get_shape())
    if found != shape:
        raise CacheDamaged(f"{file}: tensor {name!r} has shape {found}, expected {shape}")


@dataclass
class PromptTable:
    """The cached conditioning of every prompt of a pair set (and of the empty prompt)."""

    rows: dict[str, int]
    handle: Any

    def conditioning(self, prompts: list[str]) -> Conditioning:
        """The `Conditioning` of `prompts` (B rows), read from the cache."""
        missing = [p for p in prompts if p not in self.rows]
        if missing:
            raise KeyError(f"prompt {missing[0]!r} is not in the latent cache")
        rows = [self.rows[p] for p in prompts]
        fields = {}
        stored = set(self.handle.keys())
        for name in CONDITIONING_FIELDS:
            if name in stored:
                table = self.handle.get_slice(name)
                fields[name] = torch.cat([table[r : r + 1] for r in rows])
        return Conditioning(**fields)


class CachedPairs(torch.utils.data.Dataset):
    """The pairs of a `PreferencePairs` with their images as cached posteriors.

    Item: `{"prompt": str, "index": int, "posterior_w": (2C, h, w), "posterior_l": (2C, h, w)}`; with
    `random_flip` each image is the mirrored one's posterior when `PreferencePairs.flips` says so for
    the epoch (`set_epoch`), as the uncached items flip their pixels.
    """

    def __init__(self, pairs: PreferencePairs, directory: Path, key: dict[str, Any]):
        self.pairs, self.directory = pairs, Path(directory)
        manifest_path = self.directory / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise CacheDamaged(f"{MANIFEST} is missing or unreadable ({exc})") from None
        if manifest.get("key") != key:
            raise CacheDamaged(f"{MANIFEST} was written for another key")
        self.variants = tuple(manifest["variants"])
        shape = list(manifest["posterior_shape"])
        self.shards: list[tuple[int, int, Any]] = []
        covered = 0
        for shard in manifest["shards"]:
            if shard["start"] != covered:
                raise CacheDamaged(f"{shard['file']} starts at pair {shard['start']}, expected {covered}")
            handle = _open(self.directory / shard["file"], shard["bytes"])
            for name in self.variants:
                _check_shape(handle, name, [shard["rows"], *shape], shard["file"])
            self.shards.append((shard["start"], shard["rows"], handle))
            covered += shard["rows"]
        self.starts = [start for start, _, _ in self.shards]
        if covered != len(pairs):
            raise CacheDamaged(f"the shards hold {covered} pairs, the data has {len(pairs)}")
        prompts = manifest["prompts"]
        try:
            names = json.loads((self.directory / PROMPTS_INDEX).read_text())
        except (OSError, ValueError) as exc:
            raise CacheDamaged(f"{PROMPTS_INDEX} is missing or unreadable ({exc})") from None
        handle = _open(self.directory / prompts["file"], prompts["bytes"])
        if len(names) != prompts["count"]:
            raise CacheDamaged(f"{PROMPTS_INDEX} lists {len(names)} prompts, the manifest says {prompts['count']}")
        for name in list(handle.keys()):
            if handle.get_slice(name).get_shape()[0] != len(names):
                raise CacheDamaged(f"{prompts['file']}: tensor {name!r} does not have one row per prompt")
        self.prompts = PromptTable({p: i for i, p in enumerate(names)}, handle)

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.pairs.set_epoch(epoch)

    def posteriors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair `index`'s (winner, loser) posteriors `(2C, h, w)` for this epoch's flips."""
        flip_w, flip_l = self.pairs.flips(index)
        start, _, handle = self.shards[bisect.bisect_right(self.starts, index) - 1]
        row = index - start
        w = handle.get_slice("w_flip" if flip_w else "w")[row : row + 1][0]
        lo = handle.get_slice("l_flip" if flip_l else "l")[row : row + 1][0]
        return w, lo

    def __getitem__(self, index: int) -> dict[str, Any]:
        w, lo = self.posteriors(index)
        return {"prompt": self.pairs.records[index].prompt, "index": index, "posterior_w": w, "posterior_l": lo}


def cached_pairs(
    pairs: PreferencePairs,
    model,
    root: Path,
    weight_dtype: str,
    log: Callable[[str], None] = print,
) -> CachedPairs:
    """`pairs` with cached posteriors and prompt embeddings under `root/latents/<key>`: opened when the
    folder is complete, else (re)built with `model` first. Holds the folder's lock meanwhile, so
    concurrent runs and processes build it once."""
    key = cache_key(pairs, model, weight_dtype)
    directory = Path(root) / "latents" / _digest(key)[:20]
    with cache_lock(directory):
        if directory.exists():
            try:
                return CachedPairs(pairs, directory, key)
            except CacheDamaged as exc:
                log(f"latent cache {directory} is damaged ({exc}); rebuilding it")
        else:
            log(f"caching latents and prompt embeddings of {len(pairs)} pairs in {directory}")
        build_cache(directory, pairs, model, key)
        return CachedPairs(pairs, directory, key)
