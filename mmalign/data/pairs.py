"""Image preference pairs: Pick-a-Pic-style `datasets` and local folders with a JSONL index.

Sources (`load_pairs(path)`):
- a folder holding `pairs.jsonl`, or a `.jsonl` file: one object per line with `image_0`,
  `image_1` (paths relative to the JSONL's folder), `prompt`, and `label`: the index of the
  preferred image (0 or 1), or 0.5 for a tie;
- a `datasets` dataset, by Hub name or local folder (`save_to_disk`, parquet, …), with
  Pick-a-Pic v2 columns `jpg_0`, `jpg_1` (encoded image bytes or images), `label_0` (1 when
  image 0 is preferred, 0 when image 1 is, 0.5 for a tie) and `caption`.

Ties are dropped by default. Every problem stops with a `DataError` naming the file, the row
(1-based line number for JSONL, 0-based index for datasets) and the field.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmalign.data.images import IMAGE_ERRORS, to_rgb
from mmalign.errors import UserInputError

JSONL_NAME = "pairs.jsonl"
JSONL_FIELDS = ("image_0", "image_1", "label", "prompt")
PICKAPIC_FIELDS = ("jpg_0", "jpg_1", "label_0", "caption")


class DataError(UserInputError):
    """Unusable training data; the message names the file, row and field."""


def _where(source: str, row: int | None = None, field: str | None = None) -> str:
    parts = [source]
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field {field!r}")
    return ", ".join(parts)


def jsonl_rows(path: Path, fields: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line number, row)` for each non-blank line of a JSONL file whose rows must hold `fields`.

    A line that is not JSON, not an object or lacks a field raises a `DataError` naming the file,
    the row and the field.
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{_where(str(path), line_no)}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{_where(str(path), line_no)}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{_where(str(path), line_no)}: expected a JSON object with fields {', '.join(fields)}")
            for name in fields:
                if name not in row:
                    raise DataError(f"{_where(str(path), line_no, name)}: missing field")
            yield line_no, row


@dataclass(frozen=True)
class PairRecord:
    """One comparison: the preferred image first. Images are paths, bytes or PIL images."""

    prompt: str
    image_w: Any
    image_l: Any
    where: str  # "<file>, row N" for error messages


def decode_image(image: Any, where: str) -> Image.Image:
    """A PIL image, bytes, a `datasets` Image value or a file path → an RGB image (`DataError` naming `where`)."""
    try:
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, dict) and "bytes" in image:  # datasets' Image feature, undecoded
            image = image["bytes"]
        if isinstance(image, (bytes, bytearray)):
            with Image.open(io.BytesIO(image)) as im:
                return to_rgb(im)
        with Image.open(image) as im:
            return to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found: {image}") from None
    except IMAGE_ERRORS as exc:
        raise DataError(f"{where}: corrupt or unreadable image ({exc})") from None


def inside(folder: Path, relative: str, where: str) -> Path:
    """`folder / relative`, refused (naming `where`) when a relative path climbs out of the data folder
    (`../secret.png`); absolute paths are taken as given."""
    path = folder / relative
    if not Path(relative).is_absolute() and not path.resolve().is_relative_to(folder.resolve()):
        raise DataError(f"{where}: {relative!r} leaves the data folder {folder}; give it inside or as an absolute path")
    return path


def _winner_first(label: Any, where: str, one_means_first: bool) -> bool | None:
    """True if the first image wins, False if the second does, None for a tie."""
    if isinstance(label, bool) or not isinstance(label, (int, float)):
        raise DataError(f"{where}: unknown label {label!r}; expected the number 0, 1 or 0.5")
    value = float(label)
    if value == 0.5:
        return None
    if value not in (0.0, 1.0):
        raise DataError(f"{where}: unknown label {label!r}; expected 0, 1 or 0.5")
    return (value == 1.0) == one_means_first


def _check_prompt(prompt: Any, where: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: prompt must be a non-empty string, got {prompt!r}")
    return prompt


def read_jsonl(path: Path, verify_images: bool = True) -> tuple[list[PairRecord], int]:
    """Records of a `pairs.jsonl` (winner first) and the number of ties found."""
    root = path.parent
    records, ties = [], 0
    for line_no, row in jsonl_rows(path, JSONL_FIELDS):
        where = _where(str(path), line_no)
        prompt = _check_prompt(row["prompt"], _where(str(path), line_no, "prompt"))
        images = []
        for name in ("image_0", "image_1"):
            value = row[name]
            if not isinstance(value, str) or not value:
                raise DataError(f"{_where(str(path), line_no, name)}: expected an image path, got {value!r}")
            image_path = inside(root, value, _where(str(path), line_no, name))
            if not image_path.is_file():
                raise DataError(f"{_where(str(path), line_no, name)}: image file not found: {image_path}")
            if verify_images:
                decode_image(image_path, _where(str(path), line_no, name))
            images.append(image_path)
        first = _winner_first(row["label"], _where(str(path), line_no, "label"), one_means_first=False)
        if first is None:
            ties += 1
            continue
        w, lose = (images[0], images[1]) if first else (images[1], images[0])
        records.append(PairRecord(prompt, w, lose, where))
    return records, ties


def read_pickapic(dataset, source: str) -> tuple[list[PairRecord], int]:
    """Records of a Pick-a-Pic-style `datasets.Dataset` (winner first) and the number of ties."""
    missing = [c for c in PICKAPIC_FIELDS if c not in dataset.column_names]
    if missing:
        raise DataError(f"{_where(source, None, missing[0])}: missing column (columns: {dataset.column_names})")
    labels = dataset["label_0"]
    captions = dataset["caption"]
    records, ties = [], 0
    for i, (label, caption) in enumerate(zip(labels, captions)):
        first = _winner_first(label, _where(source, i, "label_0"), one_means_first=True)
        if first is None:
            ties += 1
            continue
        prompt = _check_prompt(caption, _where(source, i, "caption"))
        records.append(
            PairRecord(
                prompt, ("jpg_0" if first else "jpg_1", i), ("jpg_1" if first else "jpg_0", i), _where(source, i)
            )
        )
    return records, ties


def open_dataset(path: str, split: str):
    """Split `split` of a `datasets` dataset: a `save_to_disk` folder (one dataset or a `DatasetDict`), or
    anything `datasets.load_dataset` opens (a Hub name, a folder of parquet/JSON files)."""
    import datasets

    local = Path(path)
    try:
        if not any((local / name).exists() for name in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return datasets.load_dataset(path, split=split)
        loaded = datasets.load_from_disk(str(local))
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise DataError(f"{path}: cannot open split {split!r} as a dataset ({exc})") from None
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if split not in loaded:
        raise DataError(f"{path}: no split {split!r}; it has {', '.join(loaded)}")
    return loaded[split]


class PreferencePairs(torch.utils.data.Dataset):
    """Preference pairs as training samples.

    Item: `{"prompt": str, "pixels_w": (3, R, R), "pixels_l": (3, R, R), "index": int}` with
    pixels in [-1, 1]: resized (bilinear, short side R), centre- or random-cropped, optionally
    flipped. Random choices are keyed by `(seed, epoch, index)` so a resumed run repeats them.
    """

    def __init__(
        self,
        records: list[PairRecord],
        resolution: int,
        dataset=None,
        random_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
    ):
        self.records, self.dataset = records, dataset
        self.resolution, self.random_crop, self.random_flip, self.seed = resolution, random_crop, random_flip, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def pair_images(self, index: int) -> tuple[Image.Image, Image.Image]:
        """The untransformed (winner, loser) images of pair `index`."""
        record = self.records[index]
        if isinstance(record.image_w, tuple):  # (column, row) references into a datasets table
            (col_w, row), (col_l, _) = record.image_w, record.image_l
            data = self.dataset[row]
            return (
                decode_image(data[col_w], f"{record.where}, field {col_w!r}"),
                decode_image(data[col_l], f"{record.where}, field {col_l!r}"),
            )
        return decode_image(record.image_w, record.where), decode_image(record.image_l, record.where)

    def _crop(self, image: Image.Image, rng: np.random.Generator | None) -> Image.Image:
        """`image` resized (bilinear, short side R) and cropped to R×R: at random with `random_crop` (drawn
        from `rng`), else centred."""
        r = self.resolution
        w, h = image.size
        scale = r / min(w, h)
        size = (max(r, round(w * scale)), max(r, round(h * scale)))
        image = image.resize(size, Image.BILINEAR)
        if self.random_crop:
            left, top = int(rng.integers(size[0] - r + 1)), int(rng.integers(size[1] - r + 1))
        else:
            left, top = (size[0] - r) // 2, (size[1] - r) // 2
        return image.crop((left, top, left + r, top + r))

    def _flip(self, rng: np.random.Generator) -> bool:
        """Whether to flip an image (drawn only with `random_flip`)."""
        return self.random_flip and rng.random() < 0.5

    def _transform(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        image = self._crop(image, rng)
        pixels = image_tensor(image)
        return pixels.flip(-1) if self._flip(rng) else pixels

    def item_rng(self, index: int) -> np.random.Generator:
        """The generator of item `index`'s random crops and flips in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def flips(self, index: int) -> tuple[bool, bool]:
        """Whether item `index` flips its winner and its loser this epoch, as `__getitem__` draws them
        (without `random_crop`, whose draws come first)."""
        if self.random_crop:
            raise ValueError("flips are drawn after random crops; without crops only")
        rng = self.item_rng(index)
        return self._flip(rng), self._flip(rng)

    def centred_pixels(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair `index`'s (winner, loser) pixels `(3, R, R)` in [-1, 1], centre-cropped and unflipped."""
        if self.random_crop:
            raise ValueError("centred_pixels needs random_crop off")
        image_w, image_l = self.pair_images(index)
        return image_tensor(self._crop(image_w, None)), image_tensor(self._crop(image_l, None))

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        rng = self.item_rng(index)
        image_w, image_l = self.pair_images(index)
        return {
            "prompt": record.prompt,
            "pixels_w": self._transform(image_w, rng),
            "pixels_l": self._transform(image_l, rng),
            "index": index,
        }


def image_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image → pixels `(3, H, W)` in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pair items → a batch: `prompt` a list, `index (B,)`, and every other (tensor) key stacked `(B, …)`."""
    batch = {"prompt": [it["prompt"] for it in items], "index": torch.tensor([it["index"] for it in items])}
    for key in items[0]:
        if key not in batch:
            batch[key] = torch.stack([it[key] for it in items])
    return batch


def load_pairs(
    path: str | Path,
    *,
    split: str = "train",
    resolution: int,
    drop_ties: bool = True,
    max_pairs: int | None = None,
    random_crop: bool = False,
    random_flip: bool = False,
    seed: int = 0,
    verify_images: bool = True,
) -> PreferencePairs:
    """Open a pair source (see the module docstring) as a `PreferencePairs` dataset."""
    path = str(path)
    local = Path(path)
    dataset = None
    jsonl = local if local.suffix == ".jsonl" else local / JSONL_NAME
    if jsonl.is_file():
        records, ties = read_jsonl(jsonl, verify_images=verify_images)
        source = str(jsonl)
    elif local.suffix == ".jsonl":
        raise DataError(f"{path}: no such file")
    else:
        dataset = open_dataset(path, split)
        records, ties = read_pickapic(dataset, path)
        source = path
    if ties and not drop_ties:
        raise DataError(f"{source}: {ties} tied pairs (label 0.5); set data.drop_ties=true to skip them")
    if max_pairs is not None:
        records = records[:max_pairs]
    if not records:
        raise DataError(f"{source}: no usable preference pairs ({ties} ties dropped)")
    return PreferencePairs(records, resolution, dataset, random_crop, random_flip, seed)
