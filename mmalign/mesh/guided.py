"""Reward-guided mesh generation (DreamCS's guidance on an explicit mesh; `method: mesh-guided`).

Each template mesh (`mmalign.mesh.templates`: a generator's output for a prompt, or the mesh
world's immature meshes) is optimised through per-vertex offsets `δ (V, 3)` in its unit box,
`v = v⁰ + δ`, with faces fixed. Every step, for all templates at once:

    loss = −α(t) · mean_i r(v_i | c_i) + λ_lap · L_lap + λ_edge · L_edge + λ_normal · L_normal + λ_anchor · L_anchor

- `r` is a frozen mesh reward (the shipped RewardCS by default) or an ensemble's mean or minimum,
  averaged over `draws` surface draws. Each draw is made as the reward's own scoring makes its
  input (unit box, area-weighted samples with face normals and part labels), but with
  `SurfaceDraw`: fresh face indices and barycentric weights every step, so points and normals
  carry gradients to the vertices and the optimisation cannot fit one fixed sample set;
- `α(t) = α_min + (α_max − α_min)·t/T` grows over the run (the paper's 10 → 20 by default; the recipe's
  0.3 → 0.6 suits rewards that regress scores ÷ 5);
- `L_lap`: uniform Laplacian energy (`mmalign.losses.laplacian_smoothing_loss`) ÷ the template's
  squared mean edge length; `L_edge`: edge lengths' relative change from the template
  (`edge_length_loss`); `L_normal`: 1 − cosine between adjacent faces' normals
  (`normal_consistency_loss`, pytorch3d's third mesh regulariser), which a fold makes large;
  `L_anchor`: mean squared displacement from the template ÷ the squared mean edge length, optionally
  of the displacement's low-pass part `(I + μL)⁻¹(v − v⁰)` only (`anchor_smoothing` μ: the shape is
  held while surface noise may go). All are means over the templates. In DreamCS an SDS gradient
  keeps the shape on the prompt; here the anchor term stands in for it (the generator's output is
  the shape it meant).
- Offsets are optionally smoothly parametrised, `δ = (I + λL)⁻¹ u` (`VertexOffsets`, `smoothing` λ),
  so reward gradients move surface regions rather than single vertices; that also keeps them from
  removing per-vertex noise, so the recipe uses plain offsets with the low-pass anchor instead.
- With `part_translation_scale` s > 0 every connected component (a part) also moves rigidly,
  `v = v⁰ + δ + s·θ_k` (`PartTranslations`). No regulariser reads a part's position (they read
  `v⁰ + δ`: the Laplacian, edge and normal terms are translation invariant anyway), so where parts sit
  (resting on, beside, pushed into each other) is left to the reward alone.

`α = 0` gives the regularisers-only baseline. Evaluation (before, every `eval.every` steps,
after): the reward of every current mesh as the reward scores a file (fixed samples) and, when
every prompt belongs to the mesh world, the gold quality score (`heldout_gold`, its geometry and
prompt-match parts and their checks), which no objective reads. Each evaluation exports the
meshes as GLB under `meshes/step-NNNNNN/` and renders them into the sample grid; the final meshes
go to `final/meshes/` with a `templates.jsonl` listing them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import trimesh
from torch import nn

from mmalign.config import ConfigError, check_choice, check_range, option
from mmalign.io import atomic_directory
from mmalign.losses import (
    edge_length_loss,
    face_adjacency,
    guidance_weight,
    laplacian_smoothing_loss,
    mesh_edges,
    normal_consistency_loss,
)
from mmalign.mesh import world
from mmalign.mesh.parts import face_parts, vertex_adjacency, vertex_components
from mmalign.mesh.render import render_views
from mmalign.mesh.reward import MeshReward
from mmalign.mesh.sampling import SurfaceDraw
from mmalign.mesh.templates import (
    TEMPLATES_JSONL,
    EmbeddedTemplatesConfig,
    Template,
    TemplateDataConfig,
    load_templates,
)
from mmalign.rewards import load_reward
from mmalign.train.grids import image_grid
from mmalign.train.method import Evaluation, Method

DEFAULT_MESH_REWARD = "embedded:mesh-reward-cs"


@dataclass
class MeshGuidedConfig:
    """Options of reward-guided mesh optimisation (section `mesh_guided`)."""

    rewards: list[str] = option(
        "frozen mesh reward folders (`embedded:mesh-reward-cs` = the shipped RewardCS); several form an ensemble",
        default_factory=lambda: [DEFAULT_MESH_REWARD],
    )
    ensemble: str = option(
        "how an ensemble's rewards combine per mesh: mean, or min (optimise the least convinced member, the "
        "conservative choice against over-optimising one model's blind spots)",
        "mean",
    )
    alpha_min: float = option("α at the first step (reward weight)", 10.0)
    alpha_max: float = option("α at the last step; α grows linearly in between", 20.0)
    laplacian_weight: float = option("λ_lap: uniform Laplacian energy ÷ squared mean edge length", 1.0)
    edge_weight: float = option("λ_edge: relative change of edge lengths from the template", 1.0)
    normal_weight: float = option(
        "λ_normal: mean 1 − cos between adjacent faces' normals (zero on a plane, ≈ 2 at a fold): keeps guidance "
        "from folding the surface; 0 = off",
        0.0,
    )
    anchor_weight: float = option(
        "λ_anchor: mean squared vertex displacement from the template ÷ squared mean edge length (keeps the shape the "
        "generator made, the role SDS plays in DreamCS)",
        100.0,
    )
    anchor_smoothing: float = option(
        "μ of the anchor's low-pass: L_anchor reads the displacement's smooth part (I + μL)⁻¹(v − v⁰), so the shape "
        "stays while surface noise may go; 0 = the raw displacement",
        0.0,
    )
    smoothing: float = option("λ of the smooth parametrisation δ = (I + λL)⁻¹u of the offsets; 0 = plain offsets", 10.0)
    part_translation_scale: float = option(
        "s of the per-part rigid translations s·θ_k (one per connected component, unit-box units; an Adam step moves "
        "a part up to s·lr): only the reward moves parts, no regulariser resists it; 0 = parts stay where the "
        "template put them",
        0.0,
    )
    points: int | None = option("surface samples per mesh and draw; null = what the reward was trained with", None)
    draws: int = option("independent surface draws per mesh and step; the reward is averaged over them", 8)
    templates: EmbeddedTemplatesConfig = option(
        "generation of data.path=embedded:mesh-templates", default_factory=EmbeddedTemplatesConfig
    )
    render_size: int = option("pixels of each rendered view in the sample grids", 96)

    def check_values(self, prefix: str) -> None:
        """Ranges and choices, checked when the config is built (keys named under `prefix`)."""
        if not self.rewards:
            raise ConfigError(f"config key '{prefix}rewards' must name one or more mesh rewards")
        check_choice(f"{prefix}ensemble", self.ensemble, ("mean", "min"))
        weights = ("laplacian_weight", "edge_weight", "normal_weight", "anchor_weight", "anchor_smoothing",
                   "smoothing", "part_translation_scale", "alpha_min")  # fmt: skip
        for key in weights:
            check_range(f"{prefix}{key}", getattr(self, key), 0)
        check_range(f"{prefix}alpha_max", self.alpha_max, self.alpha_min)
        for key in ("points", "draws", "render_size"):
            check_range(f"{prefix}{key}", getattr(self, key), 1)


class VertexOffsets(nn.Module):
    """One `(V_i, 3)` offset tensor per template, zero at the start, optionally smoothly parametrised.

    With `smoothing` λ > 0 the parameters `u` are mapped to offsets `δ = (I + λL)⁻¹ u` (`L` the
    uniform graph Laplacian): the gradient reaching `u` is the vertex gradient smoothed over the
    surface, so steps move regions rather than single vertices (Nicolet et al. 2021, "Large steps
    in inverse rendering"). The solve uses a sparse LU factorisation made once per template.
    """

    def __init__(self, edges: list[torch.Tensor], vertex_counts: list[int], smoothing: float = 0.0):
        super().__init__()
        self.offsets = nn.ParameterList([nn.Parameter(torch.zeros(v, 3)) for v in vertex_counts])
        self.solvers = [
            SmoothingSolver(e, v, smoothing) if smoothing > 0 else None for e, v in zip(edges, vertex_counts)
        ]

    def forward(self) -> list[torch.Tensor]:
        return [u if solver is None else solver(u) for u, solver in zip(self.offsets, self.solvers)]


class PartTranslations(nn.Module):
    """One rigid translation `s·θ_k (3,)` per connected component `k` of each template, zero at the start.

    `forward` spreads them to the vertices: one `(V_i, 3)` tensor per template, each row its part's
    translation. The scale `s` sets how far an optimiser step moves a part without changing the
    learning rate the vertex offsets share.
    """

    def __init__(self, labels: list[torch.Tensor], scale: float):
        """`labels`: per template, the `(V_i,)` part of every vertex (`vertex_components`)."""
        super().__init__()
        self.scale = scale
        for i, label in enumerate(labels):
            self.register_buffer(f"labels_{i}", label, persistent=False)
        self.translations = nn.ParameterList([nn.Parameter(torch.zeros(int(label.max()) + 1, 3)) for label in labels])

    def forward(self) -> list[torch.Tensor]:
        return [self.scale * t[getattr(self, f"labels_{i}")] for i, t in enumerate(self.translations)]


class Deformation(nn.Module):
    """The optimised part of every template: vertex offsets `δ_i` and, optionally, part translations."""

    def __init__(self, offsets: VertexOffsets, parts: PartTranslations | None):
        super().__init__()
        self.offsets, self.parts = offsets, parts

    def forward(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per template: the offsets `δ (V, 3)` the regularisers read, and the full displacement `δ + s·θ (V, 3)`."""
        offsets = self.offsets()
        if self.parts is None:
            return offsets, offsets
        return offsets, [o + t for o, t in zip(offsets, self.parts())]


class SmoothingSolver:
    """`u (V, 3)` → `(I + λL)⁻¹ u`, differentiable (the matrix is symmetric: backward is the same solve)."""

    def __init__(self, edges: torch.Tensor, vertex_count: int, smoothing: float):
        adjacency = vertex_adjacency(edges, vertex_count)
        laplacian = scipy.sparse.diags(np.asarray(adjacency.sum(axis=1)).ravel()) - adjacency
        system = scipy.sparse.identity(vertex_count) + smoothing * laplacian
        self.solve = scipy.sparse.linalg.factorized(system.tocsc())

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return _SymmetricSolve.apply(u, self.solve)


class _SymmetricSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, solve) -> torch.Tensor:
        ctx.solve = solve
        return _apply_solve(solve, u)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _apply_solve(ctx.solve, grad), None


