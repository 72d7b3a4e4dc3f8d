"""Training a VLM reward model (`method: vlm-reward-model`): a Bradley–Terry head on a VLM.

Data (`data.path`):
- `embedded:vlm-image-prefs`: the shapes world's gold-labelled image pairs (`mmalign.vlm.prefs`);
  training on `train` captions, evaluation on `heldout` captions;
- a folder with `pairs.jsonl`, each row either an image pair
  `{"prompt", "image_1", "image_2", "label": 1 | 2 | 0.5}` (paths relative to the folder; each image is
  scored with the prompt) or a response pair `{"prompt", "images": [...], "chosen", "rejected"}`
  (the conversation with each response is scored). The last `heldout_fraction` of rows is held out;
- a `datasets` name or folder of response pairs in the layout RLAIF-V and VLFeedback-style sets use:
  an image column (`image`, one image, or `images`, a list), the question (`question`, else
  `prompt`), `chosen` and `rejected` (`data.columns` renames them). Rows are decoded when used.
  Held out: `data.eval_split` when given, else the last `heldout_fraction` of the training split.

Each pair becomes two conversations scored in one batch; the loss is
`mmalign.losses.soft_bradley_terry_loss` (ties: dropped, or soft ½ labels with `ties: soft`) with
reward centring. Evaluation: held-out pairwise accuracy over untied pairs (the gold metric here is
the label itself, never a training input for held-out rows). The final folder loads with
`mmalign.load_reward(folder)` (`mmalign.vlm.reward.VLMReward`), normalised by the train-set scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmalign.config import DataSource, VLMModelConfig, check_choice, check_range, option
from mmalign.data.pairs import DataError, decode_image, inside, jsonl_rows, open_dataset
from mmalign.losses import soft_bradley_terry_loss
from mmalign.models.vlm import Conversation
from mmalign.train.method import Evaluation, Method
from mmalign.vlm.method import load_vlm
from mmalign.vlm.prefs import image_pairs, score_conversation
from mmalign.vlm.reward import VLMRewardNet, save_vlm_reward, text_hidden_size

EMBEDDED_PAIRS = "embedded:vlm-image-prefs"


@dataclass
class PrefsColumns:
    """Column names of a `datasets` preference set; null image/prompt: the first of the usual names present."""

    image: str | None = option("image column; null = image, else images", default=None)
    prompt: str | None = option("question column; null = question, else prompt", default=None)
    chosen: str = option("the preferred response", default="chosen")
    rejected: str = option("the other response", default="rejected")


@dataclass
class PrefsDataConfig(DataSource):
    """The `data` section of `vlm-reward-model`: the preference pairs."""

    path: str = option(
        "a folder with pairs.jsonl, a datasets name or folder of response pairs, or embedded:vlm-image-prefs",
        default=EMBEDDED_PAIRS,
    )
    split: str = option("datasets: split to train on", default="train")
    eval_split: str | None = option(
        "datasets: split to evaluate on; null = the last heldout_fraction of split", default=None
    )
    columns: PrefsColumns = option("datasets: column names", default_factory=PrefsColumns)

    #: the keys only a `datasets` source reads
    DATASET_KEYS: ClassVar[tuple[str, ...]] = ("split", "eval_split", "columns")

    def __post_init__(self) -> None:
        self.refuse_unless(self.path != EMBEDDED_PAIRS, self.DATASET_KEYS, "a datasets source")


@dataclass
class VLMRewardModelConfig:
    """Options of `vlm-reward-model` (section `vlm_reward_model`)."""

    ties: str = option("tied pairs (label 0.5): drop, or soft (target ½)", default="drop")
    centring: float = option("weight η_c of the reward-centring term (r₁ + r₂)²", default=0.01)
    train_pairs: int = option("embedded data: training pairs (train captions)", default=2000)
    heldout_pairs: int = option("embedded data: held-out pairs (held-out captions)", default=200)
    heldout_fraction: float = option(
        "your pairs without an eval split: share of rows (from the end) held out", default=0.1
    )
    eval_batch_size: int = option("pairs scored at once in evaluation", default=32)

    def check_values(self, prefix: str) -> None:
        """Ranges and choices, checked when the config is built (keys named under `prefix`)."""
        check_choice(f"{prefix}ties", self.ties, ("drop", "soft"))
        check_range(f"{prefix}centring", self.centring, 0)
        for key in ("train_pairs", "heldout_pairs", "eval_batch_size"):
            check_range(f"{prefix}{key}", getattr(self, key), 1)
        check_range(f"{prefix}heldout_fraction", self.heldout_fraction, 0, 1, open_low=True)


@dataclass(frozen=True)
class PairItem:
    """Two conversations to score and the probability that the first is better."""

    first: Conversation
    second: Conversation
    target: float


def _embedded_items(config: VLMRewardModelConfig, seed: int) -> tuple[list[PairItem], list[PairItem]]:
    def items(split: str, n: int) -> list[PairItem]:
        return [
            PairItem(
                p.scoring_conversation(1),
                p.scoring_conversation(2),
                1.0 if p.label == 1 else 0.0 if p.label == 2 else 0.5,
            )
            for p in image_pairs(split, n, seed)
        ]

    return items("train", config.train_pairs), items("heldout", config.heldout_pairs)


def read_pair_rows(folder: Path) -> list[PairItem]:
    """The rows of `folder/pairs.jsonl` as `PairItem`s; errors name the file, row and field."""
    path = folder / "pairs.jsonl"
    if not path.is_file():
        raise DataError(
            f"{folder}: no pairs.jsonl (rows of prompt, image_1, image_2, label or prompt, images, chosen, rejected)"
        )
    out = []
    for row_no, row in jsonl_rows(path, ("prompt",)):
        where = f"{path}, row {row_no}"
        if "chosen" in row:
            for name in ("images", "rejected"):
                if name not in row:
                    raise DataError(f"{where}, field {name!r}: missing field")
            images = [inside(folder, p, f"{where}, field 'images'") for p in row["images"]]
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": row["prompt"]}]

            def chat(response: str, images=images, content=content, where=where) -> Conversation:
                return Conversation(
                    [{"role": "user", "content": content}, {"role": "assistant", "content": response}], images, where
                )

            out.append(PairItem(chat(row["chosen"]), chat(row["rejected"]), 1.0))
            continue
        for name in ("image_1", "image_2", "label"):
            if name not in row:
                raise DataError(f"{where}, field {name!r}: missing field")
        if row["label"] not in (1, 2, 0.5):
            raise DataError(f"{where}, field 'label': expected 1, 2 or 0.5, got {row['label']!r}")
        first, second = (
            score_conversation(inside(folder, row[k], f"{where}, field {k!r}"), row["prompt"], where)
            for k in ("image_1", "image_2")
        )
        out.append(PairItem(first, second, {1: 1.0, 2: 0.0, 0.5: 0.5}[row["label"]]))
    return out


def _pick(available: list[str], given: str | None, usual: tuple[str, ...], source: str) -> str:
    if given is not None:
        if given not in available:
            raise DataError(f"{source}: no column {given!r} (it has {', '.join(available)})")
        return given
    for name in usual:
        if name in available:
            return name
    raise DataError(
        f"{source}: none of the columns {', '.join(usual)} (it has {', '.join(available)}); set data.columns"
    )


class DatasetPairs(torch.utils.data.Dataset):
    """Response pairs of a `datasets` split as `PairItem`s (preferred first), built when indexed."""

    def __init__(self, dataset, columns: PrefsColumns, source: str, rows: range | None = None):
        available = list(dataset.column_names)
        self.image = _pick(available, columns.image, ("image", "images"), source)
        self.prompt = _pick(available, columns.prompt, ("question", "prompt"), source)
        self.chosen = _pick(available, columns.chosen, (), source)
        self.rejected = _pick(available, columns.rejected, (), source)
        self.dataset, self.columns, self.source = dataset, columns, source
        self.rows = rows if rows is not None else range(len(dataset))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int | slice) -> PairItem | list[PairItem]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.rows[index]
        data, where = self.dataset[row], f"{self.source}, row {row}"
        images = data[self.image] if isinstance(data[self.image], list) else [data[self.image]]
        images = [decode_image(image, f"{where}, field {self.image!r}") for image in images]
        for name in (self.prompt, self.chosen, self.rejected):
            if not isinstance(data[name], str) or not data[name].strip():
                raise DataError(f"{where}, field {name!r}: expected non-empty text, got {data[name]!r}")
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": data[self.prompt]}]

        def chat(response: str) -> Conversation:
            return Conversation(
                [{"role": "user", "content": content}, {"role": "assistant", "content": response}], images, where
            )

        return PairItem(chat(data[self.chosen]), chat(data[self.rejected]), 1.0)

    def split(self, fraction: float) -> tuple[DatasetPairs, DatasetPairs]:
        """`(first rows, last `fraction` of rows)`."""
        cut = len(self.rows) - max(1, round(len(self.rows) * fraction))
        return tuple(
            DatasetPairs(self.dataset, self.columns, self.source, rows)  # type: ignore[return-value]
            for rows in (self.rows[:cut], self.rows[cut:])
        )


class VLMRewardModel(Method):
    config_class = VLMRewardModelConfig
    model_config_class = VLMModelConfig
    data_config_class = PrefsDataConfig
    config: VLMRewardModelConfig

    def setup(self, accelerator) -> None:
        c = self.config
        self.vlm = load_vlm(self.run.model, accelerator.device)
        self.net = VLMRewardNet(self.vlm.model, text_hidden_size(self.vlm.model)).to(accelerator.device)
        self.module: torch.nn.Module = self.net
        d = self.run.data
        if d.path == EMBEDDED_PAIRS:
            train, heldout = _embedded_items(c, self.run.seed)
        elif (Path(d.path) / "pairs.jsonl").is_file():
            d.refuse_unless(False, d.DATASET_KEYS, "a datasets source")
            rows = read_pair_rows(Path(d.path))
            cut = len(rows) - max(1, round(len(rows) * c.heldout_fraction))
            train, heldout = rows[:cut], rows[cut:]
        else:  # response pairs carry no ties
            pairs = DatasetPairs(open_dataset(d.path, d.split), d.columns, f"{d.path} ({d.split})")
            if d.eval_split is None:
                self.train_items, self.heldout_items = pairs.split(c.heldout_fraction)
            else:
                eval_source = f"{d.path} ({d.eval_split})"
                self.train_items = pairs
                self.heldout_items = DatasetPairs(open_dataset(d.path, d.eval_split), d.columns, eval_source)
            self.heldout_items = self.heldout_items[:]  # scored at every evaluation: decoded once
            return
        self.train_items = [p for p in train if c.ties == "soft" or p.target != 0.5]
        self.heldout_items = [p for p in heldout if p.target != 0.5]

    def trainable_module(self) -> torch.nn.Module:
        return self.net

    def train_dataset(self) -> list[PairItem]:
        return self.train_items

    def collate(self, items: list[PairItem]) -> list[PairItem]:
        return items

    def scores(self, items: list[PairItem], module: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores `(B,)`, `(B,)` of each pair's first and second conversation, in one forward."""
        batch = self.vlm.encode([p.first for p in items] + [p.second for p in items], add_generation_prompt=False)
        with self.vlm.computing(self.vlm.model):  # autocast and gradient checkpointing of `model.*`
            scores = (module or self.module)(batch)
        return scores[: len(items)], scores[len(items) :]

    def compute_loss(self, batch: list[PairItem], step: int, micro: int):
        first, second = self.scores(batch)
        target = torch.tensor([p.target for p in batch], device=first.device)
        loss = soft_bradley_terry_loss(first, second, target, centring=self.config.centring)
        decided = target != 0.5
        correct = ((first > second) == (target > 0.5))[decided].float().mean() if decided.any() else first.new_zeros(())
        return loss, {"pair_accuracy": correct.detach(), "score_mean": torch.cat([first, second]).mean().detach()}

    @torch.no_grad()
    def _all_scores(self, items: list[PairItem]) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.config.eval_batch_size
        parts = [self.scores(items[i : i + size], self.net) for i in range(0, len(items), size)]
        return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()

    def gold_metric(self) -> str:
        return "heldout_pairwise_accuracy"

    def evaluate(self, step: int) -> Evaluation:
        self.net.eval()
        first, second = self._all_scores(self.heldout_items)
        target = torch.tensor([p.target for p in self.heldout_items])
        accuracy = ((first > second) == (target > 0.5)).float().mean().item()
        return Evaluation(
            {
                "heldout_pairwise_accuracy": accuracy,
                "heldout_pairs": float(len(target)),
                "heldout_score_gap": (first - second).mul(2 * target - 1).mean().item(),
            }
        )

    def data_used(self) -> dict[str, Any]:
        d = self.run.data
        used: dict[str, Any] = {
            "path": d.path,
            "train_pairs": len(self.train_items),
            "heldout_pairs": len(self.heldout_items),
        }
        if isinstance(self.train_items, DatasetPairs):
            used.update(split=d.split, eval_split=d.eval_split or f"last {self.config.heldout_fraction:g} of {d.split}")
        return used

    def report_description(self) -> str:
        return (
            f"Bradley–Terry head on `{self.run.model.path}`, trained on `{self.run.data.path}` "
            f"({len(self.train_items)} pairs, ties {self.config.ties}); pairwise accuracy on "
            f"{len(self.heldout_items)} held-out untied pairs."
        )

    def save_final(self, directory: Path) -> list[str]:
        sample = self.train_items[: 4 * self.config.eval_batch_size]
        first, second = self._all_scores(sample)
        scores = torch.cat([first, second])
        stats = {
            "mean": scores.mean().item(),
            "std": max(scores.std().item(), 1e-6),
            "metrics": self.evaluate(-1).metrics,
        }
        save_vlm_reward(directory / "reward", self.vlm, self.net, stats)
        return ["reward"]
