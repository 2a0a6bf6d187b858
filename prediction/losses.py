"""Training losses of the world model and its heads, and the simple trajectory metrics of the provisional evaluation.

Notation:
    B  samples        F  rolled-out steps     S  occupancy steps      C  latent channels     H, W  BEV rows, columns
    A  agents (padded) K  modes                T  trajectory steps     N  samples * cells, or agents kept
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _layer_norm_channels(z: torch.Tensor, dim: int) -> torch.Tensor:
    """Normalise ``z`` to zero mean and unit variance along ``dim`` (no affine)."""
    mean = z.mean(dim=dim, keepdim=True)
    var = z.var(dim=dim, keepdim=True, unbiased=False)
    return (z - mean) * torch.rsqrt(var + 1e-5)


def latent_prediction_loss(
    predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The JEPA loss: smooth-L1 between the layer-normalised channels of each cell, the target detached.

    Both latents are normalised over channels per cell, so the loss compares the pattern of the channels and not
    their scale (the target's scale is the EMA encoder's, which the predictor cannot move).

    Args:
        predicted: [B, F, C, H, W] float — the rolled-out latents ẑ_1..ẑ_F.
        target: [B, F, C, H, W] float — the target encoder's z̄_1..z̄_F (stop-gradient applied here).
        mask: [B, F] bool — steps to score; None: all.

    Returns:
        [] the mean over the scored steps, cells and channels (0 with gradient if none is scored).
    """
    if predicted.shape != target.shape or predicted.dim() != 5:
        raise ValueError(
            f"predicted and target: expected equal [B, F, C, H, W], got {list(predicted.shape)} and "
            f"{list(target.shape)}"
        )
    loss = F.smooth_l1_loss(
        _layer_norm_channels(predicted, 2), _layer_norm_channels(target.detach(), 2), reduction="none"
    ).mean(dim=(2, 3, 4))  # [B, F]
    if mask is None:
        return loss.mean()
    weight = mask.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp(min=1.0)


