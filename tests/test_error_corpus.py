"""A corpus of bad inputs through the `mmalign` command line: each ends in exit code 2 and one line
`mmalign <command>: error: ...` naming the file, row, field or key, and no traceback.

Most cases fail while the config is built or the data is read, before any model loads; the few
that need a model use the session's tiny pipelines, and the damaged-checkpoint cases share one
tiny run that each case copies and damages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from mmalign.cli import main
from tests.conftest import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root ignores file permissions


@pytest.fixture(autouse=True, scope="module")
def _library_warnings_through_pytest():
    """transformers' stderr handler keeps the stream of the test that first imported it, which pytest has
    closed since: its warnings go to pytest's log capture instead, so a test's stderr is what the CLI wrote."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    yield
    hf_logging.enable_default_handler()


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`main(argv)` in this process: (exit code, stdout, stderr). An exception escaping `main` fails the test."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expect_error(argv: list, capsys: pytest.CaptureFixture[str], *names: str) -> str:
    """Exit code 2, exactly one `error:` line (the last one written) naming every one of `names`; returns it."""
    code, _, err = run_cli(argv, capsys)
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(errors) == 1 and errors[0] == lines[-1], err
    assert errors[0].startswith(f"mmalign {argv[0]}: error: "), errors[0]
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def train(recipe: str, out: Path, *overrides: str) -> list:
    return ["train", CONFIGS / recipe, f"output_dir={out}", *overrides]


# ----------------------------------------------------------------- 1. the project's own checks
OWN_CHECKS = [
    ("video/densedpo.yaml", ["densedpo.pairs=vanilla", "densedpo.labeler=reference"], ["densedpo.labeler=reference"]),
    ("video/densedpo.yaml", ["densedpo.pairs=vanilla", "densedpo.sft_target=real"], ["densedpo.sft_target"]),
    ("video/densedpo.yaml", ["densedpo.labeler_reward=balls-physics"], ["densedpo.labeler_reward"]),
    ("video/densedpo.yaml", ["densedpo.labeler=vlm"], ["densedpo.judge_model"]),
    ("video/rdpo.yaml", ["rdpo.positive_depths=[0.9]", "rdpo.negative_depth=0.5"], ["rdpo.positive_depths"]),
    ("video/rdpo.yaml", ["rdpo.refresh_reference=true"], ["rdpo.refresh_reference", "model.lora_rank"]),
    ("video/flow_grpo.yaml", ["flow_grpo.guidance_scale_2=2"], ["flow_grpo.guidance_scale_2", "WanPipeline"]),
    ("vlm/grpo.yaml", ["grpo.iterations=2", "train.checkpoint_every=3"], ["train.checkpoint_every", "grpo.iterations"]),
    ("vlm/grpo.yaml", ["grpo.rewards=[{name: format}, {name: format}]"], ["grpo.rewards", "'format'"]),
    ("vlm/grpo.yaml", ["grpo.rewards=[{name: nosuch}]"], ["grpo.rewards[0].name", "'nosuch'"]),
    ("vlm/papo.yaml", ["papo.rewards=[{name: 'nosuch.module:f'}]"], ["papo.rewards[0].name", "nosuch.module:f"]),
    ("mesh/reward_cs.yaml", ["reward_cs.min_per_class=100"], ["reward_cs.min_per_class", "train.batch_size"]),
    ("mesh/guided.yaml", ["mesh_guided.rewards=[shapes-gold]"], ["mesh_guided.rewards", "shapes-gold"]),
    ("mesh/guided.yaml", ["mesh_guided.rewards=[]"], ["mesh_guided.rewards"]),
    ("mesh/reward_cs_rounds.yaml", ["reward_cs_rounds.rater=nosuch.module:fn"], ["reward_cs_rounds.rater"]),
    ("image/gan_rm.yaml", ["gan_rm.update=ppo"], ["gan_rm.update"]),
    ("image/gan_rm.yaml", ["gan_rm.candidates=1"], ["gan_rm.candidates"]),
]


