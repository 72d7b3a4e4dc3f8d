"""Names → implementations, imported lazily by dotted string so the core never imports a modality.

Five tables: training methods, rewards, evaluators, embedded assets (models shipped in the wheel,
addressed as `embedded:<name>`) and the data each method reads (`DATASETS`: embedded sets and user
formats).
`load(table, name)` imports and returns the object.
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_PREFIX = "embedded:"

#: method name → "module:Class" of its `Method` implementation, and a one-line description.
METHODS: dict[str, tuple[str, str]] = {
    "diffusion-dpo": (
        "mmalign.image.diffusion_dpo:DiffusionDPO",
        "Diffusion-DPO (Wallace et al. 2024): offline preference pairs, frozen reference",
    ),
    "diffusion-sft": (
        "mmalign.image.diffusion_sft:DiffusionSFT",
        "Supervised fine-tuning on the preferred image of each pair (the DPO papers' SFT baseline)",
    ),
    "gan-rm": (
        "mmalign.image.gan_rm_rounds:GanRMRounds",
        "GAN-RM rounds: reward from target images vs own samples, then DPO/SFT on its best vs worst, repeated",
    ),
    "gan-rm-reward": (
        "mmalign.image.gan_rm:GanRMReward",
        "GAN-RM reward alone: an MLP head on frozen CLIP embeddings telling target images from generated ones",
    ),
    "smpo": (
        "mmalign.image.smpo:SmPO",
        "SmPO-Diffusion (Lu et al. 2025): reward-smoothed preferences, ReNoise-inverted training latents",
    ),
    "reward-cs": (
        "mmalign.mesh.reward_cs:RewardCS",
        "RewardCS (DreamCS): mesh reward from unpaired scored meshes, score MSE + Cauchy-Schwarz set separation",
    ),
    "reward-bt": (
        "mmalign.mesh.reward_bt:RewardBT",
        "Bradley-Terry mesh reward on same-prompt (preferred, dispreferred) pairs: the paired baseline of RewardCS",
    ),
    "reward-cs-rounds": (
        "mmalign.mesh.reward_rounds:RewardRounds",
        "RewardCS rounds: guide meshes with the reward, rate them, retrain on its own hacks as negatives, repeated",
    ),
    "mesh-guided": (
        "mmalign.mesh.guided:MeshGuided",
        "Reward-guided mesh optimisation (DreamCS guidance): vertex offsets, −α(t)·reward + Laplacian + edge terms",
    ),
    "vlm-sft": (
        "mmalign.vlm.sft:VLMSFT",
        "Supervised fine-tuning of a VLM on the embedded VLM world's reference responses (the RL warm start)",
    ),
    "grpo": (
        "mmalign.vlm.grpo:GRPO",
        "GRPO (DeepSeekMath): VLM policy, group-normalised verifiable rewards, clipped ratio, optional k3 KL",
    ),
    "papo": (
        "mmalign.vlm.papo:PAPO",
        "PAPO (Wang et al. 2025): GRPO + implicit perception KL to a masked-image policy + double entropy terms",
    ),
    "listener-grpo": (
        "mmalign.vlm.listener:ListenerGRPO",
        "Listener-shaped GRPO (Gambashidze et al. 2025): a frozen VLM re-reads the reasoning; p(correct) shapes r",
    ),
    "densedpo": (
        "mmalign.video.densedpo:DenseDPO",
        "DenseDPO (Wu et al. 2025): pairs from corrupted real videos, preference labels per time segment",
    ),
    "rdpo": (
        "mmalign.video.rdpo:RDPO",
        "RDPO (Qian et al. 2025): pairs reverse-sampled from real videos (shallower regeneration preferred), stages",
    ),
    "vlm-reward-model": (
        "mmalign.vlm.reward_model:VLMRewardModel",
        "VLM reward model: Bradley-Terry head on the last real token, image or response preference pairs",
    ),
    "flow-grpo": (
        "mmalign.train.flow_grpo:FlowGRPO",
        "Flow-GRPO (Liu et al. 2025) / DDPO: online RL on image or video models, SDE rollouts, clipped ratio, KL",
    ),
    "diffusion-nft": (
        "mmalign.train.diffusion_nft:DiffusionNFT",
        "DiffusionNFT (Zheng et al. 2025): online RL on the forward process, implicit ± policies, no log-probs",
    ),
}

#: reward name → "module:Class" and a description. Every class follows `mmalign.rewards.Reward`.
REWARDS: dict[str, tuple[str, str]] = {
    "clip-score": (
        "mmalign.rewards.clip_score:ClipScore",
        "100 × cosine(image, text) of a CLIP model (transformers or open_clip folder; embedded toy CLIP by default)",
    ),
    "shapes-gold": (
        "mmalign.rewards.shapes_gold:ShapesGold",
        "programmatic gold metric of the embedded shapes world (does the image show the caption?)",
    ),
    "gan-rm": (
        "mmalign.image.gan_rm:GanRM",
        "GAN-RM: frozen CLIP image tower + MLP head trained to tell target images from the generator's (path=folder)",
    ),
    "balls-physics": (
        "mmalign.rewards.balls_physics:BallsPhysics",
        "physics gold metric of the embedded balls world (ballistic motion with bounces; videos)",
    ),
    "balls-colour": (
        "mmalign.rewards.balls_physics:BallsColour",
        "balls world: share of frames whose ball has the caption's colour (videos with prompts)",
    ),
    "motion-smoothness": (
        "mmalign.rewards.video:MotionSmoothness",
        "rule-based video judge: exp(−mean |jerk|) of the moving foreground's centroid (videos, no prompt)",
    ),
    "reward-cs": (
        "mmalign.mesh.reward:MeshReward",
        "RewardCS mesh reward: point encoder + prompt FiLM + head, scores meshes with prompts (path=folder or shipped)",
    ),
    "reward-bt": (
        "mmalign.mesh.reward:BradleyTerryMeshReward",
        "Bradley-Terry mesh reward, the same network trained on pairs (path=folder)",
    ),
    "vlm-rm": (
        "mmalign.vlm.reward:VLMReward",
        "VLM reward model (Bradley-Terry head on a VLM) scoring images with prompts (path=folder)",
    ),
    "pickscore": (
        "mmalign.rewards.pickscore:PickScore",
        "PickScore: logit_scale × cosine of the PickScore CLIP-H (path=PickScore_v1, processor=CLIP-ViT-H-14 folder)",
    ),
    "hpsv2": (
        "mmalign.rewards.hps:HPSv2",
        "HPS v2.0: cosine(image, text) of open_clip ViT-H-14 with HPS_v2 weights (path=file or folder)",
    ),
    "hpsv2.1": (
        "mmalign.rewards.hps:HPSv21",
        "HPS v2.1: cosine(image, text) of open_clip ViT-H-14 with HPS_v2.1 weights (path=file or folder)",
    ),
    "imagereward": (
        "mmalign.rewards.imagereward:ImageReward",
        "ImageReward: BLIP ViT-L + cross-attending BERT + MLP, standardised (path=ImageReward folder)",
    ),
    "aesthetic": (
        "mmalign.rewards.aesthetic:Aesthetic",
        "LAION improved aesthetic predictor: MLP on normalised CLIP ViT-L/14 image embeddings (no prompt)",
    ),
    "jpeg-compressibility": (
        "mmalign.rewards.jpeg:JpegCompressibility",
        "DDPO's compressibility: −(JPEG size in kB at quality 95) (no prompt)",
    ),
    "jpeg-incompressibility": (
        "mmalign.rewards.jpeg:JpegIncompressibility",
        "DDPO's incompressibility: JPEG size in kB at quality 95 (no prompt)",
    ),
    "vqascore": (
        "mmalign.rewards.vqascore:VQAScore",
        'VQAScore: P("Yes") of a transformers VLM asked: Does this figure show "{prompt}"? (path=VLM)',
    ),
    "vlm-judge": (
        "mmalign.rewards.vqascore:VLMJudge",
        "a transformers VLM asked a configurable yes/no question about each image: P(yes) (path=VLM, question=)",
    ),
}

#: evaluator name → "module:Class" and a description. Every class follows `mmalign.train.method.Evaluator`.
EVALUATORS: dict[str, tuple[str, str]] = {
    "diffusion-samples": (
        "mmalign.train.evaluation:DiffusionEvaluator",
        "images for eval.prompts with fixed noise, scored by eval.gold and eval.rewards; a sample grid",
    ),
    "video-samples": (
        "mmalign.train.evaluation:VideoEvaluator",
        "clips for eval.prompts with fixed noise, scored by video rewards; frame strips and a GIF",
    ),
    "vlm-questions": (
        "mmalign.vlm.evaluation:QuestionEvaluator",
        "greedy answers to held-out questions with real and black images, scored by the reward functions",
    ),
}

#: `data.path` value or user format → (the methods that read it, what it is). Embedded sets are built
#: offline on first use and cached under `data.cache_dir`, `$MMALIGN_CACHE` or `~/.cache/mmalign`.
DATASETS: dict[str, tuple[str, str]] = {
    "prompts: train": (
        "flow-grpo, diffusion-nft",
        "the embedded world's training captions (shapes world for image models, balls world for video models)",
    ),
    "prompts file": ("flow-grpo, diffusion-nft", "a text file with one prompt per line, or a .jsonl of {prompt}"),
    "embedded:shapes-prefs": (
        "diffusion-dpo, diffusion-sft, smpo",
        "the shapes world's captions, the model's own samples paired best vs worst by a proxy reward",
    ),
    "Pick-a-Pic datasets": (
        "diffusion-dpo, diffusion-sft, smpo",
        "a datasets name or folder with columns jpg_0, jpg_1, label_0, caption (ties dropped)",
    ),
    "pairs.jsonl folder": (
        "diffusion-dpo, diffusion-sft, smpo",
        "rows {image_0, image_1, prompt, label}: label = index of the preferred image, 0.5 a tie",
    ),
    "target + generated image folders": (
        "gan-rm-reward",
        "data.path: target images (label 1), data.generated: the generator's images (label 0), data.pool: more "
        "generated images to bootstrap from",
    ),
    "embedded:balls-world": ("densedpo, rdpo", "simulated clips of balls under gravity with captions"),
    "captions.jsonl or videos.jsonl folder": (
        "densedpo, rdpo",
        "MP4 or GIF clips indexed by rows {video, prompt, fps?}; data.fps, "
        "data.num_frames and data.resolution conform them",
    ),
    "embedded:meshes": ("reward-cs, reward-bt, reward-cs-rounds", "the mesh world's scored meshes"),
    "meshes.jsonl folder": (
        "reward-cs, reward-bt, reward-cs-rounds",
        "rows {prompt, mesh, score, label?, split?}, or preferred/ + dispreferred/ + prompts.jsonl",
    ),
    "embedded:mesh-templates": ("mesh-guided", "immature meshes of the mesh world to guide"),
    "templates.jsonl folder": ("mesh-guided", "rows {prompt, mesh}: your generator's meshes to guide"),
    "embedded:vlm-world": ("grpo, papo, listener-grpo, vlm-sft", "verifiable questions about shapes images"),
    "VQA set": (
        "grpo, papo, listener-grpo, vlm-sft",
        "a JSONL file, <split>.jsonl folder or datasets name/folder with columns images, problem, answer "
        "(data.columns renames them; vlm-sft also reads response)",
    ),
    "embedded:vlm-image-prefs": ("vlm-reward-model", "gold-labelled image pairs of the shapes world"),
    "VLM preference pairs": (
        "vlm-reward-model",
        "a pairs.jsonl folder with rows {prompt, image_1, image_2, label} or {prompt, images, chosen, rejected}, "
        "or a datasets name/folder with image(s), question/prompt, chosen, rejected (RLAIF-V layout)",
    ),
}

#: embedded asset name → folder under mmalign/assets.
EMBEDDED: dict[str, str] = {
    "shapes-t2i": "shapes-t2i",
    "shapes-t2i-flow": "shapes-t2i-flow",  # the same world, SD3-class flow matching: scripts/train_shapes_flow.py
    "shapes-clip": "shapes-clip",
    "mesh-reward-cs": "mesh-reward-cs",  # the last round of configs/mesh/reward_cs_rounds.yaml
    "mesh-reward-cs-round0": "mesh-reward-cs-round0",  # its rounds 0–2 (docs/results/mesh.md)
    "mesh-reward-cs-round1": "mesh-reward-cs-round1",
    "mesh-reward-cs-round2": "mesh-reward-cs-round2",
    "mesh-reward-cs-contact": "mesh-reward-cs-contact",  # RewardCS reading part contact: configs/mesh/guided.yaml
    "vlm-shapes": "vlm-shapes",
    "balls-t2v": "balls-t2v",
}


def import_string(target: str):
    """`"package.module:Attr"` → the attribute."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def unknown_name_error(kind: str, name: str, known: list[str]) -> KeyError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return KeyError(f"unknown {kind} {name!r}{hint} Known: {', '.join(sorted(known))}")


def load(table: dict[str, tuple[str, str]], kind: str, name: str):
    if name not in table:
        raise unknown_name_error(kind, name, list(table))
    return import_string(table[name][0])


def resolve_model_path(ref: str) -> str:
    """`embedded:<name>` → the shipped folder; anything else (Hub id, local folder) unchanged."""
    if not ref.startswith(EMBEDDED_PREFIX):
        return ref
    name = ref[len(EMBEDDED_PREFIX) :]
    if name not in EMBEDDED:
        raise unknown_name_error("embedded model", name, list(EMBEDDED))
    path = ASSETS / EMBEDDED[name]
    if not path.exists():
        raise FileNotFoundError(f"embedded model {name!r} is missing from {path}; reinstall mmalign")
    return str(path)
