"""One optimizer step of POPO or a baseline on a batch of `ScoredGroup`s (DESIGN §2).

The step: flatten the groups into sequences (positives only for POPO / WAPO), pack whole groups
into micro-batches under a token budget, run one online forward per micro-batch (+ the EMA base
model under no_grad for POPO), backward each micro-batch loss — normalised by step-level totals so
that the accumulated gradient is exactly the full-batch gradient — clip the global grad norm, AdamW,
cosine-with-warm-up LR, then the siamese momentum update ξ ← τξ + (1−τ)θ.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from popo.common.config import AlgorithmConfig, LearnerConfig
from popo.common.messages import ScoredGroup, unpack_f32, unpack_ids
from popo.learner import losses
from popo.learner.model import (
    Batch,
    Predictor,
    collate,
    ema_forward,
    policy_forward,
    reshard_all,
    sequence_logprobs,
)


@dataclass
class Sequence_:
    """One trainable completion, with its group's summary."""

    group: int  # index of its group in the step's batch
    prompt: np.ndarray  # [P] int
    completion: np.ndarray  # [C] int
    behaviour_logp: np.ndarray  # [C] float: log μ
    reward: float
    n_positive: int
    n_total: int
    version: int  # oldest policy version that produced the group


def flatten_groups(groups: Sequence[ScoredGroup], algorithm: str) -> list[Sequence_]:
    """ScoredGroups -> trainable sequences. POPO trains on positives only (reward > 0, whatever the
    verifier forwarded); WAPO on positives of mixed groups; GRPO / Dr. GRPO need every completion."""
    out: list[Sequence_] = []
    for gi, g in enumerate(groups):
        if algorithm in ("grpo", "dr_grpo") and g.forwarded != "all":
            raise ValueError(f"{algorithm} needs negatives; group {g.prompt_id} has positives only")
        if algorithm == "wapo" and not (0 < g.n_positive < g.n_total):
            continue  # A = 1 − n⁺/G is 0 for an all-positive group
        prompt = unpack_ids(g.prompt_token_ids).astype(np.int64)
        for c in g.completions:
            if algorithm in ("popo", "wapo") and c.reward <= 0:
                continue
            ids = unpack_ids(c.token_ids).astype(np.int64)
            if len(ids) == 0:
                continue
            out.append(
                Sequence_(
                    gi,
                    prompt,
                    ids,
                    unpack_f32(c.logprobs),
                    float(c.reward),
                    g.n_positive,
                    g.n_total,
                    g.version_min,
                )
            )
    return out


def pack_micro_batches(seqs: Sequence[Sequence_], token_budget: int) -> list[list[int]]:
    """Indices of `seqs` -> micro-batches of whole groups whose padded size N·L_max stays within
    `token_budget` (a single group larger than the budget goes alone). Groups are taken longest
    first so that similar lengths share a micro-batch and padding stays small."""
    by_group: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_group.setdefault(s.group, []).append(i)
    glen = {
        g: max(len(seqs[i].prompt) + len(seqs[i].completion) for i in ix)
        for g, ix in by_group.items()
    }
    order = sorted(by_group, key=lambda g: (-glen[g], g))
    out: list[list[int]] = []
    cur: list[int] = []
    cur_len = 0
    for g in order:
        ix = by_group[g]
        new_len = max(cur_len, glen[g])
        if cur and (len(cur) + len(ix)) * new_len > token_budget:
            out.append(cur)
            cur, new_len = [], glen[g]
        cur = cur + ix
        cur_len = new_len
    if cur:
        out.append(cur)
    return out


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up over ⌈ratio·total⌉ steps to 1, then cosine to 0 (§2)."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(module: nn.Module) -> None:
    """FSDP2: each decoder layer is its own unit (all-gathered just in time); the base model and
    lm_head are units too, because the forwards call `model.model` and `model.lm_head` directly
    rather than the root's forward."""
    from torch.distributed.fsdp import fully_shard

    base = getattr(module, "model", None)
    if base is not None:
        for layer in getattr(base, "layers", []):
            fully_shard(layer)
        fully_shard(base)
    if getattr(module, "lm_head", None) is not None:
        fully_shard(module.lm_head)
    fully_shard(module)


