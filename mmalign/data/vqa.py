"""Visual questions with verifiable answers, in the layouts public VLM-RL sets use.

Sources (`data.path` of the VLM RL methods):

- a JSONL file, one object per line; image paths are relative to the file's folder;
- a folder holding `<split>.jsonl` files (`train.jsonl`, `test.jsonl`, …);
- a `datasets` dataset: a `save_to_disk` folder (one dataset or a `DatasetDict`) or anything
  `datasets.load_dataset` opens (a Hub name, a folder of parquet files).

Columns (names configurable): `images` (one image or a list: `datasets` Image values, PIL images,
bytes or file paths; may be absent or empty for text-only rows), `problem` (the question; each
`<image>` in it marks where an image goes, else the images come first) and `answer` (the reference
answer the reward functions compare with; numbers are turned into text). An optional `response`
column holds a full target response for supervised fine-tuning.

Rows are checked when the set is opened (columns present, problem and answer non-empty) and images
are decoded when a row is used; every problem raises a `DataError` naming the source, the row
(1-based line for JSONL, 0-based index for `datasets`) and the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmalign.config import ConfigError, option
from mmalign.data.pairs import DataError, _where, decode_image, inside, jsonl_rows, open_dataset
from mmalign.models.vlm import Conversation

IMAGE_PLACEHOLDER = "<image>"
#: the answer format every built-in reward reads (`mmalign.vlm.rewards`)
DEFAULT_TEMPLATE = "{problem} Think in <think></think>, then answer in <answer></answer>."


@dataclass
class VQAColumns:
    """Which columns of a user's set hold what."""

    images: str = option("column with the image(s): one or a list (datasets Image, bytes or paths)", default="images")
    problem: str = option("column with the question text (`<image>` marks where an image goes)", default="problem")
    answer: str = option("column with the reference answer the reward functions compare with", default="answer")


@dataclass
class SFTColumns(VQAColumns):
    """The columns of a set with target responses (supervised fine-tuning)."""

    response: str = option("column with the full target response", default="response")


def question_conversation(images: Sequence[Image.Image], text: str, blind: bool, source: str) -> Conversation:
    """A one-turn chat asking `text` about `images`: each `<image>` in `text` places the next image, and
    without marks the images come first. `blind` shows all-black images of the same sizes instead."""
    shown = [Image.new("RGB", im.size) if blind else im for im in images]
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) == 1:
        content = [{"type": "image"} for _ in shown] + [{"type": "text", "text": text}]
    elif len(pieces) - 1 == len(shown):
        content = []
        for i, piece in enumerate(pieces):
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
            if i < len(shown):
                content.append({"type": "image"})
    else:
        marks = len(pieces) - 1
        raise DataError(f"{source}: the question has {marks} {IMAGE_PLACEHOLDER} marks but {len(shown)} image(s)")
    return Conversation([{"role": "user", "content": content}], shown, source)


@dataclass(frozen=True)
class VQAItem:
    """One question of a user's set: text, images and reference answer; `where` names it in errors."""

    problem: str
    answer: str
    images: tuple[Image.Image, ...]
    where: str
    template: str = DEFAULT_TEMPLATE
    response: str | None = None
    kind: str = "all"

    @property
    def text(self) -> str:
        return self.problem

    def conversation(self, blind: bool = False) -> Conversation:
        """The chat prompt; `blind` shows all-black images of the same sizes (the blind control)."""
        return question_conversation(self.images, self.template.replace("{problem}", self.problem), blind, self.where)

    def reference_response(self) -> str:
        if self.response is None:
            raise DataError(f"{self.where}: no target response (the data's response column) for supervised training")
        return self.response


