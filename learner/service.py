"""The learner role (DESIGN §1, §3): dispatcher, ledger, training loop, weight publishing, evaluation.

    actors <-ROUTER- [dispatch thread] -PULL<- verifier        (leases out, scored groups in)
                          | ledger.db (SQLite WAL: leases + buffer)
                     [training loop] -PUB-> actors            (WeightsReady)

The training loop takes `prompts_per_step` completed groups (oldest lease first), trains on those
with a signal, records every lease as trained or skipped (with a reason), publishes a new version,
checkpoints every `checkpoint_every` steps and evaluates on the held-out split. Versions count
publishes and are never reused, also across a resume (a resumed run may not overwrite what actors
already loaded).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Literal

import zmq

from popo.common import transport
from popo.common.config import RunConfig
from popo.common.data import Problem, apply_template, drop_too_long, load_prompts
from popo.common.demo_model import resolve_model_dir
from popo.common.messages import RankCommand, ScoredGroup, WeightsReady, decode, encode
from popo.common.metrics import (
    STALENESS_BUCKETS,
    STEP_BUCKETS,
    RoleMetrics,
    pass_at_k,
    role_port,
)
from popo.common.process import release_free_memory
from popo.learner.dispatch import Dispatcher, EvalRound, SharedState
from popo.learner.ledger import Ledger, Received
from popo.learner.ranks import RankLink

log = logging.getLogger("popo.learner")


class LearnerError(RuntimeError):
    pass


def build_trainer(
    cfg: RunConfig, run_dir: Path, model_dir: Path, device: str | None = None
) -> tuple[Any, Any]:
    """(trainer, tokenizer), restored from the run's latest checkpoint if there is one. Every
    learner rank calls this (with a process group, loading the checkpoint is a collective)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from popo.learner.checkpoint import latest_checkpoint, load_checkpoint
    from popo.learner.trainer import Trainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Trainer(
        model, cfg.learner, cfg.algorithm, max_completion_len=cfg.actor.max_tokens,
        temperature=cfg.actor.temperature,
        pad_id=tokenizer.pad_token_id or 0, device=device,
    )  # fmt: skip
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is not None:
        load_checkpoint(trainer, ckpt)
        log.info("resumed from %s (step %d)", ckpt, trainer.step)
    return trainer, tokenizer


def write_weights(
    trainer: Any, cfg: RunConfig, run_dir: Path, model_dir: Path, version: int,
    protect: set[int], probe: tuple[list[int], list[int]] | None, on_failure: Any = None,
) -> WeightsReady | None:  # fmt: skip
    """Publish the policy as `weights/v{version}` (every rank calls; rank 0 writes and returns the
    announcement)."""
    from popo.learner.publish import publish_weights

    lc = cfg.learner
    return publish_weights(
        trainer.policy, run_dir / "weights", version, source_dir=model_dir, keep=lc.keep_weights,
        protect=protect, probe=probe, pad_id=trainer.pad_id, retries=lc.write_retries,
        backoff_s=lc.write_retry_backoff_s, on_failure=on_failure,
    )  # fmt: skip


def write_checkpoint(trainer: Any, cfg: RunConfig, run_dir: Path, on_failure: Any = None) -> None:
    """Checkpoint the trainer (every rank calls; rank 0 writes)."""
    from popo.learner.checkpoint import save_checkpoint

    lc = cfg.learner
    save_checkpoint(
        trainer, run_dir / "checkpoints", keep=lc.keep_checkpoints, retries=lc.write_retries,
        backoff_s=lc.write_retry_backoff_s, on_failure=on_failure,
    )  # fmt: skip


