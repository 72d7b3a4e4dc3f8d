"""Diffusion and mesh methods from the CLI on data in a user's format, evaluated on the user's held-out data."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import trimesh
from PIL import Image

from mmalign.cli import main
from mmalign.data import shapes_world
from mmalign.mesh import world as mesh_world

ROOT = Path(__file__).resolve().parents[1]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pickapic_folder(root: Path, n: int = 8) -> Path:
    """A Pick-a-Pic-layout `DatasetDict` (train and validation) saved with `save_to_disk`."""
    rng = np.random.default_rng(0)

    def split(count: int) -> datasets.Dataset:
        rows = {"jpg_0": [], "jpg_1": [], "label_0": [], "caption": []}
        for i, caption in enumerate(shapes_world.sample_captions(count, "train", rng)):
            good, bad = shapes_world.render(caption, rng), rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
            first, second = (good, bad) if i % 2 else (bad, good)
            rows["jpg_0"].append(_png(first))
            rows["jpg_1"].append(_png(second))
            rows["label_0"].append(1.0 if i % 2 else 0.0)
            rows["caption"].append(caption)
        return datasets.Dataset.from_dict(rows)

    folder = root / "pickapic"
    datasets.DatasetDict({"train": split(n), "validation": split(4)}).save_to_disk(str(folder))
    return folder


def test_diffusion_dpo_from_the_cli_on_a_datasets_folder_scored_by_a_reward_on_the_users_prompts(
    tiny_pipelines, tiny_clip_dir, pair_folder, tmp_path
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square above a green triangle\n")
    for name, data in (("hf", pickapic_folder(tmp_path)), ("jsonl", pair_folder)):
        out = tmp_path / name
        args = [
            "train", str(ROOT / "configs/image/diffusion_dpo.yaml"), f"model={tiny_pipelines['sd']}", f"data={data}",
            f"output_dir={out}", "train.max_steps=2", "train.batch_size=4", "train.checkpoint_every=1", "eval.every=0",
            f"eval.prompts={prompts}", "eval.gold=null", "eval.rewards=[clip-score]", "eval.num_steps=2",
            f"eval.reward_args={{clip-score: {{path: {tiny_clip_dir}}}}}", "eval.grid_size=2",
        ]  # fmt: skip
        assert main(args) == 0, name
        report = json.loads((out / "report.json").read_text())
        assert report["data"] == {"path": str(data)} and report["eval_prompts"] == str(prompts)
        assert report["gold_metric"] == "clip-score" and report["steps"] == 2
        text = (out / "report.md").read_text()
        assert "no gold metric (`eval.gold: null`): `clip-score`" in text and f"data `{data}`" in text


def _mesh_rows(root: Path) -> Path:
    """A user's scored mesh set: world meshes exported as OBJ files, split given per row."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows = []
    for prompt in mesh_world.prompts("train")[:6] + mesh_world.prompts("heldout")[:2]:
        split = "heldout" if prompt in mesh_world.prompts("heldout") else "train"
        for kind in ("good", "noisy"):
            mesh = mesh_world.good_mesh(prompt, rng)
            if kind == "noisy":
                mesh = trimesh.Trimesh(mesh.vertices + rng.normal(0, 0.05, mesh.vertices.shape), mesh.faces)
            name = f"{len(rows):03d}.obj"
            mesh.export(root / name)
            rows.append({"prompt": prompt, "mesh": name, "score": 5.0 if kind == "good" else 1.0, "split": split})
    (root / "meshes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_reward_cs_and_guidance_from_the_cli_on_the_users_mesh_folders(tmp_path):
    data = _mesh_rows(tmp_path / "meshes")
    small = ["encoder.points=64", "encoder.neighbours=6", "encoder.local_width=8", "encoder.width=16",
             "encoder.embed_dim=16", "encoder.head_hidden=16", "min_per_class=2"]  # fmt: skip
    out = tmp_path / "reward"
    args = ["train", str(ROOT / "configs/mesh/reward_cs.yaml"), f"data={data}", f"output_dir={out}",
            "train.max_steps=4", "train.batch_size=4", "train.checkpoint_every=0", "eval.every=0",
            *(f"reward_cs.{o}" for o in small)]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == {"path": str(data)} and report["metrics"]["after"]["heldout_pairwise_accuracy"] >= 0
    assert f"Mesh set `{data}`" in (out / "report.md").read_text()

    templates = tmp_path / "templates"
    templates.mkdir()
    rows = [{"prompt": r["prompt"], "mesh": str(data / r["mesh"])} for r in
            map(json.loads, (data / "meshes.jsonl").read_text().splitlines()) if r["score"] < 2][:2]  # fmt: skip
    (templates / "templates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    guided = tmp_path / "guided"
    args = ["train", str(ROOT / "configs/mesh/guided.yaml"), f"data={templates}", f"output_dir={guided}",
            f"mesh_guided.rewards=[{out / 'final' / 'reward'}]", "train.max_steps=2", "eval.every=0",
            "train.checkpoint_every=0"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((guided / "report.json").read_text())
    assert report["data"] == {"path": str(templates)} and report["steps"] == 2
    assert len(list((guided / "final").rglob("*.obj"))) + len(list((guided / "final").rglob("*.glb"))) >= 2
