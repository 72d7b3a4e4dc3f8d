"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

A recipe is a YAML file whose sections map onto the dataclasses below; the method's own
section is named after the method (`diffusion_dpo:` for `method: diffusion-dpo`) and parsed
into that method's config dataclass. Every option is documented in its field's `help`, which
`mmalign train --help` prints. Unknown keys are errors that name the key and suggest the
closest known one; values are converted to the field's type (`mmalign.config_values`).

Overrides: `train.learning_rate=3e-4` sets one key; `model=runwayml/stable-diffusion-v1-5`
(a section name with a scalar) sets that section's `path`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmalign.config_values import ConfigError, from_dict, parse_yaml, unknown_key
from mmalign.registry import EMBEDDED_PREFIX


def option(text: str, default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A dataclass field documented by `text` (what `mmalign train --help` prints)."""
    return field(default=default, metadata={"help": text}, **kwargs)


DTYPES = ("float32", "float16", "bfloat16")
ALLOW_PICKLE_HELP = (
    "also read pickled (.bin) weights of the models this run loads, with torch.load(weights_only=True); "
    "off: safetensors only"
)


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a `ConfigError` naming `key` unless `value` is one of `choices`."""
    if value not in choices:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}, got {value!r}")


def check_range(
    key: str, value: float | None, low: float, high: float | None = None, *, open_low: bool = False
) -> None:
    """Raise a `ConfigError` naming `key` unless `low ≤ value` (`<` with `open_low`) and `value < high`;
    None passes (an option's "off")."""
    if value is None:
        return
    below = value <= low if open_low else value < low
    if below or (high is not None and value >= high):
        bound = f"> {low:g}" if open_low else f"≥ {low:g}"
        raise ConfigError(f"config key {key!r} must be {bound}{f' and < {high:g}' if high is not None else ''}, "
                          f"got {value!r}")  # fmt: skip


#: `train.optimizer` choices (`mmalign.train.optim.build_optimizer`)
OPTIMIZERS = ("adamw", "adamw8bit")
#: `train.lr_scheduler` choices: the schedules `diffusers.optimization.get_scheduler` builds from a step count
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class ModelConfig:
    """The `model` section of diffusion methods: the pipeline, its adapter and how it is loaded."""

    path: str = option("Hub id, local diffusers folder, or embedded:<name>", default="embedded:shapes-t2i")
    lora_rank: int | None = option("LoRA rank on the denoiser's attention; null = full fine-tuning", default=8)
    lora_alpha: int | None = option("LoRA alpha (scale = alpha / rank); null = rank", default=None)
    lora_targets: list[str] | None = option(
        "module names to adapt; null = the family's attention projections", default=None
    )
    dtype: str = option(
        "dtype of the frozen weights (text encoders, reference, the base under LoRA): float32, float16 or "
        "bfloat16; trainable weights stay float32 and the denoiser runs under torch.autocast in this dtype "
        "(the autoencoder stays float32)",
        default="float32",
    )
    variant: str | None = option("weights variant to load, e.g. fp16", default=None)
    revision: str | None = option("Hub revision (branch, tag or commit)", default=None)
    gradient_checkpointing: bool = option(
        "recompute the denoiser's activations in backward instead of keeping them (less memory, about a third "
        "more compute per step; gradients unchanged)",
        default=False,
    )
    offload_frozen: bool = option(
        "keep the text encoders and the autoencoder on the CPU, moving each onto the training device only "
        "while it encodes prompts, encodes images or decodes latents (less accelerator memory, a host-device "
        "copy per use)",
        default=False,
    )
    flow_sampling: str = option("σ law for flow-matching models: logit_normal or uniform", default="logit_normal")
    embedded_guidance: float | None = option(
        "guidance value a guidance-distilled transformer (FLUX.1-dev) reads in training predictions; sampling "
        "reads the guidance_scale options; null = 3.5; only for models with a guidance input",
        default=None,
    )
    save_pipeline: bool = option("with LoRA, also save the whole pipeline (LoRA merged) at the end", default=False)
    allow_pickle: bool = option(ALLOW_PICKLE_HELP, default=False)

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, DTYPES)
        check_choice("model.flow_sampling", self.flow_sampling, ("logit_normal", "uniform"))
        check_range("model.lora_rank", self.lora_rank, 1)
        check_range("model.lora_alpha", self.lora_alpha, 1)
        check_range("model.embedded_guidance", self.embedded_guidance, 0)


