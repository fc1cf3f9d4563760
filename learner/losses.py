"""Pure loss functions of the learner (docs/architecture.md, Loss): tensors in, `(loss, metrics)` out, no I/O.

Notation follows docs/architecture.md, Loss. Shapes: N sequences (completions) in a micro-batch, T completion tokens
(right-padded), H hidden size. `mask` [N, T] is 1 on real completion tokens. Every loss takes optional
step-level normalisers (`n_tokens`, `w_total`, `n_seqs`) so that a step split into micro-batches sums
to exactly the full-batch loss under gradient accumulation; by default they are the micro-batch's own.

Metrics values are detached 0-d tensors (the trainer sums them across micro-batches and calls
`.item()` once per step, avoiding a device sync per micro-batch).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

WeightMode = Literal["softmax", "uniform"]
ISLevel = Literal["token", "sequence", "none"]
Normalization = Literal["step", "sequence"]
Metrics = dict[str, Tensor]


def _f32(x: Tensor) -> Tensor:
    """Detached, at least float32 (bf16 weights/advantages would be too coarse); float64 stays."""
    x = x.detach()
    return x if x.dtype == torch.float64 else x.float()


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """group ids of any values [N] -> dense ids 0..G-1 [N] and G."""
    uniq, dense = torch.unique(group_ids, return_inverse=True)
    return dense, int(uniq.numel())


def popo_weights(
    seq_logp_mean: Tensor,
    positive: Tensor,
    group_ids: Tensor,
    temperature: float = 1.0,
    mode: WeightMode = "softmax",
    length: Tensor | None = None,
) -> Tensor:
    """Positive-set redistribution weights, detached.

    seq_logp_mean [N]: ℓ̄_i, mean token log-prob of completion i under the current policy.
    positive [N] bool: r_i = 1. group_ids [N]: the prompt each completion belongs to.
    length [N] (optional): |y_i|; when given, w_i is divided by it and renormalised per group.
    Returns w [N]: for i ∈ S⁺(x), softmax_{j∈S⁺(x)}(ℓ̄_j / T_w) (`softmax`) or 1/|S⁺(x)| (`uniform`);
    0 for negatives, so each group with a positive sums to 1 and a group without one is all zero.
    """
    positive = positive.bool()
    dense, n_groups = _group_index(group_ids)
    x = _f32(seq_logp_mean)
    if mode == "softmax":
        logits = torch.where(positive, x / temperature, torch.full_like(x, -torch.inf))
        # Subtract each group's max before exp: a group softmax that cannot overflow.
        gmax = torch.full((n_groups,), -torch.inf, dtype=x.dtype, device=x.device)
        gmax = gmax.scatter_reduce(0, dense, logits, reduce="amax", include_self=True)
        shift = torch.where(positive, logits - gmax[dense], torch.zeros_like(x))
        unnorm = torch.where(positive, shift.exp(), torch.zeros_like(x))
    elif mode == "uniform":
        unnorm = positive.to(x.dtype)
    else:
        raise ValueError(f"unknown weight mode {mode!r}")
    if length is not None:
        unnorm = unnorm / length.to(x.dtype).clamp_min(1)
    gsum = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add(0, dense, unnorm)
    denom = gsum[dense]
    return torch.where(denom > 0, unnorm / denom.clamp_min(torch.finfo(x.dtype).tiny), 0.0)


def truncated_is(
    logp: Tensor, behaviour_logp: Tensor, mask: Tensor, level: ISLevel, cap: float
) -> tuple[Tensor, Tensor]:
    """Truncated importance ratio ρ = min(π_θ/μ, ρ̄), detached (staleness correction).

    logp, behaviour_logp, mask [N, T]. `token`: ρ_i,t = min(exp(log π − log μ), ρ̄) per token.
    `sequence`: one ρ_i per completion from the length-normalised (geometric-mean) ratio
    exp(mean_t(log π − log μ)) — a product over hundreds of tokens would be 0 or ∞ — broadcast to its
    tokens. `none`: ρ = 1 (the authors' synchronous POPO).
    Returns (ρ [N, T], clipped [N, T] bool: where the cap was hit).
    """
    if level == "none":
        return torch.ones_like(logp), torch.zeros_like(logp, dtype=torch.bool)
    log_ratio = (logp.detach() - behaviour_logp.detach()) * mask
    if level == "sequence":
        seq = log_ratio.sum(-1) / mask.sum(-1).clamp_min(1)  # [N]
        log_ratio = seq[:, None].expand_as(logp)
    elif level != "token":
        raise ValueError(f"unknown is_level {level!r}")
    ratio = log_ratio.exp()
    clipped = (ratio > cap) & mask.bool()
    return ratio.clamp(max=cap), clipped


def bounded_cosine(pred: Tensor, target: Tensor, w: Tensor, w_total: Tensor | float | None = None):
    """L_sim = −Σ_i w_i · cos(pred_i, sg(target_i)) / Σ_i w_i ∈ [−1, 1].

    pred [N, H] (predictor output, online branch), target [N, H] (EMA features, noise already added),
    w [N]. Returns (L_sim, mean cosine similarity weighted by w).
    """
    dtype = torch.promote_types(pred.dtype, torch.float32)
    cos = F.cosine_similarity(pred.to(dtype), target.detach().to(dtype), dim=-1)  # [N]
    total = w.sum() if w_total is None else w_total
    loss = -(w.detach() * cos).sum() / total
    return loss, -loss.detach()


def popo_loss(
    logp: Tensor,
    behaviour_logp: Tensor,
    mask: Tensor,
    weights: Tensor,
    entropy: Tensor,
    pred_features: Tensor | None,
    ema_features: Tensor | None,
    *,
    alpha: float = 0.1,
    beta_ent: float = 0.01,
    is_level: ISLevel = "token",
    is_cap: float = 2.0,
    feature_noise: Tensor | None = None,
    n_tokens: Tensor | float | None = None,
    w_total: Tensor | float | None = None,
    normalization: Normalization = "step",
    n_seqs: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """POPO: L = L_NLL + α·L_sim + β_ent·L_ent.

    logp [N, T]: log π_θ(y_i,t) of the completion tokens (with grad). behaviour_logp [N, T]: log μ.
    mask [N, T]. weights [N]: w_i from `popo_weights` (used detached; 0 for negatives).
    entropy [N, T]: token entropy of π_θ (with grad). pred_features [N, H]: h_φ(f_θ(y_i));
    ema_features [N, H]: f_ξ(y_i) (used detached); feature_noise [N, H]: ε ~ N(0, σ²) (training only).
    n_tokens: positive-completion tokens in the step's batch (default Σ mask over rows with w > 0).
    w_total: Σ_i w_i over the step's batch (default: this batch's).

    L_NLL = Σ_i Σ_t w_i ρ_i,t (−log π_θ) m_i,t / n_tokens, ρ from `truncated_is`.
    L_sim = −Σ_i w_i cos(pred_i, sg(ema_i + ε)) / Σ_i w_i.
    L_ent = −Σ entropy · m / n_tokens over positive completions only: negatives never reach the
    learner (the reference code averaged over all completions, negatives included).
    With is_level="none" this is exactly the authors' synchronous formulation.

    normalization="sequence" reproduces the authors' code, which normalises NLL and similarity
    within each micro-batch of one sequence and averages the micro-batches (n_seqs: positive
    sequences in the step, default this batch's): L_NLL = Σ_i w_i Σ_t ρ (−log π) m / |y_i| / n_seqs,
    L_sim = −Σ_{i: w_i > 0} cos_i / n_seqs (each sequence's own weight cancels). L_ent unchanged.
    """
    w = weights.detach().to(logp.dtype)
    pos = (w > 0).to(logp.dtype)[:, None] * mask  # [N, T] tokens of positive completions
    n_tok = pos.sum() if n_tokens is None else n_tokens
    rho, clipped = truncated_is(logp, behaviour_logp, mask, is_level, is_cap)
    if normalization == "step":
        nll = (w[:, None] * rho * (-logp) * mask).sum() / n_tok
    elif normalization == "sequence":
        n_seq = (w > 0).sum() if n_seqs is None else n_seqs
        per_seq = (rho * (-logp) * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # [N]
        nll = (w * per_seq).sum() / n_seq
    else:
        raise ValueError(f"unknown normalization {normalization!r}")
    ent_mean = (entropy * pos).sum() / n_tok
    l_ent = -ent_mean
    loss = nll + beta_ent * l_ent
    metrics: Metrics = {
        "loss_nll": nll.detach(),
        "loss_ent": l_ent.detach(),
        "entropy": ent_mean.detach(),
        "is_clip_fraction": (clipped.to(logp.dtype) * pos).sum() / n_tok,
        "is_ratio_mean": (rho * pos).sum() / n_tok,
    }
    if alpha > 0 and pred_features is not None and ema_features is not None:
        target = ema_features.detach()
        if feature_noise is not None:
            target = target + feature_noise
        if normalization == "sequence":
            # per-sequence micro-batches: −w_i cos_i / w_i, averaged over the step's sequences
            l_sim, cos = bounded_cosine(pred_features, target, (w > 0).to(w.dtype), n_seq)
        else:
            l_sim, cos = bounded_cosine(pred_features, target, w, w_total)
        loss = loss + alpha * l_sim
        metrics["loss_sim"] = l_sim.detach()
        metrics["cos_sim"] = cos
    metrics["loss"] = loss.detach()
    return loss, metrics


def weight_entropy(weights: Tensor, group_ids: Tensor) -> Tensor:
    """Mean over groups with a positive of −Σ_i w_i log w_i (0: one completion takes all the weight;
    log|S⁺|: uniform). weights, group_ids [N] -> 0-d tensor."""
    dense, n_groups = _group_index(group_ids)
    w = _f32(weights)
    h = torch.where(w > 0, -w * w.clamp_min(1e-30).log(), torch.zeros_like(w))
    per_group = torch.zeros(n_groups, dtype=w.dtype, device=w.device).index_add(0, dense, h)
    has_pos = (
        torch.zeros(n_groups, dtype=w.dtype, device=w.device).index_add(
            0, dense, (w > 0).to(w.dtype)
        )
        > 0
    )
    return per_group[has_pos].mean() if has_pos.any() else per_group.sum() * 0


def group_advantages(
    rewards: Tensor, group_ids: Tensor, normalize_std: bool = True, eps: float = 1e-4
) -> Tensor:
    """GRPO / Dr. GRPO advantages. rewards, group_ids [N] -> A [N].

    A_i = (r_i − mean_g) / (std_g + eps) with the unbiased (Bessel) group std as in DeepSeekMath/TRL
    (a group of one has std 0), or A_i = r_i − mean_g when `normalize_std` is False (Dr. GRPO).
    """
    dense, n_groups = _group_index(group_ids)
    r = _f32(rewards)
    zeros = torch.zeros(n_groups, dtype=r.dtype, device=r.device)
    count = zeros.index_add(0, dense, torch.ones_like(r))
    mean = zeros.index_add(0, dense, r) / count
    centred = r - mean[dense]
    if not normalize_std:
        return centred
    var = zeros.index_add(0, dense, centred**2)
    std = (var / (count - 1).clamp_min(1)).sqrt()
    return centred / (std[dense] + eps)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator of KL(π ‖ π_ref) per sampled token: exp(r) − r − 1, r = log π_ref − log π.
    [N, T] -> [N, T], ≥ 0."""
    r = ref_logp - logp
    return r.exp() - r - 1


def _clipped_surrogate(
    logp: Tensor, behaviour_logp: Tensor, adv: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """PPO: −min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)A) per token, ρ = π_θ/μ with grad. -> ([N, T], clipped)."""
    ratio = (logp - behaviour_logp.detach()).exp()
    a = adv[:, None]
    unclipped = ratio * a
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * a
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def grpo_loss(
    logp: Tensor,
    behaviour_logp: Tensor,
    mask: Tensor,
    advantages: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    n_tokens: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """GRPO: token-mean of the asymmetric PPO-clipped surrogate against μ, + k3 KL.

    logp, behaviour_logp, mask [N, T]; advantages [N] from `group_advantages`; ref_logp [N, T]:
    frozen reference log-probs (only read when kl_coef > 0). n_tokens: tokens in the step's batch.
    """
    n_tok = mask.sum() if n_tokens is None else n_tokens
    per_tok, clipped = _clipped_surrogate(logp, behaviour_logp, advantages, clip_low, clip_high)
    pg = (per_tok * mask).sum() / n_tok
    loss = pg
    metrics: Metrics = {
        "loss_pg": pg.detach(),
        "clip_fraction": (clipped.to(logp.dtype) * mask).sum() / n_tok,
    }
    if kl_coef > 0 and ref_logp is not None:
        kl = (k3_kl(logp, ref_logp.detach()) * mask).sum() / n_tok
        loss = loss + kl_coef * kl
        metrics["kl_ref"] = kl.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def dr_grpo_loss(
    logp: Tensor,
    behaviour_logp: Tensor,
    mask: Tensor,
    advantages: Tensor,
    max_completion_len: int,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    n_seqs: Tensor | float | None = None,
    n_tokens: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """Dr. GRPO: A_i = r_i − mean (no std), clipped surrogate summed over tokens and
    divided by the constant B · max_completion_len (no length bias).

    logp, behaviour_logp, mask [N, T]; advantages [N] (`group_advantages(..., normalize_std=False)`);
    n_seqs: B, sequences in the step's batch (default N); n_tokens only normalises the clip metric.
    """
    b = logp.shape[0] if n_seqs is None else n_seqs
    per_tok, clipped = _clipped_surrogate(logp, behaviour_logp, advantages, clip_low, clip_high)
    loss = (per_tok * mask).sum() / (b * max_completion_len)
    n_tok = mask.sum().clamp_min(1) if n_tokens is None else n_tokens
    metrics: Metrics = {
        "loss_pg": loss.detach(),
        "clip_fraction": (clipped.to(logp.dtype) * mask).sum() / n_tok,
        "loss": loss.detach(),
    }
    return loss, metrics


def wapo_advantages(n_positive: Tensor, n_total: Tensor) -> Tensor:
    """WAPO advantage of a positive: A = r − mean = 1 − n⁺/G. [N], [N] -> [N]."""
    return 1.0 - n_positive.float() / n_total.float()


def wapo_loss(
    logp: Tensor,
    behaviour_logp: Tensor,
    mask: Tensor,
    n_positive: Tensor,
    n_total: Tensor,
    *,
    eps: float = 9.0,
    n_tokens: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """WAPO: positives of mixed groups only, A = 1 − n⁺/G ≥ 0, objective
    min(ρ, 1+ε)·A per token with ρ = π_θ/μ (one-sided clip: only the upper side matters as A ≥ 0);
    token-mean. Rows of all-positive groups (A = 0) are dropped from the loss and the token count.

    logp, behaviour_logp, mask [N, T] (positives only); n_positive, n_total [N]: the group summary.
    """
    mixed = ((n_positive > 0) & (n_positive < n_total)).to(logp.dtype)  # [N]
    m = mask * mixed[:, None]
    n_tok = m.sum() if n_tokens is None else n_tokens
    adv = wapo_advantages(n_positive, n_total).to(logp.dtype)
    ratio = (logp - behaviour_logp.detach()).exp()
    obj = torch.minimum(ratio, torch.full_like(ratio, 1 + eps)) * adv[:, None]
    loss = -(obj * m).sum() / n_tok
    metrics: Metrics = {
        "loss_pg": loss.detach(),
        "clip_fraction": ((ratio > 1 + eps).to(logp.dtype) * m).sum() / n_tok,
        "loss": loss.detach(),
    }
    return loss, metrics


def nll_loss(
    logp: Tensor, mask: Tensor, n_tokens: Tensor | float | None = None
) -> tuple[Tensor, Metrics]:
    """Plain token-mean NLL (SFT / benchmark reference). [N, T], [N, T] -> 0-d."""
    n_tok = mask.sum() if n_tokens is None else n_tokens
    loss = -(logp * mask).sum() / n_tok
    return loss, {"loss": loss.detach(), "loss_nll": loss.detach()}


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, tau: float) -> None:
    """Siamese momentum update ξ ← τ·ξ + (1−τ)·θ, in place on `target`'s parameters
    and floating buffers. τ = 0 copies θ exactly, τ = 1 leaves ξ exactly unchanged (lerp is exact at
    its end points)."""
    t_params = [p for p in target.parameters()]
    o_params = [p for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("EMA target and online module have different parameter lists")
    if tau == 1.0:
        return
    torch._foreach_lerp_(t_params, [p.detach() for p in o_params], 1.0 - tau)
    for tb, ob in zip(target.buffers(), online.buffers(), strict=True):
        if tb.is_floating_point():
            tb.lerp_(ob, 1.0 - tau)
        else:
            tb.copy_(ob)