def vicreg_regularizer(z: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's anti-collapse terms over the samples (every cell of every latent is a sample).

    Args:
        z: [B, C, H, W] or [N, C] float.
        eps: added to the variance before the square root.

    Returns:
        variance_loss: [] mean over channels of ``relu(1 - std)``; 0 when every channel has std >= 1.
        covariance_loss: [] sum of the squared off-diagonal covariances, divided by C.
    """
    if z.dim() == 4:
        B, C, H, W = z.shape
        z = z.permute(0, 2, 3, 1).reshape(B * H * W, C)  # [N, C]
    elif z.dim() != 2:
        raise ValueError(f"z: expected [B, C, H, W] or [N, C], got {list(z.shape)}")
    N, C = z.shape
    centred = z - z.mean(dim=0)  # [N, C]
    std = torch.sqrt(centred.pow(2).sum(dim=0) / max(N - 1, 1) + eps)  # [C]
    variance_loss = F.relu(1.0 - std).mean()
    cov = centred.T @ centred / max(N - 1, 1)  # [C, C]
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    return variance_loss, off_diagonal.pow(2).sum() / C


def occupancy_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    pos_weight: float | torch.Tensor = 5.0,
    focal_gamma: float = 0.0,
    cell_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-class occupancy: binary cross-entropy with a weight on the (rare) occupied cells, optionally focal.

    Args:
        logits: [B, S, Cls, H, W] float.
        target: [B, S, Cls, H, W] bool — occupied cells.
        mask: [B, S] bool — steps to score; None: all.
        pos_weight: weight of the occupied cells' term: a number, or [Cls] per class.
        focal_gamma: focal exponent: each term is scaled by ``(1 - p_t) ** gamma`` (0: plain BCE).
        cell_weight: [B, S, 1, H, W] float — a weight per cell (e.g. less where no sensor could see); None: 1.

    Returns:
        [] the mean over the scored elements.
    """
    if logits.shape != target.shape or logits.dim() != 5:
        raise ValueError(
            f"logits and target: expected equal [B, S, Cls, H, W], got {list(logits.shape)} and {list(target.shape)}"
        )
    y = target.to(logits.dtype)
    weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    if weight.dim() == 1:
        weight = weight[:, None, None]  # [Cls, 1, 1]
    loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=weight, reduction="none")  # [B, S, Cls, H, W]
    if focal_gamma > 0:
        p = torch.sigmoid(logits)
        p_true = torch.where(target, p, 1 - p)
        loss = loss * (1 - p_true).pow(focal_gamma)
    if cell_weight is not None:
        loss = loss * cell_weight
    per_step = loss.mean(dim=(2, 3, 4))  # [B, S]
    if mask is None:
        return per_step.mean()
    m = mask.to(per_step.dtype)
    return (per_step * m).sum() / m.sum().clamp(min=1.0)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - the soft Dice coefficient of each (step, class), over the batch's cells, averaged.

    Dice weighs a class by its own occupied area, whatever its share of the grid, so that people (0.03 % of the
    cells) count as much as vehicles (0.7 %); summing over the batch keeps a class absent from one sample defined.

    Args:
        logits: [B, S, Cls, H, W] float.
        target: [B, S, Cls, H, W] bool.
        smooth: added to the numerator and denominator (a step and class with nothing occupied and nothing
            predicted scores 0 loss).

    Returns:
        [] the mean over steps and classes of ``1 - (2 Σ p y + smooth) / (Σ p + Σ y + smooth)``.
    """
    if logits.shape != target.shape or logits.dim() != 5:
        raise ValueError(
            f"logits and target: expected equal [B, S, Cls, H, W], got {list(logits.shape)} and {list(target.shape)}"
        )
    p = torch.sigmoid(logits)
    y = target.to(p.dtype)
    overlap = (p * y).sum(dim=(0, 3, 4))  # [S, Cls]
    total = p.sum(dim=(0, 3, 4)) + y.sum(dim=(0, 3, 4))
    return (1 - (2 * overlap + smooth) / (total + smooth)).mean()


def instance_flow_targets(instances: torch.Tensor, cell_xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each occupied cell's instance was at t0: its centroid at t0 minus its centroid at the cell's step.

    Args:
        instances: [B, S, H, W] int64 — instance labels (1 + index, consistent over the steps; 0 free), step 0 = t0.
        cell_xy: [H, W, 2] float — cell centres x, y (m).

    Returns:
        offset: [B, S, 2, H, W] float — source offsets x, y (m); 0 where ``mask`` is False.
        mask: [B, S, H, W] bool — cells of an instance that also occupies cells at t0.
    """
    B, S, H, W = instances.shape
    labels = int(instances.max()) + 1 if instances.numel() else 1
    key = (torch.arange(B * S, device=instances.device).reshape(B, S, 1, 1) * labels + instances).reshape(-1)
    xy = cell_xy.to(torch.float32).reshape(1, H * W, 2).expand(B * S, -1, -1).reshape(-1, 2)  # [B*S*H*W, 2]
    sums = torch.zeros(B * S * labels, 2, device=instances.device).index_add_(0, key, xy)
    counts = torch.bincount(key, minlength=B * S * labels).to(torch.float32)  # [B*S*L]
    centroid = (sums / counts.clamp(min=1)[:, None]).reshape(B, S, labels, 2)
    present = (counts > 0).reshape(B, S, labels)
    index = instances.reshape(B, S, H * W)  # [B, S, H*W]
    at_t0 = torch.gather(centroid[:, :1].expand(B, S, labels, 2), 2, index[..., None].expand(-1, -1, -1, 2))
    at_step = torch.gather(centroid, 2, index[..., None].expand(-1, -1, -1, 2))  # [B, S, H*W, 2]
    mask = (index > 0) & torch.gather(present[:, :1].expand(B, S, labels), 2, index)  # [B, S, H*W]
    offset = torch.where(mask[..., None], at_t0 - at_step, 0.0)
    return offset.permute(0, 1, 3, 2).reshape(B, S, 2, H, W), mask.reshape(B, S, H, W)


