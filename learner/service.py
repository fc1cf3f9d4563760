"""The learner role's loop: take a batch, train, publish, close the batch's leases, checkpoint,
evaluate. Everything facing actors and verifiers is the `Orchestrator`'s; everything every rank
does is in `ops`; the process entry is `main`.

The loop takes `prompts_per_step` completed groups (oldest lease first), trains on those with a
signal, publishes a new version, records every lease as trained or skipped (with a reason),
checkpoints every `checkpoint_every` steps and evaluates on the held-out split beside training.
Versions count publishes and are never reused, also across a resume (a resumed run may not
overwrite what actors already loaded).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from popo.common.config import RunConfig
from popo.common.data import encode_prompt
from popo.common.messages import RankCommand, ScoredGroup, decode, encode
from popo.common.metrics import RoleMetrics, role_port
from popo.common.process import LAUNCH_T0_ENV, process_start_time, release_free_memory
from popo.common.run_dir import RunDir
from popo.learner.ledger import Received
from popo.learner.ops import build_trainer, write_checkpoint, write_weights
from popo.learner.orchestrator import Orchestrator
from popo.learner.publish import PublishedChange
from popo.learner.ranks import RankLink
from popo.learner.stats import LearnerStats

log = logging.getLogger("popo.learner")


class Learner:
    def __init__(
        self, cfg: RunConfig, run_dir: str | Path, model_dir: str | Path, device: str | None = None
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.model_dir = Path(model_dir)
        self.device = device
        self.link: RankLink | None = None  # to ranks 1..N-1 when the learner is sharded
        self.stop_event = threading.Event()
        self.change = PublishedChange()
        self.t0 = float(os.environ.get(LAUNCH_T0_ENV) or process_start_time())

    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = RoleMetrics("learner", cfg.metrics, self.run_dir)
        self.stats = LearnerStats(self.metrics, cfg.learner.total_steps, cfg.learner.max_staleness)
        port = self.metrics.serve(role_port(cfg.metrics, "learner"))
        if port:
            log.info("learner metrics on http://%s:%d/metrics", cfg.metrics.host, port)
        self.trainer, tokenizer = build_trainer(cfg, self.run_dir, self.model_dir, self.device)
        self.stats.outcomes("trained", "too_stale", self._no_signal_reason())
        if self.trainer.sharded:
            self.link = RankLink(self.trainer.device)
        self.orch = Orchestrator(cfg, self.run_dir, self.stats, self.t0)
        self.orch.setup(tokenizer, self.trainer.policy.config.vocab_size, self.trainer.step)
        p = self.orch.probe_problem
        # A fixed (prompt, continuation) whose log-probs learner and actors compare after each
        # reload: the first held-out prompt followed by its boxed gold answer.
        self.probe = (
            encode_prompt(tokenizer, p.problem),
            encode_prompt(tokenizer, f"\\boxed{{{p.gold}}}"),
        )
        if self.trainer.step > 0 or self.orch.resumed_weights:
            # A resumed learner announces its restored weights as a new version: actors may
            # hold versions from the lost steps, which must not be reused.
            self.publish()
        self.orch.phase("learner_ready")

    def run(self) -> None:
        lc, orch = self.cfg.learner, self.orch
        if self.trainer.step == 0 and not orch.evaluated_at_start():
            orch.start_eval(0, self.stop_event)  # sampled beside the first steps, on version 0
        while self.trainer.step < lc.total_steps:
            batch = orch.next_batch(self.stop_event)
            if batch is None:
                return
            version = orch.version  # the policy these groups update
            groups = [decode(r.payload, ScoredGroup) for r in batch]
            useful = [g for g in groups if self._has_signal(g)]
            m = self.train_step(useful) if useful else {"tokens": 0.0}
            used = {g.lease_id for g in useful} if m["tokens"] > 0 else set()
            # Publish before the batch's leases are closed: closing frees admission slots, and a
            # lease issued then must already carry the new version (else it is born stale).
            if used and self._due(lc.publish_every):
                self.publish()
            orch.close_batch(batch, used, self.trainer.step, self._no_signal_reason())
            if not used:
                continue
            self._record(m, batch, used, version)
            if self._due(lc.checkpoint_every):
                self.checkpoint()
            if lc.eval_every and self.trainer.step % lc.eval_every == 0:
                orch.start_eval(self.trainer.step, self.stop_event)
            if lc.release_memory:
                release_free_memory()
        orch.start_eval(self.trainer.step, self.stop_event)  # no-op when the last step started one
        orch.finish_eval(self.stop_event)
        if not self.stop_event.is_set():
            orch.finish()
            self._write_summary()

    def _due(self, every: int) -> bool:
        return self.trainer.step % every == 0 or self.trainer.step == self.cfg.learner.total_steps

    def stop(self) -> None:
        """Stop after the current step (signal handlers call this)."""
        self.stop_event.set()
        if hasattr(self, "orch"):
            self.orch.batches.wake()

    def train_step(self, groups: list[ScoredGroup]) -> dict[str, float]:
        if self.link is not None:
            self.link.send(RankCommand(op="train", groups=[encode(g) for g in groups]))
        return self.trainer.train_step(groups)

    def _has_signal(self, g: ScoredGroup) -> bool:
        return self.trainer.algorithm.has_signal(g)

    def _no_signal_reason(self) -> str:
        return self.trainer.algorithm.no_signal_reason

    def _record(
        self, m: dict[str, float], batch: list[Received], used: set[int], version: int
    ) -> None:
        self.stats.step(
            self.trainer.step, m, [version - r.version_min for r in batch if r.lease_id in used]
        )
        self.orch.phase("first_step")
        log.info(
            "step %d/%d  loss %.4f  groups %d/%d  tokens %d  %.2fs",
            self.trainer.step,
            self.cfg.learner.total_steps,
            m.get("loss", float("nan")),
            len(used),
            len(batch),
            m["tokens"],
            m["step_seconds"],
        )
        self.metrics.tick()

    # --- weights and checkpoints -------------------------------------------------------------------

    def publish(self) -> None:
        self.orch.check()
        version = self.orch.version + 1
        if not self.orch.may_write(version):
            self.orch.finish_eval(self.stop_event)
        t0 = time.perf_counter()
        protect = self.orch.served_versions()
        if self.link is not None:
            self.link.send(
                RankCommand(
                    op="publish", version=version, protect=sorted(protect), probe=list(self.probe)
                )
            )
        msg = write_weights(
            self.trainer,
            self.cfg,
            self.run_dir,
            self.model_dir,
            version,
            protect,
            self.probe,
            on_failure=lambda _e: self.stats.publish_failures.inc(),
            change=self.change,
        )
        self.orch.announce(msg)
        self.stats.published(version, time.perf_counter() - t0, self.change.fraction)

    def checkpoint(self) -> None:
        if self.link is not None:
            self.link.send(RankCommand(op="checkpoint"))
        write_checkpoint(
            self.trainer, self.cfg, self.run_dir, lambda _e: self.stats.checkpoint_failures.inc()
        )
        self.orch.ledger.checkpointed(self.trainer.step)

    def _write_summary(self) -> None:
        evals = self.orch.eval_history
        base = [e["seconds"] for e in evals if e["step"] == 0]
        summary = {
            "algorithm": self.cfg.algorithm.name,
            "steps": self.trainer.step,
            "accuracy_before": evals[0]["accuracy"] if evals else None,
            "accuracy_after": evals[-1]["accuracy"] if evals else None,
            "leases": self.orch.ledger.counts(),
            "ledger_problems": self.orch.ledger.check_exactly_once(),
            "tokens_trained": self.stats.tokens_trained,
            "startup": {**self.orch.startup, **({"base_eval": round(base[0], 3)} if base else {})},
            "wall_seconds": round(time.time() - self.t0, 3),
        }
        RunDir(self.run_dir).summary.write_text(json.dumps(summary, indent=1))

    def close(self) -> None:
        if hasattr(self, "orch") and hasattr(self.orch, "dispatcher"):
            self.orch.close()
        if hasattr(self, "metrics"):
            self.metrics.close()
