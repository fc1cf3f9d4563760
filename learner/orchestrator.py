"""The learner's side facing actors and verifiers: prompts, the ledger, the dispatch thread, the
batch hand-off, weight announcements and evaluation rounds. The training loop (`service.Learner`)
sees only `next_batch`, `close_batch`, `announce` and the eval calls.

    actors <-ROUTER- [dispatch thread] -PULL<- verifier        (leases out, scored groups in)
                          | ledger.db (SQLite WAL: leases + buffer), BatchSource.notify
                     [training loop] -PUB-> actors            (WeightsReady)

Evaluation rounds run beside training: a round samples the held-out prompts with the weights of
one version, and no newer version is announced until the round is complete, so every sample of a
round comes from the weights it is labelled with. The learner keeps training and writing versions
meanwhile, as far as the groups the evaluated weights sample stay within the staleness bound; the
newest is announced when the round is recorded.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any, Literal

import zmq

from popo.common import transport
from popo.common.config import RunConfig
from popo.common.data import Problem, drop_too_long, encode_prompt, load_prompts, render_problems
from popo.common.messages import WeightsReady
from popo.common.metrics import pass_at_k
from popo.common.run_dir import RunDir, append_jsonl, read_jsonl
from popo.learner.batches import BatchSource
from popo.learner.dispatch import Dispatcher, EvalRound, SharedState
from popo.learner.ledger import Ledger, Received
from popo.learner.staleness import StalenessPolicy
from popo.learner.stats import LearnerStats

log = logging.getLogger("popo.learner")

ANNOUNCE_EVERY_S = 2.0
"""Re-announce the latest version this often while waiting, for actors that joined late or
missed the PUB message."""


class LearnerError(RuntimeError):
    pass


class Orchestrator:
    def __init__(self, cfg: RunConfig, run_dir: Path, stats: LearnerStats, t0: float) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.paths = RunDir(run_dir)
        self.stats = stats
        self.t0 = t0
        self.startup: dict[str, float] = {}
        """Seconds from `t0` (the run's launch) to: learner_ready, actor_ready, first_step."""
        self.state = SharedState()
        self.last_ready: WeightsReady | None = None
        self.held: WeightsReady | None = None
        """The newest version written while an evaluation round is out, announced once the round
        is recorded (actors keep the evaluated weights until then)."""
        self._last_announce = 0.0
        self.eval_history: list[dict[str, Any]] = []
        """Every evaluation of the run, earlier learner processes' included (eval.jsonl)."""

    def setup(self, tokenizer: Any, vocab_size: int, trainer_step: int) -> None:
        """Open the ledger (rewound to the restored step), load the prompts and start serving."""
        cfg = self.cfg
        self.ledger = Ledger(self.paths.ledger)
        rewound = self.ledger.rewind_to(trainer_step)
        if rewound:
            log.info("%d lease(s) trained after the checkpoint go back to the buffer", rewound)
        self.eval_history = read_jsonl(self.paths.evals)
        if self.eval_history:  # a restarted learner's gauges show the last evaluation, not 0
            last = self.eval_history[-1]
            pass_k = next(v for k, v in last.items() if k.startswith("pass@"))
            self.stats.evaluated(last["accuracy"], pass_k)
        train = self._prompts("train", tokenizer)
        self.evals = self._prompts("test", tokenizer)[: cfg.data.eval_size]
        order = list(range(len(train)))
        random.Random(cfg.learner.seed).shuffle(order)
        self.probe_problem = (self.evals or train)[0]

        self.batches = BatchSource(
            self.ledger,
            StalenessPolicy.from_config(cfg.learner),
            on_stale=lambda n: self.stats.ended("too_stale", n),
        )
        t = cfg.transport
        self.dispatcher = Dispatcher(
            cfg,
            self.ledger,
            train,
            order,
            self.evals,
            self.state,
            transport.address(t, "dispatch", run_dir=self.run_dir),
            transport.address(t, "ingest", run_dir=self.run_dir),
            on_group=self._on_group,
            on_duplicate=self.stats.duplicate,
            on_drop=self.stats.drop,
            vocab_size=vocab_size,
        )
        self.dispatcher.start()
        self.dispatcher.ready.wait()
        if self.dispatcher.error is not None:
            raise self.dispatcher.error
        self.pub = transport.bind(
            zmq.Context.instance(),
            "weights",
            transport.address(t, "weights", run_dir=self.run_dir),
            t,
        )
        self.weight_server = None
        if t.weights_mode != "shared":  # actors without our weights/ stream them from here
            from popo.common.weight_stream import WeightServer

            self.weight_server = WeightServer(
                self.paths.weights,
                transport.address(t, "weightstream", run_dir=self.run_dir),
                t,
                on_drop=self.stats.drop,
            )
            self.weight_server.start()
        self._write_endpoints()

        store = self.paths.weight_store()
        store.remove_leftovers()  # a publish cut short by a crash
        existing = store.versions()
        self.state.version = max([self.ledger.get("version"), *existing])
        self.resumed_weights = bool(existing)

    def _prompts(self, split: Literal["train", "test"], tokenizer: Any) -> list[Problem]:
        cfg = self.cfg
        budget = cfg.model.max_model_len - cfg.actor.max_tokens
        raw = render_problems(load_prompts(cfg.data, split), cfg.data, tokenizer)
        kept, dropped = drop_too_long(raw, lambda t: len(encode_prompt(tokenizer, t)), budget)
        if dropped:
            log.warning(
                "%s split: %d of %d prompts are longer than max_model_len - max_tokens"
                " = %d tokens and are never leased",
                split,
                dropped,
                len(raw),
                budget,
            )
        if not kept:
            raise LearnerError(f"no {split} prompt fits in {budget} tokens")
        return kept

    def _write_endpoints(self) -> None:
        """Resolved addresses (ports picked by the OS when configured 0), for launchers and tests."""
        eps = {
            "dispatch": self.dispatcher.dispatch_address,
            "ingest": self.dispatcher.ingest_address,
            "weights": self.pub.address,
        }
        if self.weight_server is not None:
            eps["weightstream"] = self.weight_server.address
        self.paths.endpoints.write_text(json.dumps(eps, indent=1))

    def _on_group(self, _g: object) -> None:  # dispatch thread
        self.stats.pass_rate(self.state.positives_total, self.state.completions_total)
        self.batches.notify()

    @property
    def version(self) -> int:
        return self.state.version

    def check(self) -> None:
        """Raise if a background thread failed (its error is the cause)."""
        if self.dispatcher.error is not None:
            raise LearnerError("dispatch thread failed") from self.dispatcher.error
        if self.weight_server is not None and self.weight_server.error is not None:
            raise LearnerError("weight server thread failed") from self.weight_server.error

    def _tend(self) -> None:
        """What waiting loops do between wake-ups: check threads, re-announce, write metrics."""
        self.check()
        if time.monotonic() - self._last_announce > ANNOUNCE_EVERY_S:
            self.announce()
        ev = self.state.eval
        self.stats.eval_round(len(ev.per_prompt) if ev else 0, ev.size if ev else 0)
        if self.state.first_request_at is not None:
            self.phase("actor_ready")
        self.stats.metrics.tick()

    def phase(self, name: str) -> None:
        """Record start-up phase `name` as reached now, once; and actor_ready (the first lease
        request: an engine is up) as soon as it is known."""
        for phase, t in (("actor_ready", self.state.first_request_at), (name, time.time())):
            if t is not None and phase not in self.startup:
                self.startup[phase] = round(t - self.t0, 3)
                self.stats.started(phase, self.startup[phase])

    # --- batches ----------------------------------------------------------------------------------

    def next_batch(self, stop: threading.Event) -> list[Received] | None:
        """Block until `prompts_per_step` trainable groups are buffered (None once `stop` is set)."""
        t0 = time.monotonic()
        while not stop.is_set():
            self.poll_eval()
            batch = self.batches.take(self.state.version, timeout_s=ANNOUNCE_EVERY_S)
            self.stats.queues(
                self.batches.buffered, self.ledger.in_flight() - self.batches.buffered
            )
            if batch is not None:
                self.stats.waited(time.monotonic() - t0)
                return batch
            self._tend()
        return None

    def close_batch(self, batch: list[Received], used: set[int], step: int, reason: str) -> None:
        """End every lease of a batch: trained at `step` if in `used`, else skipped for `reason`."""
        self.ledger.mark_trained([r.lease_id for r in batch if r.lease_id in used], step)
        self.ledger.skip([r.lease_id for r in batch if r.lease_id not in used], reason)
        self.stats.ended("trained", len(used))
        self.stats.ended(reason, len(batch) - len(used))

    # --- weights ----------------------------------------------------------------------------------

    def announce(self, msg: WeightsReady | None = None) -> None:
        """Announce `msg` (a newly written version, the learner's from now on), or again the last.
        While an evaluation round is out, `msg` is held back until the round is recorded."""
        if msg is not None:
            self.state.version = msg.version
            self.ledger.set("version", msg.version)
            if self.state.eval is not None:
                self.held = msg
                log.debug(
                    "version %d held back until the evaluation round is recorded", msg.version
                )
                return
            self.held = None
            self.last_ready = msg
        if self.last_ready is not None:
            self.pub.send(self.last_ready, timeout_ms=0)
        self._last_announce = time.monotonic()

    def served_versions(self) -> set[int]:
        return self.state.served_versions()

    # --- evaluation -------------------------------------------------------------------------------

    def may_write(self, version: int) -> bool:
        """Whether `version` may be written and held back while an evaluation round is out: the
        actors keep sampling train groups with the evaluated weights, which the policy that
        `version` is must still be allowed to train on. Otherwise the round is waited for."""
        ev = self.state.eval
        return ev is None or version - ev.version <= self.cfg.learner.max_staleness

    def start_eval(self, step: int, stop: threading.Event) -> None:
        """Start sampling the held-out prompts with the current version (labelled `step`), once
        a round still out for an earlier step is recorded."""
        ev = self.state.eval
        if ev is not None:
            if ev.step == step:
                return
            self.finish_eval(stop)
        if self.state.eval is not None or (
            self.eval_history and self.eval_history[-1]["step"] == step
        ):
            return  # stopped while waiting, or this step is evaluated already
        n = len(self.evals)
        self.state.eval = EvalRound(
            version=self.state.version, pending=list(range(n))[::-1], size=n, step=step
        )

    def finish_eval(self, stop: threading.Event) -> dict[str, Any] | None:
        """Wait for the round in progress, then record it (eval.jsonl); None if there was none or
        `stop` came first."""
        ev = self.state.eval
        if ev is None:
            return None
        while not ev.finished.wait(ANNOUNCE_EVERY_S / 4):
            if stop.is_set():
                return None
            self._tend()
        return self._record_eval(ev)

    def poll_eval(self) -> None:
        """Record the round in progress if it is complete (and announce what it held back)."""
        ev = self.state.eval
        if ev is not None and ev.finished.is_set():
            self._record_eval(ev)

    def _record_eval(self, ev: EvalRound) -> dict[str, Any]:
        self.state.eval = None
        self.stats.eval_round(0, 0)  # at once: a learner with batches waiting does not `_tend`
        g = self.cfg.actor.group_size
        acc = ev.n_positive / max(1, ev.n_total)
        pk = sum(pass_at_k(n, c, min(g, n)) for c, n in ev.per_prompt.values()) / len(ev.per_prompt)
        rec = {
            "step": ev.step,
            "version": ev.version,
            "accuracy": acc,
            f"pass@{g}": pk,
            "prompts": ev.size,
            # positives and samples per held-out prompt, in the split's order: two rounds of
            # the run are compared prompt by prompt (`popo report`'s paired p-value)
            "per_prompt": [list(ev.per_prompt[i]) for i in sorted(ev.per_prompt)],
            "seconds": time.monotonic() - ev.started,
            "t": time.time(),
        }
        self.eval_history.append(rec)
        append_jsonl(self.paths.evals, rec)
        self.stats.evaluated(acc, pk)
        log.info(
            "eval at step %d: held-out accuracy %.1f%%, pass@%d %.1f%% (%d prompts, %.0fs)",
            ev.step,
            100 * acc,
            g,
            100 * pk,
            ev.size,
            rec["seconds"],
        )
        self.stats.metrics.write_jsonl()
        if self.held is not None:
            self.announce(self.held)
        return rec

    def evaluated_at_start(self) -> bool:
        """A learner restarted before its first checkpoint has evaluated step 0 already: doing it
        again costs a whole eval round per restart and adds duplicate step-0 records."""
        return any(e["step"] == 0 for e in self.eval_history)

    # --- end --------------------------------------------------------------------------------------

    def finish(self) -> None:
        """The last step is trained: stop dispatching, then end every lease still open."""
        # In this order: finish() frees admission room, and a lease issued after it would stay
        # outstanding forever.
        self.dispatcher.stop_event.set()
        self.dispatcher.join(timeout=10)
        self.ledger.finish()

    def close(self) -> None:
        self.batches.wake()
        self.dispatcher.stop_event.set()
        self.dispatcher.join(timeout=5)
        if hasattr(self, "pub"):
            self.pub.close()
        if getattr(self, "weight_server", None) is not None:
            self.weight_server.stop()
        self.ledger.close()
