"""The VLM question methods on a user's own set: `datasets` folders and JSONL, from the CLI, held-out splits."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from mmalign.cli import main
from mmalign.config import ConfigError, load_config
from mmalign.data.pairs import DataError
from mmalign.data.vqa import DEFAULT_TEMPLATE, VQAColumns, open_vqa
from mmalign.models.tiny_vlm import build_tiny_vlm
from mmalign.vlm import world
from mmalign.vlm.data import load_prompt_source

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("count", "arith", "match")  # one and two images, vision and text questions


def world_rows(n: int, seed: int) -> list[world.Question]:
    return [world.mixed_stream(list(KINDS), seed, i) for i in range(n)]


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    return build_tiny_vlm("qwen2-vl", tmp_path_factory.mktemp("vqa-policy") / "qwen2-vl", corpus=world.corpus())


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A `DatasetDict` saved with `save_to_disk`: train and test splits, `images` a list of Image values."""

    def split(questions: list[world.Question]) -> datasets.Dataset:
        features = datasets.Features({
            "images": datasets.List(datasets.Image()), "problem": datasets.Value("string"),
            "answer": datasets.Value("string"), "response": datasets.Value("string"),
        })  # fmt: skip
        return datasets.Dataset.from_dict({
            "images": [[Image.fromarray(im) for im in q.images] for q in questions],
            "problem": [q.text for q in questions], "answer": [q.answer for q in questions],
            "response": [q.reference_response() for q in questions],
        }, features=features)  # fmt: skip

    folder = tmp_path_factory.mktemp("hf") / "vqa"
    datasets.DatasetDict({"train": split(world_rows(24, 1000)), "test": split(world_rows(6, 2000))}).save_to_disk(
        str(folder)
    )
    return folder


