"""VLM reward models: the soft Bradley–Terry loss, last-token pooling, training, saving and scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmalign
from mmalign.data.pairs import DataError
from mmalign.losses import bradley_terry_loss, soft_bradley_terry_loss
from mmalign.models.tiny_vlm import build_tiny_vlm
from mmalign.models.vlm import VisionLanguageModel
from mmalign.vlm.prefs import image_pairs, score_conversation
from mmalign.vlm.reward import VLMRewardNet, last_token_index, text_hidden_size

ROOT = Path(__file__).resolve().parents[1]


def test_soft_bradley_terry_reduces_to_bt_for_hard_labels_and_ties_have_minimum_zero():
    r1 = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    r2 = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    hard = soft_bradley_terry_loss(r1, r2, torch.ones(3, dtype=torch.float64))
    assert hard.item() == pytest.approx(bradley_terry_loss(r1, r2).item(), rel=1e-12)
    flipped = soft_bradley_terry_loss(r1, r2, torch.zeros(3, dtype=torch.float64))
    assert flipped.item() == pytest.approx(bradley_terry_loss(r2, r1).item(), rel=1e-12)
    equal = torch.zeros(4)
    assert soft_bradley_terry_loss(equal, equal, torch.ones(4)).item() == pytest.approx(math.log(2))
    assert soft_bradley_terry_loss(equal, equal, torch.full((4,), 0.5)).item() == pytest.approx(0.0, abs=1e-7)
    tie = soft_bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5]))
    assert tie.item() > 0  # a tie is best explained by equal scores
    hard.backward()
    assert (r1.grad < 0).all()  # descent raises the winner
    centred = soft_bradley_terry_loss(equal + 3, equal + 3, torch.ones(4), centring=0.01)
    assert centred.item() == pytest.approx(math.log(2) + 0.01 * 36)


def test_last_token_index_for_left_and_right_padding():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert last_token_index(left).tolist() == [3, 3] and last_token_index(right).tolist() == [1, 2]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    return build_tiny_vlm("qwen2-vl", tmp_path_factory.mktemp("rm") / "qwen2-vl")


def test_scores_do_not_depend_on_padding_or_batch(tiny_vlm):
    vlm = VisionLanguageModel.from_pretrained(tiny_vlm)
    net = VLMRewardNet(vlm.model, text_hidden_size(vlm.model)).eval()
    pairs = image_pairs("heldout", 3, seed=1)
    conversations = [score_conversation(p.image_1, p.prompt) for p in pairs]
    conversations.append(score_conversation(pairs[0].image_2, "a red circle"))  # a shorter prompt: padded
    with torch.no_grad():
        together = net(vlm.encode(conversations, add_generation_prompt=False))
        alone = torch.cat([net(vlm.encode([c], add_generation_prompt=False)) for c in conversations])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def _pairs_folder(root: Path, n: int = 12) -> Path:
    (root / "img").mkdir(parents=True)
    rows = []
    for i, p in enumerate(image_pairs("train", n, seed=3)):
        for k, image in ((1, p.image_1), (2, p.image_2)):
            Image.fromarray(image).save(root / f"img/{i}_{k}.png")
        rows.append({"prompt": p.prompt, "image_1": f"img/{i}_1.png", "image_2": f"img/{i}_2.png", "label": p.label})
    rows.append({"prompt": "a red circle", "images": ["img/0_1.png"], "chosen": "yes", "rejected": "no"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _overrides(model: Path, data: Path, out: Path) -> list[str]:
    return [
        f"model.path={model}",
        f"data.path={data}",
        f"output_dir={out}",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.checkpoint_every=3",
        "eval.every=0",
        "vlm_reward_model.heldout_fraction=0.3",
    ]


def test_reward_model_trains_saves_and_scores_like_any_reward(tiny_vlm, tmp_path):
    data = _pairs_folder(tmp_path / "pairs")
    report = mmalign.train(ROOT / "configs/vlm/reward_model.yaml", *_overrides(tiny_vlm, data, tmp_path / "run"))
    assert report["gold_metric"] == "heldout_pairwise_accuracy"
    assert 0 <= report["after"] <= 1 and report["metrics"]["after"]["heldout_pairs"] >= 3
    folder = tmp_path / "run" / "final" / "reward"
    reward = mmalign.load_reward(str(folder))
    images = [data / "img/0_1.png", data / "img/0_2.png"]
    scores = reward(images, "a red circle")
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    again = mmalign.load_reward("vlm-rm", path=str(folder))(images, "a red circle")
    torch.testing.assert_close(scores, again)
    with pytest.raises(ValueError, match="pass prompts"):
        reward(images)


def test_bad_pair_rows_name_file_row_and_field(tiny_vlm, tmp_path):
    from mmalign.vlm.reward_model import read_pair_rows

    bad = tmp_path / "bad"
    bad.mkdir()
    for text, message in [
        ('{"prompt": "a", "image_1": "x.png", "label": 1}\n', r"row 1, field 'image_2': missing field"),
        ('{"prompt": "a", "image_1": "x.png", "image_2": "y.png", "label": 3}\n', r"row 1, field 'label': expected"),
        ('{"prompt": "a", "images": [], "chosen": "y"}\n', r"row 1, field 'rejected': missing field"),
        ('{"image_1": "x.png"}\n', r"row 1, field 'prompt': missing field"),
    ]:
        (bad / "pairs.jsonl").write_text(text)
        with pytest.raises(DataError, match=message):
            read_pair_rows(bad)
    (bad / "pairs.jsonl").write_text('{"prompt": "a", "image_1": "x.png", "image_2": "y.png", "label": 1}\n')
    vlm = VisionLanguageModel.from_pretrained(tiny_vlm)
    with pytest.raises(ValueError, match=r"pairs.jsonl, row 1: image file .*x.png does not exist"):
        vlm.encode([read_pair_rows(bad)[0].first])


def test_embedded_pairs_are_gold_labelled_and_split_by_caption():
    from mmalign.data import shapes_world

    train, heldout = image_pairs("train", 30, seed=0), image_pairs("heldout", 20, seed=0)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in heldout})
    for p in train:
        gold = tuple(shapes_world.gold_checks(im, p.prompt)["score"] for im in (p.image_1, p.image_2))
        assert gold == p.gold
        assert p.label == (1.0 if gold[0] > gold[1] else 2.0 if gold[1] > gold[0] else 0.5)
    labels = [p.label for p in train]
    assert labels.count(1.0) > 4 and labels.count(2.0) > 4  # the better image is not always first
    assert np.array_equal(image_pairs("train", 3, seed=0)[2].image_1, train[2].image_1)


def test_reward_model_trains_on_an_rlaif_v_style_datasets_folder(tiny_vlm, tmp_path):
    """Columns image, question, chosen, rejected (RLAIF-V); a test split held out; the report names both."""
    import datasets

    def split(seed: int, n: int) -> datasets.Dataset:
        pairs = image_pairs("train", n, seed=seed)
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(p.image_1) for p in pairs], "question": [f"Describe: {p.prompt}" for p in pairs],
             "chosen": [p.prompt for p in pairs], "rejected": ["a green cat" for _ in pairs],
             "origin_dataset": ["toy"] * n},
            features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                        "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
                                        "origin_dataset": datasets.Value("string")}),
        )  # fmt: skip

    folder = tmp_path / "rlaif"
    datasets.DatasetDict({"train": split(5, 12), "test": split(6, 4)}).save_to_disk(str(folder))
    out = tmp_path / "run"
    report = mmalign.train(
        ROOT / "configs/vlm/reward_model.yaml", *_overrides(tiny_vlm, folder, out), "data.eval_split=test"
    )
    assert report["data"] == {
        "path": str(folder),
        "train_pairs": 12,
        "heldout_pairs": 4,
        "split": "train",
        "eval_split": "test",
    }
    assert report["metrics"]["after"]["heldout_pairs"] == 4
    assert (out / "final" / "reward").is_dir()
    with pytest.raises(DataError, match="no column 'instruction'"):
        mmalign.train(
            ROOT / "configs/vlm/reward_model.yaml",
            *_overrides(tiny_vlm, folder, tmp_path / "bad"),
            "data.columns.prompt=instruction",
        )
