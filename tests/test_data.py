"""Preference-pair loading: local JSONL folders and Pick-a-Pic-style datasets, and their errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmalign.data.pairs import DataError, load_pairs
from tests.conftest import write_pair_folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "pairs"
    shutil.copytree(folder, target)
    return target


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]


def _write_rows(folder: Path, rows: list[dict]) -> None:
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_folder_puts_the_winner_first(pair_folder):
    pairs = load_pairs(pair_folder, resolution=32)
    assert len(pairs) == 16
    item = pairs[1]  # row 2 has label 1: image_1 (the clean render) is preferred
    assert item["pixels_w"].shape == (3, 32, 32) and item["pixels_w"].min() >= -1 and item["pixels_w"].max() <= 1
    # the winner is the clean render: a mostly flat light background, the loser is noise
    assert item["pixels_w"].std() < item["pixels_l"].std()
    assert load_pairs(pair_folder / "pairs.jsonl", resolution=16)[0]["pixels_l"].shape == (3, 16, 16)


def test_transforms_are_keyed_by_epoch_and_index(pair_folder):
    pairs = load_pairs(pair_folder, resolution=24, random_crop=True, random_flip=True, seed=3)
    first = pairs[5]["pixels_w"]
    assert torch.equal(first, pairs[5]["pixels_w"])  # same (seed, epoch, index): same crop and flip
    later = []
    for epoch in range(1, 6):
        pairs.set_epoch(epoch)
        later.append(pairs[5]["pixels_w"])
    assert any(not torch.equal(first, x) for x in later)  # other epochs draw other crops
    pairs.set_epoch(0)
    assert torch.equal(first, pairs[5]["pixels_w"])


def _pickapic(tmp_path: Path, labels, jpg_1=None, columns=("jpg_0", "jpg_1", "label_0", "caption")) -> Path:
    import datasets

    def jpeg(color) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (40, 32), color).save(buf, format="JPEG")
        return buf.getvalue()

    n = len(labels)
    data = {
        "jpg_0": [jpeg("red")] * n,
        "jpg_1": jpg_1 or [jpeg("blue")] * n,
        "label_0": list(labels),
        "caption": [f"a red circle {i}" for i in range(n)],
    }
    path = tmp_path / "pickapic"
    datasets.Dataset.from_dict({k: v for k, v in data.items() if k in columns}).save_to_disk(str(path))
    return path


def test_pickapic_dataset_drops_ties_and_orders_pairs(tmp_path):
    pairs = load_pairs(_pickapic(tmp_path, [1.0, 0.5, 0.0]), resolution=16)
    assert len(pairs) == 2
    red = pairs[0]["pixels_w"][0].mean() > pairs[0]["pixels_w"][2].mean()  # label_0 = 1: red wins
    blue = pairs[1]["pixels_w"][2].mean() > pairs[1]["pixels_w"][0].mean()  # label_0 = 0: blue wins
    assert red and blue
    assert pairs[1]["prompt"] == "a red circle 2"


# ------------------------------------------------------------------ bad inputs, each with a clear message
def test_missing_field_names_file_row_and_field(pair_folder, tmp_path):
    folder = _copy(pair_folder, tmp_path)
    rows = _rows(folder)
    del rows[2]["label"]
    _write_rows(folder, rows)
    with pytest.raises(DataError, match=r"pairs\.jsonl, row 3, field 'label': missing field"):
        load_pairs(folder, resolution=32)


def test_corrupt_image(pair_folder, tmp_path):
    folder = _copy(pair_folder, tmp_path)
    (folder / "img/4_bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"row 5, field 'image_1': corrupt or unreadable image"):
        load_pairs(folder, resolution=32)


def test_unknown_label(pair_folder, tmp_path):
    folder = _copy(pair_folder, tmp_path)
    rows = _rows(folder)
    rows[0]["label"] = "left"
    _write_rows(folder, rows)
    with pytest.raises(DataError, match=r"row 1, field 'label': unknown label 'left'"):
        load_pairs(folder, resolution=32)


def test_missing_image_file(pair_folder, tmp_path):
    folder = _copy(pair_folder, tmp_path)
    (folder / "img/7_good.png").unlink()
    with pytest.raises(DataError, match=r"row 8, field 'image_1': image file not found"):
        load_pairs(folder, resolution=32)


def test_invalid_json_line(pair_folder, tmp_path):
    folder = _copy(pair_folder, tmp_path)
    text = (folder / "pairs.jsonl").read_text().splitlines()
    text[3] = text[3][:-5]
    (folder / "pairs.jsonl").write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"row 4: not valid JSON"):
        load_pairs(folder, resolution=32)


def test_empty_prompt(pair_folder, tmp_path):
    folder = _copy(pair_folder, tmp_path)
    rows = _rows(folder)
    rows[1]["prompt"] = "  "
    _write_rows(folder, rows)
    with pytest.raises(DataError, match=r"row 2, field 'prompt': prompt must be a non-empty string"):
        load_pairs(folder, resolution=32)


def test_empty_set_after_dropping_ties(pair_folder, tmp_path):
    folder = _copy(pair_folder, tmp_path)
    _write_rows(folder, [dict(r, label=0.5) for r in _rows(folder)])
    with pytest.raises(DataError, match=r"no usable preference pairs \(16 ties dropped\)"):
        load_pairs(folder, resolution=32)
    (folder / "pairs.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable preference pairs"):
        load_pairs(folder, resolution=32)


def test_ties_refused_when_not_dropping(pair_folder, tmp_path):
    folder = _copy(pair_folder, tmp_path)
    rows = _rows(folder)
    rows[0]["label"] = 0.5
    _write_rows(folder, rows)
    with pytest.raises(DataError, match="1 tied pairs"):
        load_pairs(folder, resolution=32, drop_ties=False)


def test_pickapic_missing_column(tmp_path):
    path = _pickapic(tmp_path, [1.0], columns=("jpg_0", "jpg_1", "caption"))
    with pytest.raises(DataError, match=r"pickapic, field 'label_0': missing column"):
        load_pairs(path, resolution=16)


def test_pickapic_unknown_label(tmp_path):
    with pytest.raises(DataError, match=r"pickapic, row 1, field 'label_0': unknown label 0.7"):
        load_pairs(_pickapic(tmp_path, [1.0, 0.7]), resolution=16)


def test_pickapic_corrupt_image_is_named_when_read(tmp_path):
    path = _pickapic(tmp_path, [1.0, 0.0], jpg_1=[b"\xff\xd8garbage", b"\xff\xd8garbage"])
    pairs = load_pairs(path, resolution=16)
    with pytest.raises(DataError, match=r"pickapic, row 0, field 'jpg_1': corrupt or unreadable image"):
        pairs[0]


def test_path_that_is_neither_folder_nor_dataset(tmp_path):
    with pytest.raises(DataError, match="cannot open split .train. as a dataset"):
        load_pairs(tmp_path / "nowhere", resolution=16)
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "nowhere.jsonl", resolution=16)


def test_fixture_writer_is_reusable(tmp_path):
    folder = write_pair_folder(tmp_path / "x", n=4, seed=1)
    assert len(load_pairs(folder, resolution=32)) == 4