@pytest.mark.parametrize(("recipe", "overrides", "names"), OWN_CHECKS, ids=lambda v: v if isinstance(v, str) else None)
def test_own_checks(recipe, overrides, names, tmp_path, capsys):
    expect_error(train(recipe, tmp_path / "run", *overrides), capsys, *names)


# ----------------------------------------------------------------- 2. values checked when the config is built
BUILD_TIME = [
    ("vlm/grpo.yaml", "grpo.num_generations=1"),
    ("vlm/grpo.yaml", "grpo.temperature=0"),
    ("vlm/grpo.yaml", "grpo.top_p=1.5"),
    ("vlm/grpo.yaml", "grpo.clip_low=-0.1"),
    ("vlm/grpo.yaml", "grpo.aggregation=sum"),
    ("vlm/grpo.yaml", "grpo.max_new_tokens=0"),
    ("vlm/grpo.yaml", "model.lora_rank=0"),
    ("vlm/grpo.yaml", "model.dtype=float64"),
    ("vlm/papo.yaml", "papo.mask_ratio=1"),
    ("vlm/papo.yaml", "papo.temperature=-1"),
    ("vlm/papo.yaml", "papo.mask_patch=0"),
    ("vlm/listener_grpo.yaml", "listener_grpo.beta=-1"),
    ("vlm/reward_model.yaml", "vlm_reward_model.ties=maybe"),
    ("vlm/reward_model.yaml", "vlm_reward_model.heldout_fraction=1"),
    ("image/smpo.yaml", "smpo.inversion=exact"),
    ("image/smpo.yaml", "smpo.inversion_steps=0"),
    ("image/smpo.yaml", "smpo.tau=0"),
    ("image/diffusion_dpo.yaml", "diffusion_dpo.beta_convention=half"),
    ("image/diffusion_dpo.yaml", "diffusion_dpo.prompt_dropout=1.5"),
    ("image/diffusion_dpo.yaml", "model.lora_rank=0"),
    ("image/diffusion_dpo.yaml", "data.resolution=0"),
    ("image/gan_rm.yaml", "gan_rm.dpo.beta_convention=half"),
    ("image/gan_rm.yaml", "gan_rm.reward_model.dropout=1"),
    ("video/densedpo.yaml", "densedpo.labeler=oracle"),
    ("video/densedpo.yaml", "densedpo.eta=[0.9, 0.1]"),
    ("video/densedpo.yaml", "densedpo.tie_margin=-1"),
    ("video/densedpo.yaml", "densedpo.segment_seconds=0"),
    ("video/rdpo.yaml", "rdpo.select=farthest"),
    ("video/rdpo.yaml", "rdpo.candidates=0"),
    ("video/rdpo.yaml", "rdpo.negative_depth=1.5"),
    ("video/flow_grpo.yaml", "flow_grpo.guidance_scale_2=0.5"),
    ("mesh/reward_cs.yaml", "reward_cs.bandwidth=0"),
    ("mesh/reward_cs.yaml", "reward_cs.cs_weight=-1"),
    ("mesh/reward_cs.yaml", "reward_cs.train_draws=0"),
    ("mesh/reward_bt.yaml", "reward_bt.pairing=random"),
    ("mesh/reward_cs_rounds.yaml", "reward_cs_rounds.reward.bandwidth=0"),
    ("mesh/reward_cs_rounds.yaml", "reward_cs_rounds.guidance.ensemble=max"),
    ("mesh/guided.yaml", "mesh_guided.ensemble=max"),
    ("mesh/guided.yaml", "mesh_guided.alpha_max=0.1"),
    ("mesh/guided.yaml", "mesh_guided.edge_weight=-1"),
    ("mesh/guided.yaml", "mesh_guided.draws=0"),
]


