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
model's own processor (PIL), so the score is not differentiable in the pixels. The pairwise form
(two images compared, asked in both orders) is not implemented.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmalign.models.vlm import Conversation, VisionLanguageModel
from mmalign.rewards.base import Reward, RewardInputError

VQASCORE_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
JUDGE_QUESTION = 'Is this image a faithful, high-quality depiction of "{prompt}"? Please answer yes or no.'
DEFAULT_VLM = "Qwen/Qwen2.5-VL-7B-Instruct"


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """`(N, 3, H, W)` in [0, 1] → N RGB PIL images (rounded to uint8)."""
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


class VLMJudge(Reward):
    """Probability that a VLM answers yes to `question` (formatted with the prompt) about each image.

    Args:
        path: a transformers image-text-to-text checkpoint folder or Hub id.
        question: the question; `{prompt}` is replaced by the sample's prompt.
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
        yes: str = "Yes",
        no: str = "No",
        normalise: bool = True,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        allow_pickle: bool = False,
    ):
        self.question = question or self.default_question
        if "{prompt}" not in self.question:
            raise RewardInputError(f"{self.name}: the question must contain {{prompt}}, got {self.question!r}")
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

    def conversations(self, images: torch.Tensor, prompts: list[str]) -> list[Conversation]:
        """One user turn per image: the image, then the question about its prompt."""
        return [
            Conversation(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": self.question.format(prompt=p)}],
                    }
                ],
                [image],
                source=f"{self.name} sample {i}",
            )
            for i, (image, p) in enumerate(zip(to_pil(images), prompts))
        ]

    def answer_logits(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Next-token logits `(N, V)` after the question (prompts are left-padded, so the last column)."""
        batch = self.vlm.encode(self.conversations(images, prompts))
        with torch.no_grad():
            return self.vlm.model(**batch.inputs, logits_to_keep=1).logits[:, -1].float()

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        logits = self.answer_logits(images, prompts or [])
        if self.normalise:
            return torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id]).cpu()
        return torch.softmax(logits, dim=-1)[:, self.yes_id].cpu()


class VQAScore(VLMJudge):
    """VQAScore: `P("Yes")` to `Does this figure show "{prompt}"? Please answer yes or no.`"""

    name = "vqascore"
    default_question = VQASCORE_QUESTION
