"""The staleness bound, in one place: which actors get train leases, how many may be in flight, and
which buffered groups may still be trained.

Versions count publishes. A group's lag is `learner version - version_min`, the oldest weights
that sampled any of its tokens. Admission keeps lags within `max_staleness` for groups that come
back in time; `fresh` catches the rest (a slow actor, a reload that came late) before training.
"""

from __future__ import annotations

from dataclasses import dataclass

from popo.common.config import LearnerConfig
from popo.learner.ledger import Received


@dataclass(frozen=True)
class StalenessPolicy:
    max_staleness: int
    """Largest lag (versions) of a trained group; 0 is a synchronous run."""
    prompts_per_step: int

    @classmethod
    def from_config(cls, lc: LearnerConfig) -> StalenessPolicy:
        return cls(lc.max_staleness, lc.prompts_per_step)

    def admits(self, actor_version: int, version: int) -> bool:
        """Whether an actor serving `actor_version` may get train leases while the learner is at
        `version`: its samples would otherwise be too stale to train on, so it reloads first."""
        return actor_version >= version - self.max_staleness

    def room(self, in_flight: int, actor_version: int, version: int) -> int:
        """Train leases an actor serving `actor_version` may still be given while `in_flight` are
        handed out and not yet trained and the learner is at `version`.

        Batches take groups oldest lease first, `prompts_per_step` a step, one version a step, so
        a lease issued behind `in_flight` others is trained by version about
        `version + (in_flight + i) // prompts_per_step`; it stays within the bound only while that
        is at most `actor_version + max_staleness`. For an actor that serves `version` this is
        `max_staleness + 1` steps' worth in flight; each version an actor lags takes one step's
        worth off its room instead of handing it leases it would sample only to have them
        skipped as too stale."""
        steps = self.max_staleness + 1 - max(0, version - actor_version)
        return steps * self.prompts_per_step - in_flight

    def fresh(self, r: Received, version: int) -> bool:
        """Whether a buffered group may be trained by the policy at `version`. A group rewound by
        a resume was fresh when first trained and stays trainable."""
        return r.resumed or version - r.version_min <= self.max_staleness