@pytest.mark.parametrize(("recipe", "override"), BUILD_TIME, ids=lambda v: v.replace("/", "-").replace(" ", ""))
def test_values_checked_when_the_config_is_built(recipe, override, tmp_path, capsys):
    key = override.split("=")[0]
    expect_error(train(recipe, tmp_path / "run", override), capsys, f"'{key}'")
    assert not (tmp_path / "run").exists()  # refused before the run directory (or any model) was made


# ----------------------------------------------------------------- 3. data decoding
def _png(path: Path, size: int = 16) -> Path:
    Image.new("RGB", (size, size), "red").save(path)
    return path


def _truncated_png(path: Path) -> Path:
    data = (_png(path, 64)).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _mesh_line(mesh: str = "a.obj", **fields) -> str:
    return json.dumps({"prompt": "a chair", "mesh": mesh, "score": 5.0, **fields}) + "\n"


SCORED_FILES: list[tuple[str, str, Callable[[Path], bytes | None]]] = [
    ("shapes-gold", "bad.png", lambda p: p.write_bytes(b"not a png")),
    ("shapes-gold", "empty.png", lambda p: p.write_bytes(b"")),
    ("shapes-gold", "half.png", _truncated_png),
    ("shapes-gold", "text.jpg", lambda p: p.write_text("hello")),
    ("motion-smoothness", "bad.mp4", lambda p: p.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)),
    ("motion-smoothness", "bad.gif", lambda p: p.write_bytes(b"GIF89a\x10\x00\x10\x00")),
    ("embedded:mesh-reward-cs", "bad.obj", lambda p: p.write_text("v 0 0\nf 1 2 3 4 5\nnonsense\n")),
    ("embedded:mesh-reward-cs", "huge.ply", lambda p: p.write_text(
        "ply\nformat ascii 1.0\nelement vertex 99999999999\nproperty float x\nend_header\n0\n")),
    ("embedded:mesh-reward-cs", "bad.glb", lambda p: p.write_bytes(b"glTF\x02\x00\x00\x00" + b"\xff" * 20)),
    ("embedded:mesh-reward-cs", "empty.stl", lambda p: p.write_bytes(b"")),
]  # fmt: skip


@pytest.mark.parametrize(("reward", "name", "make"), SCORED_FILES, ids=[c[1] for c in SCORED_FILES])
def test_unreadable_files_are_named(reward, name, make, tmp_path, capsys):
    make(tmp_path / name)
    expect_error(["score", "--reward", reward, tmp_path / name, "--prompt", "a red circle"], capsys, name)


