"""`VisionLanguageModel`: one wrapper over transformers' image-text-to-text models and their processors.

It is what GRPO, PAPO, listener shaping, VLM reward models and VLM judges share:

- `encode(conversations)`: chat-formatted prompts with one or more images → a left-padded `PromptBatch`;
- `sample(conversations, num_generations)`: groups of completions (each prompt's G copies consecutive);
- `token_logprobs(prompts, completions)`: per-token log-probs and entropies of given completions, under
  the prompts' images or under *replacement* images (PAPO's masked copy: same `input_ids`), from the
  trained model or from the reference;
- `reference()`: the frozen reference (LoRA disabled, or a frozen copy for full fine-tuning);
- LoRA through peft, `save_pretrained` (adapter or merged) and `from_pretrained` of a hub name, a
  checkpoint folder or an adapter folder.

Shapes: `B` prompts (after group repetition), `P` prompt tokens, `T` completion tokens. Completions
are right-padded; `completion_mask (B, T)` is 1 up to and including the end-of-turn token.
Tested families: Qwen2-VL, Qwen2.5-VL (flat `pixel_values` + `image_grid_thw`, `mm_token_type_ids`)
and LLaVA (`pixel_values (B, 3, H, W)`); see `mmalign/models/tiny_vlm.py`.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmalign.data.images import IMAGE_ERRORS, to_rgb
from mmalign.errors import UserInputError
from mmalign.models.state import load_trainable_state, trainable_state
from mmalign.models.weights import reading_weights, use_safetensors

ROLES = ("system", "user", "assistant")
#: LoRA on the language model's projections only (the vision tower's own q/k/v stay frozen); Idefics3
#: (SmolVLM) calls its language model `text_model`.
DEFAULT_LORA_TARGETS = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")  # per-token inputs to extend over completions


class ConversationError(UserInputError):
    """A prompt the model cannot take: no user turn, missing or unreadable image, bad content."""


@dataclass
class Conversation:
    """One prompt: chat `messages` (TRL's conversational format) and the `images` its image items show.

    `messages`: `[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}]`;
    string content is allowed. `images` are PIL images (or paths), in the order of the image items.
    `source` names where the prompt came from (file and row) in error messages.
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    source: str = "conversation"

    def checked(self) -> Conversation:
        """Validate and return a copy with every image opened as RGB; raises `ConversationError`."""
        if not isinstance(self.messages, list) or not self.messages:
            raise ConversationError(f"{self.source}: messages must be a non-empty list of chat turns")
        image_items = 0
        for i, message in enumerate(self.messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
                raise ConversationError(f"{self.source}: turn {i} must be a dict with a role in {ROLES} and content")
            content = message["content"]
            if isinstance(content, list):
                for item in content:
                    kind = item.get("type") if isinstance(item, dict) else None
                    if kind not in ("image", "text"):
                        raise ConversationError(f"{self.source}: turn {i} has a content item of type {kind!r}")
                    image_items += kind == "image"
            elif not isinstance(content, str):
                raise ConversationError(f"{self.source}: turn {i} content must be a string or a list of items")
        if not any(m["role"] == "user" for m in self.messages):
            raise ConversationError(f"{self.source}: the chat has no user turn")
        if image_items != len(self.images):
            raise ConversationError(
                f"{self.source}: the chat has {image_items} image item(s) but {len(self.images)} image(s) were given"
            )
        return Conversation(self.messages, [_open_image(im, self.source) for im in self.images], self.source)


@contextlib.contextmanager
def _remote_code_refused(path: str | Path) -> Iterator[None]:
    """transformers' refusal to run a checkpoint's own code, as a one-line `UserInputError`."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise UserInputError(
            f"{path}: the checkpoint ships its own code, which mmalign does not run by default; "
            "load it in Python with trust_remote_code=True if you trust it"
        ) from None


def _open_image(image: Image.Image | str | Path, source: str) -> Image.Image:
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise ConversationError(f"{source}: image file {image} does not exist")
        try:
            with Image.open(image) as opened:
                image = to_rgb(opened)
        except IMAGE_ERRORS as e:
            raise ConversationError(f"{source}: cannot read image {image}: {e}") from None
    if not isinstance(image, Image.Image):
        raise ConversationError(f"{source}: images must be PIL images or paths, got {type(image).__name__}")
    if min(image.size) < 1:
        raise ConversationError(f"{source}: image has size {image.size}")
    return to_rgb(image)


@dataclass
class PromptBatch:
    """Processor output for `B` prompts: `input_ids`, `attention_mask (B, P)` and the vision inputs."""

    inputs: dict[str, torch.Tensor]
    conversations: list[Conversation]

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.inputs["attention_mask"]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class Rollout:
    """Sampled completions: `completion_ids`, `completion_mask (B, T)` and their decoded `texts`."""

    prompts: PromptBatch
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]


@dataclass
class LoraSpec:
    """LoRA on the language model: rank, alpha (default = rank) and a peft `target_modules` regex or list."""

    rank: int = 16
    alpha: float | None = None
    targets: str | list[str] = DEFAULT_LORA_TARGETS


class VisionLanguageModel:
    """A transformers image-text-to-text model + processor with the operations RL and reward models need."""

    def __init__(self, model: torch.nn.Module, processor: Any, *, reference_model: torch.nn.Module | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # prompts are left-padded so completions start at one column
        self._reference_model = reference_model
        #: the half-precision dtype the model's calls run under `torch.autocast` in (`prepare_training`); None: none
        self.autocast_dtype: torch.dtype | None = None
        self.gradient_checkpointing = False
        eos = self.tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        generation_eos = model.generation_config.eos_token_id
        if generation_eos is not None:
            self.eos_token_ids |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        # placeholders the processor expands into vision features: never sampled, never in a completion
        placeholders = [getattr(processor, name, None) for name in ("image_token", "video_token")]
        self.placeholder_ids = sorted(
            {self.tokenizer.convert_tokens_to_ids(t) for t in placeholders if t} - {self.tokenizer.unk_token_id}
        )

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        lora: LoraSpec | None = None,
        reference_copy: bool = False,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
    ) -> VisionLanguageModel:
        """Load a hub name or a folder (a full checkpoint, or a LoRA adapter folder saved by this class).

        `lora` adds a trainable adapter (or makes a loaded one trainable); `reference_copy` keeps a
        frozen copy of the starting weights as the reference for full fine-tuning (with LoRA the
        reference is the model with its adapter disabled, at no memory cost). Weights are read from
        safetensors only unless `allow_pickle` (`mmalign.models.weights`).
        """
        from peft import PeftModel, get_peft_model
        from transformers import AutoModelForImageTextToText, AutoProcessor

        adapter_config = Path(path) / "adapter_config.json"
        base_path = path
        if adapter_config.is_file():
            base_path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        kwargs = dict(
            dtype=dtype,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=use_safetensors(allow_pickle),
        )
        with _remote_code_refused(base_path), reading_weights(base_path, allow_pickle):
            model = AutoModelForImageTextToText.from_pretrained(base_path, **kwargs)
            reference = None
            if reference_copy:
                reference = AutoModelForImageTextToText.from_pretrained(base_path, **kwargs).to(device).eval()
                reference.requires_grad_(False)
        if adapter_config.is_file():
            with reading_weights(path, allow_pickle):
                model = PeftModel.from_pretrained(model, str(path), is_trainable=lora is not None)
        elif lora is not None:
            model = get_peft_model(model, lora_config(lora))
        with _remote_code_refused(path):
            processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        model.to(device).eval()
        return cls(model, processor, reference_model=reference)

    def prepare_training(self, gradient_checkpointing: bool = False) -> None:
        """Make the loaded model ready to train: trainable weights in float32 (LoRA matrices, or every weight
        of a full fine-tuning) while frozen ones keep the loaded dtype (the base under LoRA, the reference
        copy); with a half-precision load, every model call then runs under `torch.autocast` in that dtype.
        `gradient_checkpointing` recomputes each decoder (and vision) layer's activations in backward."""
        loaded = next(self.model.parameters()).dtype
        for p in self.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        self.autocast_dtype = loaded if loaded in (torch.float16, torch.bfloat16) else None
        if gradient_checkpointing:
            base = self.model.get_base_model() if self.has_adapter else self.model
            if hasattr(base, "activation_checkpointing_enable"):
                base.activation_checkpointing_enable({"use_reentrant": False})
            else:  # transformers 4
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.gradient_checkpointing = True

    @contextlib.contextmanager
    def computing(self, model: torch.nn.Module) -> Iterator[None]:
        """A call of `model`: under autocast in `autocast_dtype` when set and, with gradient checkpointing
        and gradients on, with the checkpointed layers in training mode (transformers checkpoints a layer
        only then; the model itself stays in eval mode, so dropout stays off)."""
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        layers = []
        if self.gradient_checkpointing and torch.is_grad_enabled():
            layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) and not m.training]
        for layer in layers:
            layer.training = True
        try:
            with autocast:
                yield
        finally:
            for layer in layers:
                layer.training = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_adapter(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    @property
    def context_length(self) -> int | None:
        """The most tokens the language model reads (`max_position_embeddings`), if its config says."""
        config = self.model.config
        text = getattr(config, "text_config", None) or config
        return getattr(text, "max_position_embeddings", None)

    # ------------------------------------------------------------------ the Policy part (mmalign.train.method)
    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable weights by name (LoRA matrices, or every weight), detached on CPU."""
        return trainable_state(self.model)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.model, state)

    def save(self, directory: str | Path, merged: bool = False) -> list[str]:
        """The trained model into `directory/model` (see `save_pretrained`); returns the paths written."""
        return [f"model/{name}" for name in self.save_pretrained(Path(directory) / "model", merged=merged)]

    def save_pretrained(self, directory: str | Path, merged: bool = False) -> list[str]:
        """Write the processor and either the LoRA adapter (`merged=False`) or full weights; return file names.

        A merged save of a LoRA model merges a copy, so the wrapper keeps training unchanged.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model = self.model
        if self.has_adapter and merged:
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        return sorted(p.name for p in directory.iterdir())

    # ------------------------------------------------------------------ prompts
    def encode(self, conversations: Sequence[Conversation], *, add_generation_prompt: bool = True) -> PromptBatch:
        """Chat-template and process `conversations` into one left-padded batch on the model's device."""
        checked = [c.checked() for c in conversations]
        texts = [
            self.processor.apply_chat_template(c.messages, add_generation_prompt=add_generation_prompt, tokenize=False)
            for c in checked
        ]
        images = [c.images for c in checked]
        try:
            inputs = self.processor(
                text=texts, images=images if any(images) else None, padding=True, return_tensors="pt"
            )
        except (ValueError, TypeError, RuntimeError) as e:
            sources = ", ".join(sorted({c.source for c in checked}))
            raise ConversationError(f"the processor rejected the prompt or image(s) of {sources}: {e}") from e
        limit = self.context_length
        if limit is not None:
            lengths = inputs["attention_mask"].sum(1).tolist()
            for conversation, length in zip(checked, lengths):
                if length >= limit:
                    raise ConversationError(
                        f"{conversation.source}: the prompt takes {length} tokens with its images; the model reads "
                        f"{limit} at most, and the completion needs room too"
                    )
        device = self.device
        return PromptBatch({k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}, checked)

    def with_images(self, prompts: PromptBatch, images: Sequence[Sequence[Image.Image]]) -> PromptBatch:
        """The same prompts with replacement images (one list per prompt): identical `input_ids`, new pixels."""
        if len(images) != len(prompts):
            raise ValueError(f"need one image list per prompt: {len(images)} for {len(prompts)} prompts")
        replaced = [Conversation(c.messages, list(ims), c.source) for c, ims in zip(prompts.conversations, images)]
        batch = self.encode(replaced)
        if not torch.equal(batch.input_ids, prompts.input_ids):
            raise ValueError("replacement images changed the prompt tokens; keep each image's size unchanged")
        return batch

    @staticmethod
    def repeat(conversations: Sequence[Conversation], times: int) -> list[Conversation]:
        """Each conversation `times` times in a row (the layout `group_advantages` expects)."""
        return [c for c in conversations for _ in range(times)]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: PromptBatch,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        do_sample: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one completion per prompt: `completion_ids (B, T)` (padded), `completion_mask (B, T)`."""
        self.model.eval()
        with self.computing(self.model):
            out = self.model.generate(
                **prompts.inputs,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=top_p if do_sample else None,
                pad_token_id=self.pad_token_id,
                eos_token_id=sorted(self.eos_token_ids),
                suppress_tokens=self.placeholder_ids or None,
            )
        completion = out[:, prompts.input_ids.shape[1] :]
        return completion, self.completion_mask(completion)

    def completion_mask(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """1 on every token up to and including the first end-of-turn token, 0 after: `(B, T)` long."""
        is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
        for eos in self.eos_token_ids:
            is_eos |= completion_ids == eos
        ended_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # eos tokens strictly before t
        return (ended_before == 0).long()

    def sample(
        self,
        conversations: Sequence[Conversation],
        num_generations: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> Rollout:
        """`num_generations` completions per conversation, each group consecutive."""
        prompts = self.encode(self.repeat(conversations, num_generations))
        ids, mask = self.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        return Rollout(prompts, ids, mask, self.decode(ids, mask))

    def completion_tokens(self, texts: Sequence[str], end_of_turn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids of `texts` (+ the end-of-turn token) and their mask: `(B, T)` each."""
        eos = self.tokenizer.eos_token if end_of_turn else ""
        encoded = self.tokenizer(
            [t + eos for t in texts], add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt"
        )
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    def decode(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
        """Completion texts without padding and without the end-of-turn token."""
        texts = []
        for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist()):
            kept = [t for t, m in zip(ids, mask) if m and t not in self.eos_token_ids]
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=False))
        return texts

    # ------------------------------------------------------------------ scoring
    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The frozen reference: the model with its adapter disabled, or the frozen copy."""
        if self.has_adapter:
            with self.model.disable_adapter():
                yield self.model
        elif self._reference_model is not None:
            yield self._reference_model
        else:
            raise ValueError("no reference: load with lora=... or reference_copy=True")

    def forward(
        self,
        prompts: PromptBatch,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        model: torch.nn.Module | None = None,
        **kwargs,
    ):
        """The model's output over `[prompt ; completion]` with the prompts' vision inputs."""
        if self.placeholder_ids and torch.isin(completion_ids, torch.tensor(self.placeholder_ids)).any():
            raise ValueError("a completion contains an image/video placeholder token; the processor expands those")
        inputs = dict(prompts.inputs)
        inputs["input_ids"] = torch.cat([prompts.input_ids, completion_ids], dim=1)
        inputs["attention_mask"] = torch.cat([prompts.attention_mask, completion_mask.to(prompts.attention_mask)], 1)
        for key in _TOKEN_TYPE_KEYS:  # text tokens over the completion (Qwen's get_rope_index needs full length)
            if key in inputs:
                inputs[key] = torch.cat([inputs[key], torch.zeros_like(completion_ids)], dim=1)
        model = model or self.model
        with self.computing(model):
            return model(**inputs, **kwargs)

    def token_logprobs(
        self,
        prompts: PromptBatch,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        reference: bool = False,
        model: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs `(B, T)` of `completion_ids` (logits divided by the sampling `temperature`) and,
        with `with_entropy`, the policy's entropy at each position `(B, T)`; gradients flow unless
        `reference`. Pass `with_images(...)` prompts to score under replacement images, and `model`
        to run the policy through a wrapper of `self.model` (accelerate's DDP module).
        """
        length = completion_ids.shape[1]
        context = self.reference() if reference else contextlib.nullcontext(model or self.model)
        grad = contextlib.nullcontext() if not reference else torch.no_grad()
        with context as model, grad:
            output = self.forward(prompts, completion_ids, completion_mask, model=model, logits_to_keep=length + 1)
        logits = output.logits[:, -length - 1 : -1].float() / temperature  # position t predicts completion token t
        log_probs = torch.log_softmax(logits, dim=-1)
        logp = log_probs.gather(-1, completion_ids[..., None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
        return logp, entropy


def lora_config(spec: LoraSpec):
    """peft `LoraConfig` for `spec` (no dropout: RL ratios must be exactly 1 on-policy)."""
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank, target_modules=spec.targets, lora_dropout=0.0)
