"""Unpaired mesh sets: reading, validation errors, thresholds, splits, cached samples, stratified draws, pairs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from mmalign.config import ConfigError, DataConfig
from mmalign.data.pairs import DataError
from mmalign.mesh import data as mesh_data
from mmalign.mesh import world
from mmalign.mesh.data import (
    MeshSetConfig,
    PairDraws,
    StratifiedDraws,
    load_mesh_sets,
    read_mesh_rows,
    same_prompt_pairs,
    sample_rows,
    split_rows,
)
from mmalign.mesh.embedded import EmbeddedMeshesConfig, build_embedded_meshes, embedded_meshes_directory
from mmalign.train.trainer import EpochSampler

PROMPTS = ("a cube", "a sphere", "a torus", "a cone")


def _write_set(root: Path, rows: list[dict]) -> Path:
    """A `meshes.jsonl` folder; every `mesh` named in `rows` that does not exist is written as a small box."""
    root.mkdir(parents=True, exist_ok=True)
    for row in rows:
        mesh = row.get("mesh")
        if isinstance(mesh, str) and mesh.endswith(".obj") and not (root / mesh).exists():
            (root / mesh).parent.mkdir(parents=True, exist_ok=True)
            trimesh.creation.box(extents=(1.0, 0.5 + 0.1 * len(mesh), 0.3)).export(root / mesh)
    (root / "meshes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _rows(n_per_prompt: int = 2) -> list[dict]:
    """Per prompt: preferred rows (score 4.5) then dispreferred ones (score 1.0)."""
    rows = []
    for p, prompt in enumerate(PROMPTS):
        for i in range(n_per_prompt):
            rows.append({"prompt": prompt, "mesh": f"m/{p}_good{i}.obj", "score": 4.5})
            rows.append({"prompt": prompt, "mesh": f"m/{p}_bad{i}.obj", "score": 1.0})
    return rows


def test_thresholds_keep_both_ends_and_drop_the_band(tmp_path):
    scores = [5.0, 4.0, 3.99, 3.7, 3.5, 0.0]
    rows = [{"prompt": "a cube", "mesh": f"{i}.obj", "score": s} for i, s in enumerate(scores)]
    rows[0]["label"], rows[5]["label"], rows[1]["label"] = 1, 0, None
    read = read_mesh_rows(_write_set(tmp_path, rows), MeshSetConfig())
    assert [(r.score, r.preferred) for r in read] == [(5.0, True), (4.0, True), (3.5, False), (0.0, False)]
    assert read[2].where.endswith("meshes.jsonl, row 5") and read[0].mesh == tmp_path / "0.obj"
    strict = read_mesh_rows(tmp_path / "meshes.jsonl", MeshSetConfig(preferred_min=4.5, dispreferred_max=1.0))
    assert [r.score for r in strict] == [5.0, 0.0]
    with pytest.raises(ConfigError, match="dispreferred_max"):
        read_mesh_rows(tmp_path, MeshSetConfig(preferred_min=3.0, dispreferred_max=3.5))


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"prompt": "a cube", "mesh": "x.obj"}, r"row 2, field 'score': missing field"),
        ({"prompt": "a cube", "score": 4.5}, r"row 2, field 'mesh': missing field"),
        ({"mesh": "x.obj", "score": 4.5}, r"row 2, field 'prompt': missing field"),
        ({"prompt": "a cube", "mesh": "x.obj", "score": "high"}, r"row 2, field 'score': score must be a number"),
        ({"prompt": "a cube", "mesh": "x.obj", "score": 7}, r"row 2, field 'score': .*\[0, 5\]"),
        ({"prompt": "a cube", "mesh": "x.obj", "score": True}, r"row 2, field 'score'"),
        ({"prompt": " ", "mesh": "x.obj", "score": 4.5}, r"row 2, field 'prompt': prompt must be a non-empty"),
        ({"prompt": "a cube", "mesh": "gone.ply", "score": 4.5}, r"row 2, field 'mesh': mesh file not found"),
        ({"prompt": "a cube", "mesh": "x.png", "score": 4.5}, r"row 2, field 'mesh': 'x.png' is not a mesh file"),
        ({"prompt": "a cube", "mesh": "x.obj", "score": 4.5, "label": 0}, r"row 2, field 'label': .*contradicts"),
        ({"prompt": "a cube", "mesh": "x.obj", "score": 3.8, "label": 1}, r"row 2, field 'label': .*between"),
        ({"prompt": "a cube", "mesh": "x.obj", "score": 4.5, "label": "yes"}, r"row 2, field 'label': expected"),
        ({"prompt": "a cube", "mesh": "x.obj", "score": 4.5, "split": "test"}, r"row 2, field 'split'"),
    ],
)
def test_bad_rows_name_the_file_row_and_field(tmp_path, row, match):
    _write_set(tmp_path, [{"prompt": "a cube", "mesh": "x.obj", "score": 1.0}])
    (tmp_path / "x.png").write_bytes(b"not a mesh")
    (tmp_path / "meshes.jsonl").write_text(
        json.dumps({"prompt": "a cube", "mesh": "x.obj", "score": 1.0}) + "\n" + json.dumps(row) + "\n"
    )
    with pytest.raises(DataError, match=match) as info:
        read_mesh_rows(tmp_path, MeshSetConfig())
    assert str(tmp_path / "meshes.jsonl") in str(info.value)


def test_broken_json_empty_sets_one_class_and_unreadable_meshes(tmp_path):
    root = _write_set(tmp_path / "a", [{"prompt": "a cube", "mesh": "x.obj", "score": 1.0}])
    (root / "meshes.jsonl").write_text('{"prompt": "a cube", "mesh": "x.obj", "score": 1}\n{"prompt": \n')
    with pytest.raises(DataError, match="row 2: not valid JSON"):
        read_mesh_rows(root, MeshSetConfig())
    (root / "meshes.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no meshes"):
        read_mesh_rows(root, MeshSetConfig())
    with pytest.raises(DataError, match="not a mesh set"):
        read_mesh_rows(tmp_path / "nowhere", MeshSetConfig())
    only_good = [r for r in _rows() if r["score"] > 4]
    root = _write_set(tmp_path / "b", only_good)
    with pytest.raises(DataError, match="holds no dispreferred meshes"):
        split_rows(read_mesh_rows(root, MeshSetConfig()), MeshSetConfig(), str(root))
    root = _write_set(tmp_path / "c", [{"prompt": "a cube", "mesh": "bad.ply", "score": 4.5}])
    (root / "bad.ply").write_text("ply\nthis is not a mesh\n")
    rows = read_mesh_rows(root, MeshSetConfig())
    with pytest.raises(DataError, match=r"meshes.jsonl, row 1, field 'mesh': .*bad.ply"):
        sample_rows(rows, 16, seed=0)


def test_class_folders_with_a_prompts_file(tmp_path):
    for folder, names in (("preferred", ["a.obj", "sub/b.obj"]), ("dispreferred", ["c.obj"])):
        for name in names:
            (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
            trimesh.creation.icosphere(subdivisions=1).export(tmp_path / folder / name)
    prompts = {"preferred/a.obj": "a sphere", "preferred/sub/b.obj": "a sphere", "dispreferred/c.obj": "a cube"}
    lines = [json.dumps({"mesh": m, "prompt": p}) for m, p in prompts.items()]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(DataError, match=r"c.obj: no prompt for this mesh"):
        read_mesh_rows(tmp_path, MeshSetConfig())
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    rows = read_mesh_rows(tmp_path, MeshSetConfig())
    assert [(r.mesh.name, r.prompt, r.score, r.preferred) for r in rows] == [
        ("a.obj", "a sphere", 5.0, True),
        ("b.obj", "a sphere", 5.0, True),
        ("c.obj", "a cube", 0.0, False),
    ]
    (tmp_path / "prompts.jsonl").write_text("\n".join([*lines, json.dumps({"mesh": "c.obj", "prompt": "x"})]) + "\n")
    (tmp_path / "c.obj").write_bytes((tmp_path / "dispreferred/c.obj").read_bytes())
    with pytest.raises(DataError, match=r"row 4, field 'mesh': 'c.obj' is not inside preferred or dispreferred"):
        read_mesh_rows(tmp_path, MeshSetConfig())
    (tmp_path / "prompts.jsonl").unlink()
    with pytest.raises(DataError, match="prompts.jsonl: missing"):
        read_mesh_rows(tmp_path, MeshSetConfig())


def test_splits_hold_out_whole_prompts_or_follow_split_fields(tmp_path):
    rows = read_mesh_rows(_write_set(tmp_path / "a", _rows()), MeshSetConfig())
    train, held = split_rows(rows, MeshSetConfig(holdout_fraction=0.25), "set")
    assert len({r.prompt for r in held}) == 1 and not {r.prompt for r in train} & {r.prompt for r in held}
    assert len(train) + len(held) == len(rows)
    again = split_rows(rows, MeshSetConfig(holdout_fraction=0.25), "set")
    assert [r.mesh for r in again[1]] == [r.mesh for r in held]  # seeded
    marked = [{**r, "split": "heldout" if r["prompt"] == "a torus" else "train"} for r in _rows()]
    train, held = split_rows(read_mesh_rows(_write_set(tmp_path / "b", marked), MeshSetConfig()), MeshSetConfig(), "s")
    assert {r.prompt for r in held} == {"a torus"} and len(train) == 12
    marked[3].pop("split")
    rows = read_mesh_rows(_write_set(tmp_path / "c", marked), MeshSetConfig())
    with pytest.raises(DataError, match=r"row 4, field 'split': missing, but other rows have one"):
        split_rows(rows, MeshSetConfig(), "s")


def test_samples_are_drawn_once_and_cached(tmp_path, monkeypatch):
    rows = read_mesh_rows(_write_set(tmp_path / "set", _rows(1)), MeshSetConfig())
    points = sample_rows(rows, 32, seed=0, cache=tmp_path / "cache")
    assert points.shape == (len(rows), 32, 6) and points.dtype == torch.float32
    torch.testing.assert_close(points[..., 3:].norm(dim=-1), torch.ones(len(rows), 32))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr(mesh_data, "mesh_points", no_sampling)
    assert torch.equal(sample_rows(rows, 32, seed=0, cache=tmp_path / "cache"), points)
    with pytest.raises(AssertionError, match="sampled again"):
        sample_rows(rows, 32, seed=1, cache=tmp_path / "cache")  # another seed is another key
    with pytest.raises(AssertionError, match="sampled again"):
        sample_rows(rows, 32, seed=0, cache=tmp_path / "cache", parts=True)  # so are part labels
    monkeypatch.undo()
    labelled = sample_rows(rows, 32, seed=0, cache=tmp_path / "cache", parts=True)
    assert labelled.shape == (len(rows), 32, 7) and torch.equal(labelled[..., :6], points)
    assert torch.equal(sample_rows(rows, 32, seed=0, cache=tmp_path / "cache", parts=True), labelled)


def test_rows_appended_to_a_set_resample_only_the_last_cached_block(tmp_path, monkeypatch):
    rows = read_mesh_rows(_write_set(tmp_path / "set", _rows(2)), MeshSetConfig())  # 16 rows
    monkeypatch.setattr(mesh_data, "CACHE_BLOCK", 4)
    first = sample_rows(rows[:10], 16, seed=0, cache=tmp_path / "cache")  # blocks of 4, 4, 2
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    sampled = []
    real_sampler = mesh_data.mesh_points
    sampler = lambda mesh, *a, **k: sampled.append(mesh) or real_sampler(mesh, *a, **k)  # noqa: E731
    monkeypatch.setattr(mesh_data, "mesh_points", sampler)
    grown = sample_rows(rows[:11], 16, seed=0, cache=tmp_path / "cache")
    assert sampled == [r.mesh for r in rows[8:11]]  # only the last block, now 3 rows
    assert torch.equal(grown[:10], first)
    assert torch.equal(grown, sample_rows(rows[:11], 16, seed=0))  # as without a cache


def test_stratified_batches_hold_both_classes():
    preferred = torch.tensor([True] * 20 + [False] * 13)
    dataset = StratifiedDraws(preferred, seed=0)
    assert len(dataset) == 20
    for epoch in range(2):
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=EpochSampler(20, 0, epoch), drop_last=True)
        batches = list(loader)
        assert len(batches) == 2
        for batch in batches:
            assert len(batch["preferred"]) == len(batch["dispreferred"]) == 8
            assert preferred[batch["preferred"]].all() and not preferred[batch["dispreferred"]].any()
    dataset.set_epoch(0)
    first = [dataset[i] for i in range(20)]
    assert sorted(item["preferred"] for item in first) == list(range(20))  # every preferred mesh once per epoch
    assert set(item["dispreferred"] for item in first) == set(range(20, 33))  # the smaller class repeated
    dataset.set_epoch(1)
    assert [dataset[i] for i in range(20)] != first  # each epoch re-draws the combinations
    with pytest.raises(DataError, match="both preferred and dispreferred"):
        StratifiedDraws(torch.ones(4, dtype=torch.bool), seed=0)


def test_same_prompt_pairs():
    prompts = ["a", "a", "a", "b", "b", "c"]
    preferred = torch.tensor([True, False, False, True, False, True])
    every = same_prompt_pairs(prompts, preferred, every=True)
    assert sorted(map(tuple, every.tolist())) == [(0, 1), (0, 2), (3, 4)]
    cycled = same_prompt_pairs(prompts, preferred, every=False, seed=3)
    assert sorted(map(tuple, cycled.tolist())) == [(0, 1), (0, 2), (3, 4)]  # the shorter list repeated, no repeats
    prompts, preferred = ["a"] * 7, torch.tensor([True] * 3 + [False] * 4)
    cycled = same_prompt_pairs(prompts, preferred, every=False, seed=0)
    assert len(cycled) == 4 and set(cycled[:, 1].tolist()) == {3, 4, 5, 6} and set(cycled[:, 0].tolist()) == {0, 1, 2}
    dataset = PairDraws(cycled)
    assert dataset[0] == {"preferred": int(cycled[0, 0]), "dispreferred": int(cycled[0, 1])}
    with pytest.raises(DataError, match="no same-prompt"):
        PairDraws(same_prompt_pairs(["a", "b"], torch.tensor([True, False]), every=False))


def test_embedded_set_scores_by_the_gold_judge_and_splits_by_heldout_prompts(tmp_path):
    config = EmbeddedMeshesConfig(
        good_per_prompt=1, bad_per_prompt=2, bad_kinds=["noisy", "wrong"], seed=5, min_strength=1.0
    )  # full-strength corruptions only: all clearly dispreferred
    directory = embedded_meshes_directory(config, tmp_path)
    assert directory == embedded_meshes_directory(EmbeddedMeshesConfig(**vars(config)), tmp_path)
    assert directory != embedded_meshes_directory(EmbeddedMeshesConfig(seed=6), tmp_path)
    build_embedded_meshes(config, directory)
    rows = [json.loads(line) for line in (directory / "meshes.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * len(world.PROMPTS)
    assert [r["kind"] for r in rows[:3]] == ["good", "noisy", "wrong"]
    assert {r["prompt"] for r in rows if r["split"] == "heldout"} == set(world.prompts("heldout"))
    for row in rows[:6]:
        mesh = trimesh.load(directory / row["mesh"], process=False)
        assert row["score"] == pytest.approx(5 * world.gold_score(mesh, row["prompt"]), abs=1e-3)
    good = np.array([r["score"] for r in rows if r["kind"] == "good"])
    bad = np.array([r["score"] for r in rows if r["kind"] != "good"])
    assert (good >= 4.0).mean() > 0.9 and (bad <= 3.5).mean() > 0.9
    data = DataConfig(path="embedded:meshes", cache_dir=str(tmp_path))
    train, held = load_mesh_sets(data, MeshSetConfig(embedded=config), points=16, seed=0)
    assert {r.prompt for r in held.rows} <= set(world.prompts("heldout")) and len(train) + len(held) <= len(rows)
    assert held.points.shape == (len(held), 16, 6) and held.preferred.any() and not held.preferred.all()
    drawn, held_again = load_mesh_sets(data, MeshSetConfig(embedded=config), points=16, seed=0, train_draws=2)
    assert drawn.points.shape == (2, len(train), 16, 6) and torch.equal(drawn.points[0], train.points[0])
    assert not torch.equal(drawn.points[1], drawn.points[0]) and torch.equal(held_again.points, held.points)
    with pytest.raises(KeyError, match="embedded mesh set"):
        load_mesh_sets(DataConfig(path="embedded:shapes", cache_dir=str(tmp_path)), MeshSetConfig(), 16, 0)
    with pytest.raises(ConfigError, match="bad_kinds"):
        build_embedded_meshes(EmbeddedMeshesConfig(bad_kinds=["melted"]), tmp_path / "x")
    with pytest.raises(ConfigError, match="min_strength"):
        build_embedded_meshes(EmbeddedMeshesConfig(min_strength=0.0), tmp_path / "x")
    with pytest.raises(ConfigError, match="prompts must be one of core, grammar"):
        build_embedded_meshes(EmbeddedMeshesConfig(prompts="all"), tmp_path / "x")


def test_floating_meshes_come_only_for_on_prompts_and_fail_the_relation(tmp_path):
    config = EmbeddedMeshesConfig(good_per_prompt=1, bad_per_prompt=1, bad_kinds=["noisy"], floating_per_prompt=2)
    rows = [json.loads(line) for line in (build_embedded_meshes(config, tmp_path / "set") / "meshes.jsonl").open()]
    on = [p for p in world.PROMPTS if world.parse_prompt(p).relation == "on"]
    floating = [r for r in rows if r["kind"] == "floating"]
    assert len(rows) == 2 * len(world.PROMPTS) + 2 * len(on) and sorted(r["prompt"] for r in floating) == sorted(on * 2)
    for row in floating:
        checks = world.gold_checks(trimesh.load(tmp_path / "set" / row["mesh"], process=False), row["prompt"])
        assert checks["relation"] == 0.0 and checks["count"] == 1.0 and checks["geometry"] > 0.9  # clean, apart
        assert row["score"] == 0.0
    plain = EmbeddedMeshesConfig(good_per_prompt=1, bad_per_prompt=1, bad_kinds=["noisy"])
    plain_rows = [json.loads(line) for line in (build_embedded_meshes(plain, tmp_path / "p") / "meshes.jsonl").open()]
    assert [r["kind"] for r in plain_rows] == ["good", "noisy"] * len(world.PROMPTS)  # 0: no floating meshes
    with pytest.raises(ValueError, match="'on' prompt"):
        world.floating_mesh("a sphere next to a torus", np.random.default_rng(0))
    with pytest.raises(ConfigError, match="floating_per_prompt"):
        build_embedded_meshes(EmbeddedMeshesConfig(floating_per_prompt=-1), tmp_path / "x")


def test_displaced_meshes_come_for_two_part_prompts_and_are_scored_like_any_mesh(tmp_path):
    config = EmbeddedMeshesConfig(good_per_prompt=1, bad_per_prompt=1, bad_kinds=["noisy"], displaced_per_prompt=3)
    rows = [json.loads(line) for line in (build_embedded_meshes(config, tmp_path / "set") / "meshes.jsonl").open()]
    pairs = [p for p in world.PROMPTS if len(world.parse_prompt(p).parts) == 2]
    displaced = [r for r in rows if r["kind"] == "displaced"]
    assert sorted(r["prompt"] for r in displaced) == sorted(pairs * 3)
    for row in displaced:
        mesh = trimesh.load(tmp_path / "set" / row["mesh"], process=False)
        assert row["score"] == round(5.0 * world.gold_score(mesh, row["prompt"]), 4)
    assert {r["score"] > 4.0 for r in displaced} == {True, False}  # resting within the tolerance, or not
    with pytest.raises(ConfigError, match="displaced_per_prompt"):
        build_embedded_meshes(EmbeddedMeshesConfig(displaced_per_prompt=-1), tmp_path / "x")


def test_embedded_set_holds_mild_corruptions_between_clean_and_broken(tmp_path):
    config = EmbeddedMeshesConfig(good_per_prompt=1, bad_per_prompt=4, bad_kinds=["noisy"], min_strength=0.25)
    rows = [json.loads(line) for line in (build_embedded_meshes(config, tmp_path / "set") / "meshes.jsonl").open()]
    noisy = np.array([r["score"] for r in rows if r["kind"] == "noisy"])
    assert (noisy <= 3.5).mean() > 0.5 and ((noisy > 0.5) & (noisy < 4.9)).sum() >= 5, np.sort(noisy)


_RESOLVE = """
import sys, time
from pathlib import Path
from mmalign.config import DataConfig
from mmalign.mesh.data import MeshSetConfig, resolve_mesh_source
from mmalign.mesh.embedded import EmbeddedMeshesConfig
cache = Path(sys.argv[1])
(cache / f"ready-{sys.argv[2]}").touch()
while len(list(cache.glob("ready-*"))) < 2:  # both processes imported: start together
    time.sleep(0.01)
embedded = EmbeddedMeshesConfig(prompts="core", good_per_prompt=1, bad_per_prompt=2, bad_kinds=["noisy"])
print(resolve_mesh_source(DataConfig(path="embedded:meshes", cache_dir=str(cache)), MeshSetConfig(embedded=embedded)))
"""


def test_concurrent_runs_build_the_embedded_set_once(tmp_path):
    """Two processes asking for the same uncached set at once: one builds it, the other waits and reads it."""
    processes = [subprocess.Popen([sys.executable, "-c", _RESOLVE, str(tmp_path), str(i)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]
    folders = {out.strip() for out, _ in outputs}
    assert len(folders) == 1 and sum("building embedded:meshes" in err for _, err in outputs) == 1
    folder = Path(folders.pop())
    rows = [json.loads(line) for line in (folder / "meshes.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * len(world.PROMPTS) and all((folder / r["mesh"]).is_file() for r in rows)
