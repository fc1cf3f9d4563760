"""Harness of the actor tests (fixtures re-exported by conftest.py): a tiny random model, ONE real vLLM CPU engine for the whole
directory (it takes ~20 s to start), fake learner / verifier peers on real ZeroMQ sockets, and a
transformers float32 reference for log-probs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import zmq

from popo.common import transport
from popo.common.config import RunConfig
from popo.common.messages import Lease, LeaseRequest, Leases, RolloutGroup, WeightsReady
from popo.common.process import free_ports
from popo.common.weights import write_version_dir

# Log-probs of vLLM's CPU float32 kernels vs a transformers float32 forward on the same tokens.
# Measured max |diff| on this model is ~1e-6; the bound leaves room for other CPUs' kernels.
LOGPROB_ATOL = 1e-4


def free_port() -> int:
    return free_ports(1)[0]


def actor_test_config() -> RunConfig:
    cfg = RunConfig()
    a = cfg.actor
    a.group_size = 4
    a.max_tokens = 12
    a.max_inflight_prompts = 4
    a.max_pending_groups = 6
    a.kv_cache_gib = 1
    a.drain_timeout_s = 30.0
    cfg.metrics.enabled = False
    cfg.transport.linger_ms = 200
    return cfg


@pytest.fixture(autouse=True)
def fast_lease_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Actors here re-ask for leases after 0.1 s (at most 1 s), so tests whose learner shows up
    late or drops a request do not wait out the production back-off."""
    from popo.actors import actor

    monkeypatch.setattr(actor, "LEASE_RETRY_S", 0.1)
    monkeypatch.setattr(actor, "LEASE_RETRY_MAX_S", 1.0)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from popo.common.demo_model import save_random_model

    return save_random_model(tmp_path_factory.mktemp("actor-model") / "m", seed=0)


class Reference:
    """transformers float32 copy of the weights the engine is expected to serve."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.base = {k: v.clone() for k, v in self.model.state_dict().items()}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state)

    def perturbed(self, seed: int, scale: float = 0.1) -> dict:
        """The base weights plus N(0, scale^2) noise on every tensor (a 'trained' version)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in self.base.items()}

    def logprobs(self, prompt: list[int], completion: list[int]) -> np.ndarray:
        """[T] log p(completion_t | prompt, completion_<t) under the loaded weights."""
        import torch

        ids = torch.tensor([list(prompt) + list(completion)])
        with torch.no_grad():
            logits = self.model(ids).logits[0].float()  # [L, V]
        lp = torch.log_softmax(logits, dim=-1)
        p = len(prompt)
        return lp[p - 1 : -1].gather(-1, ids[0, p:, None])[:, 0].numpy()


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> Reference:
    return Reference(model_dir)


@pytest.fixture(scope="session")
def engine(model_dir: Path):
    from popo.actors.engine import RolloutEngine

    cfg = actor_test_config()
    eng = RolloutEngine(model_dir, cfg.actor, cfg.model, seed=0)
    eng.start(initial_version=0)
    yield eng
    eng.close()


@dataclass
class Peers:
    """Fake learner (ROUTER + PUB) and verifier (PULL) on real sockets, bound on demand."""

    cfg: RunConfig
    dispatch_addr: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")
    rollouts_addr: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")
    weights_addr: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")
    ctx: zmq.Context = field(default_factory=zmq.Context)
    learner: transport.Channel | None = None
    verifier: transport.Channel | None = None
    pub: transport.Channel | None = None
    next_lease: int = 0
    requests: list[LeaseRequest] = field(default_factory=list)
    granted: list[Lease] = field(default_factory=list)
    received: list[RolloutGroup] = field(default_factory=list)

    def endpoints(self):
        from popo.actors.actor import ActorEndpoints

        return ActorEndpoints(self.dispatch_addr, [self.rollouts_addr], self.weights_addr)

    def bind_learner(self) -> None:
        self.learner = transport.bind(self.ctx, "dispatch", self.dispatch_addr, self.cfg.transport)

    def bind_verifier(self) -> None:
        self.verifier = transport.bind(self.ctx, "rollouts", self.rollouts_addr, self.cfg.transport)

    def bind_pub(self) -> None:
        self.pub = transport.bind(self.ctx, "weights", self.weights_addr, self.cfg.transport)

    def serve(self, seconds: float, grant: int | None = None, until=None) -> None:
        """Answer lease requests (with up to `grant` leases each, default all asked) and collect
        rollouts for `seconds`, or until `until()` is true."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until and until()):
            if self.learner is not None and (got := self.learner.recv(5)) is not None:
                ident, req = got
                assert isinstance(req, LeaseRequest)
                self.requests.append(req)
                leases = [self._lease() for _ in range(min(req.n, grant if grant else req.n))]
                self.granted += leases
                self.learner.send(Leases(leases=leases, learner_version=0), identity=ident)
            if self.verifier is not None:
                while (got := self.verifier.recv(0 if self.learner else 5)) is not None:
                    assert isinstance(got[1], RolloutGroup)
                    self.received.append(got[1])
            elif self.learner is None:
                time.sleep(0.005)

    def _lease(self) -> Lease:
        self.next_lease += 1
        a, b = divmod(self.next_lease * 7919, 100)
        return Lease(
            lease_id=self.next_lease,
            prompt_id=f"p{self.next_lease}",
            prompt=f"{a % 100}+{b}=",
            gold=str(a % 100 + b),
            dispatch_version=0,
            deadline=time.time() + 120,
        )

    def close(self) -> None:
        for ch in (self.learner, self.verifier, self.pub):
            if ch is not None:
                ch.close()
        self.ctx.term()


@pytest.fixture
def peers() -> Iterator[Peers]:
    p = Peers(actor_test_config())
    yield p
    p.close()


@contextmanager
def running(actor) -> Iterator[threading.Event]:
    """Run `actor.run` in a thread; on exit stop it (as SIGTERM does), join, close."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            actor.run(stop)
        except BaseException as e:
            errors.append(e)

    th = threading.Thread(target=target, name="actor", daemon=True)
    th.start()
    try:
        yield stop
    finally:
        stop.set()
        th.join(timeout=60)
        actor.close()
    assert not th.is_alive(), "actor did not stop"
    if errors:
        raise errors[0]


def assert_serves(engine, reference: Reference, prompt_ids: list[int]) -> np.ndarray:
    """Sample a group; its log-probs must equal the reference's on the same tokens. Returns them."""
    group = engine.sample(prompt_ids).result(timeout=60)
    out = []
    for s in group.samples:
        ref = reference.logprobs(prompt_ids, s.token_ids.tolist())
        np.testing.assert_allclose(s.logprobs, ref, atol=LOGPROB_ATOL, rtol=0)
        out.append(ref)
    return np.concatenate(out)


def publish(tmp_path: Path, name: str, state: dict) -> tuple[Path, str, int]:
    """Write a version directory as the learner does; returns (dir, sha256, nbytes)."""
    path, sha, nbytes = write_version_dir(tmp_path / name, state)
    return path.parent, sha, nbytes


def announce_until(peers: Peers, msg: WeightsReady, done, seconds: float = 60) -> None:
    """PUB the announcement repeatedly (a SUB that joined late misses the first) until `done()`."""
    end = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < end, f"actor did not act on version {msg.version}"
        peers.pub.send(msg)
        peers.serve(0.1)