def _apply_solve(solve, x: torch.Tensor) -> torch.Tensor:
    out = np.stack([solve(column) for column in x.detach().cpu().double().numpy().T], axis=1)
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)


def unit_box(vertices: torch.Tensor) -> torch.Tensor:
    """`(V, 3)` → the same shape centred on its bounding box with longest side 1 (differentiable)."""
    lower, upper = vertices.min(dim=0).values, vertices.max(dim=0).values
    return (vertices - (lower + upper) / 2) / (upper - lower).max().clamp_min(1e-9)


class MeshGuided(Method):
    config_class = MeshGuidedConfig
    data_config_class = TemplateDataConfig
    config: MeshGuidedConfig

    def setup(self, accelerator) -> None:
        c = self.config
        self.device = accelerator.device
        self.rewards = [load_reward(name, device=self.device) for name in c.rewards]
        for name, reward in zip(c.rewards, self.rewards):
            if not isinstance(reward, MeshReward):
                raise ConfigError(f"mesh_guided.rewards: {name!r} is not a mesh reward (got {type(reward).__name__})")
        self.templates: list[Template] = load_templates(self.run.data.path, c.templates)
        self.prompts = [t.prompt for t in self.templates]
        self.points = c.points or self.rewards[0].config.points
        to = {"device": self.device, "dtype": torch.float32}
        self.rest = [torch.as_tensor(np.asarray(t.mesh.vertices), **to) for t in self.templates]
        self.faces = [torch.as_tensor(np.asarray(t.mesh.faces), device=self.device) for t in self.templates]
        self.edges = [mesh_edges(f) for f in self.faces]
        vertex_parts = [vertex_components(e, len(v)) for e, v in zip(self.edges, self.rest)]
        self.face_parts = [face_parts(f, parts).to(torch.float32) for f, parts in zip(self.faces, vertex_parts)]
        self.adjacency = [face_adjacency(f) for f in self.faces]
        self.rest_lengths = [(v[e[:, 0]] - v[e[:, 1]]).norm(dim=-1) for v, e in zip(self.rest, self.edges)]
        self.spacing2 = [lengths.mean().pow(2) for lengths in self.rest_lengths]  # squared mean edge length
        counts = [len(v) for v in self.rest]
        parts = PartTranslations(vertex_parts, c.part_translation_scale) if c.part_translation_scale else None
        self.deformation = Deformation(VertexOffsets(self.edges, counts, c.smoothing), parts).to(self.device)
        self.anchor_filters = [
            SmoothingSolver(e, v, c.anchor_smoothing) if c.anchor_smoothing > 0 else None
            for e, v in zip(self.edges, counts)
        ]
        self.module: nn.Module = self.deformation
        self.in_world = all(_is_world_prompt(p) for p in self.prompts)
        self.generator = torch.Generator(device="cpu")

    # ------------------------------------------------------------------ Method plumbing
    def trainable_module(self) -> nn.Module:
        return self.deformation

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.deformation.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.deformation.load_state_dict(state)

    def gold_metric(self) -> str:
        return "heldout_gold" if self.in_world else "reward"

    def report_description(self) -> str:
        c = self.config
        gold = "and the mesh world's gold score" if self.in_world else "(no gold score: prompts outside the mesh world)"
        rewards = ", ".join(f"`{r}`" for r in c.rewards) + (f" ({c.ensemble})" if len(c.rewards) > 1 else "")
        return (
            f"Reward {rewards}; {len(self.templates)} templates from `{self.run.data.path}`. Evaluated on the current "
            f"meshes: the reward as it scores a mesh file (fixed samples) {gold}."
        )

    def next_batch(self, step: int, micro: int) -> int:
        return step  # every step optimises every template; the step seeds the surface draw

    # ------------------------------------------------------------------ optimisation
    def deform(self, module: nn.Module | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per template: its offsets `δ (V_i, 3)` and its current vertices `(V_i, 3)`, in its unit-box frame."""
        offsets, displacements = (module or self.deformation)()
        return offsets, [rest + d for rest, d in zip(self.rest, displacements)]

    def vertices(self) -> list[torch.Tensor]:
        """Current vertex positions `(V_i, 3)` of every template, in its unit-box frame."""
        return self.deform()[1]

    def regularisers(self, offsets: torch.Tensor, i: int) -> tuple[torch.Tensor, ...]:
        """Laplacian, edge-length, normal-consistency and anchor terms of template `i` moved by `offsets (V, 3)`.

        They read the template plus its vertex offsets only, not the part translations: the first
        three are invariant to moving a part rigidly anyway, and this way a part's position gets no
        gradient from them at all (not even rounding noise, which Adam would scale up to full steps).
        """
        edges, rest_lengths, spacing2 = self.edges[i], self.rest_lengths[i], self.spacing2[i]
        vertices = self.rest[i] + offsets
        laplacian = laplacian_smoothing_loss(vertices, edges) / spacing2
        displacement = vertices - self.rest[i]  # = offsets up to rounding, as docs/results/mesh.md measured
        if self.anchor_filters[i] is not None:
            displacement = self.anchor_filters[i](displacement)
        anchor = displacement.pow(2).sum(dim=-1).mean() / spacing2
        normal = normal_consistency_loss(vertices, self.faces[i], self.adjacency[i])
        return laplacian, edge_length_loss(vertices, edges, rest_lengths), normal, anchor

    def compute_loss(self, batch: int, step: int, micro: int):
        c = self.config
        offsets, vertices = self.deform(self.module)
        self.generator.manual_seed(self.run.seed * 1_000_003 + batch)
        samples = []
        for v, f, labels in zip(vertices, self.faces, self.face_parts):
            unit = unit_box(v)
            for _ in range(c.draws):
                draw = SurfaceDraw.draw(unit.detach(), f, self.points, self.generator)
                points, normals = draw.sample(unit, f)
                samples.append(torch.cat([points, normals, labels[draw.face_index, None]], dim=-1))
        prompts = [p for p in self.prompts for _ in range(c.draws)]
        points = torch.stack(samples)
        members = [r.rewards(points, prompts).view(len(vertices), c.draws).mean(dim=1) for r in self.rewards]
        rewards = combine_rewards(torch.stack(members), c.ensemble)
        terms = zip(*(self.regularisers(o, i) for i, o in enumerate(offsets)))
        laplacian, edge, normal, anchor = (torch.stack(t).mean() for t in terms)
        alpha = guidance_weight(step, self.run.train.max_steps, c.alpha_min, c.alpha_max)
        regularisation = (
            c.laplacian_weight * laplacian + c.edge_weight * edge + c.normal_weight * normal + c.anchor_weight * anchor
        )
        loss = -alpha * rewards.mean() + regularisation
        metrics = {
            "reward": rewards.mean().detach(),
            "laplacian": laplacian.detach(),
            "edge": edge.detach(),
            "normal": normal.detach(),
            "anchor": anchor.detach(),
        }
        return loss, {**metrics, "alpha": torch.tensor(alpha)}

    # ------------------------------------------------------------------ evaluation and result
    def current_meshes(self) -> list[trimesh.Trimesh]:
        with torch.no_grad():
            return [
                trimesh.Trimesh(v.cpu().numpy(), f.cpu().numpy(), process=False)
                for v, f in zip(self.vertices(), self.faces)
            ]

    def evaluate(self, step: int) -> Evaluation:
        meshes = self.current_meshes()
        scores = [r(meshes, self.prompts, progress=False) for r in self.rewards]
        rewards = combine_rewards(torch.stack(scores), self.config.ensemble)
        metrics: dict[str, float] = {}
        captions = [f"{p} r={r:.3f}" for p, r in zip(self.prompts, rewards.tolist())]
        if self.in_world:
            checks = [world.gold_checks(m, p) for m, p in zip(meshes, self.prompts)]
            metrics["heldout_gold"] = float(np.mean([c["score"] for c in checks]))
            metrics["gold_geometry"] = float(np.mean([c["geometry"] for c in checks]))
            metrics["gold_match"] = float(np.mean([c["match"] for c in checks]))
            for name in ("smooth", "unfolded", "closed", "oriented", "nondegenerate", "count", "shape", "proportion"):
                metrics[f"gold/{name}"] = float(np.mean([c[name] for c in checks]))
            relations = [c["relation"] for c in checks if "relation" in c]  # compositions only
            if relations:
                metrics["gold/relation"] = float(np.mean(relations))
            captions = [f"{cap} gold={c['score']:.2f}" for cap, c in zip(captions, checks)]
        metrics["reward"] = float(rewards.mean())
        export_meshes(Path(self.run.output_dir) / "meshes" / f"step-{step:06d}", self.templates, meshes)
        views = torch.stack([render_views(m, self.config.render_size) for m in meshes])
        return Evaluation(metrics, image_grid(views, captions, columns=4, cell=self.config.render_size))

    def save_final(self, directory: Path) -> list[str]:
        export_meshes(directory / "meshes", self.templates, self.current_meshes())
        return ["meshes"]


def combine_rewards(members: torch.Tensor, how: str) -> torch.Tensor:
    """`(M, K)` rewards of M ensemble members → `(K,)`: their mean, or their minimum (`how`)."""
    if how == "mean":
        return members.mean(dim=0)
    if how == "min":
        return members.min(dim=0).values
    raise ValueError(f"unknown ensemble combination {how!r}; expected mean or min")


def export_meshes(directory: Path, templates: list[Template], meshes: list[trimesh.Trimesh]) -> None:
    """GLB files `<name>.glb` and a `templates.jsonl` of (prompt, mesh) rows, written atomically."""
    with atomic_directory(directory) as tmp:
        rows = []
        for template, mesh in zip(templates, meshes):
            mesh.export(tmp / f"{template.name}.glb")
            rows.append({"prompt": template.prompt, "mesh": f"{template.name}.glb"})
        (tmp / TEMPLATES_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _is_world_prompt(prompt: str) -> bool:
    try:
        world.parse_prompt(prompt)
    except ValueError:
        return False
    return True
