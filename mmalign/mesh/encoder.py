"""The mesh reward network: a local-geometry point encoder, prompt FiLM, LayerNorm-ed embedding, scalar head.

Input: `points (B, N, 6)`: surface samples in the unit box (xyz) and their unit normals (see
`mmalign.mesh.points`), with `part_contact` a 7th channel, each sample's part label. Output: an
embedding `(B, D)` (the samples of RewardCS's Cauchy–Schwarz term) and a reward `(B,)` from a
small head on it.

Why this encoder: an EdgeConv-style k-nearest-neighbour stage feeding a PointNet.

- A plain PointNet (per-point MLP, then max-pool) is the cheapest permutation-invariant set
  encoder, but it sees every point alone. The defects that make a mesh dispreferred are relations
  between neighbouring points: roughness (noise), folds (crumpling), normals that turn inwards or
  flip between neighbours (flipped patches), the rims of holes.
- One kNN stage adds those relations for O(N·k) work: each point meets its k nearest neighbours
  through rotation-invariant edge features (offsets in units of the local spacing, normal
  differences, the offset's height above the tangent plane `o·n_i`, the normals' cosine), an edge
  MLP and a max over the neighbours. The kNN graph is a function of the point set, so permuting
  the input permutes the graph and the pooled (max and mean) embedding is exactly permutation
  invariant.
- Farthest-point-sampled patches (PointNet++, Point-MAE) depend on their start point, hence on
  the input order, and run a sequential loop; attention over all points costs O(N²). Both are
  heavier on a one-CPU-core budget with nothing to gain on primitive shapes.

Part contact (optional, `part_contact`): where parts meet is a relation between points of
*different* connected components, which may be far apart in the kNN graph of a coarse sampling
(a sphere resting on a cylinder meets it in one small disc). With it, every point also reads the
other parts: their winding number at the point (inside one or not) and its distance to their
nearest sample, signed by it, in units of its local spacing (`contact_features`). The input then
carries each sample's part label as a 7th channel (`mmalign.mesh.points`). Both are
differentiable in the positions, so guidance can move parts into contact or out of each other.

Prompt conditioning (optional): a frozen CLIP text tower (`TextTower`, the embedded toy CLIP by
default) gives one unit vector per prompt; FiLM turns it into a per-channel scale and shift of the
point features before pooling (initialised to the identity), so whether a shape matches its prompt
can shape the embedding. The embedding ends in a LayerNorm without affine parameters: every
embedding has zero mean and unit variance over its D channels, so the CS divergence cannot grow by
scaling embeddings up (with a fixed bandwidth it could; the median bandwidth is scale-free too).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from mmalign.config import option
from mmalign.rewards.clip_score import DEFAULT_CLIP, ClipScore

EDGE_FEATURES = 11  # offset (3), normal difference (3), own normal (3), height above the tangent plane, cosine
CONTACT_FEATURES = 3  # signed distance to the nearest other part, winding number of the other parts, whether one exists
CONTACT_SATURATION = 4.0  # local spacings: distances beyond a few samples' spacing read alike
# Area a uniformly sampled surface gives each sample, in squared local spacings: the mean distance to
# the 11 nearest others and itself (`local_spacing`, k = 12) is 2.09 / sqrt(π·density) for a planar
# Poisson sampling, so the area per sample 1 / density is 2.09⁻²·π ≈ 0.72 spacing².
WINDING_AREA = 0.72


@dataclass
class MeshEncoderConfig:
    """How a mesh becomes an embedding and a reward (saved with a trained reward)."""

    points: int = option("surface samples per mesh (drawn once per mesh, seeded)", 256)
    sample_seed: int = option("seed of the surface samples, for training data and scoring alike", 0)
    neighbours: int = option("k of the kNN stage (each point's neighbourhood, itself included)", 12)
    local_width: int = option("width of the edge MLP of the kNN stage", 32)
    width: int = option("width of the per-point MLP", 64)
    embed_dim: int = option("D: embedding size (the CS divergence's sample space)", 64)
    head_hidden: int = option("hidden width of the reward head", 64)
    part_contact: bool = option(
        "also read, at each point, the other parts' (connected components') winding number and the distance to "
        "their nearest sample signed by it: contact, gaps and interpenetration between parts "
        "(`contact_features`); the input gains a 7th channel, the part label",
        False,
    )
    text_conditioning: bool = option("condition on the prompt through a frozen text tower (FiLM)", True)
    text_encoder: str = option(
        "CLIP folder or id whose frozen text tower embeds prompts, or `hashed-ngrams` (words and word pairs, "
        "feature-hashed: see `TextTower`)",
        DEFAULT_CLIP,
    )

    @property
    def channels(self) -> int:
        """Channels of the encoder's input per point: xyz, normal, and the part label with `part_contact`."""
        return 7 if self.part_contact else 6


