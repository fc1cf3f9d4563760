"""Fixtures of the verifier tests: a real scoring pool, a real Verifier on 127.0.0.1 (port 0),
and fakes for its peers (an actor PUSH, a learner PULL) over real ZeroMQ sockets."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import zmq

from popo.common import transport
from popo.common.config import RunConfig
from popo.common.messages import Completion, RolloutGroup, ScoredGroup, pack_f32, pack_ids
from popo.verifier import service
from popo.verifier.pool import PoolLimits, ScoringPool
from popo.verifier.service import Verifier

HANG = r"So the answer is \boxed{9^{9^{9^{9}}}}"
"""sympy tries to evaluate the power tower: runs until killed."""


def make_cfg(**verifier: Any) -> RunConfig:
    algorithm = verifier.pop("algorithm", "popo")
    return RunConfig(
        verifier={"num_workers": 2, "timeout_s": 2.0, **verifier},
        algorithm={"name": algorithm},
        transport={"rollouts_port": 0, "ingest_port": 0, "linger_ms": 0},
        metrics={"enabled": False},
    )


def make_group(lease_id: int, gold: str, texts: list[str], version: int = 3) -> RolloutGroup:
    rng = np.random.default_rng(lease_id)
    comps = [
        Completion(
            token_ids=pack_ids(rng.integers(0, 100, size=5 + i)),
            logprobs=pack_f32(-rng.random(5 + i)),
            text=t,
            finish_reason="stop",
        )
        for i, t in enumerate(texts)
    ]
    now = time.time()
    return RolloutGroup(
        lease_id=lease_id,
        prompt_id=f"p{lease_id}",
        prompt_token_ids=pack_ids([1, 2, 3]),
        gold=gold,
        completions=comps,
        version_min=version - 1,
        version_max=version,
        actor_id="actor-test",
        t_leased=now - 2,
        t_started=now - 1,
        t_finished=now,
    )


class Peers:
    """A fake learner (ingest PULL, bound on a free port) and a fake actor (rollouts PUSH)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.learner = transport.bind(self.ctx, "ingest", "tcp://127.0.0.1:*", cfg.transport)
        self.actor: transport.Channel | None = None

    def connect_actor(self, addrs: str | list[str]) -> None:
        self.actor = transport.connect(self.ctx, "rollouts", addrs, self.cfg.transport)

    def send(self, group: RolloutGroup) -> None:
        assert self.actor is not None
        assert self.actor.send(group, timeout_ms=5000), "verifier did not accept a group"

    def collect(self, n: int, timeout_s: float = 30.0) -> list[ScoredGroup]:
        out: list[ScoredGroup] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < n and time.monotonic() < deadline:
            got = self.learner.recv(timeout_ms=100)
            if got is not None:
                assert isinstance(got[1], ScoredGroup)
                out.append(got[1])
        assert len(out) == n, f"got {len(out)} scored groups, expected {n}"
        return out

    def close(self) -> None:
        if self.actor is not None:
            self.actor.close()
        self.learner.close()
        self.ctx.term()


@contextmanager
def running_verifier(cfg: RunConfig, ingest_addr: str, replica: int = 0) -> Iterator[Verifier]:
    """A Verifier set up, run and closed in its own thread (its sockets never leave it)."""
    v = Verifier(cfg, replica=replica, ingest_addr=ingest_addr)
    stop = threading.Event()
    ready = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            v.setup()
            ready.set()
            v.run(stop)
        except BaseException as e:
            errors.append(e)
            ready.set()
        finally:
            v.close()

    th = threading.Thread(target=target, name=f"verifier-{replica}", daemon=True)
    th.start()
    assert ready.wait(60), "verifier did not start"
    if errors:
        raise errors[0]
    try:
        yield v
    finally:
        stop.set()
        th.join(30)
        assert not th.is_alive(), "verifier did not stop"
        if errors:
            raise errors[0]


@pytest.fixture(autouse=True)
def quick_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Verifiers here wait at most 0.1 s per loop step, so each stops within 0.1 s of its test."""
    monkeypatch.setattr(service, "WAIT_S", 0.1)


@pytest.fixture
def peers() -> Iterator[Peers]:
    p = Peers(make_cfg())
    yield p
    p.close()


@pytest.fixture(scope="module")
def pool() -> Iterator[ScoringPool]:
    with ScoringPool(2, PoolLimits(timeout_s=2.0)) as p:
        yield p


def score_all(pool: ScoringPool, items: list[tuple[str, str]], timeout_s: float = 120.0) -> list:
    """Score (gold, text) pairs on `pool`; results in input order."""
    base = pool_next_id(pool)
    for k, (gold, text) in enumerate(items):
        pool.submit(base + k, gold, text)
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < len(items):
        assert time.monotonic() < deadline, "pool did not finish"
        for r in pool.poll(0.5):
            got[r.task_id] = r
    return [got[base + k] for k in range(len(items))]


_ids = {"next": 0}


def pool_next_id(pool: ScoringPool) -> int:
    _ids["next"] += 1_000_000
    return _ids["next"]
