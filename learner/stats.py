"""The learner's figures in one object: named methods the loop and the dispatch thread call,
mirrored into the role's Prometheus registry (`popo_learner_*`) and metrics.jsonl. docs/metrics.md
lists every series."""

from __future__ import annotations

from popo.common.metrics import STALENESS_BUCKETS, STEP_BUCKETS, RoleMetrics


class LearnerStats:
    """Prometheus counters are thread-safe; the plain attributes are written by one thread each
    (the training loop, except `dropped` and `duplicates`, which the dispatch thread counts)."""

    def __init__(self, metrics: RoleMetrics, total_steps: int, max_staleness: int) -> None:
        self.metrics = m = metrics
        self.tokens_trained = 0
        self.dropped = 0
        self.duplicates = 0
        self._step = m.gauge("learner_step", "Optimizer steps taken")
        m.gauge("learner_total_steps", "Optimizer steps the run will take").set(total_steps)
        self._version = m.gauge(
            "learner_policy_version",
            "Latest weight version written (announced at once, or when an evaluation round ends)",
        )
        self._step_s = m.histogram(
            "learner_step_seconds", "Wall time of one optimizer step", STEP_BUCKETS
        )
        self._phase_s = m.gauge(
            "learner_step_phase_seconds",
            "Seconds of the last step's phases: forward_backward, optimizer, after_step",
            ["phase"],
        )
        self._tokens = m.counter("learner_tokens_total", "Completion tokens trained on")
        self._seqs = m.counter("learner_sequences_total", "Completions trained on")
        self._loss = m.gauge("learner_loss", "Loss terms of the last step", ["term"])
        # trainer figures (keys of `train_step`'s dict) shown as gauges when it reports them
        self._gauges = {
            "is_clip_fraction": m.gauge(
                "learner_is_clip_fraction", "Fraction of IS ratios at the cap (last step)"
            ),
            "cos_sim": m.gauge(
                "learner_cosine_similarity", "cos(h(f_theta), f_xi) of the last step"
            ),
            "ema_kl": m.gauge("learner_ema_kl", "KL(pi_theta || pi_xi) monitor (k3), last step"),
            "weight_entropy": m.gauge(
                "learner_weight_entropy", "Mean entropy of the POPO weights over S+"
            ),
            "grad_norm": m.gauge("learner_grad_norm", "Global gradient norm before clipping"),
            "lr": m.gauge("learner_lr", "Learning rate of the last step"),
        }
        self._stale = m.histogram(
            "learner_staleness_versions", "Policy-version lag of trained groups", STALENESS_BUCKETS
        )
        self._buffer = m.gauge("learner_buffer_groups", "Received groups waiting to be trained")
        self._leases = m.gauge(
            "learner_outstanding_leases", "Train leases handed out, not yet back"
        )
        self._publish_s = m.histogram(
            "learner_publish_seconds", "Write + announce of one weight version", STEP_BUCKETS
        )
        self._changed = m.gauge(
            "learner_published_change_fraction",
            "Share of sampled policy elements whose published value changed from the last version",
        )
        self.publish_failures = m.counter(
            "learner_publish_failures_total", "Failed weight-version writes (each one retried)"
        )
        self.checkpoint_failures = m.counter(
            "learner_checkpoint_failures_total", "Failed checkpoint writes (each one retried)"
        )
        self._wait = m.counter(
            "learner_wait_seconds_total", "Time the training loop waited for data"
        )
        self._ended = m.counter(
            "learner_leases_ended_total", "Leases ended, by outcome", ["outcome"]
        )
        self._pass = m.gauge(
            "learner_pass_rate", "Positive fraction of verified completions (all groups)"
        )
        self._eval = m.gauge(
            "learner_eval_accuracy", "Held-out sampled accuracy (avg@G) at the last eval"
        )
        self._eval_k = m.gauge(
            "learner_eval_pass_at_k", "Held-out unbiased pass@G at the last eval"
        )
        self._eval_round = m.gauge(
            "learner_eval_round_prompts",
            "Held-out prompts of the evaluation in progress: scored (done) and all (total)",
            ["state"],
        )
        self._dup = m.counter("learner_duplicates_total", "Late or duplicate completions ignored")
        self._dropped = m.counter(
            "learner_dropped_messages_total",
            "Malformed, unexpected or invalid frames dropped on dispatch, ingest and weightstream,"
            " and scored groups the model cannot train on (token ids outside its vocabulary...)",
        )
        # The bound and the last step's worst lag as gauges, so an alert can compare the two.
        m.gauge("learner_staleness_bound_versions", "Configured max_staleness (versions)").set(
            max_staleness
        )
        self._stale_max = m.gauge(
            "learner_staleness_max_versions", "Largest version lag among the last step's groups"
        )
        self._startup = m.gauge(
            "learner_startup_seconds",
            "Seconds from the run's launch to a start-up phase",
            ["phase"],
        )

    def eval_round(self, done: int, total: int) -> None:
        """Progress of the evaluation in progress (0 of 0 between rounds)."""
        self._eval_round.labels("done").set(done)
        self._eval_round.labels("total").set(total)

    def started(self, phase: str, seconds: float) -> None:
        self._startup.labels(phase).set(seconds)

    def outcomes(self, *names: str) -> None:
        """Zero series for these lease outcomes, so alert ratios have series from the start."""
        for name in names:
            self._ended.labels(name)

    def ended(self, outcome: str, n: int) -> None:
        if n:
            self._ended.labels(outcome).inc(n)

    def waited(self, seconds: float) -> None:
        self._wait.inc(seconds)

    def queues(self, buffered: int, in_flight: int) -> None:
        self._buffer.set(buffered)
        self._leases.set(in_flight)

    def step(self, step: int, m: dict[str, float], lags: list[int]) -> None:
        """One optimizer step's figures (`m` from `Trainer.train_step`)."""
        for lag in lags:
            self._stale.observe(lag)
        if lags:
            self._stale_max.set(max(lags))
        self._step.set(step)
        self._step_s.observe(m["step_seconds"])
        self._tokens.inc(m["tokens"])
        self.tokens_trained += int(m["tokens"])
        self._seqs.inc(m["sequences"])
        for key, gauge in self._gauges.items():
            if key in m:
                gauge.set(m[key])
        for key, v in m.items():
            if key.startswith("phase_seconds_"):
                self._phase_s.labels(key.removeprefix("phase_seconds_")).set(v)
            if key.startswith("loss"):
                self._loss.labels("total" if key == "loss" else key.removeprefix("loss_")).set(v)

    def published(self, version: int, seconds: float, changed: float | None = None) -> None:
        self._version.set(version)
        self._publish_s.observe(seconds)
        if changed is not None:
            self._changed.set(changed)

    def evaluated(self, accuracy: float, pass_at_k: float) -> None:
        self._eval.set(accuracy)
        self._eval_k.set(pass_at_k)

    def pass_rate(self, positives: int, completions: int) -> None:
        if completions:
            self._pass.set(positives / completions)

    def duplicate(self) -> None:
        self.duplicates += 1
        self._dup.inc()

    def drop(self, _why: str) -> None:
        self.dropped += 1
        self._dropped.inc()
