"""One optimizer step of POPO or a baseline on a batch of `ScoredGroup`s.

The step: flatten the groups into the sequences the algorithm trains (`popo.learner.algorithms`),
pack whole groups into micro-batches under a token budget, run one online forward per micro-batch
(+ whatever auxiliary forward the algorithm needs, e.g. POPO's EMA base model under no_grad), and
backward each micro-batch loss — normalised by step-level totals so that the accumulated gradient
is exactly the full-batch gradient —, clip the policy's grad norm (a predictor head's apart), AdamW,
cosine-with-warm-up LR, then the algorithm's post-step update (POPO: ξ ← τξ + (1−τ)θ).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from popo.common.config import LearnerConfig
from popo.common.messages import ScoredGroup, unpack_f32, unpack_ids
from popo.learner.algorithms import Algorithm, MicroBatch, make_algorithm
from popo.learner.model import (
    Batch,
    block_rows,
    collate,
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


def flatten_groups(groups: Sequence[ScoredGroup], algorithm: Algorithm | str) -> list[Sequence_]:
    """ScoredGroups -> the sequences `algorithm` trains (e.g. POPO: the positives, whatever the
    verifier forwarded; GRPO: every completion). Empty completions are dropped."""
    algo = make_algorithm(algorithm) if isinstance(algorithm, str) else algorithm
    out: list[Sequence_] = []
    for gi, g in enumerate(groups):
        algo.check_group(g)
        if not algo.trains_group(g):
            continue
        prompt = unpack_ids(g.prompt_token_ids).astype(np.int64)
        for c in g.completions:
            if not algo.trains_completion(c):
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
    """LR multiplier: linear warm-up over ⌈ratio·total⌉ steps to 1, then cosine to 0."""
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


def _full(t: Tensor) -> Tensor:
    """A norm as a plain tensor (clip_grad_norm_ returns a DTensor under FSDP2)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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
        algorithm: Any,
        *,
        max_completion_len: int,
        temperature: float = 1.0,
        pad_id: int = 0,
        device: str | torch.device | None = None,
    ):
        self.cfg, self.algo = learner, algorithm
        self.max_completion_len = max_completion_len
        # π is the distribution the actors sample from: logits / T (TRL does the same)
        self.temperature = temperature
        self.chunk_bytes = learner.logits_chunk_mib << 20
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
        self.algorithm = make_algorithm(algorithm)
        self.ema: nn.Module | None = None
        self.predictor: nn.Module | None = None
        self.reference: nn.Module | None = None
        if self.algorithm.needs_ema:
            self.ema = copy.deepcopy(self.policy).eval().requires_grad_(False)
        # seeded init (identical on every FSDP rank) without touching the global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(learner.seed)
            predictor = self.algorithm.make_predictor(self.policy.config.hidden_size)
        if predictor is not None:
            self.predictor = predictor.to(self.device)
        if self.algorithm.needs_reference:
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        if self.sharded:
            # the copies are taken before sharding, so each is sharded like the policy
            for m in (self.policy, self.ema, self.reference, self.predictor):
                if m is not None:
                    _shard(m)
        self.policy_params = list(self.policy.parameters())
        params = list(self.policy_params)
        self.predictor_params = [] if self.predictor is None else list(self.predictor.parameters())
        params += self.predictor_params
        self.params = params
        # the fused kernel updates in place; the default per-tensor AdamW on CPU builds two
        # temporaries the size of the largest parameter (the vocabulary matrix) on every step
        self.optimizer = torch.optim.AdamW(
            params,
            lr=learner.lr,
            weight_decay=learner.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
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
        seqs = flatten_groups(groups, self.algorithm)
        if not seqs:
            return {"step": float(self.step), "tokens": 0.0, "sequences": 0.0, "skipped": 1.0}
        totals = self._step_totals(seqs)
        kl_step = self.algorithm.kl_monitor(self.step)
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
        t_fb = time.perf_counter()
        # the policy's norm on its own: a large predictor gradient must not shrink the policy's step
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.policy_params, self.cfg.grad_clip))
        if self.predictor_params:
            pred_clip = getattr(self.algo, "predictor_grad_clip", None)
            pred_norm = _full(
                torch.nn.utils.clip_grad_norm_(self.predictor_params, pred_clip or math.inf)
            )
            acc["predictor_grad_norm"] = pred_norm
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        t_opt = time.perf_counter()
        self.algorithm.after_step(self)
        self.step += 1
        t_end = time.perf_counter()
        out = {k: float(v) for k, v in acc.items()}
        out.update(
            step=float(self.step),
            grad_norm=float(grad_norm),
            lr=lr,
            tokens=float(sum(len(s.completion) for s in seqs)),
            sequences=float(len(seqs)),
            groups=float(totals["groups"]),
            step_seconds=t_end - t0,
            # where the step's time went: every micro-batch's forward and backward (with the
            # collation), clipping + optimizer, and the algorithm's after-step (POPO's EMA update)
            phase_seconds_forward_backward=t_fb - t0,
            phase_seconds_optimizer=t_opt - t_fb,
            phase_seconds_after_step=t_end - t_opt,
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

    def forward_kwargs(self, batch: Batch) -> dict[str, Any]:
        """Keyword arguments of every training forward of `batch` (policy, EMA, reference)."""
        fwd: dict[str, Any] = {"temperature": self.temperature, "chunk_bytes": self.chunk_bytes}
        if self.sharded:
            # every FSDP rank must call lm_head (an FSDP unit) as often as the others
            rows = block_rows(self.policy.lm_head, batch.n_tokens, self.chunk_bytes)
            fwd["min_blocks"] = self._max_over_ranks(-(-batch.n_tokens // rows))
        return fwd

    def _micro_batch_loss(
        self, mb: Sequence[Sequence_], batch: Batch, totals: dict[str, float], kl_step: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        out = policy_forward(
            self.policy,
            batch,
            need_entropy=self.algorithm.needs_entropy,
            # the step only calls backward(), and puts no hooks on the vocabulary matrices
            # unless FSDP shards them
            grad_in_place=not self.sharded,
            **self.forward_kwargs(batch),
        )
        group_ids = torch.tensor([s.group for s in mb], device=self.device)
        return self.algorithm.loss(self, MicroBatch(mb, batch, group_ids, out, totals, kl_step))

    def sequence_logprobs(self, prompt: np.ndarray, completion: np.ndarray) -> np.ndarray:
        """log π_θ of `completion` after `prompt` under the current policy -> [C] float32."""
        return sequence_logprobs(self.policy, prompt, completion, self.pad_id)