@dataclass
class VLMModelConfig:
    """The `model` section of VLM methods: the vision-language model and its adapter."""

    path: str = option("Hub id, local transformers folder, or embedded:<name>", default="embedded:vlm-shapes")
    lora_rank: int | None = option(
        "LoRA rank on the language model's projections; null = full fine-tuning", default=None
    )
    lora_alpha: int | None = option("LoRA alpha (scale = alpha / rank); null = rank", default=None)
    lora_targets: list[str] | None = option(
        "module names to adapt; null = the attention and MLP projections", default=None
    )
    dtype: str = option(
        "dtype of the frozen weights (the base under LoRA, the reference copy): float32, float16 or bfloat16; "
        "trainable weights stay float32 and the model runs under torch.autocast in this dtype",
        default="float32",
    )
    revision: str | None = option("Hub revision (branch, tag or commit)", default=None)
    gradient_checkpointing: bool = option(
        "recompute the decoder layers' activations in backward instead of keeping them (less memory, more "
        "compute; gradients unchanged)",
        default=False,
    )
    allow_pickle: bool = option(ALLOW_PICKLE_HELP, default=False)

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, DTYPES)
        check_range("model.lora_rank", self.lora_rank, 1)
        check_range("model.lora_alpha", self.lora_alpha, 1)


@dataclass
class EmbeddedPrefsConfig:
    """How `data.path: embedded:shapes-prefs` is generated (pairs labelled by the proxy reward)."""

    prompts: int = option("number of training captions (train split of the shapes world)", default=512)
    candidates: int = option("samples per caption; the proxy's best and worst form a pair", default=4)
    min_margin: float = option("drop pairs whose proxy scores differ by less than this", default=1.0)
    reward: str = option("proxy reward that labels the pairs (never the gold metric)", default="clip-score")
    num_steps: int = option("sampling steps for the candidates", default=20)
    guidance_scale: float = option("classifier-free guidance for the candidates", default=3.0)
    seed: int = option("seed for captions and sampling noise", default=0)


@dataclass
class DataSource:
    """A `data` section that only names where the data is (methods that read nothing else about it)."""

    path: str = option("a dataset folder or file, or embedded:<name> (`mmalign methods` lists them)", default="")

    def changed(self, *names: str) -> list[str]:
        """The fields among `names` whose values differ from their defaults."""
        defaults = {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            for f in dataclasses.fields(self)
        }
        return [name for name in names if getattr(self, name) != defaults[name]]

    def refuse_unless(self, applies: bool, names: tuple[str, ...], applies_to: str) -> None:
        """A `ConfigError` naming the first of `names` that was set, unless `applies` (the keys apply to
        `applies_to` only, and this data is `self.path`)."""
        if not applies and (set_keys := self.changed(*names)):
            raise ConfigError(f"config key 'data.{set_keys[0]}' applies to {applies_to}, not {self.path}")


@dataclass
class CachedDataSource(DataSource):
    """A `data` section whose embedded sets are generated once and cached."""

    cache_dir: str | None = option(
        "where generated embedded data and data caches are kept; null = $MMALIGN_CACHE or ~/.cache/mmalign",
        default=None,
    )