def follow(cfg: RunConfig, run_dir: Path, model_dir: Path, device: str) -> None:
    """Learner ranks 1..N-1: build the same trainer, then do what rank 0 says until `stop`."""
    trainer, _ = build_trainer(cfg, run_dir, model_dir, device)
    link = RankLink(trainer.device)
    while (cmd := link.recv()).op != "stop":
        if cmd.op == "train":
            trainer.train_step([decode(b, ScoredGroup) for b in cmd.groups])
        elif cmd.op == "publish":
            probe = (cmd.probe[0], cmd.probe[1]) if cmd.probe else None
            write_weights(trainer, cfg, run_dir, model_dir, cmd.version, set(cmd.protect), probe)
        elif cmd.op == "checkpoint":
            write_checkpoint(trainer, cfg, run_dir)
        if cfg.learner.release_memory:
            release_free_memory()


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
        self.state = SharedState()
        self.last_ready: WeightsReady | None = None
        self.eval_history: list[dict[str, Any]] = []
        self.tokens_trained = 0

    # --- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, lc = self.cfg, self.cfg.learner
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.trainer, tokenizer = build_trainer(cfg, self.run_dir, self.model_dir, self.device)
        if self.trainer.sharded:
            self.link = RankLink(self.trainer.device)
        self.ledger = Ledger(self.run_dir / "ledger.db")
        rewound = self.ledger.rewind_to(self.trainer.step)
        if rewound:
            log.info("%d lease(s) trained after the checkpoint go back to the buffer", rewound)

        template = cfg.data.resolved_template
        budget = cfg.model.max_model_len - cfg.actor.max_tokens

        def prepare(split: Literal["train", "test"]) -> list[Problem]:
            raw = load_prompts(cfg.data, split)
            raw = [Problem(p.prompt_id, apply_template(p.problem, template), p.gold) for p in raw]
            kept, dropped = drop_too_long(raw, lambda t: len(tokenizer(t)["input_ids"]), budget)
            if dropped:
                log.warning("%s split: %d of %d prompts are longer than max_model_len - max_tokens"
                            " = %d tokens and are never leased", split, dropped, len(raw), budget)  # fmt: skip
            if not kept:
                raise LearnerError(f"no {split} prompt fits in {budget} tokens")
            return kept

        train = prepare("train")
        evals = prepare("test")[: cfg.data.eval_size]
        order = list(range(len(train)))
        random.Random(lc.seed).shuffle(order)
        self.evals = evals
        self.probe = self._probe(tokenizer, (evals or train)[0])

        self._setup_metrics()
        t = cfg.transport
        self.dispatcher = Dispatcher(
            cfg, self.ledger, train, order, evals, self.state,
            transport.address(t, "dispatch", run_dir=self.run_dir),
            transport.address(t, "ingest", run_dir=self.run_dir),
            on_group=self._on_group,
            on_duplicate=self.c_dup.inc,
            on_drop=lambda _why: self.c_dropped.inc(),
            vocab_size=self.trainer.policy.config.vocab_size,
        )  # fmt: skip
        self.dispatcher.start()
        self.dispatcher.ready.wait()
        if self.dispatcher.error is not None:
            raise self.dispatcher.error
        self.pub = transport.bind(
            zmq.Context.instance(), "weights",
            transport.address(t, "weights", run_dir=self.run_dir), t,
        )  # fmt: skip
        self.weight_server = None
        if t.weights_mode != "shared":  # actors without our weights/ stream them from here
            from popo.common.weight_stream import WeightServer

            self.weight_server = WeightServer(
                self.run_dir / "weights", transport.address(t, "weightstream", run_dir=self.run_dir),
                t, on_drop=lambda _why: self.c_dropped.inc(),
            )  # fmt: skip
            self.weight_server.start()
        self._write_endpoints()

        weights = self.run_dir / "weights"
        for leftover in weights.glob(".tmp-*"):  # a publish cut short by a crash
            shutil.rmtree(leftover, ignore_errors=True)
        existing = [int(p.name[1:]) for p in weights.glob("v*") if p.name[1:].isdigit()]
        self.state.version = max([self.ledger.get("version"), *existing])
        if self.trainer.step > 0 or existing:
            # A resumed learner announces its restored weights as a new version: actors may
            # hold versions from the lost steps, which must not be reused.
            self.publish()

    @staticmethod
    def _probe(tokenizer: Any, p: Problem) -> tuple[list[int], list[int]]:
        """A fixed (prompt, continuation) whose log-probs learner and actors compare after each
        reload: the first held-out prompt followed by its boxed gold answer."""
        prompt = tokenizer(p.problem)["input_ids"]
        cont = tokenizer(f"\\boxed{{{p.gold}}}")["input_ids"]
        return prompt, cont

    def _setup_metrics(self) -> None:
        m = self.metrics = RoleMetrics("learner", self.cfg.metrics, self.run_dir)
        self.g_step = m.gauge("learner_step", "Optimizer steps taken")
        self.g_total = m.gauge("learner_total_steps", "Optimizer steps the run will take")
        self.g_version = m.gauge("learner_policy_version", "Latest published policy version")
        self.h_step = m.histogram(
            "learner_step_seconds", "Wall time of one optimizer step", STEP_BUCKETS
        )
        self.c_tokens = m.counter("learner_tokens_total", "Completion tokens trained on")
        self.c_seqs = m.counter("learner_sequences_total", "Completions trained on")
        self.g_loss = m.gauge("learner_loss", "Loss terms of the last step", ["term"])
        self.g_clip = m.gauge(
            "learner_is_clip_fraction", "Fraction of IS ratios at the cap (last step)"
        )
        self.g_cos = m.gauge("learner_cosine_similarity", "cos(h(f_theta), f_xi) of the last step")
        self.g_kl = m.gauge("learner_ema_kl", "KL(pi_theta || pi_xi) monitor (k3), last step")
        self.g_went = m.gauge("learner_weight_entropy", "Mean entropy of the POPO weights over S+")
        self.g_gnorm = m.gauge("learner_grad_norm", "Global gradient norm before clipping")
        self.g_lr = m.gauge("learner_lr", "Learning rate of the last step")
        self.h_stale = m.histogram(
            "learner_staleness_versions", "Policy-version lag of trained groups", STALENESS_BUCKETS
        )
        self.g_buffer = m.gauge("learner_buffer_groups", "Received groups waiting to be trained")
        self.g_lease = m.gauge(
            "learner_outstanding_leases", "Train leases handed out, not yet back"
        )
        self.h_pub = m.histogram(
            "learner_publish_seconds", "Write + announce of one weight version", STEP_BUCKETS
        )
        self.c_pub_fail = m.counter(
            "learner_publish_failures_total", "Failed weight-version writes (each one retried)"
        )
        self.c_ckpt_fail = m.counter(
            "learner_checkpoint_failures_total", "Failed checkpoint writes (each one retried)"
        )
        self.c_wait = m.counter(
            "learner_wait_seconds_total", "Time the training loop waited for data"
        )
        self.c_leases = m.counter(
            "learner_leases_ended_total", "Leases ended, by outcome", ["outcome"]
        )
        self.g_pass = m.gauge(
            "learner_pass_rate", "Positive fraction of verified completions (all groups)"
        )
        self.g_eval = m.gauge(
            "learner_eval_accuracy", "Held-out sampled accuracy (avg@G) at the last eval"
        )
        self.g_evalk = m.gauge(
            "learner_eval_pass_at_k", "Held-out unbiased pass@G at the last eval"
        )
        self.c_dup = m.counter("learner_duplicates_total", "Late or duplicate completions ignored")
        self.c_dropped = m.counter(
            "learner_dropped_messages_total",
            "Malformed, unexpected or invalid frames dropped on dispatch, ingest and weightstream,"
            " and scored groups the model cannot train on (token ids outside its vocabulary...)",
        )
        # The bound and the last step's worst lag as gauges, so an alert can compare the two.
        self.g_stale_bound = m.gauge(
            "learner_staleness_bound_versions", "Configured max_staleness (versions)"
        )
        self.g_stale_max = m.gauge(
            "learner_staleness_max_versions", "Largest version lag among the last step's groups"
        )
        for outcome in ("trained", "too_stale", self._no_signal_reason()):
            self.c_leases.labels(outcome)  # zeros from the start, so alert ratios have series
        self.g_total.set(self.cfg.learner.total_steps)
        self.g_stale_bound.set(self.cfg.learner.max_staleness)
        port = self.metrics.serve(role_port(self.cfg.metrics, "learner"))
        if port:
            log.info("learner metrics on http://%s:%d/metrics", self.cfg.metrics.host, port)

    def _write_endpoints(self) -> None:
        """Resolved addresses (ports picked by the OS when configured 0), for launchers and tests."""
        eps = {
            "dispatch": self.dispatcher.dispatch_address,
            "ingest": self.dispatcher.ingest_address,
            "weights": self.pub.address,
        }
        if self.weight_server is not None:
            eps["weightstream"] = self.weight_server.address
        (self.run_dir / "endpoints.json").write_text(json.dumps(eps, indent=1))

    def _on_group(self, g: ScoredGroup) -> None:
        st = self.state
        if st.completions_total:
            self.g_pass.set(st.positives_total / st.completions_total)

    # --- the loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        lc = self.cfg.learner
        if self.trainer.step == 0 and not self._evaluated_at_start():
            self.evaluate()
        while self.trainer.step < lc.total_steps and not self.stop_event.is_set():
            batch = self.next_batch()
            if batch is None:
                break
            version = self.state.version  # the policy these groups update
            groups = [decode(r.payload, ScoredGroup) for r in batch]
            useful = [g for g in groups if self._has_signal(g)]
            m = self.train_step(useful) if useful else {"tokens": 0.0}
            used = {g.lease_id for g in useful} if m["tokens"] > 0 else set()
            # Publish before the batch's leases are closed: closing frees admission slots, and a
            # lease issued then must already carry the new version (else it is born stale).
            if used and (
                self.trainer.step % lc.publish_every == 0 or self.trainer.step == lc.total_steps
            ):
                self.publish()
            self.ledger.mark_trained(
                [r.lease_id for r in batch if r.lease_id in used], self.trainer.step
            )
            self.ledger.skip(
                [r.lease_id for r in batch if r.lease_id not in used], self._no_signal_reason()
            )
            self._record(m, batch, used, version)
            if not used:
                continue
            if self.trainer.step % lc.checkpoint_every == 0 or self.trainer.step == lc.total_steps:
                self.checkpoint()
            if (
                lc.eval_every
                and self.trainer.step % lc.eval_every == 0
                and self.trainer.step < lc.total_steps
            ):
                self.evaluate()
            if lc.release_memory:
                release_free_memory()
        if self.trainer.step >= lc.total_steps:
            self.evaluate()
            # Stop dispatching first: finish() frees admission room, and a lease issued after it
            # would stay outstanding forever (found by the chaos test).
            self.dispatcher.stop_event.set()
            self.dispatcher.join(timeout=10)
            self.ledger.finish()
            self._write_summary()

    def train_step(self, groups: list[ScoredGroup]) -> dict[str, float]:
        if self.link is not None:
            self.link.send(RankCommand(op="train", groups=[encode(g) for g in groups]))
        return self.trainer.train_step(groups)

    def _evaluated_at_start(self) -> bool:
        """A learner restarted before its first checkpoint has evaluated step 0 already: doing it
        again costs a whole eval round per restart and adds duplicate step-0 records."""
        try:
            lines = (self.run_dir / "eval.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return False
        return any(json.loads(x)["step"] == 0 for x in lines if x.strip())

    def next_batch(self) -> list[Received] | None:
        """Block until `prompts_per_step` fresh groups are buffered; skip the too-stale ones."""
        lc = self.cfg.learner
        t0 = time.monotonic()
        last_announce = 0.0
        while not self.stop_event.is_set():
            if self.dispatcher.error is not None:
                raise LearnerError("dispatch thread failed") from self.dispatcher.error
            rows = self.ledger.received()
            version = self.state.version
            fresh = [r for r in rows if r.resumed or version - r.version_min <= lc.max_staleness]
            kept = {r.lease_id for r in fresh}
            stale = [r.lease_id for r in rows if r.lease_id not in kept]
            if stale:
                self.ledger.skip(stale, "too_stale")
                self.c_leases.labels("too_stale").inc(len(stale))
            self.g_buffer.set(len(fresh))
            self.g_lease.set(self.ledger.in_flight() - len(fresh))
            if len(fresh) >= lc.prompts_per_step:
                self.c_wait.inc(time.monotonic() - t0)
                return fresh[: lc.prompts_per_step]
            if time.monotonic() - last_announce > 2.0:
                self._announce()  # actors that joined late or missed the PUB catch up
                last_announce = time.monotonic()
            self.metrics.tick()
            time.sleep(0.02)
        return None

    def _has_signal(self, g: ScoredGroup) -> bool:
        return self.trainer.algorithm.has_signal(g)

    def _no_signal_reason(self) -> str:
        return self.trainer.algorithm.no_signal_reason

    def _record(
        self, m: dict[str, float], batch: list[Received], used: set[int], version: int
    ) -> None:
        lags = [version - r.version_min for r in batch if r.lease_id in used]
        for lag in lags:
            self.h_stale.observe(lag)
        if lags:
            self.g_stale_max.set(max(lags))
        self.c_leases.labels("trained").inc(len(used))
        self.c_leases.labels(self._no_signal_reason()).inc(len(batch) - len(used))
        if m["tokens"] > 0:
            self.g_step.set(self.trainer.step)
            self.h_step.observe(m["step_seconds"])
            self.c_tokens.inc(m["tokens"])
            self.tokens_trained += int(m["tokens"])
            self.c_seqs.inc(m["sequences"])
            for key, gauge in (("is_clip_fraction", self.g_clip), ("cos_sim", self.g_cos),
                               ("ema_kl", self.g_kl), ("weight_entropy", self.g_went),
                               ("grad_norm", self.g_gnorm), ("lr", self.g_lr)):  # fmt: skip
                if key in m:
                    gauge.set(m[key])
            for key, v in m.items():
                if key.startswith("loss"):
                    self.g_loss.labels(key.removeprefix("loss_") if key != "loss" else "total").set(
                        v
                    )
            log.info(
                "step %d/%d  loss %.4f  groups %d/%d  tokens %d  %.2fs",
                self.trainer.step, self.cfg.learner.total_steps, m.get("loss", float("nan")),
                len(used), len(batch), m["tokens"], m["step_seconds"],
            )  # fmt: skip
        self.metrics.tick()

    # --- weights, checkpoints, eval ----------------------------------------------------------------

    def publish(self) -> None:
        if self.weight_server is not None and self.weight_server.error is not None:
            raise LearnerError("weight server thread failed") from self.weight_server.error
        t0 = time.perf_counter()
        version = self.state.version + 1
        protect = set(self.state.actor_versions.values())
        if self.link is not None:
            self.link.send(RankCommand(op="publish", version=version, protect=sorted(protect),
                                       probe=list(self.probe)))  # fmt: skip
        msg = write_weights(self.trainer, self.cfg, self.run_dir, self.model_dir, version, protect,
                            self.probe, on_failure=lambda _e: self.c_pub_fail.inc())  # fmt: skip
        self.ledger.set("version", version)
        self.state.version = version
        self.last_ready = msg
        self._announce()
        self.g_version.set(version)
        self.h_pub.observe(time.perf_counter() - t0)

    def _announce(self) -> None:
        if self.last_ready is not None:
            self.pub.send(self.last_ready, timeout_ms=0)

    def checkpoint(self) -> None:
        if self.link is not None:
            self.link.send(RankCommand(op="checkpoint"))
        write_checkpoint(self.trainer, self.cfg, self.run_dir, lambda _e: self.c_ckpt_fail.inc())
        self.ledger.checkpointed(self.trainer.step)

    def evaluate(self) -> dict[str, Any] | None:
        """Held-out sampled accuracy (avg@G) and unbiased pass@G of the current version, generated by
        the actors through the normal pipeline (eval leases are never trained)."""
        if not self.evals:
            return None
        ev = EvalRound(version=self.state.version, pending=list(range(len(self.evals)))[::-1],
                       size=len(self.evals))  # fmt: skip
        self.state.eval = ev
        t0 = time.monotonic()
        last_announce = 0.0
        while not ev.done and not self.stop_event.is_set():
            if self.dispatcher.error is not None:
                raise LearnerError("dispatch thread failed") from self.dispatcher.error
            if time.monotonic() - last_announce > 2.0:
                self._announce()
                last_announce = time.monotonic()
            self.metrics.tick()
            time.sleep(0.05)
        self.state.eval = None
        if not ev.done:
            return None
        g = self.cfg.actor.group_size
        acc = ev.n_positive / max(1, ev.n_total)
        pk = sum(pass_at_k(n, c, min(g, n)) for c, n in ev.per_prompt.values()) / len(ev.per_prompt)
        rec = {"step": self.trainer.step, "version": ev.version, "accuracy": acc, f"pass@{g}": pk,
               "prompts": ev.size, "seconds": time.monotonic() - t0, "t": time.time()}  # fmt: skip
        self.eval_history.append(rec)
        with open(self.run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.g_eval.set(acc)
        self.g_evalk.set(pk)
        log.info("eval at step %d: held-out accuracy %.1f%%, pass@%d %.1f%% (%d prompts, %.0fs)",
                 self.trainer.step, 100 * acc, g, 100 * pk, ev.size, rec["seconds"])  # fmt: skip
        self.metrics.write_jsonl()
        return rec

    def _write_summary(self) -> None:
        evals = [json.loads(x) for x in (self.run_dir / "eval.jsonl").read_text().splitlines()]
        summary = {
            "algorithm": self.cfg.algorithm.name,
            "steps": self.trainer.step,
            "accuracy_before": evals[0]["accuracy"] if evals else None,
            "accuracy_after": evals[-1]["accuracy"] if evals else None,
            "leases": self.ledger.counts(),
            "ledger_problems": self.ledger.check_exactly_once(),
            "tokens_trained": self.tokens_trained,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))

    def close(self) -> None:
        self.dispatcher.stop_event.set()
        self.dispatcher.join(timeout=5)
        if hasattr(self, "pub"):
            self.pub.close()
        if getattr(self, "weight_server", None) is not None:
            self.weight_server.stop()
        self.metrics.close()
        self.ledger.close()


def _follower_main(cfg: RunConfig, run_dir: Path, device: str | None, rank: int) -> int:
    # rank 0 stops the group (a `stop` command after its current step); a signal here would
    # only kill this rank mid-collective
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        follow(cfg, run_dir, resolve_model_dir(cfg), device or "cpu")
        return 0
    except Exception:
        log.exception("learner rank %d failed", rank)
        return 1


def main(cfg: RunConfig, run_dir: str | Path) -> int:
    """`popo learner`: run until `total_steps` (exit 0) or an error (logged, exit 1).

    With `learner.devices` > 1 it starts that many ranks of itself (or, started by torchrun, is one):
    rank 0 runs the learner role, the others `follow`."""
    from popo.learner import ranks

    if cfg.learner.devices > 1 and not ranks.in_group():
        return ranks.launch(ranks.main_argv(), cfg.learner.devices)
    if not ranks.in_group():
        return _leader_main(cfg, run_dir, None)
    rank, world, device = ranks.init_group(cfg.learner.device)
    log.info("learner rank %d of %d on %s", rank, world, device)
    if rank > 0:
        ranks.leave_group(_follower_main(cfg, Path(run_dir), device, rank))
    ranks.leave_group(_leader_main(cfg, run_dir, device))


def _leader_main(cfg: RunConfig, run_dir: str | Path, device: str | None) -> int:
    learner: Learner | None = None

    def on_signal(signum: int, _frame: object) -> None:
        log.info("learner: signal %d, stopping after the current step", signum)
        if learner is not None:
            learner.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        learner = Learner(cfg, run_dir, resolve_model_dir(cfg), device)
        learner.setup()
        learner.run()
        if learner.link is not None:
            learner.link.send(RankCommand(op="stop"))
        return 0
    except Exception:
        log.exception("learner failed")
        return 1
    finally:
        if learner is not None and hasattr(learner, "dispatcher"):
            learner.close()