def test_a_decompression_bomb_is_named(tmp_path, capsys, monkeypatch):
    _png(tmp_path / "bomb.png", 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64² > 2 × 100: PIL refuses to decode it
    expect_error(["score", "--reward", "shapes-gold", tmp_path / "bomb.png", "--prompt", "x"], capsys, "bomb.png")


MESH_ROWS: list[tuple[str, bytes, list[str]]] = [
    ("non-utf8", _mesh_line().encode() + b'{"prompt": "caf\xe9"}\n', ["meshes.jsonl", "row 2", "UTF-8"]),
    ("bad-json", (_mesh_line() + '{"prompt": "a", \n').encode(), ["meshes.jsonl", "row 2", "JSON"]),
    ("not-an-object", (_mesh_line() + "[1, 2]\n").encode(), ["meshes.jsonl", "row 2"]),
    ("missing-score", (_mesh_line() + '{"prompt": "a", "mesh": "a.obj"}\n').encode(),
     ["meshes.jsonl", "row 2", "'score'"]),
    ("string-score", _mesh_line(score="high").encode(), ["meshes.jsonl", "row 1", "'score'"]),
    ("missing-file", _mesh_line("gone.obj").encode(), ["meshes.jsonl", "row 1", "gone.obj"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "text", "names"), MESH_ROWS, ids=[c[0] for c in MESH_ROWS])
def test_bad_mesh_rows_name_the_row_and_field(case, text, names, tmp_path, capsys):
    data = tmp_path / "meshes"
    data.mkdir()
    (data / "a.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (data / "meshes.jsonl").write_bytes(text)
    expect_error(train("mesh/reward_cs.yaml", tmp_path / "run", f"data={data}"), capsys, *names)


PAIR_ROWS = [
    ("non-utf8", b'{"prompt": "caf\xe9"}\n', ["pairs.jsonl", "row 1", "UTF-8"]),
    ("missing-image", b'{"image_0": "a.png", "label": 0, "prompt": "x"}\n', ["pairs.jsonl", "row 1", "'image_1'"]),
    ("corrupt-image", b'{"image_0": "a.png", "image_1": "bad.png", "label": 0, "prompt": "x"}\n',
     ["bad.png"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "text", "names"), PAIR_ROWS, ids=[c[0] for c in PAIR_ROWS])
def test_bad_pair_rows_name_the_row_and_field(case, text, names, tiny_pipelines, tmp_path, capsys):
    data = tmp_path / "pairs"
    data.mkdir()
    _png(data / "a.png")
    (data / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    (data / "pairs.jsonl").write_bytes(text)
    out = tmp_path / "run"
    argv = train("image/diffusion_dpo.yaml", out, *tiny_run_overrides(tiny_pipelines["sd"], data, out, 1))
    expect_error(argv, capsys, *names)


# ----------------------------------------------------------------- 4. output problems
def _image(tmp_path: Path) -> Path:
    return _png(tmp_path / "a.png")


def _score(tmp_path: Path, *extra: str) -> list:
    return ["score", "--reward", "shapes-gold", _image(tmp_path), "--prompt", "a red circle", *extra]


OUTPUTS: list[tuple[str, Callable[[Path], tuple[list, str]]]] = [
    ("csv-to-a-folder", lambda t: (_score(t, "--csv", t), str(t))),
    ("json-to-a-folder", lambda t: (_score(t, "--json", t), str(t))),
    ("csv-under-a-file", lambda t: (_score(t, "--csv", t / "a.png" / "s.csv"), "s.csv")),
    ("json-in-a-missing-folder", lambda t: (_score(t, "--json", t / "nowhere" / "s.json"), "s.json")),
    ("output-dir-is-a-file", lambda t: (train("mesh/reward_cs.yaml", _image(t)), "a.png")),
    ("output-dir-under-a-file", lambda t: (train("mesh/reward_cs.yaml", _image(t) / "run"), "a.png")),
    ("config-yaml-is-a-folder", lambda t: ((t / "run" / "config.yaml").mkdir(parents=True),
                                           (train("mesh/reward_cs.yaml", t / "run"), "config.yaml"))[1]),
    ("report-json-is-a-folder", lambda t: ((t / "run" / "report.json").mkdir(parents=True),
                                           (train("mesh/reward_cs.yaml", t / "run"), "report.json"))[1]),
    ("prompts-file-is-a-folder", lambda t: (["score", "--reward", "shapes-gold", _image(t), "--prompts-file", t],
                                            str(t))),
    ("prompts-file-is-missing", lambda t: (["score", "--reward", "shapes-gold", _image(t), "--prompts-file",
                                            t / "p.txt"], "p.txt")),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make"), OUTPUTS, ids=[c[0] for c in OUTPUTS])
def test_output_problems(case, make, tmp_path, capsys):
    argv, name = make(tmp_path)
    expect_error(argv, capsys, name)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_is_named(tmp_path, capsys):
    expect_error(_score(tmp_path, "--csv", "/dev/full"), capsys, "/dev/full")
    expect_error(_score(tmp_path, "--json", "/dev/full"), capsys, "/dev/full")


def test_sample_refuses_a_folder_holding_an_earlier_sample(tiny_pipelines, tmp_path, capsys):
    out = tmp_path / "samples"
    out.mkdir()
    _png(out / "00000.png")
    argv = ["sample", "--model", tiny_pipelines["sd"], "--prompt", "a red circle", "--out", out, "--steps", "1"]
    expect_error(argv, capsys, str(out), "earlier sample")
    out_file = _png(tmp_path / "file.png")
    argv = ["sample", "--model", tiny_pipelines["sd"], "--prompt", "a red circle", "--out", out_file, "--steps", "1"]
    expect_error(argv, capsys, "file.png")
    argv = ["sample", "--model", tiny_pipelines["sd"], "--prompt", "a red circle", "--out", out_file / "x", "--steps",
            "1"]  # fmt: skip
    expect_error(argv, capsys, "file.png")


@pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions")
@pytest.mark.parametrize("target", ["csv", "output_dir"])
def test_read_only_places(target, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if target == "csv":
            expect_error(_score(tmp_path, "--csv", locked / "s.csv"), capsys, "s.csv")
        else:
            expect_error(train("mesh/reward_cs.yaml", locked / "run"), capsys, "locked")
    finally:
        locked.chmod(0o700)


# ----------------------------------------------------------------- 5. damaged checkpoints
STEPS = 2


def _run_args(model: Path, data: Path, out: Path) -> list:
    return train("image/diffusion_dpo.yaml", out, *tiny_run_overrides(model, data, out, STEPS),
                 "train.checkpoint_every=1", "eval.num_prompts=1", "eval.grid_size=1")  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tiny_pipelines, pair_folder, tmp_path_factory) -> Path:
    """One tiny two-step run with checkpoints at steps 1 and 2, which each case copies and damages."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([str(a) for a in _run_args(tiny_pipelines["sd"], pair_folder, out)]) == 0
    return out


def _copy_run(run: Path, out: Path) -> Path:
    """A copy of `run` at `out` without its final result, so that running it again resumes."""
    shutil.copytree(run, out)
    (out / "report.json").unlink()
    shutil.rmtree(out / "final")
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace(str(run), str(out)))
    return out / "checkpoints" / f"step-{STEPS:06d}"


def _edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(checkpoint: Path) -> None:
        tensors = load_file(str(checkpoint / "trainable.safetensors"))
        edit(tensors)
        save_file(tensors, str(checkpoint / "trainable.safetensors"))

    return damage


def _rename_first(tensors: dict) -> None:
    key = next(iter(tensors))
    tensors["renamed." + key] = tensors.pop(key)


def _shrink_first(tensors: dict) -> None:
    key = next(iter(tensors))
    tensors[key] = tensors[key][:1].clone()


def _set_step(step: object) -> Callable[[Path], None]:
    def damage(checkpoint: Path) -> None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "step": step}))

    return damage


def _truncate(name: str) -> Callable[[Path], None]:
    return lambda checkpoint: (checkpoint / name).write_bytes((checkpoint / name).read_bytes()[:40])


REFUSED: list[tuple[str, Callable[[Path], None], str]] = [
    ("moved-folder", lambda c: c.rename(c.with_name("step-000006")), "trainer_state.json"),
    ("edited-step", _set_step(3), "trainer_state.json"),
    ("step-as-text", _set_step("2"), "trainer_state.json"),
    ("renamed-tensor", _edit_tensors(_rename_first), "trainable.safetensors"),
    ("reshaped-tensor", _edit_tensors(_shrink_first), "trainable.safetensors"),
    ("missing-tensor", _edit_tensors(lambda t: t.pop(next(iter(t)))), "trainable.safetensors"),
    ("extra-tensor", _edit_tensors(lambda t: t.update(extra=next(iter(t.values())).clone())), "trainable.safetensors"),
    ("edited-config", lambda c: (c.parents[1] / "config.yaml").write_text("seed: 7\n"), "config.yaml"),
    ("config-not-yaml", lambda c: (c.parents[1] / "config.yaml").write_text("train: [unclosed\n"), "config.yaml"),
    ("state-not-an-object", lambda c: (c / "trainer_state.json").write_text("[]"), "trainer_state.json"),
    ("optimizer-json-edited", lambda c: (c / "optimizer.json").write_text('{"state": 1}'), "optimizer.json"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "damage", "name"), REFUSED, ids=lambda v: v if isinstance(v, str) else None)
def test_damaged_checkpoints_that_are_refused(case, damage, name, finished_run, tiny_pipelines, pair_folder,
                                              tmp_path, capsys):  # fmt: skip
    out = tmp_path / "run"
    damage(_copy_run(finished_run, out))
    expect_error(_run_args(tiny_pipelines["sd"], pair_folder, out), capsys, name)


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.safetensors", "trainer_state.json",
                                  "scheduler.json", "rng-rank0.safetensors"])  # fmt: skip
def test_truncated_checkpoints_fall_back_to_the_one_before(name, finished_run, tiny_pipelines, pair_folder,
                                                           tmp_path, capsys):  # fmt: skip
    out = tmp_path / "run"
    checkpoint = _copy_run(finished_run, out)
    _truncate(name)(checkpoint)
    code, stdout, err = run_cli(_run_args(tiny_pipelines["sd"], pair_folder, out), capsys)
    assert code == 0 and "Traceback" not in err
    assert f"checkpoint {checkpoint} is damaged" in stdout and "resumed from" in stdout and "step-000001" in stdout
    assert (out / "report.json").exists()


# ----------------------------------------------------------------- 6. values that were accepted silently
SILENT_PAIRS = [
    ("leaves-the-folder", {"image_0": "../secret.png"}, ["row 1", "'image_0'", "../secret.png"]),
    ("bool-label", {"label": True}, ["row 1", "'label'"]),
    ("string-label", {"label": "1"}, ["row 1", "'label'"]),
    ("label-two", {"label": 2}, ["row 1", "'label'"]),
    ("empty-prompt", {"prompt": " "}, ["row 1", "'prompt'"]),
    ("number-prompt", {"prompt": 7}, ["row 1", "'prompt'"]),
    ("null-image", {"image_1": None}, ["row 1", "'image_1'"]),
]


@pytest.mark.parametrize(("case", "fields", "names"), SILENT_PAIRS, ids=[c[0] for c in SILENT_PAIRS])
def test_pair_values_that_were_accepted_silently(case, fields, names, tiny_pipelines, tmp_path, capsys):
    data = tmp_path / "pairs"
    data.mkdir()
    for name in ("a.png", "b.png"):
        _png(data / name)
    _png(tmp_path / "secret.png")
    row = {"image_0": "a.png", "image_1": "b.png", "label": 0, "prompt": "a red circle", **fields}
    (data / "pairs.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "run"
    argv = train("image/diffusion_dpo.yaml", out, *tiny_run_overrides(tiny_pipelines["sd"], data, out, 1))
    expect_error(argv, capsys, "pairs.jsonl", *names)


SILENT_MESHES = [
    ("mesh-leaves-the-folder", _mesh_line("../secret.obj"), ["row 1", "'mesh'", "../secret.obj"]),
    ("nan-score", _mesh_line(score=float("nan")), ["row 1", "'score'"]),
    ("bool-score", _mesh_line(score=True), ["row 1", "'score'"]),
    ("empty-prompt", _mesh_line(prompt=""), ["row 1", "'prompt'"]),
]


@pytest.mark.parametrize(("case", "text", "names"), SILENT_MESHES, ids=[c[0] for c in SILENT_MESHES])
def test_mesh_values_that_were_accepted_silently(case, text, names, tmp_path, capsys):
    data = tmp_path / "meshes"
    data.mkdir()
    triangle = "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"
    (data / "a.obj").write_text(triangle)
    (tmp_path / "secret.obj").write_text(triangle)
    (data / "meshes.jsonl").write_text(text)
    expect_error(train("mesh/reward_cs.yaml", tmp_path / "run", f"data={data}"), capsys, "meshes.jsonl", *names)


def test_prompts_that_do_not_match_the_files(tiny_pipelines, pair_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    argv = ["score", "--reward", "shapes-gold", _image(tmp_path), "--prompts-file", prompts]
    expect_error(argv, capsys, "prompts.txt")
    (tmp_path / "empty.txt").write_text("\n")
    out = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_pipelines["sd"], pair_folder, out, 1)
    argv = train("image/diffusion_dpo.yaml", out, *overrides, f"eval.prompts={tmp_path / 'empty.txt'}")
    expect_error(argv, capsys, "eval.prompts", "empty.txt")


# ----------------------------------------------------------------- 7. code that data could run
def _remote_code_folder(folder: Path) -> Path:
    """A transformers checkpoint whose config points at its own Python files (which raise if run)."""
    folder.mkdir()
    config = {"model_type": "my_custom_vlm", "architectures": ["CustomModel"],
              "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                           "AutoModel": "modeling_custom.CustomModel",
                           "AutoModelForImageTextToText": "modeling_custom.CustomModel"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (folder / name).write_text('raise SystemExit("the checkpoint code ran")\n')
    return folder


REMOTE_CODE: list[tuple[str, Callable[[Path], list]]] = [
    ("vlm-sft-model", lambda f: train("vlm/sft.yaml", f.parent / "run", f"model={f}")),
    ("grpo-model", lambda f: train("vlm/grpo.yaml", f.parent / "run", f"model={f}")),
    ("listener", lambda f: train("vlm/listener_grpo.yaml", f.parent / "run", f"listener_grpo.listener={f}")),
    ("clip-reward", lambda f: ["score", "--reward", "clip-score", "--reward-arg", f"path={f}",
                               _image(f.parent), "--prompt", "x"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "argv"), REMOTE_CODE, ids=[c[0] for c in REMOTE_CODE])
def test_remote_code_folders_are_refused(case, argv, tmp_path, capsys):
    folder = _remote_code_folder(tmp_path / "custom")
    expect_error(argv(folder), capsys, "custom")


YAML_TAGS = [
    ("method: !!python/object/apply:os.system ['echo ran']\n", ["recipe.yaml", "line 1", "python/object/apply"]),
    ("train: !!python/object/new:dict {}\n", ["recipe.yaml", "line 1", "python/object/new"]),
    ("seed: !!python/name:os.system\n", ["recipe.yaml", "python/name"]),
    ("seed: !!python/module:os\n", ["recipe.yaml", "python/module"]),
    ("method: reward-cs\nseed: !custom 3\n", ["recipe.yaml", "line 2", "!custom"]),
    ("method: reward-cs\ntrain: &a [*a]\n", ["'train'"]),
]


@pytest.mark.parametrize(("text", "names"), YAML_TAGS, ids=range(len(YAML_TAGS)))
def test_yaml_tags_in_a_recipe_are_refused(text, names, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    expect_error(["train", recipe, f"output_dir={tmp_path / 'run'}"], capsys, *names)


@pytest.mark.parametrize(
    "override",
    ["seed=!!python/object/apply:os.system ['echo ran']", "train.max_steps=!!python/name:os.system"],
)
def test_yaml_tags_in_an_override_are_plain_text(override, tmp_path, capsys):
    expect_error(train("mesh/reward_cs.yaml", tmp_path / "run", override), capsys, f"'{override.split('=')[0]}'")


def test_a_reward_folder_naming_unknown_code_is_refused(tmp_path, capsys):
    folder = tmp_path / "reward"
    folder.mkdir()
    (folder / "mmalign_reward.json").write_text(json.dumps({"reward": "os:system"}))
    expect_error(["score", "--reward", folder, _image(tmp_path), "--prompt", "x"], capsys, "os:system")
    (folder / "mmalign_reward.json").write_text("{not json")
    expect_error(["score", "--reward", folder, _image(tmp_path), "--prompt", "x"], capsys, "mmalign_reward.json")
    (folder / "mmalign_reward.json").write_text("{}")
    expect_error(["score", "--reward", folder, _image(tmp_path), "--prompt", "x"], capsys, "mmalign_reward.json")