@dataclass
class DataConfig(CachedDataSource):
    """The `data` section of diffusion pair methods: preference pairs and their preprocessing."""

    path: str = option(
        "datasets name or folder (Pick-a-Pic columns jpg_0/jpg_1/label_0/caption), a folder with pairs.jsonl "
        "(image_0/image_1/label/prompt), or embedded:shapes-prefs",
        default="embedded:shapes-prefs",
    )
    split: str = option("dataset split to train on", default="train")
    drop_ties: bool = option("drop tied pairs (label 0.5) instead of failing on them", default=True)
    resolution: int | None = option("training resolution in pixels; null = the model's default", default=None)
    random_crop: bool = option("random instead of centre crop after resizing", default=False)
    random_flip: bool = option("horizontal flip with probability 1/2, per image", default=False)
    max_pairs: int | None = option("use at most this many pairs (after dropping ties)", default=None)
    cache_latents: bool = option(
        "encode every image's autoencoder posterior (mean and variance: each step still draws its own sample) and "
        "every prompt's embeddings once, store them under <cache_dir>/latents/<key> and train on them; the key "
        "covers the data, the autoencoder, text encoders and tokenizers, resolution, flips and dtype. With "
        "random_flip both flips are cached; random_crop cannot be cached",
        default=False,
    )
    embedded: EmbeddedPrefsConfig = option(
        "generation of the embedded preference set", default_factory=EmbeddedPrefsConfig
    )

    def __post_init__(self) -> None:
        self.refuse_unless(self.path.startswith(EMBEDDED_PREFIX), ("embedded",), "embedded:shapes-prefs only")
        check_range("data.resolution", self.resolution, 8)
        check_range("data.max_pairs", self.max_pairs, 1)
        if self.cache_latents and self.random_crop:
            raise ConfigError(
                "config key 'data.cache_latents' cannot be combined with data.random_crop: every epoch draws new "
                "crops, which encoded images cannot hold; turn one off (random_flip can be cached)"
            )


@dataclass
class TrainConfig:
    max_steps: int = option("optimizer steps", default=300)
    batch_size: int = option("global batch per optimizer micro-step (pairs for DPO), split over processes", default=8)
    gradient_accumulation_steps: int = option("micro-steps per optimizer step", default=1)
    learning_rate: float = option("peak learning rate", default=1e-4)
    optimizer: str = option(
        "adamw (torch.optim.AdamW, float32 state) or adamw8bit (bitsandbytes' AdamW8bit: moments stored in 8 bits "
        "with block-wise scales, a quarter of AdamW's state memory; tensors under 4096 elements keep float32 "
        "state; needs `pip install bitsandbytes`)",
        default="adamw",
    )
    lr_scheduler: str = option(f"learning-rate schedule: {', '.join(LR_SCHEDULERS)}", default="constant_with_warmup")
    warmup_steps: int = option("learning-rate warm-up steps", default=0)
    weight_decay: float = option("AdamW weight decay", default=1e-2)
    adam_beta1: float = option("AdamW β1", default=0.9)
    adam_beta2: float = option("AdamW β2", default=0.999)
    adam_epsilon: float = option("AdamW ε", default=1e-8)
    max_grad_norm: float | None = option("clip the gradient norm to this; null = no clipping", default=1.0)
    mixed_precision: str = option("no, fp16 or bf16 (accelerate autocast)", default="no")
    log_every: int = option("log training metrics every N steps", default=10)
    checkpoint_every: int = option("write a resumable checkpoint every N steps (0 = never)", default=100)
    keep_checkpoints: int = option("keep the newest N checkpoints", default=2)
    resume: bool = option("continue from the newest checkpoint in output_dir when there is one", default=True)
    threads: int | None = option("torch CPU threads; null = torch's default", default=None)

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every", "keep_checkpoints"):
            check_range(f"train.{key}", getattr(self, key), 1)
        for key in ("warmup_steps", "weight_decay", "checkpoint_every"):
            check_range(f"train.{key}", getattr(self, key), 0)
        for key in ("learning_rate", "adam_epsilon", "max_grad_norm"):
            check_range(f"train.{key}", getattr(self, key), 0, open_low=True)
        check_range("train.adam_beta1", self.adam_beta1, 0, 1)
        check_range("train.adam_beta2", self.adam_beta2, 0, 1)
        check_range("train.threads", self.threads, 1)
        check_choice("train.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("train.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))


