"""The verifier role (docs/architecture.md, Roles): rollout groups in, scored groups out.

    actors --PUSH--> [rollouts PULL] Verifier [ingest PUSH] --> learner
                                        |
                                  ScoringPool (worker processes, hard time limit)

Every completion of every `RolloutGroup` is scored against the group's gold answer; one
`ScoredGroup` per group goes to the learner with the positives only (`forward = "positives"`) or
everything with rewards (`"all"`), and always the summary, so the learner's ledger can close
all-negative leases too. Completions of many groups are in the pool at once. The service keeps no
state beyond counters, so replicas run side by side (replica r binds `rollouts_port + r`).

One thread owns both sockets and the pool: a `zmq.Poller` waits on the rollouts socket, the
workers' pipes and, when results are queued for a slow learner, the ingest socket's POLLOUT.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from popo.common import transport
from popo.common.config import RunConfig
from popo.common.messages import (
    RolloutGroup,
    ScoredCompletion,
    ScoredGroup,
    Verdict,
)
from popo.common.metrics import LATENCY_BUCKETS, RoleMetrics, role_port
from popo.verifier.pool import PoolLimits, Result, ScoringPool

log = logging.getLogger(__name__)

VERDICTS: tuple[Verdict, ...] = ("positive", "negative", "timeout", "error")

WAIT_S = 1.0
"""Longest wait of one loop step for input (rollouts, results, send room): the loop wakes at least
this often to see a stop request, so a stopping verifier starts its drain within a second; work
that arrives wakes it at once."""


class VerifierStats:
    """The verifier's figures: plain attributes for the loop and tests, mirrored into the role's
    Prometheus registry (`popo_verifier_*`) and metrics.jsonl. The one place metrics are recorded."""

    def __init__(self, metrics: RoleMetrics) -> None:
        self.metrics = m = metrics
        self.verdicts: dict[str, int] = dict.fromkeys(VERDICTS, 0)
        self.groups_in = 0
        self.groups_out = 0
        self.forwarded = 0
        """Completions forwarded to the learner."""
        self.dropped = 0
        """Malformed or wrong-version frames dropped (counted by the Channel)."""
        self.worker_restarts = 0
        self.latencies: deque[float] = deque(maxlen=100_000)
        """Per-completion worker seconds (recent), for tests and the benchmark."""

        self._completions = m.counter("verifier_completions_total", "Completions scored.")
        self._verdicts = m.counter(
            "verifier_verdicts_total", "Completions scored, by verdict.", ["verdict"]
        )
        for v in VERDICTS:  # export zeros, so a dashboard's rate() has a series from the start
            self._verdicts.labels(verdict=v)
        self._latency = m.histogram(
            "verifier_verify_seconds", "Worker time per completion.", LATENCY_BUCKETS
        )
        self._group_latency = m.histogram(
            "verifier_group_seconds", "Receipt to scored, per group.", LATENCY_BUCKETS
        )
        self._groups_in = m.counter("verifier_groups_received_total", "Rollout groups received.")
        self._groups_out = m.counter("verifier_groups_sent_total", "Scored groups sent.")
        self._forwarded = m.counter(
            "verifier_forwarded_completions_total", "Completions forwarded to the learner."
        )
        self._dropped = m.counter("verifier_dropped_messages_total", "Malformed frames dropped.")
        self._restarts = m.counter(
            "verifier_worker_restarts_total", "Scoring workers killed (timeout) or replaced."
        )
        self._pass_rate = m.gauge(
            "verifier_pass_rate", "positive / scored completions (cumulative)."
        )
        self._inflight = m.gauge("verifier_inflight_groups", "Groups being scored or queued.")

    @property
    def scored(self) -> int:
        return sum(self.verdicts.values())

    @property
    def pass_rate(self) -> float:
        return self.verdicts["positive"] / self.scored if self.scored else 0.0

    def completion(self, verdict: Verdict, seconds: float) -> None:
        self.verdicts[verdict] += 1
        self.latencies.append(seconds)
        self._completions.inc()
        self._verdicts.labels(verdict=verdict).inc()
        self._latency.observe(seconds)
        self._pass_rate.set(self.pass_rate)

    def received(self) -> None:
        self.groups_in += 1
        self._groups_in.inc()

    def sent(self, group: ScoredGroup) -> None:
        self.groups_out += 1
        self.forwarded += len(group.completions)
        self._groups_out.inc()
        self._forwarded.inc(len(group.completions))
        self._group_latency.observe(group.verify_seconds)

    def drop(self, why: str) -> None:
        self.dropped += 1
        self._dropped.inc()

    def restarts(self, total: int) -> None:
        if total > self.worker_restarts:
            self._restarts.inc(total - self.worker_restarts)
            self.worker_restarts = total

    def inflight(self, n: int) -> None:
        self._inflight.set(n)

    def summary(self) -> dict[str, object]:
        return {
            "groups_in": self.groups_in,
            "groups_out": self.groups_out,
            "verdicts": dict(self.verdicts),
            "pass_rate": round(self.pass_rate, 4),
            "forwarded": self.forwarded,
            "dropped": self.dropped,
            "worker_restarts": self.worker_restarts,
        }


@dataclass
class _Group:
    msg: RolloutGroup
    t_received: float
    verdicts: list[Verdict | None]
    left: int
    t0: float = field(default_factory=time.monotonic)


class Verifier:
    """One verifier replica: `setup()`, `run(stop_event)`, `close()`.

    `ingest_addr` overrides where scored groups go (default: the configured learner endpoint;
    tests pass the real address of a learner bound to port 0).
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path | None = None,
        replica: int = 0,
        ingest_addr: str | None = None,
        metrics: RoleMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.vcfg = cfg.verifier
        self.run_dir = run_dir
        self.replica = replica
        self.forward = cfg.forward
        self._ingest_addr = ingest_addr
        self.metrics = metrics or RoleMetrics(
            "verifier", cfg.metrics, run_dir, instance=f"verifier-{replica}"
        )
        self.stats = VerifierStats(self.metrics)
        self._ctx: zmq.Context | None = None
        self.rollouts: transport.Channel | None = None
        self.ingest: transport.Channel | None = None
        self.pool: ScoringPool | None = None
        self._groups: dict[int, _Group] = {}
        self._tasks: dict[int, tuple[int, int]] = {}
        """task id -> (group key, completion index)."""
        self._outbox: deque[ScoredGroup] = deque()
        self._next_group = 0
        self._next_task = 0

    # --- phases -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Start the workers, bind rollouts, connect ingest."""
        v = self.vcfg
        self.pool = ScoringPool(
            v.num_workers,
            PoolLimits(v.timeout_s, v.max_completion_chars, v.max_brace_depth, v.worker_memory_mib),
        )
        self.pool.start()
        t = self.cfg.transport
        self._ctx = zmq.Context()
        addr = transport.rollouts_address(self.cfg.transport, self.replica, self.run_dir)
        self.rollouts = transport.bind(self._ctx, "rollouts", addr, t, on_drop=self.stats.drop)
        ingest = self._ingest_addr or transport.learner_address(t, "ingest", run_dir=self.run_dir)
        self.ingest = transport.connect(self._ctx, "ingest", ingest, t)
        log.info(
            "verifier-%d: %d workers, forward=%s, rollouts %s -> ingest %s",
            self.replica,
            v.num_workers,
            self.forward,
            self.rollouts.address,
            ingest,
        )

    def run(self, stop: threading.Event) -> None:
        """Score until `stop` is set, then finish the groups in flight (bounded by the time limit)."""
        while not stop.is_set():
            self.step()
            self.metrics.tick()
        drain_until = time.monotonic() + self.vcfg.timeout_s + 2.0
        while (self._groups or self._outbox) and time.monotonic() < drain_until:
            self.step(accept=False)
        if self._groups or self._outbox:
            log.warning(
                "verifier-%d: stopping with %d groups unscored, %d unsent (their leases expire)",
                self.replica,
                len(self._groups),
                len(self._outbox),
            )

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        for ch in (self.rollouts, self.ingest):
            if ch is not None:
                ch.close()
        if self._ctx is not None:
            self._ctx.term()
        self.metrics.close()
        log.info("verifier-%d: %s", self.replica, self.stats.summary())

    # --- the loop ---------------------------------------------------------------------------

    def step(self, accept: bool = True) -> None:
        """Wait for input (frames, results, send room), then handle everything that is ready."""
        assert self.pool is not None and self.rollouts is not None and self.ingest is not None
        accept = accept and self._has_room()
        poller = zmq.Poller()
        if accept:
            poller.register(self.rollouts.sock, zmq.POLLIN)
        if self._outbox:
            poller.register(self.ingest.sock, zmq.POLLOUT)
        for conn in self.pool.connections():
            poller.register(conn.fileno(), zmq.POLLIN)
        wait_s = WAIT_S
        to_deadline = self.pool.seconds_to_deadline()
        if to_deadline is not None:
            wait_s = min(wait_s, to_deadline + 0.001)
        events = dict(poller.poll(int(wait_s * 1000) + 1))

        if accept and self.rollouts.sock in events:
            # Drain what is queued, up to the in-flight bound (the rest waits in ZeroMQ).
            while self._has_room():
                got = self.rollouts.recv(timeout_ms=0)
                if got is None:
                    break
                msg = got[1]
                if isinstance(msg, RolloutGroup):
                    self._accept(msg)
                else:
                    self.stats.drop(f"unexpected {type(msg).__name__} on rollouts")
        for r in self.pool.poll(0):
            self._on_result(r)
        self.stats.restarts(self.pool.restarts)
        self._flush()
        self.stats.inflight(len(self._groups) + len(self._outbox))

    def _has_room(self) -> bool:
        return len(self._groups) + len(self._outbox) < self.vcfg.max_inflight_groups

    def _accept(self, msg: RolloutGroup) -> None:
        assert self.pool is not None
        self.stats.received()
        key = self._next_group
        self._next_group += 1
        g = _Group(msg, time.time(), [None] * len(msg.completions), len(msg.completions))
        self._groups[key] = g
        if g.left == 0:
            self._finish(key)
            return
        for i, c in enumerate(msg.completions):
            tid = self._next_task
            self._next_task += 1
            self._tasks[tid] = (key, i)
            self.pool.submit(tid, msg.gold, c.text)

    def _on_result(self, r: Result) -> None:
        key, i = self._tasks.pop(r.task_id)
        g = self._groups[key]
        g.verdicts[i] = r.verdict
        g.left -= 1
        self.stats.completion(r.verdict, r.seconds)
        if r.verdict in ("timeout", "error"):
            log.info("lease %d completion %d: %s (%s)", g.msg.lease_id, i, r.verdict, r.detail)
        if g.left == 0:
            self._finish(key)

    def _finish(self, key: int) -> None:
        g = self._groups.pop(key)
        self._outbox.append(build_scored_group(g.msg, g.verdicts, self.forward, g.t0))  # type: ignore[arg-type]

    def _flush(self) -> None:
        assert self.ingest is not None
        while self._outbox:
            if not self.ingest.send(self._outbox[0], timeout_ms=0):
                return  # learner not there or its queue is full: retry on POLLOUT
            self.stats.sent(self._outbox.popleft())


