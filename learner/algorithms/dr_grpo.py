"""Dr. GRPO: mean-centred advantages (no std), the clipped surrogate summed over tokens and
divided by the constant B · max_completion_len (no length bias)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from popo.common.config import DrGrpoConfig
from popo.common.messages import ScoredGroup
from popo.learner import losses
from popo.learner.algorithms.base import Algorithm, MicroBatch
from popo.learner.algorithms.grpo import check_negatives_forwarded

if TYPE_CHECKING:
    from popo.learner.trainer import Trainer


class DrGrpo(Algorithm):
    name = "dr_grpo"
    cfg: DrGrpoConfig

    def check_group(self, g: ScoredGroup) -> None:
        check_negatives_forwarded(self.name, g)

    def loss(self, trainer: Trainer, mb: MicroBatch) -> tuple[Tensor, losses.Metrics]:
        logp, batch = mb.out.logp, mb.batch
        rewards = torch.tensor([s.reward for s in mb.seqs], device=logp.device)
        adv = losses.group_advantages(rewards, mb.group_ids, normalize_std=False)
        return losses.dr_grpo_loss(
            logp,
            batch.behaviour_logp,
            batch.mask,
            adv.to(logp.dtype),
            trainer.max_completion_len,
            clip_low=self.cfg.clip_low,
            clip_high=self.cfg.clip_high,
            n_seqs=mb.totals["seqs"],
            n_tokens=mb.totals["tokens"],
        )