@dataclass
class MonitorConfig:
    """The `eval.monitor` section: the reward-hacking monitor every Trainer run has
    (`mmalign.train.monitor`). It fires when, for `patience` evaluations in a row, the training reward
    measured on held-out prompts is higher and the held-out monitor metric lower (each by more than
    `min_delta`) than at the baseline evaluation: the best by the metric so far, or the one before."""

    action: str = option(
        "what the reward-hacking monitor does: off; warn: print each firing, log monitor/hacking and list it in "
        "the report; stop: also end training at the first firing and save the weights of the evaluation with "
        "the best monitor metric as final/. warn and stop keep those best weights in best/",
        default="off",
    )
    reward: str = option(
        "the evaluation metric holding the training reward measured on held-out prompts", default="reward"
    )
    metric: str | None = option(
        "the held-out metric to watch (higher is better); null = the method's gold metric", default=None
    )
    baseline: str = option(
        "what each evaluation is compared with: best = the evaluation with the best metric so far (catches a "
        "slide below the peak that wobbles); previous = the evaluation just before (only uninterrupted falls)",
        default="best",
    )
    patience: int = option("consecutive evaluations with reward up and metric down before it fires", default=2)
    min_delta: float = option("a rise or fall counts when larger than this", default=0.0)

    def __post_init__(self) -> None:
        check_choice("eval.monitor.action", self.action, ("off", "warn", "stop"))
        check_choice("eval.monitor.baseline", self.baseline, ("best", "previous"))
        check_range("eval.monitor.patience", self.patience, 1)
        check_range("eval.monitor.min_delta", self.min_delta, 0)
        if not self.reward:
            raise ConfigError("config key 'eval.monitor.reward' must name an evaluation metric, got ''")
        if self.metric is not None and not self.metric:
            raise ConfigError("config key 'eval.monitor.metric' must name an evaluation metric or be null, got ''")
        if self.metric == self.reward:
            raise ConfigError(
                f"config key 'eval.monitor.metric' must differ from eval.monitor.reward, both are {self.reward!r}"
            )


@dataclass
class EvalSchedule:
    """The `eval` section of methods whose evaluation options live in their own section: when to evaluate,
    and the reward-hacking monitor."""

    every: int = option("evaluate every N steps (0 = only before and after)", default=100)
    monitor: MonitorConfig = option("the reward-hacking monitor", default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        check_range("eval.every", self.every, 0)
        if not isinstance(self.monitor, MonitorConfig):
            raise ConfigError(f"config key 'eval.monitor' is a section; expected a mapping, got {self.monitor!r}")


@dataclass
class EvalConfig(EvalSchedule):
    """The `eval` section of diffusion methods: prompts, sampling and the rewards that score the samples."""

    prompts: str = option(
        "heldout / train (shapes-world splits) or a text file with one prompt per line", default="heldout"
    )
    num_prompts: int | None = option("use the first N prompts; null = all", default=None)
    samples_per_prompt: int = option("images per prompt (different noise)", default=1)
    gold: str | None = option("the reward reported as gold_metric (never trained on)", default="shapes-gold")
    rewards: list[str] = option("other rewards to report (proxy metrics)", default_factory=lambda: ["clip-score"])
    reward_args: dict[str, dict[str, Any]] = option(
        "keyword arguments per reward, e.g. {clip-score: {path: openai/clip-vit-large-patch14}}", default_factory=dict
    )
    num_steps: int = option("sampling steps", default=20)
    guidance_scale: float = option("classifier-free guidance", default=3.0)
    guidance_scale_2: float | None = option(
        "two-expert models (Wan 2.2 A14B): guidance of the steps on the low-noise expert (transformer_2), as "
        "WanPipeline's guidance_scale_2; null = guidance_scale; an error on a model with one denoiser",
        default=None,
    )
    seed: int = option("seed of the evaluation noise (the same before and after)", default=1234)
    batch_size: int = option("prompts sampled at once", default=64)
    grid_size: int = option("images in each sample grid", default=16)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("num_prompts", "samples_per_prompt", "num_steps", "batch_size", "grid_size"):
            check_range(f"eval.{key}", getattr(self, key), 1)


@dataclass
class RunConfig:
    method: str = option("training method; `mmalign methods` lists them", default="diffusion-dpo")
    recipe: str = option("name shown in reports", default="")
    seed: int = option("global seed (data order, noise, timesteps)", default=0)
    output_dir: str = option("run directory: config, logs, checkpoints, samples, report", default="runs/run")
    # `model`, `data` and `eval` hold the dataclasses the method declares (`Method.model_config_class`, …);
    # a method without a model section has `model=None`.
    model: Any = field(default_factory=ModelConfig)
    data: Any = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: Any = field(default_factory=EvalConfig)
    method_args: Any = None  # the method's own config dataclass, parsed from its section

    @property
    def method_section(self) -> str:
        return self.method.replace("-", "_")

    def to_dict(self) -> dict[str, Any]:
        """Every section the run has (a method without a model section has none), then the method's own."""
        out: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method_args"
        }
        out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items() if v is not None}
        if self.method_args is not None:
            out[self.method_section] = dataclasses.asdict(self.method_args)
        return out


