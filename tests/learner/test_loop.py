"""The learner loop with fake peers: a real `Learner` (tiny random model, real ledger, real ZeroMQ
sockets, real weight files) and, in a thread of this test, a fake actor + verifier that leases
prompts, makes up scored groups and pushes them to ingest. Covers the hand-off from ingest to the
training loop, publish-before-close, `too_stale`, evaluation beside training, and resume."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from popo.common import transport
from popo.common.config import RunConfig
from popo.common.messages import (
    LeaseRequest,
    Leases,
    ScoredCompletion,
    ScoredGroup,
    WeightsReady,
    pack_f32,
    pack_ids,
)
from popo.common.metrics import RoleMetrics
from popo.common.run_dir import RunDir
from popo.learner.batches import BatchSource
from popo.learner.ledger import Ledger, LedgerReader
from popo.learner.orchestrator import Orchestrator
from popo.learner.service import Learner
from popo.learner.staleness import StalenessPolicy
from popo.learner.stats import LearnerStats

G = 2


def _config(run_dir: Path, total_steps: int, **learner: object) -> RunConfig:
    cfg = RunConfig(
        learner={
            "total_steps": total_steps,
            "prompts_per_step": 2,
            "max_staleness": 1,
            "checkpoint_every": 1,
            "eval_every": 2,
            **learner,
        },
        actor={"group_size": G, "max_tokens": 8},
        data={"eval_size": 4, "synthetic": {"n_train": 40, "n_test": 8}},
    )
    t = cfg.transport
    t.dispatch_port = t.ingest_port = t.weights_port = t.weightstream_port = 0
    t.linger_ms = 0
    cfg.metrics.base_port = 0
    cfg.deploy.run_dir = str(run_dir)
    return cfg


def _group(lease_id: int, version: int, n_positive: int, rng: np.random.Generator) -> ScoredGroup:
    comps = [
        ScoredCompletion(
            token_ids=pack_ids(rng.integers(3, 40, 4)),
            logprobs=pack_f32(rng.uniform(-3, -0.5, 4)),
            reward=1.0,
            verdict="positive",
        )
        for _ in range(n_positive)
    ]
    return ScoredGroup(
        lease_id=lease_id,
        prompt_id=str(lease_id),
        prompt_token_ids=pack_ids([5, 6, 7]),
        completions=comps,
        forwarded="positives",
        n_total=G,
        n_positive=n_positive,
        verdicts={"positive": n_positive, "negative": G - n_positive},
        version_min=version,
        version_max=version,
        actor_id="fake-0",
        t_leased=0.0,
        t_generated=0.0,
        t_verified=0.0,
        verify_seconds=0.0,
    )


class FakePeers(threading.Thread):
    """Actor + verifier in one thread: serves the announced version, leases prompts, answers
    every train lease with a one-positive group sampled by the version it serves (the last announced)
    and every eval lease with 1 of G positive.

    `hold_eval_until_step`: eval groups are kept back until the learner has taken that step (a
    learner that waited for its evaluation before training would never get there).
    `stale_after_version`: once the learner serves this version, one more train lease is answered
    as if sampled by version 0."""

    def __init__(
        self,
        learner: Learner,
        hold_eval_until_step: int = 0,
        stale_after_version: int | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.learner = learner
        self.hold = hold_eval_until_step
        self.stale_after = stale_after_version
        self.stale_lease: int | None = None
        self.version = 0
        self.eval_versions: list[int] = []
        self.announced: list[tuple[int, bool]] = []
        """(version, whether the held eval groups had been pushed) of each new announcement."""
        self.released = False
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as e:
            self.error = e

    def _serve(self) -> None:
        cfg, eps = (
            self.learner.cfg,
            json.loads((self.learner.run_dir / "endpoints.json").read_text()),
        )
        ctx = zmq.Context()
        t = cfg.transport
        dealer = transport.connect(ctx, "dispatch", eps["dispatch"], t, identity="fake-0:1")
        push = transport.connect(ctx, "ingest", eps["ingest"], t)
        sub = transport.connect(ctx, "weights", eps["weights"], t)
        rng = np.random.default_rng(0)
        held: list[ScoredGroup] = []
        try:
            while not self.stop.is_set():
                while (got := sub.recv(0)) is not None:
                    if isinstance(got[1], WeightsReady) and got[1].version > self.version:
                        self.version = got[1].version
                        self.announced.append((self.version, self.released))
                dealer.send(LeaseRequest(actor_id="fake-0", n=4, policy_version=self.version))
                got = dealer.recv(2000)
                leases = got[1].leases if got is not None and isinstance(got[1], Leases) else []
                for lease in leases:
                    if lease.lease_id < 0:
                        self.eval_versions.append(self.version)
                        held.append(_group(lease.lease_id, self.version, 1, rng))
                        continue
                    version = self.version  # the announced weights, as a real actor samples
                    if (
                        self.stale_after is not None
                        and self.stale_lease is None
                        and self.learner.orch.version >= self.stale_after
                    ):
                        version, self.stale_lease = 0, lease.lease_id
                    push.send(_group(lease.lease_id, version, 1, rng))
                if held and self.learner.trainer.step >= self.hold:
                    for g in held:
                        push.send(g)
                    held.clear()
                    self.released = True
                if not leases:
                    time.sleep(0.02)
        finally:
            for s in (dealer, push, sub):
                s.close()
            ctx.term()


def _run(
    cfg: RunConfig, run_dir: Path, model_dir: Path, **peers: object
) -> tuple[Learner, FakePeers]:
    learner = Learner(cfg, run_dir, model_dir)
    learner.setup()
    fake = FakePeers(learner, **peers)  # type: ignore[arg-type]
    fake.start()
    done = threading.Thread(target=learner.run, daemon=True)
    done.start()
    done.join(120)
    fake.stop.set()
    fake.join(10)
    learner.close()
    assert not done.is_alive(), "the learner loop did not finish"
    assert fake.error is None, fake.error
    return learner, fake


def _leases(run_dir: Path) -> list[dict]:
    with LedgerReader(RunDir(run_dir).ledger) as db:
        return db.leases()


def test_trains_evaluates_beside_training_and_skips_stale(tmp_path, random_model_dir):
    run_dir = tmp_path / "run"
    cfg = _config(run_dir, total_steps=4)
    _, fake = _run(cfg, run_dir, random_model_dir, hold_eval_until_step=1, stale_after_version=2)
    # every step trained, every lease ended once; the late group from version 0 was too stale
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["ledger_problems"] == []
    rows = _leases(run_dir)
    stale = [r for r in rows if r["reason"] == "too_stale"]
    assert [r["lease_id"] for r in stale] == [fake.stale_lease]
    trained = [r for r in rows if r["state"] == "trained"]
    assert sorted({r["step"] for r in trained}) == [1, 2, 3, 4]
    assert all(r["step"] - 1 - r["version_min"] <= 1 for r in trained)  # within max_staleness
    # publish before close: a lease issued after step k's leases closed already carries version k
    for k in (1, 2, 3):
        closed = max(r["ended_at"] for r in trained if r["step"] == k)
        later = [r for r in rows if r["kind"] == "train" and r["issued_at"] > closed]
        assert all(r["dispatch_version"] >= k for r in later)
    # evaluation: steps 0, 2, 4, each sampled only by the weights it is labelled with; step 1 was
    # trained while the step-0 round was still out (its groups were held until then)
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [(e["step"], e["version"]) for e in evals] == [(0, 0), (2, 2), (4, 4)]
    assert all(e["accuracy"] == pytest.approx(1 / G) for e in evals)
    assert all(e["per_prompt"] == [[1, G]] * 4 for e in evals)  # eval_size 4, in split order
    assert sorted(set(fake.eval_versions)) == [0, 2, 4]
    assert set(summary["startup"]) >= {"learner_ready", "actor_ready", "first_step", "base_eval"}


def test_keeps_training_while_an_evaluation_round_is_out(tmp_path, random_model_dir):
    """With max_staleness 2 the learner trains steps 1 and 2 on groups sampled by version 0 while
    the step-0 round is out (its groups are held until step 2), writing versions 1 and 2 without
    announcing them; version 3 waits for the round, and actors never leave version 0 before it."""
    run_dir = tmp_path / "run"
    cfg = _config(run_dir, total_steps=4, max_staleness=2, eval_every=0)
    learner, fake = _run(cfg, run_dir, random_model_dir, hold_eval_until_step=2)
    assert json.loads((run_dir / "summary.json").read_text())["ledger_problems"] == []
    assert not [v for v, released in fake.announced if not released]
    assert fake.announced[0][0] >= 2  # the held versions collapse into the newest
    trained = [r for r in _leases(run_dir) if r["state"] == "trained"]
    assert {r["version_min"] for r in trained if r["step"] <= 2} == {0}
    assert all(r["step"] - 1 - r["version_min"] <= 2 for r in trained)
    assert not [r for r in _leases(run_dir) if r["reason"] == "too_stale"]
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [(e["step"], e["version"]) for e in evals] == [(0, 0), (4, 4)]
    assert fake.eval_versions.count(0) == 4 and set(fake.eval_versions) == {0, 4}
    assert learner.orch.held is None


def test_resume_trains_each_step_once(tmp_path, random_model_dir):
    run_dir = tmp_path / "run"
    _run(_config(run_dir, total_steps=2), run_dir, random_model_dir)
    _run(_config(run_dir, total_steps=4), run_dir, random_model_dir)
    rows = _leases(run_dir)
    steps = [r["step"] for r in rows if r["state"] == "trained"]
    assert sorted(set(steps)) == [1, 2, 3, 4] and all(steps.count(s) == 2 for s in (1, 2, 3, 4))
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals].count(0) == 1  # the resumed learner skips step 0
    # a restarted learner's gauges start at the last evaluation, not at 0, past a torn last line
    with open(run_dir / "eval.jsonl", "a") as f:
        f.write('{"step": 6, "accu')
    restarted = Learner(_config(run_dir, total_steps=4), run_dir, random_model_dir)
    restarted.setup()
    try:
        registry = restarted.stats.metrics.registry
        assert registry.get_sample_value("popo_learner_eval_accuracy") == evals[-1]["accuracy"]
    finally:
        restarted.close()
    assert json.loads((run_dir / "summary.json").read_text())["ledger_problems"] == []


class _CountingLedger(Ledger):
    reads = 0

    def received(self, *a, **kw):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().received(*a, **kw)


def test_batch_source_waits_for_ingest_instead_of_polling(tmp_path):
    """`take` reads the ledger once, then sleeps until ingest signals enough groups for a batch."""
    ledger = _CountingLedger(tmp_path / "ledger.db")
    source = BatchSource(ledger, StalenessPolicy(max_staleness=1, prompts_per_step=3))
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(source.take(version=0, timeout_s=30)))
    waiter.start()
    time.sleep(0.5)
    leases = ledger.issue(3, "a", 0, time.time() + 60, 10)
    for i, row in enumerate(leases[:2]):
        ledger.receive(row.lease_id, 0, G, 1, b"x")
        source.notify()
        time.sleep(0.2)
        assert waiter.is_alive(), f"returned with {i + 1} of 3 groups"
    assert ledger.reads == 1  # no re-read while the batch cannot be complete
    ledger.receive(leases[2].lease_id, 0, G, 1, b"x")
    source.notify()
    waiter.join(5)
    assert not waiter.is_alive() and [r.lease_id for r in got[0]] == [r.lease_id for r in leases]
    # wake() ends a wait at once (shutdown)
    t = threading.Thread(target=lambda: got.append(source.take(version=0, timeout_s=30)))
    ledger.mark_trained([r.lease_id for r in leases], 1)
    t.start()
    source.wake()
    t.join(5)
    assert not t.is_alive() and got[-1] is None
    ledger.close()


def test_startup_phases_are_recorded_once_and_actor_ready_as_soon_as_known(tmp_path):
    cfg = _config(tmp_path, total_steps=1)
    stats = LearnerStats(RoleMetrics("learner", cfg.metrics), 1, 1)
    orch = Orchestrator(cfg, tmp_path, stats, t0=time.time() - 10)
    orch.phase("learner_ready")
    assert list(orch.startup) == ["learner_ready"] and 10 <= orch.startup["learner_ready"] < 20
    orch.state.first_request_at = orch.t0 + 12.0  # an engine asked for leases
    orch.phase("first_step")
    orch.phase("first_step")
    assert list(orch.startup) == ["learner_ready", "actor_ready", "first_step"]
    assert orch.startup["actor_ready"] == 12.0
    registry = stats.metrics.registry
    assert registry.get_sample_value("popo_learner_startup_seconds", {"phase": "actor_ready"}) == 12