def flow_loss(
    offset_m: torch.Tensor,
    target_m: torch.Tensor,
    mask: torch.Tensor,
    scale_m: float = 5.0,
    cell_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Smooth-L1 of predicted source offsets against the instances' (``instance_flow_targets``) on their cells.

    Args:
        offset_m: [B, S, 2, H, W] float — predicted offsets (m), on the target grid.
        target_m: [B, S, 2, H, W] float.
        mask: [B, S, H, W] bool — cells scored.
        scale_m: metres per unit of the loss.
        cell_weight: [B, S, H, W] float — each scored cell's weight (e.g. by its class: a pedestrian covers a
            few cells where a car covers dozens); None: 1.

    Returns:
        [] the weighted mean over the scored cells (0 with gradient when none is).
    """
    error = F.smooth_l1_loss(offset_m / scale_m, target_m / scale_m, reduction="none").sum(dim=2)  # [B, S, H, W]
    weight = mask.to(error.dtype)
    if cell_weight is not None:
        weight = weight * cell_weight
    return (error * weight).sum() / weight.sum().clamp(min=1.0)


def _masked_displacements(modes: torch.Tensor, future: torch.Tensor, future_mask: torch.Tensor) -> torch.Tensor:
    """Euclidean errors [..., K, T] of modes [..., K, T, 2] against future [..., T, 2], 0 at masked steps."""
    future = torch.where(future_mask[..., None], future, torch.zeros_like(future))  # NaN-safe
    error = torch.linalg.vector_norm(modes - future[..., None, :, :], dim=-1)  # [..., K, T]
    return torch.where(future_mask[..., None, :], error, torch.zeros_like(error))


def trajectory_loss(
    modes: torch.Tensor,
    mode_logits: torch.Tensor,
    future: torch.Tensor,
    future_mask: torch.Tensor,
    agent_mask: torch.Tensor,
    huber_delta_m: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Winner-takes-all trajectory loss: the mode with the least masked ADE is regressed and classified.

    Agents that are padding or have no valid future step are left out.

    Args:
        modes: [B, A, K, T, 2] float — predicted xy (m).
        mode_logits: [B, A, K] float.
        future: [B, A, T, 2] float — true xy (m); anything (NaN too) at masked steps.
        future_mask: [B, A, T] bool.
        agent_mask: [B, A] bool.
        huber_delta_m: the Huber loss's threshold (m).

    Returns:
        regression: [] Huber loss of the winning mode (summed over x and y, mean over valid steps, then over agents).
        classification: [] cross-entropy of the mode logits against the winner, mean over agents.
        Both are 0, with gradient, when no agent counts.
    """
    B, A, K, T, _ = modes.shape
    if (
        mode_logits.shape != (B, A, K)
        or future.shape != (B, A, T, 2)
        or future_mask.shape != (B, A, T)
        or agent_mask.shape != (B, A)
    ):
        raise ValueError(
            f"trajectory_loss: shapes do not agree with modes {list(modes.shape)}: mode_logits "
            f"{list(mode_logits.shape)}, future {list(future.shape)}, future_mask "
            f"{list(future_mask.shape)}, agent_mask {list(agent_mask.shape)}"
        )
    valid = agent_mask & future_mask.any(dim=-1)  # [B, A]
    if not bool(valid.any()):
        zero = modes.sum() * 0.0 + mode_logits.sum() * 0.0
        return zero, zero.clone()
    modes_v, logits_v = modes[valid], mode_logits[valid]  # [N, K, T, 2], [N, K]
    mask_v = future_mask[valid]  # [N, T]
    future_v = torch.where(mask_v[..., None], future[valid], torch.zeros_like(future[valid]))  # [N, T, 2]
    count = mask_v.sum(dim=-1).to(modes.dtype)  # [N]
    with torch.no_grad():
        ade = _masked_displacements(modes_v, future_v, mask_v).sum(dim=-1) / count[:, None]  # [N, K]
        winner = ade.argmin(dim=-1)  # [N]
    best = modes_v[torch.arange(len(winner), device=modes.device), winner]  # [N, T, 2]
    huber = F.huber_loss(best, future_v, delta=huber_delta_m, reduction="none").sum(dim=-1)  # [N, T]
    regression = ((huber * mask_v).sum(dim=-1) / count).mean()
    classification = F.cross_entropy(logits_v, winner)
    return regression, classification