#: the sections every run has; `model`, `data` and `eval` take the dataclass the method declares
SHARED_SECTIONS = ("model", "data", "train", "eval")


def section_classes(method_class: type) -> dict[str, type | None]:
    """`{section: dataclass or None}` of a method class (None: the method reads no such section)."""
    return {
        "model": method_class.model_config_class,
        "data": method_class.data_config_class,
        "train": TrainConfig,
        "eval": method_class.eval_config_class,
    }


# ---------------------------------------------------------------------------- parsing
def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, sections: set[str]) -> None:
    keys = dotted.split(".")
    if len(keys) == 1 and keys[0] in sections and not isinstance(value, dict):
        keys = [keys[0], "path"]
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`"a.b=value"` → `("a.b", value)` with the value parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = parse_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _read_tree(path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The recipe YAML (or nothing) with the overrides applied, as a nested mapping (a recipe's
    `data.embedded` dropped where the overrides point `data` elsewhere)."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = parse_yaml(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        tree = loaded or {}
    sections = {"model", "data"}  # sections with a `path`: `model=ID` means `model.path=ID`
    overridden = []
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value, sections)
        overridden.append(key)
    _drop_recipe_embedded_data(tree, overridden)
    return tree


def method_of(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The method a recipe and its overrides select."""
    return str(_read_tree(path, overrides).get("method", RunConfig.method))


def _drop_recipe_embedded_data(tree: dict[str, Any], overridden: list[str]) -> None:
    """A recipe's `data.embedded` describes its embedded set: an override that points `data` at other
    data drops it (unless the overrides set `data.embedded` themselves, which is then checked)."""
    data = tree.get("data")
    if not isinstance(data, dict) or "embedded" not in data:
        return
    points_elsewhere = any(key in ("data", "data.path") for key in overridden)
    sets_embedded = any(key == "data.embedded" or key.startswith("data.embedded.") for key in overridden)
    if points_elsewhere and not sets_embedded and not str(data.get("path", "")).startswith(EMBEDDED_PREFIX):
        del data["embedded"]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a recipe YAML (or start from defaults), apply overrides, and validate.

    Each section is parsed with the dataclass the method declares for it, so a key the method does
    not read is an error that names it.
    """
    tree = _read_tree(path, overrides)
    method = str(tree.get("method", RunConfig.method))
    from mmalign.registry import METHODS, load

    method_class = load(METHODS, "method", method)
    reader = f"method {method}"
    section = method.replace("-", "_")
    method_tree = tree.pop(section, {}) or {}
    classes = section_classes(method_class)
    scalars = [f.name for f in dataclasses.fields(RunConfig) if f.name not in (*SHARED_SECTIONS, "method_args")]
    other_sections = {name.replace("-", "_"): name for name in METHODS}
    for key in tree:
        if key in other_sections:
            raise ConfigError(
                f"config section {key!r} configures method {other_sections[key]}, but this run's "
                f"method is {method}; remove the section or set method={other_sections[key]}"
            )
        if key not in scalars and key not in SHARED_SECTIONS:
            raise unknown_key(key, scalars + [name for name, cls in classes.items() if cls] + [section])
    config = from_dict(RunConfig, {k: v for k, v in tree.items() if k in scalars})
    for name, cls in classes.items():
        values = tree.get(name)
        if cls is None:
            if values:
                first = next(iter(values)) if isinstance(values, dict) else "path"
                raise ConfigError(f"config key '{name}.{first}' is not read by {reader}: it has no {name} section")
            setattr(config, name, None)
            continue
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"config key {name!r} is a section; expected a mapping, got {values!r}")
        setattr(config, name, from_dict(cls, values or {}, prefix=f"{name}.", reader=reader))
    config.method_args = from_dict(method_class.config_class, method_tree, prefix=f"{section}.", reader=reader)
    return config


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