class Trainer:
    """Owns policy, EMA siamese copy, predictor, (GRPO) reference, optimizer and LR schedule.

    With a torch.distributed process group of more than one rank, every module is sharded with
    FSDP2 (`fully_shard`) and the step is data-parallel: every rank is given the same batch, trains
    the groups `g % world == rank`, and the losses keep the step-level normalisers of the whole
    batch, so the summed gradient equals the single-process one.

    Give it the model in float32: parameters (and so the EMA copy, whose τ = 0.999 updates a bf16
    tensor would round away) stay fp32 masters, and GPU steps run under bf16 autocast.
    """

    def __init__(
        self,
        model: nn.Module,
        learner: LearnerConfig,
        algorithm: AlgorithmConfig,
        *,
        max_completion_len: int,
        pad_id: int = 0,
        device: str | torch.device | None = None,
    ):
        self.cfg, self.algo = learner, algorithm
        self.max_completion_len = max_completion_len
        self.pad_id = pad_id
        if device is None:
            device = learner.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.step = 0
        self.generator = torch.Generator(device=self.device).manual_seed(learner.seed)

        self.rank, self.world = _world()
        self.sharded = self.world > 1
        self.policy = model.to(self.device).train()
        self.ema: nn.Module | None = None
        self.predictor: nn.Module | None = None
        self.reference: nn.Module | None = None
        if algorithm.name == "popo":
            self.ema = copy.deepcopy(self.policy).eval().requires_grad_(False)
            hidden = self.policy.config.hidden_size
            # seeded init (identical on every FSDP rank) without touching the global RNG
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(learner.seed)
                predictor = Predictor(
                    hidden, algorithm.predictor_hidden, algorithm.predictor_layers
                )
            self.predictor = predictor.to(self.device)
        if algorithm.name == "grpo" and algorithm.kl_coef > 0:
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        if self.sharded:
            # the copies are taken before sharding, so each is sharded like the policy
            for m in (self.policy, self.ema, self.reference, self.predictor):
                if m is not None:
                    _shard(m)
        params = list(self.policy.parameters())
        if self.predictor is not None:
            params += list(self.predictor.parameters())
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=learner.lr, weight_decay=learner.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(learner.total_steps, learner.warmup_ratio)
        )

    def _autocast(self):
        # bf16 autocast on GPU; CPU trains in fp32 (CPU bf16 matmuls are slow and less exact).
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, groups: Sequence[ScoredGroup]) -> dict[str, float]:
        """One optimizer step on `groups`. Returns the step's metrics; with nothing trainable
        (e.g. all groups all-negative) no update happens and `tokens` is 0."""
        t0 = time.perf_counter()
        algo = self.algo.name
        seqs = flatten_groups(groups, algo)
        if not seqs:
            return {"step": float(self.step), "tokens": 0.0, "sequences": 0.0, "skipped": 1.0}
        totals = self._step_totals(seqs)
        kl_step = (
            self.ema is not None
            and self.algo.kl_monitor_every > 0
            and self.step % self.algo.kl_monitor_every == 0
        )
        self.optimizer.zero_grad(set_to_none=True)
        acc: dict[str, Tensor] = {}
        mine = [i for i, s in enumerate(seqs) if s.group % self.world == self.rank]
        micro = [
            [mine[j] for j in ix]
            for ix in pack_micro_batches([seqs[i] for i in mine], self.cfg.micro_batch_tokens)
        ]
        n_micro = self._max_over_ranks(len(micro))
        for k in range(n_micro):
            # FSDP collectives need the same number of forwards on every rank: a rank with
            # fewer micro-batches runs a zero-weighted one
            scale = 1.0 if k < len(micro) else 0.0
            mb = [seqs[i] for i in (micro[k] if k < len(micro) else [0])]
            batch = collate(
                [s.prompt for s in mb],
                [s.completion for s in mb],
                [s.behaviour_logp for s in mb],
                self.pad_id,
            ).to(self.device)
            with self._autocast():
                loss, metrics = self._micro_batch_loss(mb, batch, totals, kl_step)
            # FSDP2 averages gradients over ranks; the losses are already normalised by
            # whole-batch totals, so the sum over ranks is wanted: scale by the world size
            (loss * (scale * self.world)).backward()
            if self.sharded:
                for m in (self.ema, self.reference):
                    if m is not None:
                        reshard_all(m)
            for key, v in metrics.items():
                acc[key] = acc.get(key, 0.0) + v.detach().float() * scale
        acc = self._sum_over_ranks(acc)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            losses.ema_update(self.ema, self.policy, self.algo.ema_tau)
        self.step += 1
        out = {k: float(v) for k, v in acc.items()}
        out.update(
            step=float(self.step),
            grad_norm=float(grad_norm),
            lr=lr,
            tokens=float(sum(len(s.completion) for s in seqs)),
            sequences=float(len(seqs)),
            groups=float(totals["groups"]),
            step_seconds=time.perf_counter() - t0,
        )
        return out

    def _max_over_ranks(self, n: int) -> int:
        if not self.sharded:
            return n
        import torch.distributed as dist

        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _sum_over_ranks(self, acc: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.sharded or not acc:
            return acc
        import torch.distributed as dist

        keys = sorted(acc)
        t = torch.stack([torch.as_tensor(acc[k], device=self.device).float() for k in keys])
        dist.all_reduce(t)
        return dict(zip(keys, t, strict=True))

    def _step_totals(self, seqs: Sequence[Sequence_]) -> dict[str, float]:
        """Step-level normalisers, so micro-batch losses sum to the full-batch loss."""
        tokens = float(sum(len(s.completion) for s in seqs))
        groups = len({s.group for s in seqs})
        return {"tokens": tokens, "groups": float(groups), "seqs": float(len(seqs))}

    def _micro_batch_loss(
        self, mb: Sequence[Sequence_], batch: Batch, totals: dict[str, float], kl_step: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        algo = self.algo
        dev = self.device
        group_ids = torch.tensor([s.group for s in mb], device=dev)
        out = policy_forward(self.policy, batch, need_entropy=algo.name == "popo")
        logp, mask = out.logp, batch.mask
        if algo.name == "popo":
            assert self.ema is not None and self.predictor is not None
            lengths = mask.sum(-1)
            # ℓ̄ from the training forward itself: no extra forward (§2)
            lbar = (logp.detach() * mask).sum(-1) / lengths
            positive = torch.ones(len(mb), dtype=torch.bool, device=dev)
            w = losses.popo_weights(
                lbar,
                positive,
                group_ids,
                algo.weight_temperature,
                algo.weight_mode,
                lengths if algo.length_norm else None,
            )
            pred = ema_feat = noise = None
            ema_logp = None
            if algo.alpha > 0 or kl_step:
                ema_feat, ema_logp = ema_forward(self.ema, batch, with_logp=kl_step)
            if algo.alpha > 0:
                pred = self.predictor(out.features)
                if algo.feature_noise_std > 0:
                    noise = torch.randn(ema_feat.shape, generator=self.generator, device=dev)
                    noise = noise * algo.feature_noise_std
            loss, m = losses.popo_loss(
                logp,
                batch.behaviour_logp,
                mask,
                w,
                out.entropy,
                pred,
                ema_feat,
                alpha=algo.alpha,
                beta_ent=algo.beta_ent,
                is_level=algo.is_level,
                is_cap=algo.is_cap,
                feature_noise=noise,
                n_tokens=totals["tokens"],
                w_total=totals["groups"],
            )
            n_groups_mb = len(set(group_ids.tolist()))
            m["weight_entropy"] = (
                losses.weight_entropy(w, group_ids) * n_groups_mb / totals["groups"]
            )
            if ema_logp is not None:
                m["ema_kl"] = (losses.k3_kl(logp.detach(), ema_logp) * mask).sum() / totals[
                    "tokens"
                ]
            return loss, m
        if algo.name == "grpo":
            rewards = torch.tensor([s.reward for s in mb], device=dev)
            adv = losses.group_advantages(rewards, group_ids).to(logp.dtype)
            ref_logp = None
            if self.reference is not None:
                with torch.no_grad():
                    ref_logp = policy_forward(self.reference, batch, need_entropy=False).logp
            return losses.grpo_loss(
                logp,
                batch.behaviour_logp,
                mask,
                adv,
                clip_low=algo.clip_low,
                clip_high=algo.clip_high,
                ref_logp=ref_logp,
                kl_coef=algo.kl_coef,
                n_tokens=totals["tokens"],
            )
        if algo.name == "dr_grpo":
            rewards = torch.tensor([s.reward for s in mb], device=dev)
            adv = losses.group_advantages(rewards, group_ids, normalize_std=False).to(logp.dtype)
            return losses.dr_grpo_loss(
                logp,
                batch.behaviour_logp,
                mask,
                adv,
                self.max_completion_len,
                clip_low=algo.clip_low,
                clip_high=algo.clip_high,
                n_seqs=totals["seqs"],
                n_tokens=totals["tokens"],
            )
        if algo.name == "wapo":
            n_pos = torch.tensor([s.n_positive for s in mb], device=dev)
            n_tot = torch.tensor([s.n_total for s in mb], device=dev)
            return losses.wapo_loss(
                logp,
                batch.behaviour_logp,
                mask,
                n_pos,
                n_tot,
                eps=algo.wapo_eps,
                n_tokens=totals["tokens"],
            )
        raise ValueError(f"unknown algorithm {algo.name!r}")

    def sequence_logprobs(self, prompt: np.ndarray, completion: np.ndarray) -> np.ndarray:
        """log π_θ of `completion` after `prompt` under the current policy -> [C] float32."""
        return sequence_logprobs(self.policy, prompt, completion, self.pad_id)
