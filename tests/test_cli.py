"""The `mmalign` command line: methods, help, score, sample, and error exits."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.cli import main
from mmalign.data import shapes_world
from mmalign.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
# what the listing commands must not import: the ML libraries and mmalign's model, method and reward code
MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "peft", "open_clip", "trimesh")
MODEL_PACKAGES = ("models", "image", "video", "mesh", "vlm", "rewards", "train", "data")  # under mmalign.


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(shapes_world.render("a red circle above a blue square", rng)).save(folder / f"{i}.png")
    return folder


def test_methods_lists_methods_and_rewards(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "diffusion-dpo" in out and "clip-score" in out and "shapes-gold" in out
    assert "embedded:vlm-world" in out and "VQA set" in out and "videos.jsonl folder" in out


def test_train_help_lists_the_options_the_run_reads(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "train.learning_rate" in out and "mmalign train CONFIG --help" in out and "diffusion_dpo.beta" not in out
    assert main(["train", "configs/image/diffusion_dpo.yaml", "--help"]) == 0
    out = capsys.readouterr().out
    assert "diffusion_dpo.beta" in out and "data.embedded.prompts" in out and "grpo.rewards" not in out
    assert main(["train", "configs/image/diffusion_dpo.yaml", "method=grpo", "--help"]) == 0
    assert "grpo.rewards" in capsys.readouterr().out
    assert main(["train", "--help", "reward-cs"]) == 0
    out = capsys.readouterr().out
    assert "reward_cs.cs_weight" in out and "has no model section" in out and "eval.gold" not in out


def _mmalign_package(module: str) -> str | None:
    """`image` for `mmalign.image.smpo`; None outside mmalign's subpackages."""
    parts = module.split(".")
    return parts[1] if parts[0] == "mmalign" and len(parts) > 1 else None


def _modules_imported_by(argv: list[str]) -> set[str]:
    """`sys.modules` of a fresh interpreter after `mmalign.cli.main(argv)` (its output discarded)."""
    code = (
        "import contextlib, io, json, sys\n"
        "from mmalign.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    main({argv!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["methods"], ["train", "--help"], ["score", "--help"]])
def test_listing_commands_import_no_model_code(argv):
    modules = _modules_imported_by(argv)
    assert "mmalign.cli" in modules
    assert not [m for m in modules if m.split(".")[0] in MODEL_LIBRARIES or _mmalign_package(m) in MODEL_PACKAGES]


@pytest.mark.parametrize(
    "config, method",
    [("configs/image/diffusion_dpo.yaml", "diffusion-dpo"), ("configs/vlm/sft.yaml", "vlm-sft")],
)
def test_train_config_help_imports_only_that_method(config, method):
    modules = _modules_imported_by(["train", config, "--help"])
    assert {name for name, (target, _) in METHODS.items() if target.split(":")[0] in modules} == {method}
    modality = METHODS[method][0].split(".")[1]
    others = {"image", "video", "mesh", "vlm"} - {modality}
    assert not [m for m in modules if _mmalign_package(m) in others]


def test_score_prints_a_table_and_writes_csv_and_json(image_folder, tmp_path, capsys):
    args = [
        "score",
        "--reward",
        "shapes-gold",
        str(image_folder),
        "--prompt",
        "a red circle above a blue square",
        "--csv",
        str(tmp_path / "s.csv"),
        "--json",
        str(tmp_path / "s.json"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[-1] == "shapes-gold" and len(out) == 4
    rows = list(csv.DictReader((tmp_path / "s.csv").read_text().splitlines()))
    assert len(rows) == 3 and all(float(r["score"]) > 0.8 for r in rows)
    assert len(json.loads((tmp_path / "s.json").read_text())["scores"]) == 3


def test_score_with_clip_folder_and_prompts_file(image_folder, tiny_clip_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na cat\n")
    args = ["score", str(image_folder), "--prompts-file", str(prompts), "--reward-arg", f"path={tiny_clip_dir}"]
    assert main(args) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "bad.png").write_bytes(b"xx"), "bad.png: not a readable image"),
        (lambda d: None, "no image files inside"),
    ],
)
def test_score_errors_exit_2_with_a_message(tmp_path, capsys, make, message):
    folder = tmp_path / "f"
    folder.mkdir()
    make(folder)
    target = folder / "bad.png" if (folder / "bad.png").exists() else folder
    assert main(["score", "--reward", "shapes-gold", str(target), "--prompt", "a red circle"]) == 2
    assert message in capsys.readouterr().err


def test_unknown_reward_and_bad_override(capsys, tmp_path):
    assert main(["score", "--reward", "clip-scor", str(tmp_path), "--prompt", "x"]) == 2
    assert main(["train", "configs/image/diffusion_dpo.yaml", "train.learnig_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'clip-score'" in err
    assert "did you mean 'train.learning_rate'" in err


def test_sample_writes_images_and_a_grid(tiny_pipelines, tmp_path):
    out = tmp_path / "out"
    args = ["sample", "--model", str(tiny_pipelines["sd"]), "--prompt", "a red circle", "--prompt", "a blue square",
            "--num", "2", "--steps", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png", "00003.png", "grid.png"]
    assert (out / "prompts.txt").read_text().splitlines() == ["a red circle"] * 2 + ["a blue square"] * 2


def test_sample_best_of_n_keeps_the_rewards_choice(tiny_pipelines, tmp_path):
    out = tmp_path / "best"
    args = [
        "sample",
        "--model",
        str(tiny_pipelines["sd"]),
        "--prompt",
        "a red circle",
        "--prompt",
        "a blue square",
        "--steps",
        "2",
        "--best-of",
        "3",
        "--reward",
        "shapes-gold",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    record = json.loads((out / "best_of_n.json").read_text())
    assert record["n"] == 3 and len(record["samples"]) == 2
    for sample in record["samples"]:
        assert sample["chosen"] == max(range(3), key=lambda k: sample["scores"][k])
    assert main([*args[:-2], "--best-of", "1", "--out", str(tmp_path / "one")]) == 2  # N < 2 is a clear error


def test_the_projects_own_checks_are_one_line_errors(tmp_path, capsys):
    """Checks made when a method sets up (not only when the config is built) print one line, no traceback."""
    recipe = str(Path(__file__).resolve().parents[1] / "configs/video/densedpo.yaml")
    args = ["train", recipe, f"output_dir={tmp_path}", "densedpo.pairs=vanilla",
            "densedpo.labeler=reference"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "densedpo.labeler=reference" in err and len(err.splitlines()) == 1 and "Traceback" not in err
