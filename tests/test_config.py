"""Recipe configs: YAML + dotted overrides, type conversion, typos with suggestions, help text."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mmalign.config import ConfigError, dump_config, load_config, section_classes
from mmalign.config_help import help_text
from mmalign.registry import METHODS, load

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: every training recipe (configs/accelerate holds `accelerate launch --config_file` configs, not recipes)
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS / "accelerate")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses(recipe):
    config = load_config(recipe)
    assert config.recipe and config.method_args is not None
    again = load_config(None, [f"{k}={v}" for k, v in _flatten(config.to_dict()).items()])
    assert dump_config(again) == dump_config(config)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = "null" if value is None else value
    return out


def test_overrides_convert_types_and_section_shorthand():
    config = load_config(
        RECIPES[0],
        [
            "train.learning_rate=3e-4",
            "model=org/model",
            "data=/data/pairs",
            "train.max_grad_norm=null",
            "eval.rewards=[clip-score, shapes-gold]",
            "diffusion_dpo.beta=5000",
        ],
    )
    assert config.train.learning_rate == 3e-4
    assert config.model.path == "org/model" and config.data.path == "/data/pairs"
    assert config.train.max_grad_norm is None
    assert config.eval.rewards == ["clip-score", "shapes-gold"]
    assert config.method_args.beta == 5000.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.learnig_rate=1",
            "'train.learnig_rate' is not read by method diffusion-dpo; did you mean 'train.learning_rate'?",
        ),
        ("trian.max_steps=1", "unknown config key 'trian'; did you mean 'train'?"),
        ("diffusion_dpo.bta=1", "did you mean 'diffusion_dpo.beta'?"),
        ("train.max_steps=abc", "config key 'train.max_steps' expects int, got 'abc'"),
        ("train.max_steps=1.5", "expects int"),
        ("train.resume=maybe", "expects bool"),
        ("train=3", "is a section"),
        ("train.max_steps=0", "'train.max_steps' must be ≥ 1, got 0"),
        ("train.batch_size=0", "'train.batch_size' must be ≥ 1"),
        ("train.gradient_accumulation_steps=0", "'train.gradient_accumulation_steps' must be ≥ 1"),
        ("train.learning_rate=-1e-4", "'train.learning_rate' must be > 0"),
        ("train.weight_decay=-1", "'train.weight_decay' must be ≥ 0"),
        ("train.adam_beta2=1.0", "'train.adam_beta2' must be ≥ 0 and < 1"),
        ("train.max_grad_norm=0", "'train.max_grad_norm' must be > 0"),
        ("train.lr_scheduler=warmup_cosine", "'train.lr_scheduler' must be one of constant"),
        ("train.mixed_precision=fp8", "'train.mixed_precision' must be one of no, fp16, bf16"),
        ("eval.num_steps=0", "'eval.num_steps' must be ≥ 1"),
        ("eval.every=-1", "'eval.every' must be ≥ 0"),
        ("model.dtype=float64", "'model.dtype' must be one of float32, float16, bfloat16"),
        ("no_equals_sign", "must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_config(RECIPES[0], [override])


def test_unknown_method_suggests_the_closest():
    with pytest.raises(KeyError, match="did you mean 'diffusion-dpo'"):
        load_config(None, ["method=difusion-dpo"])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_help_documents_every_key_of_the_method_and_no_other():
    text = help_text("diffusion-dpo")
    for key in (
        "train.learning_rate",
        "model.lora_rank",
        "data.embedded.candidates",
        "eval.gold",
        "diffusion_dpo.beta",
    ):
        assert key in text
    assert "diffusion_sft.both_images" in help_text("diffusion-sft") and "diffusion_sft" not in text
    grpo = help_text("grpo")
    assert "data.columns.problem" in grpo and "grpo.rewards" in grpo and "eval.gold" not in grpo
    assert "model.flow_sampling" not in grpo and "data.random_crop" not in grpo
    assert "has no model section" in help_text("reward-cs")
    shared = help_text()
    assert "train.learning_rate" in shared and "model.path" not in shared


def _keys(cls: type, prefix: str) -> set[str]:
    out = set()
    for f in dataclasses.fields(cls):
        out.add(prefix + f.name)
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            out |= _keys(f.type, f"{prefix}{f.name}.")
    return out


def _section_keys(method: str) -> set[str]:
    classes = section_classes(load(METHODS, "method", method))
    return {key for name, cls in classes.items() if cls is not None for key in _keys(cls, f"{name}.")}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_refuses_the_keys_its_method_does_not_read(recipe):
    """Any model/data/eval key that some method reads but this recipe's method does not is an error naming it."""
    method = load_config(recipe).method
    own = _section_keys(method)
    foreign = set().union(*(_section_keys(m) for m in METHODS)) - own
    assert foreign
    for key in sorted(foreign):
        if any(key.startswith(k + ".") for k in foreign):  # a nested section's parent is refused already
            continue
        with pytest.raises(ConfigError, match=f"'{re.escape(key)}' is not read by method {method}"):
            load_config(recipe, [f"{key}=1"])


def test_a_section_of_another_method_is_named():
    with pytest.raises(ConfigError, match="section 'diffusion_dpo' configures method diffusion-dpo"):
        load_config(RECIPES[0], ["method=diffusion-sft"])


def test_pointing_data_elsewhere_drops_the_recipes_embedded_set_options_but_not_the_users():
    recipe = RECIPES[0]  # image/diffusion_dpo: it sets data.embedded
    assert load_config(recipe, ["data=/my/pairs"]).data.embedded == load_config(None, []).data.embedded
    with pytest.raises(ConfigError, match="'data.embedded' applies to embedded:shapes-prefs only, not /my/pairs"):
        load_config(recipe, ["data=/my/pairs", "data.embedded.prompts=8"])
    listener = next(r for r in RECIPES if r.stem == "listener_grpo")
    assert load_config(listener, ["data=/my/questions.jsonl"]).data.path == "/my/questions.jsonl"
