"""GRPO: group-normalised advantages, the asymmetric PPO-clipped surrogate against μ, token mean,
and an optional k3 KL to a frozen reference."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from popo.common.config import GrpoConfig
from popo.common.messages import ScoredGroup
from popo.learner import losses
from popo.learner.algorithms.base import Algorithm, MicroBatch
from popo.learner.model import policy_forward

if TYPE_CHECKING:
    from popo.learner.trainer import Trainer


def check_negatives_forwarded(name: str, g: ScoredGroup) -> None:
    """Advantage baselines need every completion of a group, negatives included."""
    if g.forwarded != "all":
        raise ValueError(f"{name} needs negatives; group {g.prompt_id} has positives only")


class Grpo(Algorithm):
    name = "grpo"
    cfg: GrpoConfig

    def __init__(self, cfg: GrpoConfig):
        super().__init__(cfg)
        self.needs_reference = cfg.kl_coef > 0

    def check_group(self, g: ScoredGroup) -> None:
        check_negatives_forwarded(self.name, g)

    def loss(self, trainer: Trainer, mb: MicroBatch) -> tuple[Tensor, losses.Metrics]:
        logp, batch = mb.out.logp, mb.batch
        rewards = torch.tensor([s.reward for s in mb.seqs], device=logp.device)
        adv = losses.group_advantages(rewards, mb.group_ids).to(logp.dtype)
        ref_logp = None
        if trainer.reference is not None:
            with torch.no_grad():
                fwd = trainer.forward_kwargs(batch)
                ref_logp = policy_forward(trainer.reference, batch, False, **fwd).logp
        return losses.grpo_loss(
            logp,
            batch.behaviour_logp,
            batch.mask,
            adv,
            clip_low=self.cfg.clip_low,
            clip_high=self.cfg.clip_high,
            ref_logp=ref_logp,
            kl_coef=self.cfg.kl_coef,
            n_tokens=mb.totals["tokens"],
        )