class VQASet:
    """The rows of one split; `item(i)` decodes row `i`'s images into a `VQAItem`.

    `rows`: the raw rows (dicts) or a `datasets.Dataset`; `folder`: where relative image paths start.
    """

    def __init__(
        self,
        rows: Any,
        columns: VQAColumns,
        source: str,
        folder: Path | None,
        template: str,
        line_numbers: Sequence[int] | None = None,
    ):
        self.rows, self.columns, self.source, self.folder, self.template = rows, columns, source, folder, template
        self.line_numbers = line_numbers
        self.indices = list(range(len(rows)))

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, indices: Sequence[int]) -> VQASet:
        """The rows at positions `indices` of this set (same source, row names kept)."""
        out = VQASet(self.rows, self.columns, self.source, self.folder, self.template, self.line_numbers)
        out.indices = [self.indices[i] for i in indices]
        return out

    def _where(self, row: int, name: str | None = None) -> str:
        number = self.line_numbers[row] if self.line_numbers is not None else row
        return _where(self.source, number, name)

    def _images(self, value: Any, row: int) -> tuple[Image.Image, ...]:
        where = self._where(row, self.columns.images)
        if value is None:
            return ()
        values = value if isinstance(value, (list, tuple)) else [value]
        images = []
        for image in values:
            if isinstance(image, str) and self.folder is not None:
                image = str(inside(self.folder, image, where))
            images.append(decode_image(image, where))
        return tuple(images)

    def __getitem__(self, i: int) -> VQAItem:
        return self.item(i)

    def item(self, i: int) -> VQAItem:
        row = self.indices[i]
        data = self.rows[row]
        c = self.columns
        response = data.get(c.response) if isinstance(c, SFTColumns) else None
        return VQAItem(
            problem=str(data[c.problem]),
            answer=_text(data[c.answer]),
            images=self._images(data.get(c.images), row),
            where=self._where(row),
            template=self.template,
            response=None if response is None else str(response),
        )

    def check(self, text_columns: Sequence[str] | None = None) -> None:
        """Every row holds non-empty text in `text_columns` (default: problem and answer); images are decoded
        when a row is used."""
        names = list(text_columns or (self.columns.problem, self.columns.answer))
        for name in names:
            if isinstance(self.rows, list):
                values = [r.get(name) for r in self.rows]
            else:  # a datasets.Dataset: read the text columns only
                if name not in self.rows.column_names:
                    available = ", ".join(self.rows.column_names)
                    raise DataError(f"{self.source}: no column {name!r} (it has {available}); set data.columns")
                values = self.rows[name]
            for row in self.indices:
                if _text(values[row]) == "":
                    raise DataError(f"{self._where(row, name)}: expected non-empty text, got {values[row]!r}")


def _text(value: Any) -> str:
    """A reference answer as text (`7`, `7.5`, `"B"`); lists and None count as missing."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def open_vqa(path: str, split: str, columns: VQAColumns, template: str) -> VQASet:
    """Split `split` of the set at `path` (see the module doc), its rows checked."""
    local = Path(path)
    if local.is_file() and local.suffix == ".jsonl":
        if split != "train":
            raise ConfigError(
                f"data: {path} is one JSONL file, a single split; use split 'train' or a folder of "
                f"<split>.jsonl files (got split {split!r})"
            )
        return _jsonl_set(local, columns, template)
    if local.is_dir() and not (local / "dataset_dict.json").exists() and any(local.glob("*.jsonl")):
        file = local / f"{split}.jsonl"
        if not file.is_file():
            found = ", ".join(sorted(p.stem for p in local.glob("*.jsonl")))
            raise DataError(f"{path}: no {split}.jsonl for split {split!r} (found splits: {found})")
        return _jsonl_set(file, columns, template)
    dataset = open_dataset(path, split)
    folder = local if local.is_dir() else None
    out = VQASet(dataset, columns, f"{path} ({split})", folder, template)
    out.check()
    return out


def _jsonl_set(file: Path, columns: VQAColumns, template: str) -> VQASet:
    numbers, rows = [], []
    for number, row in jsonl_rows(file, (columns.problem, columns.answer)):
        numbers.append(number)
        rows.append(row)
    if not rows:
        raise DataError(f"{file}: no rows")
    out = VQASet(rows, columns, str(file), file.parent, template, numbers)
    out.check()
    return out


def heldout_split(data: VQASet, size: int, seed: int) -> tuple[VQASet, VQASet]:
    """`(train, heldout)`: `size` rows drawn with `seed` are held out, the rest train (order kept)."""
    if size < 1 or size >= len(data):
        raise ConfigError(f"data.eval_size={size} must leave rows on both sides of a set of {len(data)} rows")
    picked = np.random.default_rng(seed).permutation(len(data))[:size]
    held = set(picked.tolist())
    return data.subset([i for i in range(len(data)) if i not in held]), data.subset(sorted(held))
