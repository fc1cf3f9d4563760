"""POPO: positive-only policy optimisation — weighted NLL over the positives with a bounded
importance correction, the EMA-siamese bounded cosine similarity and an entropy bonus."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from popo.common.config import PopoConfig
from popo.common.messages import ScoredCompletion, ScoredGroup
from popo.learner import losses
from popo.learner.algorithms.base import Algorithm, MicroBatch
from popo.learner.model import Predictor, ema_forward

if TYPE_CHECKING:
    from popo.learner.trainer import Trainer


class Popo(Algorithm):
    name = "popo"
    no_signal_reason = "all_negative"
    needs_entropy = True
    needs_ema = True
    cfg: PopoConfig

    def trains_completion(self, c: ScoredCompletion) -> bool:
        # positives only, whatever the verifier forwarded
        return c.reward > 0

    def has_signal(self, g: ScoredGroup) -> bool:
        return g.n_positive > 0

    def make_predictor(self, hidden_size: int) -> nn.Module | None:
        return Predictor(hidden_size, self.cfg.predictor_hidden, self.cfg.predictor_layers)

    def kl_monitor(self, step: int) -> bool:
        every = self.cfg.kl_monitor_every
        return every > 0 and step % every == 0

    def after_step(self, trainer: Trainer) -> None:
        losses.ema_update(trainer.ema, trainer.policy, self.cfg.ema_tau)

    def loss(self, trainer: Trainer, mb: MicroBatch) -> tuple[Tensor, losses.Metrics]:
        cfg, out, batch = self.cfg, mb.out, mb.batch
        logp, mask = out.logp, batch.mask
        lengths = mask.sum(-1)
        # ℓ̄ from the training forward itself: no extra forward
        lbar = (logp.detach() * mask).sum(-1) / lengths
        positive = torch.ones(len(mb.seqs), dtype=torch.bool, device=logp.device)
        w = losses.popo_weights(
            lbar,
            positive,
            mb.group_ids,
            cfg.weight_temperature,
            cfg.weight_mode,
            lengths if cfg.length_norm else None,
        )
        pred = ema_feat = noise = ema_logp = None
        if cfg.alpha > 0 or mb.kl_step:
            ema_feat, ema_logp = ema_forward(
                trainer.ema, batch, with_logp=mb.kl_step, **trainer.forward_kwargs(batch)
            )
        if cfg.alpha > 0:
            pred = trainer.predictor(out.features)
            if cfg.feature_noise_std > 0:
                noise = torch.randn(
                    ema_feat.shape, generator=trainer.generator, device=ema_feat.device
                )
                noise = noise * cfg.feature_noise_std
        loss, m = losses.popo_loss(
            logp,
            batch.behaviour_logp,
            mask,
            w,
            out.entropy,
            pred,
            ema_feat,
            alpha=cfg.alpha,
            beta_ent=cfg.beta_ent,
            is_level=cfg.is_level,
            is_cap=cfg.is_cap,
            feature_noise=noise,
            n_tokens=mb.totals["tokens"],
            w_total=mb.totals["groups"],
            normalization=cfg.normalization,
            n_seqs=mb.totals["seqs"],
        )
        n_groups_mb = len(set(mb.group_ids.tolist()))
        m["weight_entropy"] = (
            losses.weight_entropy(w, mb.group_ids) * n_groups_mb / mb.totals["groups"]
        )
        if ema_logp is not None:
            kl = (losses.k3_kl(logp.detach(), ema_logp) * mask).sum()
            m["ema_kl"] = kl / mb.totals["tokens"]
        return loss, m