def build_scored_group(
    msg: RolloutGroup,
    verdicts: list[Verdict],
    forward: str,
    t0: float,
) -> ScoredGroup:
    """The learner's view of a scored group: positives only or all (reward 1/0), plus the summary.

    `t0` is the `time.monotonic()` at receipt; `verify_seconds` is receipt-to-scored wall time.
    """
    counts = dict.fromkeys(VERDICTS, 0)
    for v in verdicts:
        counts[v] += 1
    completions = [
        ScoredCompletion(
            token_ids=c.token_ids,
            logprobs=c.logprobs,
            reward=1.0 if v == "positive" else 0.0,
            verdict=v,
        )
        for c, v in zip(msg.completions, verdicts, strict=True)
        if forward == "all" or v == "positive"
    ]
    return ScoredGroup(
        lease_id=msg.lease_id,
        prompt_id=msg.prompt_id,
        prompt_token_ids=msg.prompt_token_ids,
        completions=completions,
        forwarded="all" if forward == "all" else "positives",
        n_total=len(verdicts),
        n_positive=counts["positive"],
        verdicts=counts,
        version_min=msg.version_min,
        version_max=msg.version_max,
        actor_id=msg.actor_id,
        t_leased=msg.t_leased,
        t_generated=msg.t_finished,
        t_verified=time.time(),
        verify_seconds=time.monotonic() - t0,
    )


def main(cfg: RunConfig, run_dir: str | Path, index: int = 0) -> int:
    """`popo verifier`: run replica `index` until SIGTERM/SIGINT. Returns the exit code
    (non-zero after an unexpected error, which is logged)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("verifier-%d: signal %d, stopping", index, signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    v = Verifier(cfg, run_dir, replica=index)
    try:
        v.setup()
        port = role_port(cfg.metrics, "verifier", index)
        if cfg.metrics.enabled:
            log.info("verifier-%d: metrics on port %d", index, v.metrics.serve(port))
        v.run(stop)
    except Exception:
        log.exception("verifier-%d failed", index)
        return 1
    finally:
        v.close()
    return 0
