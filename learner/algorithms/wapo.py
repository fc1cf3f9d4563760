"""WAPO: the positives of mixed groups only, advantage A = 1 − n⁺/G, one-sided clip
min(ρ, 1 + ε)·A against μ; runs on the positives stream plus the group summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from popo.common.config import WapoConfig
from popo.common.messages import ScoredCompletion, ScoredGroup
from popo.learner import losses
from popo.learner.algorithms.base import Algorithm, MicroBatch

if TYPE_CHECKING:
    from popo.learner.trainer import Trainer


class Wapo(Algorithm):
    name = "wapo"
    cfg: WapoConfig

    def trains_group(self, g: ScoredGroup) -> bool:
        return 0 < g.n_positive < g.n_total  # A = 1 − n⁺/G is 0 for an all-positive group

    def trains_completion(self, c: ScoredCompletion) -> bool:
        return c.reward > 0

    def loss(self, trainer: Trainer, mb: MicroBatch) -> tuple[Tensor, losses.Metrics]:
        logp, batch = mb.out.logp, mb.batch
        dev = logp.device
        return losses.wapo_loss(
            logp,
            batch.behaviour_logp,
            batch.mask,
            torch.tensor([s.n_positive for s in mb.seqs], device=dev),
            torch.tensor([s.n_total for s in mb.seqs], device=dev),
            eps=self.cfg.wapo_eps,
            n_tokens=mb.totals["tokens"],
        )
