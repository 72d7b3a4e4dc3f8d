"""Where the VLM methods' questions come from: the embedded VLM world or a user's set.

`data.path: embedded:vlm-world` streams the world's questions (`mmalign.vlm.world`; options under
`data.embedded`) and evaluates on its held-out questions. Any other path is a user's set
(`mmalign.data.vqa`: JSONL, `<split>.jsonl` folders, `datasets` folders or names) evaluated on a
split of it, a separate set, or rows held out of the training split.

A `PromptSource` gives question `index` of the training stream (`item`) and the held-out questions
(`heldout`). The stream is a pure function of the index, so any process and a resumed run draw the
same questions: the world's is its seeded stream, a user's set is walked in one seeded permutation
per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mmalign.config import ConfigError, DataSource, option
from mmalign.data.vqa import DEFAULT_TEMPLATE, SFTColumns, VQAColumns, VQAItem, VQASet, heldout_split, open_vqa
from mmalign.vlm import world
from mmalign.vlm.world import Question

EMBEDDED_WORLD = "embedded:vlm-world"


@dataclass
class VLMWorldData:
    """`data.embedded`: which questions of the embedded VLM world to train and evaluate on."""

    kinds: list[str] = option(
        f"question kinds to train on: {', '.join(world.KINDS)}", default_factory=lambda: list(world.KINDS)
    )
    stream_seed: int = option(
        f"seed of the training question stream (never the held-out seed {world.HELDOUT_SEED})", default=1000
    )
    eval_kinds: list[str] = option("held-out question kinds", default_factory=lambda: list(world.KINDS))
    eval_per_kind: int = option("held-out questions per kind", default=100)


@dataclass
class VQADataConfig(DataSource):
    """The `data` section of the VLM question methods (`grpo`, `papo`, `listener-grpo`, `vlm-sft`)."""

    path: str = option(
        f"a JSONL file, a folder of <split>.jsonl files, a datasets name or folder, or {EMBEDDED_WORLD}",
        default=EMBEDDED_WORLD,
    )
    split: str = option("split to train on", default="train")
    columns: VQAColumns = option("column names of your set", default_factory=VQAColumns)
    template: str = option("the user turn's text; {problem} is replaced by the question", default=DEFAULT_TEMPLATE)
    eval_path: str | None = option(
        "a separate evaluation set (same layout and columns); null = data.path", default=None
    )
    eval_split: str | None = option(
        "split to evaluate on; null = hold out data.eval_size rows of the training "
        "split (data.eval_path null) or the training split of data.eval_path",
        default=None,
    )
    eval_size: int = option(
        "rows held out of the training split, or the most rows evaluated of an eval set", default=100
    )
    holdout_seed: int = option("seed of the held-out rows", default=0)
    max_rows: int | None = option("train on at most this many rows; null = all", default=None)
    embedded: VLMWorldData = option(
        f"{EMBEDDED_WORLD} only: which questions to train and evaluate on", default_factory=VLMWorldData
    )

    def __post_init__(self) -> None:
        on_world = self.path == EMBEDDED_WORLD
        user_keys = ("columns", "eval_path", "eval_split", "max_rows", "split", "template")
        self.refuse_unless(not on_world, user_keys, "your own data (the world's questions are set under data.embedded)")
        self.refuse_unless(on_world, ("embedded",), f"{EMBEDDED_WORLD} only")
        if unknown := sorted(set(self.embedded.kinds + self.embedded.eval_kinds) - set(world.KINDS)):
            raise ConfigError(f"data.embedded: unknown question kinds {unknown}; choose from {list(world.KINDS)}")
        if self.eval_size < 1:
            raise ConfigError(f"data.eval_size must be at least 1, got {self.eval_size}")


@dataclass
class SFTDataConfig(VQADataConfig):
    """The `data` section of `vlm-sft`: questions with target responses."""

    columns: SFTColumns = option("column names of your set", default_factory=SFTColumns)


class PromptSource(Protocol):
    """Questions with `conversation(blind=…)`, `answer`, `kind`, `text` and `images`."""

    heldout: list[Any]

    def item(self, index: int) -> Any:
        """Question `index` of the training stream (deterministic)."""

    def describe(self) -> dict[str, Any]:
        """What the run trains and evaluates on, for `report.json`."""

    def summary(self) -> str:
        """The same for `report.md`: "<training data>. Evaluated on <held-out data>"."""


class WorldPrompts:
    """The embedded VLM world: its seeded training stream and held-out questions."""

    def __init__(self, config: VLMWorldData):
        self.config = config
        self.heldout: list[Question] = world.question_set(config.eval_kinds, config.eval_per_kind)

    def item(self, index: int) -> Question:
        return world.mixed_stream(self.config.kinds, self.config.stream_seed, index)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"path": EMBEDDED_WORLD, "train": {"kinds": c.kinds, "stream_seed": c.stream_seed},
                "eval": {"kinds": c.eval_kinds, "per_kind": c.eval_per_kind, "seed": world.HELDOUT_SEED,
                         "rows": len(self.heldout)}}  # fmt: skip

    def summary(self) -> str:
        c = self.config
        return (
            f"the VLM world's {', '.join(c.kinds)} questions (stream seed {c.stream_seed}). Evaluated on "
            f"{c.eval_per_kind} held-out questions per kind ({', '.join(c.eval_kinds)}; seed {world.HELDOUT_SEED})"
        )


class DatasetPrompts:
    """A user's set: training rows walked in a seeded permutation per epoch, held-out rows decoded once."""

    def __init__(self, train: VQASet, heldout: VQASet, seed: int, details: dict[str, Any]):
        self.train, self.seed, self.details = train, seed, details
        self.heldout: list[VQAItem] = [heldout.item(i) for i in range(len(heldout))]
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.train))}
        return self._orders[epoch]

    def item(self, index: int) -> VQAItem:
        epoch, position = divmod(index, len(self.train))
        return self.train.item(int(self._order(epoch)[position]))

    def describe(self) -> dict[str, Any]:
        return self.details

    def summary(self) -> str:
        held, used = self.details["eval"], self.details
        if "held_out_rows" in held:
            where = f"{held['held_out_rows']} rows held out of that split (seed {held['holdout_seed']})"
        else:
            where = f"`{held['path']}` split `{held['split']}` ({held['rows']} rows)"
        return f"`{used['path']}` split `{used['split']}` ({used['train_rows']} rows). Evaluated on {where}"


def load_prompt_source(data: VQADataConfig, seed: int) -> WorldPrompts | DatasetPrompts:
    """The questions `data` names; a user's set is opened and checked now (one-line errors naming row and field)."""
    if data.path == EMBEDDED_WORLD:
        return WorldPrompts(data.embedded)
    train = open_vqa(data.path, data.split, data.columns, data.template)
    if data.eval_path is None and data.eval_split is None:
        train, heldout = heldout_split(train, data.eval_size, data.holdout_seed)
        eval_info = {
            "path": data.path,
            "split": data.split,
            "held_out_rows": len(heldout),
            "holdout_seed": data.holdout_seed,
        }
    else:
        eval_path, eval_split = data.eval_path or data.path, data.eval_split or "train"
        heldout = open_vqa(eval_path, eval_split, data.columns, data.template)
        heldout = heldout.subset(range(min(data.eval_size, len(heldout))))
        eval_info = {"path": eval_path, "split": eval_split, "rows": len(heldout)}
    if data.max_rows is not None:
        train = train.subset(range(min(data.max_rows, len(train))))
    details = {"path": data.path, "split": data.split, "train_rows": len(train), "eval": eval_info}
    return DatasetPrompts(train, heldout, seed, details)