def detection_loss(
    heatmap_logits: torch.Tensor,
    regression: torch.Tensor,
    heatmap_target: torch.Tensor,
    regression_target: torch.Tensor,
    regression_mask: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 4.0,
    regression_weight: float = 0.25,
) -> torch.Tensor:
    """CenterNet's focal loss on the heat-map plus L1 on the box regression at the object centres.

    Args:
        heatmap_logits: [B, Cls, H, W] float.
        regression: [B, R, H, W] float.
        heatmap_target: [B, Cls, H, W] float in [0, 1], exactly 1 at the centres (``heads.detection_targets``).
        regression_target: [B, R, H, W] float; non-finite entries (unknown velocity) are left out.
        regression_mask: [B, H, W] bool — the centre cells.
        alpha, beta: the focal exponents on the prediction and on the target's distance from a centre.
        regression_weight: weight of the regression term.

    Returns:
        [] focal loss (normalised by the number of centres) + ``regression_weight`` * L1 (summed over channels,
        mean over centres).
    """
    log_p, log_not_p = F.logsigmoid(heatmap_logits), F.logsigmoid(-heatmap_logits)
    p = torch.sigmoid(heatmap_logits)
    positive = heatmap_target == 1
    pos_term = (1 - p).pow(alpha) * log_p
    neg_term = (1 - heatmap_target).pow(beta) * p.pow(alpha) * log_not_p
    focal = torch.where(positive, pos_term, neg_term)  # [B, Cls, H, W]
    centres = positive.sum().clamp(min=1).to(heatmap_logits.dtype)
    heatmap_term = -focal.sum() / centres

    pred = regression.permute(0, 2, 3, 1)[regression_mask]  # [M, R]
    target = regression_target.permute(0, 2, 3, 1)[regression_mask]  # [M, R]
    finite = torch.isfinite(target)
    l1 = torch.where(
        finite, (pred - torch.where(finite, target, torch.zeros_like(target))).abs(), torch.zeros_like(pred)
    )  # [M, R]
    regression_term = l1.sum() / max(pred.shape[0], 1)
    return heatmap_term + regression_weight * regression_term


def velocity_area_loss(velocity: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """L1 of the regressed velocity over the splats' cells, weighed by the splat (``heads.velocity_area_targets``).

    Args:
        velocity: [B, 2, H, W] float — the regressed vx, vy (m/s).
        target: [B, 2, H, W] float — NaN where unknown (left out, as ``detection_loss`` does).
        weight: [B, H, W] float.

    Returns:
        [] Σ weight · |velocity − target|₁ / Σ weight over the cells with a known target; 0 without one.
    """
    known = torch.isfinite(target).all(dim=1) & (weight > 0)  # [B, H, W]
    error = (velocity - torch.nan_to_num(target)).abs().sum(dim=1)  # [B, H, W]
    w = torch.where(known, weight, torch.zeros_like(weight))
    return (w * torch.where(known, error, torch.zeros_like(error))).sum() / w.sum().clamp(min=1e-6)


@torch.no_grad()
def min_ade_fde(
    modes: torch.Tensor,
    mode_logits: torch.Tensor,
    future: torch.Tensor,
    future_mask: torch.Tensor,
    k: int,
    agent_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """minADE_k and minFDE_k of each agent, over its ``k`` most probable modes (each minimised on its own).

    ADE is the mean displacement over the agent's valid steps, FDE the displacement at its last valid step, as
    the nuScenes prediction metrics (there over the full horizon). Agents with no valid step are left out.

    Args:
        modes: [B, A, K, T, 2] float — predicted xy (m).
        mode_logits: [B, A, K] float.
        future: [B, A, T, 2] float — true xy (m).
        future_mask: [B, A, T] bool.
        k: modes considered, 1 <= k <= K.
        agent_mask: [B, A] bool — real agents; None: every agent with a valid step.

    Returns:
        ade: [N] float (m), fde: [N] float (m) — one per kept agent, in (sample, agent) order.
    """
    B, A, K, T, _ = modes.shape
    if not 1 <= k <= K:
        raise ValueError(f"k must be in [1, {K}], got {k}")
    valid = future_mask.any(dim=-1)  # [B, A]
    if agent_mask is not None:
        valid = valid & agent_mask
    top = mode_logits[valid].topk(k, dim=-1).indices  # [N, k]
    modes_v = modes[valid].gather(1, top[:, :, None, None].expand(-1, k, T, 2))  # [N, k, T, 2]
    mask_v = future_mask[valid]  # [N, T]
    error = _masked_displacements(modes_v, future[valid], mask_v)  # [N, k, T]
    ade = (error.sum(dim=-1) / mask_v.sum(dim=-1, keepdim=True)).min(dim=-1).values  # [N]
    last = (torch.arange(T, device=modes.device) * mask_v).argmax(dim=-1)  # [N] last valid step
    fde = error.gather(2, last[:, None, None].expand(-1, k, 1))[..., 0].min(dim=-1).values  # [N]
    return ade, fde