def write_jsonl(root: Path, questions: list[world.Question], columns=("images", "problem", "answer")) -> Path:
    """A JSONL file with image paths relative to it; the first image of each row marked by `<image>`."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, q in enumerate(questions):
        paths = []
        for j, image in enumerate(q.images):
            Image.fromarray(image).save(root / f"img/{i}_{j}.png")
            paths.append(f"img/{i}_{j}.png")
        marks = "".join("<image>" for _ in paths) if i % 2 else ""  # odd rows place their images in the text
        rows.append({columns[0]: paths if len(paths) > 1 else paths[0], columns[1]: marks + q.text,
                     columns[2]: int(q.answer) if q.answer.isdigit() else q.answer})  # fmt: skip
    file = root / "questions.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return file


def run_overrides(method: str, policy: Path, out: Path, *extra: str) -> list[str]:
    section = method.replace("-", "_")
    return [
        f"model.path={policy}", f"output_dir={out}", "train.max_steps=2", "train.batch_size=2",
        "train.checkpoint_every=1", "train.log_every=1", "eval.every=0", f"{section}.max_new_tokens=6",
        *([f"{section}.num_generations=3"] if method != "vlm-sft" else []), *extra,
    ]  # fmt: skip


def test_a_datasets_folder_and_a_jsonl_file_give_the_same_questions(hf_folder, tmp_path):
    questions = world_rows(6, 2000)
    from_hf = open_vqa(str(hf_folder), "test", VQAColumns(), DEFAULT_TEMPLATE)
    jsonl = write_jsonl(tmp_path, questions, ("pictures", "question", "solution"))
    from_jsonl = open_vqa(str(jsonl), "train", VQAColumns("pictures", "question", "solution"), DEFAULT_TEMPLATE)
    for i, q in enumerate(questions):
        a, b = from_hf.item(i), from_jsonl.item(i)
        assert a.answer == b.answer == q.answer  # JSONL numbers become text
        assert len(a.images) == len(b.images) == len(q.images)
        assert all(np.array_equal(np.asarray(x), y) for x, y in zip(b.images, q.images))
        conversation = b.conversation()
        content = conversation.messages[0]["content"]
        assert [c["type"] for c in content].count("image") == len(q.images)
        assert content[-1]["text"].endswith("answer in <answer></answer>.") and "<image>" not in str(content)
        assert all(not np.asarray(im).any() for im in b.conversation(blind=True).images)


def test_held_out_rows_never_train_and_the_stream_is_a_pure_function_of_the_index(hf_folder):
    run = load_config(ROOT / "configs/vlm/grpo.yaml", [f"data={hf_folder}", "data.eval_size=5"])
    source = load_prompt_source(run.data, seed=0)
    assert len(source.heldout) == 5 and source.describe()["train_rows"] == 19
    held = {q.where for q in source.heldout}  # "<source>, row N"
    first_epoch = [source.item(i) for i in range(19)]
    assert not held & {q.where for q in first_epoch}
    assert len({q.where for q in first_epoch}) == 19  # every training row once per epoch
    again = load_prompt_source(run.data, seed=0)
    assert [again.item(i).where for i in (3, 25, 40)] == [source.item(i).where for i in (3, 25, 40)]
    other_seed = load_prompt_source(run.data, seed=1)
    assert [other_seed.item(i).where for i in range(19)] != [q.where for q in first_epoch]


@pytest.mark.parametrize("method", ["grpo", "papo", "vlm-sft"])
def test_the_cli_trains_on_a_datasets_folder_and_reports_the_split_it_used(method, policy, hf_folder, tmp_path):
    out = tmp_path / method
    recipe = {"grpo": "grpo", "papo": "papo", "vlm-sft": "sft"}[method]
    args = [
        "train",
        str(ROOT / f"configs/vlm/{recipe}.yaml"),
        f"data={hf_folder}",
        "data.eval_split=test",
        *run_overrides(method, policy, out),
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == {
        "path": str(hf_folder),
        "split": "train",
        "train_rows": 24,
        "eval": {"path": str(hf_folder), "split": "test", "rows": 6},
    }
    assert report["gold_metric"] == "heldout_reward" and report["steps"] == 2
    after = report["metrics"]["after"]
    assert {"heldout_reward", "blind_reward", "heldout/accuracy", "heldout/format", "format_rate"} <= set(after)
    assert "heldout_accuracy" not in after  # the world's exact-match metric belongs to the world
    assert f"`{hf_folder}` split `train` (24 rows)" in (out / "report.md").read_text()
    assert (out / "final" / "model" / "model.safetensors").is_file()


def test_grpo_and_the_listener_train_on_jsonl_with_renamed_columns_and_user_rewards(policy, tmp_path):
    questions = [world.question("match", 1000, i) for i in range(12)]  # answers "1" / "2": the listener's decisions
    file = write_jsonl(tmp_path / "data", questions, ("pictures", "question", "solution"))
    columns = ["data.columns.images=pictures", "data.columns.problem=question", "data.columns.answer=solution"]
    rewards = (
        "{section}.rewards=[{{name: choice, weight: 0.5}}, {{name: numeric, weight: 0.3, args: {{abs_tol: 0.5}}}}, "
        "{{name: 'tests.test_vlm_rewards:my_reward', weight: 0.2}}]"
    )
    for method, recipe in (("grpo", "grpo"), ("listener-grpo", "listener_grpo")):
        section = method.replace("-", "_")
        out = tmp_path / method
        listener = [f"listener_grpo.listener={policy}"] if method == "listener-grpo" else []
        args = [
            "train",
            str(ROOT / f"configs/vlm/{recipe}.yaml"),
            f"data={file}",
            "data.eval_size=4",
            *columns,
            rewards.format(section=section),
            *listener,
            *run_overrides(method, policy, out),
        ]
        assert main(args) == 0, method
        report = json.loads((out / "report.json").read_text())
        assert report["data"]["eval"] == {"path": str(file), "split": "train", "held_out_rows": 4, "holdout_seed": 0}
        assert report["data"]["train_rows"] == 8
        train = report["train"]
        assert {"reward/choice", "reward/numeric", "reward/tests.test_vlm_rewards:my_reward"} <= set(train)
        assert {"heldout/choice", "heldout/numeric"} <= set(report["metrics"]["after"])
        if method == "listener-grpo":
            assert "listener_probability" in train and "listener_probability" in report["metrics"]["after"]


def test_bad_user_data_and_misplaced_keys_are_one_line_errors(hf_folder, tmp_path, capsys):
    recipe = str(ROOT / "configs/vlm/grpo.yaml")
    file = tmp_path / "q.jsonl"
    file.write_text('{"images": [], "problem": "What is 1+1?", "answer": "2"}\n{"images": [], "problem": "Hi?"}\n')
    cases = [
        ([f"data={hf_folder}", "data.columns.problem=question"], "no column 'question'"),
        ([f"data={hf_folder}", "data.split=validation"], "no split 'validation'"),
        ([f"data={file}"], "row 2, field 'answer'"),
        (["data.random_crop=true"], "'data.random_crop' is not read by method grpo"),
        (["model.flow_sampling=uniform"], "'model.flow_sampling' is not read by method grpo"),
        (["data.columns.problem=question"], "'data.columns' applies to your own data"),
        ([f"data={file}", "data.embedded.kinds=[count]"], "'data.embedded' applies to embedded:vlm-world only"),
        (["data.embedded.kinds=[colour]"], "unknown question kinds ['colour']"),
        (["model.dtype=float64"], "'model.dtype' must be one of"),
    ]
    for overrides, message in cases:
        assert main(["train", recipe, f"output_dir={tmp_path / 'out'}", *overrides]) == 2, overrides
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (overrides, err)
    with pytest.raises(DataError, match="no column 'reply'"):
        load_prompt_source(load_config(recipe, [f"data={hf_folder}", "data.eval_split=test"]).data, 0).train.check(
            ["reply"]
        )
    file.write_text('{"images": [], "problem": "What is 1+1?", "answer": "2"}\n' * 3)
    with pytest.raises(ConfigError, match="eval_size=100 must leave rows"):
        load_prompt_source(load_config(recipe, [f"data={file}"]).data, 0)
