"""The interface every algorithm implements: which sequences it trains, whether a group carries a
learning signal, which auxiliary models it needs, and its micro-batch loss over the pure functions
of `popo.learner.losses`. The trainer owns the models, the optimizer and the step; an algorithm
only decides what the step optimises."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from popo.common.messages import ScoredCompletion, ScoredGroup
from popo.learner.losses import Metrics
from popo.learner.model import Batch, PolicyOutput

if TYPE_CHECKING:
    from popo.learner.trainer import Sequence_, Trainer


@dataclass
class MicroBatch:
    """One micro-batch of whole groups, after the policy's forward."""

    seqs: Sequence[Sequence_]  # its N sequences
    batch: Batch  # collated tensors, [N, T] completion-aligned
    group_ids: Tensor  # [N] index of each sequence's group in the step's batch
    out: PolicyOutput  # log π_θ [N, T] (at the sampling temperature), entropy, features [N, H]
    totals: dict[str, float]  # step-level normalisers: tokens, seqs, groups (whole batch)
    kl_step: bool  # whether this step logs the KL monitor


class Algorithm(ABC):
    """One objective. Subclasses set `name` (the config's `algorithm.name`) and implement `loss`."""

    name: ClassVar[str]
    no_signal_reason: ClassVar[str] = "zero_advantage"
    """Ledger skip reason of a group without signal."""
    needs_entropy: ClassVar[bool] = False
    """Whether `loss` reads the token entropies (they cost a vocabulary-wide reduction)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    # --- which sequences ----------------------------------------------------------------------

    def check_group(self, g: ScoredGroup) -> None:
        """Raise ValueError when a group cannot be trained by this algorithm at all."""
        return None

    def trains_group(self, g: ScoredGroup) -> bool:
        """Whether any completion of `g` is trained."""
        return True

    def trains_completion(self, c: ScoredCompletion) -> bool:
        """Whether completion `c` (of a trained group) is one of the step's sequences."""
        return True

    def has_signal(self, g: ScoredGroup) -> bool:
        """Whether the group moves the policy; one without is skipped (`no_signal_reason`).
        Advantage-based objectives: only mixed groups (an all-same group has zero advantage)."""
        return 0 < g.n_positive < g.n_total

    # --- auxiliary models ---------------------------------------------------------------------

    needs_ema: ClassVar[bool] = False
    """An EMA siamese copy of the policy, updated after every optimizer step (`after_step`)."""
    needs_reference: bool = False
    """A frozen copy of the initial policy."""

    def make_predictor(self, hidden_size: int) -> nn.Module | None:
        """A head trained with the policy (its own optimizer parameter group), or None."""
        return None

    def kl_monitor(self, step: int) -> bool:
        """Whether step `step` logs KL(π_θ ‖ π_ξ) (needs the EMA's logits)."""
        return False

    def after_step(self, trainer: Trainer) -> None:
        """Called after each optimizer step (e.g. the EMA update)."""
        return None

    # --- the objective ------------------------------------------------------------------------

    @abstractmethod
    def loss(self, trainer: Trainer, mb: MicroBatch) -> tuple[Tensor, Metrics]:
        """The micro-batch's share of the step loss (normalised by the step-level `mb.totals`, so
        that the micro-batch losses sum to the full-batch loss) and its metrics (summed over the
        step's micro-batches)."""
