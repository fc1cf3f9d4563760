"""The actor's figures in one object (docs/metrics.md): plain attributes the loop and tests read, mirrored
into the role's Prometheus registry (`popo_actor_*`) and metrics.jsonl."""

from __future__ import annotations

import logging
import time

from popo.common.metrics import LATENCY_BUCKETS, RoleMetrics

log = logging.getLogger("popo.actor")


class ActorStats:
    """Counters and gauges of one actor. Only the actor's loop thread calls the mutators."""

    def __init__(self, metrics: RoleMetrics) -> None:
        self.metrics = metrics
        m = metrics
        self.tokens = 0
        """Completion tokens sampled (all groups finished by the engine)."""
        self.groups_finished = 0
        self.rollouts = 0
        """Groups delivered to a verifier."""
        self.version = -1
        self.reloads = 0
        self.reload_failures = 0
        self.last_reload_s = 0.0
        self.idle_s = 0.0
        """Seconds the engine had nothing to sample (no lease in flight)."""
        self.leases_received = 0
        self.leases_expired = 0
        """Leases dropped because their deadline passed before the group was sent."""
        self.lease_requests = 0
        self.mismatch_kl: float | None = None
        self.probe_max_abs_diff: float | None = None
        self.tokens_per_s = 0.0

        self._tokens = m.counter("actor_tokens_total", "Completion tokens sampled.")
        self._groups = m.counter("actor_groups_finished_total", "Prompt groups sampled.")
        self._rollouts = m.counter(
            "actor_rollouts_total", "Rollout groups delivered to a verifier."
        )
        self._tps = m.gauge("actor_tokens_per_second", "Completion tokens per second (recent).")
        self._version = m.gauge("actor_policy_version", "Weight version the engine serves.")
        self._reload = m.histogram(
            "actor_weight_reload_seconds", "Checksum + in-place reload + probe.", LATENCY_BUCKETS
        )
        self.dropped = 0
        self._dropped = m.counter(
            "actor_dropped_messages_total", "Malformed, unexpected or invalid frames dropped."
        )
        self._reload_fail = m.counter(
            "actor_weight_reload_failures_total", "Announced versions rejected (checksum, file)."
        )
        self._idle = m.counter("actor_idle_seconds_total", "Seconds with nothing to sample.")
        self._inflight = m.gauge("actor_inflight_prompts", "Leased prompts not yet finished.")
        self._pending = m.gauge("actor_pending_groups", "Finished groups waiting for a verifier.")
        self._expired = m.counter("actor_leases_expired_total", "Leases dropped past deadline.")
        self._rejected = m.counter(
            "actor_prompts_rejected_total", "Leases dropped: prompt too long for max_model_len."
        )
        self._requests = m.counter("actor_lease_requests_total", "Lease requests sent.")
        self._kl = m.gauge("actor_mismatch_kl", "Probe KL(learner || actor) after the last reload.")
        self.mode = ""
        """How the last version reached the engine: `shared` path or `stream`ed (weight_stream)."""
        self.streamed_bytes = 0
        self.stream_retries = 0
        self._mode = m.gauge(
            "actor_weights_mode",
            "1 for how the last version was obtained: shared or stream.",
            ["mode"],
        )
        self._streamed = m.counter(
            "actor_weights_streamed_bytes_total", "Weight bytes streamed from the learner."
        )
        self._stream_retries = m.counter(
            "actor_weights_stream_retries_total",
            "Weight stream attempts retried (timeout, corrupt).",
        )
        self._window = (time.monotonic(), 0)

    def finished(self, n_tokens: int) -> None:
        self.tokens += n_tokens
        self.groups_finished += 1
        self._tokens.inc(n_tokens)
        self._groups.inc()

    def delivered(self) -> None:
        self.rollouts += 1
        self._rollouts.inc()

    def expired(self, n: int = 1) -> None:
        before = self.leases_expired
        self.leases_expired += n
        self._expired.inc(n)
        # Work thrown away is silent otherwise (the learner re-dispatches the prompt); say so at
        # the 1st, 10th, 100th... expiry rather than once per lease.
        if len(str(self.leases_expired)) > len(str(before)) or before == 0:
            log.warning(
                "%d leases expired before their groups were sent: the engine is slower than "
                "learner.lease_timeout_s allows (raise it or lower actor.max_inflight_prompts)",
                self.leases_expired,
            )

    def rejected(self) -> None:
        self._rejected.inc()

    def requested(self) -> None:
        self.lease_requests += 1
        self._requests.inc()

    def idle(self, seconds: float) -> None:
        self.idle_s += seconds
        self._idle.inc(seconds)

    def serving(self, version: int) -> None:
        self.version = version
        self._version.set(version)

    def reloaded(self, seconds: float, mismatch_kl: float | None, max_abs: float | None) -> None:
        self.reloads += 1
        self.last_reload_s = seconds
        self._reload.observe(seconds)
        self.mismatch_kl = mismatch_kl
        self.probe_max_abs_diff = max_abs
        if mismatch_kl is not None:
            self._kl.set(mismatch_kl)

    def weights_mode(self, mode: str) -> None:
        self.mode = mode
        for m in ("shared", "stream"):
            self._mode.labels(m).set(1.0 if m == mode else 0.0)

    def streamed(self, total_bytes: int) -> None:
        """Bring the streamed-bytes counter up to the fetcher's running total."""
        self._streamed.inc(total_bytes - self.streamed_bytes)
        self.streamed_bytes = total_bytes

    def stream_retried(self) -> None:
        """Called from the fetch thread: only the (thread-safe) Prometheus counter and an int."""
        self.stream_retries += 1
        self._stream_retries.inc()

    def drop(self, why: str) -> None:
        """A frame on dispatch or weights that was malformed, unexpected or invalid."""
        self.dropped += 1
        self._dropped.inc()

    def reload_failed(self) -> None:
        self.reload_failures += 1
        self._reload_fail.inc()

    def queues(self, inflight: int, pending: int) -> None:
        self._inflight.set(inflight)
        self._pending.set(pending)

    def tick(self) -> None:
        """Refresh the tokens/s gauge (over the last >= 1 s) and append to metrics.jsonl when due."""
        t0, tok0 = self._window
        now = time.monotonic()
        if now - t0 >= 1.0:
            self.tokens_per_s = (self.tokens - tok0) / (now - t0)
            self._tps.set(self.tokens_per_s)
            self._window = (now, self.tokens)
        self.metrics.tick()
