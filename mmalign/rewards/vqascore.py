"""VLM judges: ask any transformers image-text-to-text model a yes/no question about each image.

VQAScore (Lin et al. 2024) scores an image by the probability that a VLM answers "Yes" to
`Does this figure show "{prompt}"? Please answer yes or no.`; the question and answer templates are
those of linzhiqiu/t2v_metrics (`t2v_metrics/models/vqascore_models/*_model.py`, `forward`:
`question_template`, `answer_template="Yes"`), where the score is the likelihood of the answer
tokens after the question. Here the question is sent as one user turn (the image, then the question)
through the model's chat template with the generation prompt, and the next-token logits at the
answer position give

    score = P(yes) / (P(yes) + P(no))  =  sigmoid(logit[yes] − logit[no])      (normalise=True)
    score = P(yes) over the whole vocabulary                                   (normalise=False)

with `yes` / `no` the first token of each answer word. Scores are in [0, 1]. Images go through the
model's own processor (PIL), so the score is not differentiable in the pixels.

Pairwise, `judge.prefer(images_a, images_b, prompts)` shows both images in one user turn (first,
second, then `pairwise_question`) and asks in both orders, so a judge's bias for a position cancels:

    prefer(a, b) = ½ · [s(a, b) + 1 − s(b, a)]      ∈ [0, 1],  prefer(a, b) + prefer(b, a) = 1

with `s(x, y)` the yes-score above for "is the first image better" with `x` shown first.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmalign.models.vlm import Conversation, VisionLanguageModel
from mmalign.rewards.base import Reward, RewardInputError, broadcast_prompts

VQASCORE_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
JUDGE_QUESTION = 'Is this image a faithful, high-quality depiction of "{prompt}"? Please answer yes or no.'
PAIRWISE_QUESTION = (
    'Is the first image a more faithful, higher-quality depiction of "{prompt}" than the second image? '
    "Please answer yes or no."
)
DEFAULT_VLM = "Qwen/Qwen2.5-VL-7B-Instruct"


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """`(N, 3, H, W)` in [0, 1] → N RGB PIL images (rounded to uint8)."""
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def _one_tensor(batch: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A batch of images as one `(N, 3, H, W)` tensor; images of several sizes are an error."""
    if isinstance(batch, torch.Tensor):
        return batch
    if len({tuple(t.shape) for t in batch}) > 1:
        raise RewardInputError("prefer compares images of one size per side; resize them first")
    return torch.stack(batch)


class VLMJudge(Reward):
    """Probability that a VLM answers yes to `question` (formatted with the prompt) about each image.

    Args:
        path: a transformers image-text-to-text checkpoint folder or Hub id.
        question: the question; `{prompt}` is replaced by the sample's prompt.
        pairwise_question: the question `prefer` asks about two images shown first and second.
        yes: the answer whose probability is the score.
        no: the competing answer (normalisation over {yes, no}).
        normalise: `True`: `P(yes) / (P(yes) + P(no))`; `False`: `P(yes)` over the vocabulary.
        device: where the model runs (default CPU).
        dtype: `float32`, `bfloat16` or `float16`.
        batch_size: images asked per forward pass.
        allow_pickle: read pickled weights with `torch.load(weights_only=True)`.
    """

    name = "vlm-judge"
    default_question = JUDGE_QUESTION

    def __init__(
        self,
        path: str | None = None,
        question: str | None = None,
        pairwise_question: str = PAIRWISE_QUESTION,
        yes: str = "Yes",
        no: str = "No",
        normalise: bool = True,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        allow_pickle: bool = False,
    ):
        self.question, self.pairwise_question = question or self.default_question, pairwise_question
        for text in (self.question, self.pairwise_question):
            if "{prompt}" not in text:
                raise RewardInputError(f"{self.name}: a question must contain {{prompt}}, got {text!r}")
        self.vlm = VisionLanguageModel.from_pretrained(
            path or DEFAULT_VLM, dtype=getattr(torch, dtype), device=device, allow_pickle=allow_pickle
        )
        self.yes_id, self.no_id = self.answer_token(yes), self.answer_token(no)
        if self.yes_id == self.no_id:
            raise RewardInputError(f"{self.name}: {yes!r} and {no!r} start with the same token")
        self.normalise = normalise
        self.batch_size = batch_size

    def answer_token(self, word: str) -> int:
        """The first token id of `word` as the assistant's answer starts."""
        ids = self.vlm.tokenizer.encode(word, add_special_tokens=False)
        if not ids:
            raise RewardInputError(f"{self.name}: the answer {word!r} encodes to no token")
        return ids[0]

    def conversations(self, images: list[torch.Tensor], prompts: list[str], question: str) -> list[Conversation]:
        """One user turn per sample: its images (each `(N, 3, H, W)` in [0, 1], shown in list order),
        then `question` about its prompt."""
        pils = [to_pil(batch) for batch in images]
        content = [{"type": "image"} for _ in images]
        return [
            Conversation(
                [{"role": "user", "content": [*content, {"type": "text", "text": question.format(prompt=p)}]}],
                [shown[i] for shown in pils],
                source=f"{self.name} sample {i}",
            )
            for i, p in enumerate(prompts)
        ]

    def yes_scores(self, images: list[torch.Tensor], prompts: list[str], question: str) -> torch.Tensor:
        """`(N,)` yes-scores of `question` about each sample's images (see the module doc)."""
        batch = self.vlm.encode(self.conversations(images, prompts, question))
        with torch.no_grad():  # prompts are left-padded: the answer's logits are the last column
            logits = self.vlm.model(**batch.inputs, logits_to_keep=1).logits[:, -1].float()
        if self.normalise:
            return torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id]).cpu()
        return torch.softmax(logits, dim=-1)[:, self.yes_id].cpu()

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.yes_scores([images], prompts or [""] * len(images), self.question)

    def prefer(self, images_a, images_b, prompts: str | list[str]) -> torch.Tensor:
        """`(N,)` probability that each image of `images_a` beats its partner in `images_b` for its prompt,
        asked in both orders: `½ · [s(a, b) + 1 − s(b, a)]` (any inputs `reward(...)` takes)."""
        a, b = _one_tensor(self.as_batch(images_a)), _one_tensor(self.as_batch(images_b))
        if len(a) != len(b):
            raise RewardInputError(f"{self.name}: prefer needs as many images on each side, got {len(a)} and {len(b)}")
        prompt_list = broadcast_prompts(prompts, len(a), True)
        scores = []
        for start in range(0, len(a), self.batch_size):
            part = slice(start, start + self.batch_size)
            first = self.yes_scores([a[part], b[part]], prompt_list[part], self.pairwise_question)
            swapped = self.yes_scores([b[part], a[part]], prompt_list[part], self.pairwise_question)
            scores.append(0.5 * (first + 1 - swapped))
        return torch.cat(scores)


class VQAScore(VLMJudge):
    """VQAScore: `P("Yes")` to `Does this figure show "{prompt}"? Please answer yes or no.`"""

    name = "vqascore"
    default_question = VQASCORE_QUESTION