def knn_indices(xyz: torch.Tensor, k: int, chunk: int = 64) -> torch.Tensor:
    """`(B, N, 3)` → `(B, N, k)` long: each point's k nearest points (itself first), no gradient.

    Computed `chunk` meshes at a time to bound the `(chunk, N, N)` distance matrix.
    """
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"expected positions of shape (B, N, 3), got {tuple(xyz.shape)}")
    if not 1 <= k <= xyz.shape[1]:
        raise ValueError(f"neighbours must lie in 1..{xyz.shape[1]} (points per mesh), got {k}")
    with torch.no_grad():
        return torch.cat([torch.cdist(c, c).topk(k, dim=-1, largest=False).indices for c in xyz.split(chunk)])


def local_spacing(xyz: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """`(B, N, 1)`: each point's mean distance to its kNN `neighbours (B, N, k)` (itself included)."""
    batch = torch.arange(xyz.shape[0], device=xyz.device)[:, None, None]
    return (xyz[batch, neighbours] - xyz[:, :, None]).norm(dim=-1).mean(dim=-1, keepdim=True).clamp_min(1e-6)


def contact_features(
    xyz: torch.Tensor, normals: torch.Tensor, parts: torch.Tensor, spacing: torch.Tensor
) -> torch.Tensor:
    """Each point's relation to the other parts of its mesh: `(B, N, 3)`.

    `parts (B, N)`: part labels; `spacing (B, N, 1)`: local spacing (`local_spacing`).

    - Channel 1, `w`: the winding number of the other parts' samples at the point (Barill et al. 2018,
      "Fast winding numbers for soups and clouds"): `Σ_j a_j (q_j − p)·n_j / (4π (r² + ε_j²)^{3/2})`
      over the samples `q_j` of other parts, `r = ‖q_j − p‖`, each standing for the area
      `a_j = WINDING_AREA · spacing_j²` of a uniform sampling at its spacing, softened within
      `ε_j = spacing_j / 2`. About 1 inside another (closed, outward-wound) part, 0 outside, ½ on its
      surface; it reads the inside from all of the part's samples, not from one normal, so it holds
      near edges and corners too.
    - Channel 0: the distance to the nearest sample of another part in local spacings, signed by
      that (negative inside: `d·(1 − 2·clamp(w, 0, 1))`) and softly saturated, `S·tanh(d/S)` with
      `S = CONTACT_SATURATION`: ≈ 0 where parts touch, positive across a gap; `S` on a one-part mesh.
    - Channel 2: 1 where another part exists.

    Differentiable in `xyz` and `normals` (which sample is nearest is not).
    """
    other = parts[:, :, None] != parts[:, None, :]  # (B, N, N): [i, j] = sample j lies on another part than i
    has_other = other.any(dim=-1)
    offsets = xyz[:, None, :, :] - xyz[:, :, None, :]  # (B, N, N, 3): q_j − p_i
    squared = offsets.pow(2).sum(dim=-1)
    with torch.no_grad():
        nearest = squared.masked_fill(~other, float("inf")).argmin(dim=-1, keepdim=True)  # (B, N, 1)
    source = spacing.squeeze(-1)[:, None, :]  # (B, 1, N): spacing of sample j
    flux = (offsets * normals[:, None, :, :]).sum(dim=-1) / (squared + (source / 2).pow(2)).pow(1.5)
    winding = (other * WINDING_AREA * source.pow(2) * flux).sum(dim=-1) / (4 * torch.pi)  # (B, N)
    distance = squared.gather(-1, nearest).squeeze(-1).clamp_min(1e-12).sqrt() / spacing.squeeze(-1)
    signed = distance * (1 - 2 * winding.clamp(0.0, 1.0))
    signed = CONTACT_SATURATION * torch.tanh(signed / CONTACT_SATURATION)
    signed = torch.where(has_other, signed, torch.full_like(signed, CONTACT_SATURATION))
    return torch.stack([signed, winding, has_other.to(signed.dtype)], dim=-1)


def edge_features(
    xyz: torch.Tensor, normals: torch.Tensor, neighbours: torch.Tensor, spacing: torch.Tensor
) -> torch.Tensor:
    """Features of every point with each of its k neighbours: `(B, N, k, 11)`.

    Offsets `o_ij = (p_j − p_i) / s_i` are in units of the point's mean neighbour distance `s_i`,
    so they read the same on a coarse and a fine sampling; `o_ij · n_i` is negative on convex
    surfaces with outward normals and positive under a flipped patch.
    """
    batch = torch.arange(xyz.shape[0], device=xyz.device)[:, None, None]
    offsets = xyz[batch, neighbours] - xyz[:, :, None]  # (B, N, k, 3)
    offsets = offsets / spacing[..., None]
    n_i = normals[:, :, None].expand_as(offsets)
    n_j = normals[batch, neighbours]
    height = (offsets * n_i).sum(-1, keepdim=True)
    cosine = (n_j * n_i).sum(-1, keepdim=True)
    return torch.cat([offsets, n_j - n_i, n_i, height, cosine], dim=-1)


class MeshRewardNet(nn.Module):
    """`points (B, N, C)`, optional text embeddings `(B, T)` → embeddings `(B, D)`, rewards `(B,)`."""

    def __init__(self, config: MeshEncoderConfig, text_dim: int | None = None):
        super().__init__()
        if config.text_conditioning and not text_dim:
            raise ValueError("text_conditioning needs the text tower's embedding size (text_dim)")
        self.config = config
        w = config.width
        self.edge = nn.Sequential(
            nn.Linear(EDGE_FEATURES, config.local_width), nn.ReLU(), nn.Linear(config.local_width, config.local_width)
        )
        contact = CONTACT_FEATURES if config.part_contact else 0
        self.point_in = nn.Sequential(nn.Linear(6 + contact + config.local_width, w), nn.ReLU(), nn.Linear(w, w))
        self.film = nn.Linear(text_dim, 2 * w) if config.text_conditioning else None
        if self.film is not None:  # starts as the identity: scale 1, shift 0
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.point_out = nn.Linear(w, w)
        self.project = nn.Linear(2 * w, config.embed_dim)
        self.norm = nn.LayerNorm(config.embed_dim, elementwise_affine=False)
        self.head = nn.Sequential(
            nn.Linear(config.embed_dim, config.head_hidden), nn.ReLU(), nn.Linear(config.head_hidden, 1)
        )

    def embed(
        self, points: torch.Tensor, text: torch.Tensor | None = None, neighbours: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(B, N, C)` (+ `(B, T)` text) → LayerNorm-ed embeddings `(B, D)`; differentiable in `points`.

        `C` = `config.channels`: xyz, normal, and with `part_contact` the part label.

        `neighbours (B, N, k)`: the points' kNN indices when already known (`knn_indices` of fixed
        training samples, computed once); None computes them.
        """
        channels = self.config.channels
        if points.ndim != 3 or points.shape[-1] != channels:
            raise ValueError(f"expected points of shape (B, N, {channels}), got {tuple(points.shape)}")
        if (self.film is not None) != (text is not None):
            state = "needs" if self.film is not None else "takes no"
            raise ValueError(f"this reward network {state} text embeddings")
        xyz, normals = points[..., :3], points[..., 3:6]
        if neighbours is None:
            neighbours = knn_indices(xyz, self.config.neighbours)
        spacing = local_spacing(xyz, neighbours)
        edges = edge_features(xyz, normals, neighbours, spacing)
        local = [self.edge(edges).amax(dim=2)]  # (B, N, local_width)
        if self.config.part_contact:
            local.append(contact_features(xyz, normals, points[..., 6], spacing))
        h = self.point_in(torch.cat([points[..., :6], *local], dim=-1))  # (B, N, W)
        if self.film is not None:
            scale, shift = self.film(text).unsqueeze(1).chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        h = self.point_out(torch.relu(h))
        pooled = torch.cat([h.amax(dim=1), h.mean(dim=1)], dim=-1)  # (B, 2W)
        return self.norm(self.project(pooled))

    def forward(
        self, points: torch.Tensor, text: torch.Tensor | None = None, neighbours: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings `(B, D)` and rewards `(B,)` (see `embed`)."""
        embeddings = self.embed(points, text, neighbours)
        return embeddings, self.head(embeddings).squeeze(-1)


HASHED_NGRAMS = "hashed-ngrams"


class TextTower:
    """Frozen prompt embeddings `(B, T)`, unit norm, never trained.

    `path` names a CLIP folder or id (its text tower's features), or `hashed-ngrams`: the prompt's
    words and word pairs, each hashed with a sign into `HashedNgrams.DIM` buckets (feature hashing,
    no weights). A CLIP tower that never saw a vocabulary maps its words to arbitrary directions; the
    hashed features give a prompt made of known words in a new combination a vector built from the
    words' and pairs' known directions, so FiLM learned on training prompts carries over to it.
    """

    def __init__(self, path: str = DEFAULT_CLIP, device: str | torch.device = "cpu"):
        self.clip = None if path == HASHED_NGRAMS else ClipScore(path, device=device)
        self.embed = HashedNgrams(device) if self.clip is None else self.clip.text_embeddings
        self.dim = int(self(["a mesh"]).shape[1])

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self.embed(prompts)


class HashedNgrams:
    """`prompts` → `(B, DIM)` unit vectors: signed feature hashing of lower-cased words and adjacent word pairs."""

    DIM = 512

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = device

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.DIM)
        for row, prompt in enumerate(prompts):
            words = re.findall(r"[a-z0-9]+", prompt.lower())
            for feature in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
                code = zlib.crc32(feature.encode())
                out[row, code % self.DIM] += 1.0 if (code >> 16) & 1 else -1.0
        return torch.nn.functional.normalize(out, dim=1).to(self.device)
