"""When a failed role comes back: a sliding window of recent restarts and a doubling back-off.

One policy for both launchers: `popo train`'s local supervisor and `popo ray`'s driver. A week-long
run survives a kill a day: only the restarts inside the last `deploy.restart_window_s` count against
the limit, and the back-off starts over once a role has stayed up that long.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from popo.common.config import DeployConfig


@dataclass
class RestartPolicy:
    """The restart history of one role and the decision for its next failure."""

    limit: int
    """Restarts allowed within the window (`deploy.max_restarts`, `deploy.learner_max_restarts`)."""
    window_s: float
    backoff_s: float
    backoff_max_s: float
    restarts: int = 0
    """Restarts over the whole run (reported); the limit counts only `recent`."""
    recent: list[float] = field(default_factory=list)
    """Times of the restarts inside the last `window_s`."""

    @classmethod
    def of(cls, d: DeployConfig, limit: int) -> RestartPolicy:
        return cls(limit, d.restart_window_s, d.restart_backoff_s, d.restart_backoff_max_s)

    def in_window(self, now: float) -> int:
        """Restarts inside the window ending at `now` (older ones are forgotten)."""
        self.recent = [t for t in self.recent if now - t < self.window_s]
        return len(self.recent)

    def next_delay(self, now: float) -> float | None:
        """A failure at `now`: the back-off before the restart (recorded as one), or None when
        the role has used up its restarts in the window."""
        recent = self.in_window(now)
        if recent >= self.limit:
            return None
        self.restarts += 1
        self.recent.append(now)
        return min(self.backoff_s * 2**recent, self.backoff_max_s)
