"""Hand-off of training batches from ingest to the training loop.

The dispatch thread writes every verified group to the ledger's buffer and then calls `notify`;
the training loop blocks in `take` until `prompts_per_step` trainable groups are buffered. The
ledger stays the only store (a crash loses nothing); the condition variable only says when it is
worth reading again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from popo.learner.ledger import Ledger, Received
from popo.learner.staleness import StalenessPolicy


class BatchSource:
    def __init__(
        self,
        ledger: Ledger,
        policy: StalenessPolicy,
        on_stale: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self.ledger = ledger
        self.policy = policy
        self.on_stale = on_stale
        """Called with the number of groups skipped as `too_stale`."""
        self.buffered = 0
        """Trainable groups in the buffer at the last look."""
        self._cond = threading.Condition()
        self._seq = 0
        self._woken = False

    def notify(self) -> None:
        """A group reached the ledger (dispatch thread)."""
        with self._cond:
            self._seq += 1
            self._cond.notify_all()

    def wake(self) -> None:
        """Make a waiting `take` return None now (shutdown; safe from a signal handler)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def take(self, version: int, timeout_s: float) -> list[Received] | None:
        """The oldest `prompts_per_step` groups trainable at `version`, or None when fewer are
        buffered after `timeout_s` (or `wake` was called). Groups too stale for `version` are
        skipped in the ledger on the way."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                seen = self._seq
            rows = self.ledger.received()
            fresh = [r for r in rows if self.policy.fresh(r, version)]
            if len(fresh) < len(rows):
                kept = {r.lease_id for r in fresh}
                stale = [r.lease_id for r in rows if r.lease_id not in kept]
                self.ledger.skip(stale, "too_stale")
                self.on_stale(len(stale))
            self.buffered = len(fresh)
            if len(fresh) >= self.policy.prompts_per_step:
                return fresh[: self.policy.prompts_per_step]
            with self._cond:
                left = deadline - time.monotonic()
                if self._woken or left <= 0:
                    return None
                # Read the ledger again only once enough groups arrived to complete a batch.
                need = self.policy.prompts_per_step - len(fresh)
                self._cond.wait_for(
                    lambda seen=seen, need=need: self._seq - seen >= need or self._woken, left
                )
