"""Pure tensor losses. Nothing here touches a model, a file or a device: tensors in, tensors out.

Conventions: `B` is the batch of pairs (or samples), `S` the number of segments of a video.
Errors are mean-reduced squared errors, so `beta` values match the papers' codes (2500 for SD1.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`(B, ...)` × `(B, ...)` → `(B,)` mean squared error over every non-batch element."""
    return (prediction - target).pow(2).flatten(1).mean(dim=1)


def per_segment_mse(
    prediction: torch.Tensor, target: torch.Tensor, frame_segment: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """Squared error of `(B, C, F, H, W)` latents split over segments: `(B, S)`.

    `frame_segment (F,)` gives the segment index of every latent frame. Segment `s` holds the
    squared error summed over its elements divided by the whole sample's element count, so the
    segments sum to `per_sample_mse`.
    """
    if prediction.ndim != 5:
        raise ValueError(f"expected (B, C, F, H, W) latents, got shape {tuple(prediction.shape)}")
    frames = prediction.shape[2]
    if frame_segment.shape != (frames,):
        raise ValueError(f"frame_segment must have shape ({frames},), got {tuple(frame_segment.shape)}")
    sq = (prediction - target).pow(2)
    per_frame = sq.sum(dim=(1, 3, 4)) / sq[0].numel()  # (B, F)
    one_hot = F.one_hot(frame_segment.long().to(per_frame.device), num_segments).to(per_frame.dtype)  # (F, S)
    return per_frame @ one_hot


def diffusion_dpo_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    pair_scale: torch.Tensor | None = None,
    segment_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss, optionally soft-scaled per pair and masked per segment.

    Errors are `(B,)` per-sample mean squared errors or `(B, S)` per-segment errors (see
    `per_segment_mse`). With segment labels ℓ ∈ {+1, 0, −1} (all +1 when None) and per-pair
    scale c (1 when None):

        z_b = −beta · c_b · Σ_s ℓ_{b,s} · [(policy_err_w − ref_err_w) − (policy_err_l − ref_err_l)]_{b,s}
        loss = mean_b(−log σ(z_b))

    A label of −1 means the "loser" is better on that segment; 0 (a tie) removes the segment.
    Returns the loss and detached metrics: `implicit_acc = mean(z > 0)`, `z_mean`, the four
    mean errors, and `policy_margin` / `ref_margin` (mean loser − winner error).
    """
    shapes = {tuple(t.shape) for t in (policy_err_w, policy_err_l, ref_err_w, ref_err_l)}
    if len(shapes) != 1:
        raise ValueError(f"all four error tensors must have the same shape, got {sorted(shapes)}")
    diff = (policy_err_w - ref_err_w) - (policy_err_l - ref_err_l)
    if diff.ndim == 1:
        diff = diff[:, None]
    elif diff.ndim != 2:
        raise ValueError(f"errors must be (B,) or (B, S), got shape {tuple(policy_err_w.shape)}")
    if segment_labels is not None:
        if segment_labels.shape != diff.shape:
            raise ValueError(f"segment_labels shape {tuple(segment_labels.shape)} != errors {tuple(diff.shape)}")
        diff = diff * segment_labels.to(diff)
    z = -beta * diff.sum(dim=1)
    if pair_scale is not None:
        z = z * pair_scale.to(z)
    loss = -F.logsigmoid(z).mean()

    def sample_mean(err: torch.Tensor) -> torch.Tensor:  # segments sum to the per-sample error
        return err.detach().reshape(err.shape[0], -1).sum(1).mean()

    metrics = {
        "implicit_acc": (z > 0).float().mean().detach(),
        "z_mean": z.mean().detach(),
        "policy_err_w": sample_mean(policy_err_w),
        "policy_err_l": sample_mean(policy_err_l),
        "ref_err_w": sample_mean(ref_err_w),
        "ref_err_l": sample_mean(ref_err_l),
    }
    metrics["policy_margin"] = metrics["policy_err_l"] - metrics["policy_err_w"]
    metrics["ref_margin"] = metrics["ref_err_l"] - metrics["ref_err_w"]
    return loss, metrics


def soft_preference(score_w: torch.Tensor, score_l: torch.Tensor, tau: float) -> torch.Tensor:
    """SmPO's smoothed label `p = σ((r_w − r_l)/τ)`: `(B,)` × `(B,)` → `(B,)` in (0, 1).

    Equal scores give ½; swapping the two gives `1 − p`. `τ` is the reward's range over the data
    set in SmPO (PickScore: ≈0.167 in cosine units), so `p ∈ [½, σ(1)]` when the winner is the
    higher-scored image.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    return torch.sigmoid((score_w - score_l) / tau)


def smpo_pair_scale(p: torch.Tensor, gamma: float) -> torch.Tensor:
    """SmPO's per-pair multiplier of the DPO margin, `γ(2p − 1)` (0 at p = ½; 1 at γ = p = 1)."""
    return gamma * (2 * p - 1)


def weighted_soft_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of `(N,)` logits against soft targets `y ∈ [0, 1]`, weighted per row.

    `Σ_i w_i · [−y_i log σ(l_i) − (1 − y_i) log(1 − σ(l_i))] / Σ_i w_i`. Each row's term is
    minimised (zero gradient) at `σ(l_i) = y_i`; weights balance the classes (see
    `class_balance_weights`).
    """
    if not logits.shape == targets.shape == weights.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and weights "
            f"{tuple(weights.shape)} must have the same shape"
        )
    if ((targets < 0) | (targets > 1)).any():
        raise ValueError("targets must lie in [0, 1]")
    per_row = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (weights * per_row).sum() / weights.sum().clamp_min(1e-12)


def class_balance_weights(groups: torch.Tensor) -> torch.Tensor:
    """`(N,)` integer group ids → weights giving every group present the same total weight."""
    counts = torch.bincount(groups)
    present = (counts > 0).sum()
    return 1.0 / (counts[groups].float() * present)


def cs_divergence(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
    """Empirical Cauchy–Schwarz divergence between sample sets `x (N, D)` and `y (M, D)`: a scalar ≥ 0.

    With a Gaussian kernel `κ(a, b) = exp(−‖a − b‖² / (2σ²))` and every mean taken over all pairs,
    diagonal terms included:

        D = log mean κ(x, x') + log mean κ(y, y') − 2 · log mean κ(x, y)

    Each `log mean κ` is a logsumexp of `−d²/(2σ²)` minus the log of the pair count, so sets many
    bandwidths apart give a finite value and finite gradients. `D(x, x) = 0`; no pairing between
    `x` and `y` is used, so `N ≠ M` is fine.

    `bandwidth` is σ in the embeddings' units. When None, σ is the median of the detached pairwise
    distances of the pooled samples (diagonal included), each pair weighted as if drawn from the
    balanced mixture `½ p̂_x + ½ p̂_y`. That is the plain pooled median when `N = M`; the balance
    keeps σ (and D) unchanged when one set is duplicated or the batch's class ratio changes. The
    median heuristic makes D invariant to a global scale of the embeddings; with a fixed σ an
    encoder can raise D just by scaling its outputs up. Should more than half the weight sit at
    distance 0, σ falls back to the largest distance (and to 1 when every point coincides).
    Half-precision inputs are computed (and returned) in float32.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected x (N, D) and y (M, D), got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    n, m = x.shape[0], y.shape[0]
    if n == 0 or m == 0:
        raise ValueError(f"both sets must be non-empty, got N={n}, M={m}")
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    pooled = torch.cat([x, y])
    if pooled.dtype in (torch.float16, torch.bfloat16):
        pooled = pooled.float()
    pooled = pooled - pooled.detach().mean(dim=0)  # same distances, less cancellation in the expansion below
    sq_norm = pooled.pow(2).sum(dim=1)
    sq_dist = (sq_norm[:, None] + sq_norm[None, :] - 2 * pooled @ pooled.T).clamp_min(0)  # (N+M, N+M)
    if bandwidth is None:
        sigma = _balanced_median_distance(sq_dist.detach(), n)
    else:
        sigma = torch.as_tensor(bandwidth, dtype=sq_dist.dtype, device=sq_dist.device)
    logits = -sq_dist / (2 * sigma**2)

    def log_mean_kernel(block: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(block.reshape(-1), dim=0) - math.log(block.numel())

    return log_mean_kernel(logits[:n, :n]) + log_mean_kernel(logits[n:, n:]) - 2 * log_mean_kernel(logits[:n, n:])


def _balanced_median_distance(sq_dist: torch.Tensor, n: int) -> torch.Tensor:
    """Lower weighted median of `sqrt(sq_dist)` over all `(K, K)` pairs, the first `n` points weighted `1/n`.

    The other `K − n` points weigh `1/(K − n)`, so each set carries half the mass. Weights are kept
    as exact integers (`K − n` and `n`, divided by their gcd) so ties at ½ resolve without rounding.
    """
    k = sq_dist.shape[0]
    g = math.gcd(n, k - n)
    weight = torch.full((k,), (k - n) // g, dtype=torch.int64, device=sq_dist.device)
    weight[n:] = n // g
    dist = sq_dist.reshape(-1).sqrt()
    order = torch.argsort(dist)
    cumulative = torch.cumsum((weight[:, None] * weight[None, :]).reshape(-1)[order], dim=0)
    half = (cumulative[-1] + 1) // 2  # the smallest distance whose cumulative weight reaches half the total
    median = dist[order][torch.searchsorted(cumulative, half[None])][0]
    largest = dist.max()
    return torch.where(median > 0, median, torch.where(largest > 0, largest, torch.ones_like(largest)))


def bradley_terry_loss(reward_w: torch.Tensor, reward_l: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood of `(B,)` pairs, winner first: `mean_b −log σ(r_w − r_l)`.

    Equal rewards give log 2. `∂L/∂r_w = −σ(r_l − r_w)/B = −∂L/∂r_l`, so a descent step raises the
    winner and lowers the loser; only the difference matters (shifting both leaves the loss unchanged).
    """
    if reward_w.shape != reward_l.shape or reward_w.ndim != 1:
        raise ValueError(f"expected two (B,) reward tensors, got {tuple(reward_w.shape)} and {tuple(reward_l.shape)}")
    return -F.logsigmoid(reward_w - reward_l).mean()


def _face_edges(faces: torch.Tensor) -> torch.Tensor:
    """`faces (F, 3)` long → its faces' three edges `(3F, 2)` as (smaller, larger) index: every face's first
    edge, then every face's second, then every third (row `j·F + f` belongs to face f)."""
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.is_floating_point():
        raise ValueError(f"faces must be an integer (F, 3) tensor, got {faces.dtype} {tuple(faces.shape)}")
    return torch.sort(torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), dim=1).values


def mesh_edges(faces: torch.Tensor) -> torch.Tensor:
    """`faces (F, 3)` long → the mesh's unique undirected edges `(E, 2)`, each as (smaller, larger) index."""
    return torch.unique(_face_edges(faces), dim=0)


def laplacian_smoothing_loss(vertices: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Uniform Laplacian energy: `mean_i ‖v_i − mean_{j ∈ N(i)} v_j‖²` over vertices with neighbours.

    `vertices (V, 3)`, `edges (E, 2)` undirected (`mesh_edges`). Zero on a flat regular grid's interior
    and for any translation of a mesh; it grows with roughness (a vertex pulled off its neighbours'
    centroid), and its gradient moves every vertex towards that centroid. In the vertices' units².
    """
    degree = torch.zeros(vertices.shape[0], dtype=vertices.dtype, device=vertices.device)
    ones = torch.ones(edges.shape[0], dtype=vertices.dtype, device=vertices.device)
    degree.index_add_(0, edges[:, 0], ones).index_add_(0, edges[:, 1], ones)
    neighbour_sum = torch.zeros_like(vertices)
    neighbour_sum.index_add_(0, edges[:, 0], vertices[edges[:, 1]]).index_add_(0, edges[:, 1], vertices[edges[:, 0]])
    connected = degree > 0
    offsets = vertices[connected] - neighbour_sum[connected] / degree[connected, None]
    return offsets.pow(2).sum(dim=-1).mean()


def edge_length_loss(vertices: torch.Tensor, edges: torch.Tensor, rest_lengths: torch.Tensor) -> torch.Tensor:
    """`mean_e ((ℓ_e − ℓ⁰_e) / mean(ℓ⁰))²`: how far edge lengths moved from their rest lengths `(E,)`.

    Zero at the rest shape and for any rigid motion of it; scale-free (relative to the mean rest
    length); keeps triangles from collapsing or stretching while other terms move the vertices.
    """
    lengths = (vertices[edges[:, 0]] - vertices[edges[:, 1]]).norm(dim=-1)
    return ((lengths - rest_lengths) / rest_lengths.mean()).pow(2).mean()


def face_adjacency(faces: torch.Tensor) -> torch.Tensor:
    """`faces (F, 3)` long → `(P, 2)` pairs (smaller, larger index) of faces that share an edge; an edge
    shared by k faces gives k − 1 pairs, a boundary edge none."""
    edges = _face_edges(faces)
    owner = torch.arange(faces.shape[0], device=faces.device).repeat(3)
    key = edges[:, 0] * (int(faces.max()) + 1) + edges[:, 1]
    order = torch.argsort(key, stable=True)
    key, owner = key[order], owner[order]
    shared = key[1:] == key[:-1]
    return torch.sort(torch.stack([owner[:-1][shared], owner[1:][shared]], dim=1), dim=1).values


def normal_consistency_loss(vertices: torch.Tensor, faces: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
    """`mean_(a,b) (1 − cos(n_a, n_b))` over adjacent faces `adjacency (P, 2)` (`face_adjacency`).

    `vertices (V, 3)`, `faces (F, 3)`; `n` the faces' normals. Zero on a plane, 1 across a right-angled
    edge, near 2 where a face folds back over its neighbour; invariant to rigid motion and scale
    (pytorch3d's `mesh_normal_consistency`). A face of zero area counts as orthogonal to its neighbours.
    """
    corners = vertices[faces]
    normals = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1)
    cosine = torch.nn.functional.cosine_similarity(normals[adjacency[:, 0]], normals[adjacency[:, 1]], dim=-1)
    return (1.0 - cosine).mean()


def guidance_weight(step: int, total_steps: int, alpha_min: float, alpha_max: float) -> float:
    """DreamCS's reward weight `α(t) = α_min + (α_max − α_min) · t / T`, with t clipped to [0, T]."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return alpha_min + (alpha_max - alpha_min) * min(max(step, 0), total_steps) / total_steps


# ---------------------------------------------------------------------------------------------- policy RL
# Token tensors are `(B, T)`: B sampled completions, T completion positions; `mask (B, T)` is 1 on a
# completion's real tokens (up to and including its end-of-turn token) and 0 on padding.

AGGREGATIONS = ("token", "sequence", "constant")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO's outcome advantages: `rewards (B,)` → `(B,)`, each reward against its own group.

    Consecutive runs of `group_size` entries form a group. Returns `r − mean_group`, divided by
    `std_group + 1e-4` (unbiased std, as `torch.std`) when `scale`. A group whose rewards are all
    equal gets advantages of exactly zero (no NaN, no gradient).
    """
    if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be (B,) with B a multiple of group_size={group_size}, got {tuple(rewards.shape)}"
        )
    groups = rewards.reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    constant = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    centred = torch.where(constant, torch.zeros_like(centred), centred)
    if scale and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def k3_divergence(logp: torch.Tensor, logp_other: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π ‖ π_other) on tokens sampled from π, clamped as verl's `low_var_kl`.

    `u = clamp(logp_other − logp, −20, 20)`, `k3 = clamp(exp(u) − u − 1, −10, 10)`: ≥ 0, zero
    exactly where the two log-probs agree; its expectation under π is the KL. Same shape as the inputs.
    """
    u = (logp_other - logp).clamp(-20.0, 20.0)
    return (torch.exp(u) - u - 1).clamp(-10.0, 10.0)


def aggregate_tokens(
    values: torch.Tensor, mask: torch.Tensor, mode: str = "token", max_length: int | None = None
) -> torch.Tensor:
    """Reduce per-token `values (B, T)` over the real tokens of `mask (B, T)` to a scalar.

    - `token` (DAPO): `Σ m·v / Σ m`, every token of the batch weighs the same;
    - `sequence` (original GRPO): the mean over sequences of each sequence's token mean;
    - `constant` (Dr. GRPO): `Σ m·v / (B · L)` with L = `max_length` (the generation limit; T when
      None), a normaliser that does not change with the batch's longest completion, as in Dr. GRPO
      and TRL's `dr_grpo` (`/ (B · max_completion_length)`).
    Padding positions never contribute, whatever their value.
    """
    if values.shape != mask.shape or values.ndim != 2:
        raise ValueError(f"values and mask must both be (B, T), got {tuple(values.shape)} and {tuple(mask.shape)}")
    mask = mask.to(values.dtype)
    masked = torch.where(mask > 0, values, torch.zeros_like(values))
    if mode == "token":
        return masked.sum() / mask.sum().clamp(min=1)
    if mode == "sequence":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if mode == "constant":
        length = values.shape[1] if max_length is None else max_length
        if length < values.shape[1]:
            raise ValueError(f"max_length={length} is shorter than the completions' {values.shape[1]} tokens")
        return masked.sum() / (values.shape[0] * length)
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    beta: float = 0.0,
    logp_ref: torch.Tensor | None = None,
    aggregation: str = "token",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate with an optional k3 penalty to a reference, as a loss to minimise.

    Per token, with `ρ = exp(logp − logp_old)` and the sequence's advantage `A (B,)`:
    `λ = −(min(ρA, clip(ρ, 1 − clip_low, 1 + clip_high)A) − beta · k3(logp, logp_ref))`,
    aggregated by `aggregate_tokens(mode=aggregation, max_length=max_length)`. On-policy (`logp_old = logp.detach()`)
    ρ is exactly 1 and the gradient is REINFORCE with the group baseline. Returns the loss and
    detached metrics: the fractions of tokens clipped low and high, the mean ratio and the k3 KL.
    """
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be (B,) for logp (B, T), got {tuple(advantages.shape)}")
    ratio = torch.exp(logp - logp_old)
    a = advantages[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    per_token = -surrogate
    metrics: dict[str, torch.Tensor] = {}
    if beta:
        if logp_ref is None:
            raise ValueError("beta > 0 needs the reference log-probs logp_ref")
        kl = k3_divergence(logp, logp_ref)
        per_token = per_token + beta * kl
        metrics["kl"] = aggregate_tokens(kl.detach(), mask, aggregation, max_length)
    with torch.no_grad():
        metrics["clip_low_frac"] = aggregate_tokens(((ratio < 1 - clip_low) & (a < 0)).to(logp.dtype), mask)
        metrics["clip_high_frac"] = aggregate_tokens(((ratio > 1 + clip_high) & (a > 0)).to(logp.dtype), mask)
        metrics["ratio_mean"] = aggregate_tokens(ratio, mask)
    return aggregate_tokens(per_token, mask, aggregation, max_length), metrics


def perception_kl(logp: torch.Tensor, logp_masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PAPO's implicit perception KL: the mean of `k3_divergence(logp, logp_masked)` over response tokens.

    `logp`, `logp_masked (B, T)`: log-probs of the sampled tokens given the real and the masked
    image; `mask (B, T)` marks response tokens. A scalar carrying gradients to both inputs; PAPO
    *maximises* it (subtracts γ times it from the loss).
    """
    return aggregate_tokens(k3_divergence(logp, logp_masked), mask, "token")


def papo_loss(
    policy_loss: torch.Tensor,
    logp: torch.Tensor,
    logp_masked: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    entropy_weight: float = 0.0,
    masked_entropy_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PAPO's objective as a loss: `policy_loss − γ·KL_prcp + η₁·TokMean(−ℓ) + η₂·TokMean(−ℓᵐ)`.

    `KL_prcp = perception_kl(logp, logp_masked, mask)` (maximised); the token-mean negative
    log-likelihoods are Monte-Carlo entropy estimates of the policy under the real and the masked
    image, kept low ("double entropy"). With `logp_masked` detached (PAPO's released default) the
    η₂ term is a constant and carries no gradient. Returns the loss and detached monitors: the
    perception KL, its variance over response tokens, and both entropy estimates.
    """
    kappa = k3_divergence(logp, logp_masked)
    kl = aggregate_tokens(kappa, mask, "token")
    nll, nll_masked = aggregate_tokens(-logp, mask, "token"), aggregate_tokens(-logp_masked, mask, "token")
    loss = policy_loss - gamma * kl + entropy_weight * nll + masked_entropy_weight * nll_masked
    with torch.no_grad():
        variance = aggregate_tokens((kappa - kl).pow(2), mask, "token")
    return loss, {
        "perception_kl": kl.detach(),
        "perception_kl_var": variance,
        "nll": nll.detach(),
        "nll_masked": nll_masked.detach(),
    }


def soft_bradley_terry_loss(
    reward_1: torch.Tensor, reward_2: torch.Tensor, target_1: torch.Tensor, *, centring: float = 0.0
) -> torch.Tensor:
    """Bradley–Terry with soft labels (PickScore/HPSv2 ties) and TRL's reward centring, `(B,)` inputs.

    `target_1` is the probability that item 1 wins (1, 0, or ½ for a tie). Per pair:
    `BCE(σ(r₁ − r₂), y) − H(y)`, which is `−log σ(r_w − r_l)` for hard labels and has its minimum 0
    at `r₁ = r₂` for a tie; plus `centring · (r₁ + r₂)²` keeping scores near zero. Mean over pairs.
    Equal scores with a hard label give log 2.
    """
    if not reward_1.shape == reward_2.shape == target_1.shape or reward_1.ndim != 1:
        raise ValueError(
            f"expected three (B,) tensors, got {tuple(reward_1.shape)}, {tuple(reward_2.shape)}, "
            f"{tuple(target_1.shape)}"
        )
    y = target_1.to(reward_1.dtype)
    bce = F.binary_cross_entropy_with_logits(reward_1 - reward_2, y, reduction="none")
    entropy = -(torch.xlogy(y, y) + torch.xlogy(1 - y, 1 - y))
    return (bce - entropy + centring * (reward_1 + reward_2).pow(2)).mean()


def reward_advantages(
    rewards: dict[str, torch.Tensor], weights: dict[str, float], group_size: int, per_reward: bool = False
) -> torch.Tensor:
    """Group-normalised advantages `(N,)` of several rewards `{name: (N,)}` with `weights {name: w}`.

    `per_reward=False`: `group_advantages(Σ_k w_k·R_k)`, the sum normalised within each group.
    `per_reward=True` (GDPO-style): `Σ_k (w_k / Σ_j |w_j|)·group_advantages(R_k)`, each reward
    normalised within each group before the weighted mean, so no reward dominates by its scale; with
    one reward it is exactly `group_advantages(R)`.
    """
    if set(rewards) != set(weights):
        raise ValueError(f"rewards {sorted(rewards)} and weights {sorted(weights)} name different rewards")
    if per_reward:
        total = sum(abs(w) for w in weights.values())
        if total == 0:
            raise ValueError("per-reward advantages need a non-zero weight")
        return sum((weights[k] / total) * group_advantages(r, group_size) for k, r in rewards.items())
    return group_advantages(sum(weights[k] * r for k, r in rewards.items()), group_size)


def gaussian_mean_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`KL(N(mean, std²) ‖ N(mean_ref, std²))` per element, averaged over all but the batch axis: `(B, …) → (B,)`.

    Two Gaussians of the same std: `‖mean − mean_ref‖² / (2·std²)`; Flow-GRPO's KL of one sampling
    step to the reference policy. `std` is a scalar or broadcasts against `mean`.
    """
    return ((mean - mean_ref) ** 2 / (2 * std**2)).flatten(1).mean(dim=1)


def flow_grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    beta: float = 0.0,
    kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-GRPO's loss over the window steps of a rollout, to minimise.

    `logp`, `logp_old (B, W)`: each sample's log-probability of its window steps under the policy
    and the policy that sampled them; `advantages (B,)`; `kl (B, W)`: `gaussian_mean_kl` of each
    step to the reference. `L = −mean_{b,i} min(ρA, clip(ρ, 1 − ε, 1 + ε)A) + β·mean(kl)`,
    `ρ = exp(logp − logp_old)`: `grpo_loss` with one "token" per window step and a symmetric clip.
    """
    loss, metrics = grpo_loss(
        logp, logp_old, advantages, torch.ones_like(logp), clip_low=clip_range, clip_high=clip_range
    )
    if beta:
        if kl is None:
            raise ValueError("beta > 0 needs the per-step KL to the reference")
        loss = loss + beta * kl.mean()
    if kl is not None:
        metrics["kl"] = kl.detach().mean()
    return loss, metrics


def nft_optimality(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability `r = clamp(clip(A, ±A_max) / (2·A_max) + ½, 0, 1)`, `(B,)`."""
    return (advantages.clamp(-clip, clip) / (2 * clip) + 0.5).clamp(0, 1)


def diffusion_nft_loss(
    v: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, r: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's negative-aware flow-matching loss (arXiv 2509.16117, velocity form), to minimise.

    `v (B, …)`: the policy's velocity at `x_σ` (with a graph); `v_old`: the old (sampling) policy's;
    `target = ε − x₀`; `r (B,)`: optimality probabilities (`nft_optimality`). With the implicit
    positive and negative policies `v⁺ = β·v + (1 − β)·v_old` and `v⁻ = (1 + β)·v_old − β·v`,
    `L = mean_b( r·‖v⁺ − target‖² + (1 − r)·‖v⁻ − target‖² )` (squared errors averaged over
    elements). When `v = v_old` it is plain flow matching whatever `r`.
    """
    v_old = v_old.detach()
    positive = per_sample_mse(beta * v + (1 - beta) * v_old, target)
    negative = per_sample_mse((1 + beta) * v_old - beta * v, target)
    loss = (r * positive + (1 - r) * negative).mean()
    return loss, {"positive_mse": positive.detach().mean(), "negative_mse": negative.detach().mean()}
