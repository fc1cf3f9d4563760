"""Actor measurements for `popo bench generate` and `popo bench sync` (`popo.deploy.bench`).

- Throughput: completion tokens/s of the running actor (fake learner + fake verifier on real
  ZeroMQ sockets, the whole lease -> sample -> push path) against the same engine's raw `generate`
  of the same prompts with the same sampling, in the same process, alternating runs.
- Reload: the actor's own in-place reload path (`Reloader`), fed the learner's announcements.

`python -m popo.actors.bench ...` is `popo bench generate ...`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popo.common.process import free_ports

if TYPE_CHECKING:
    from popo.actors.engine import ReloadTiming, RolloutEngine
    from popo.common.config import RunConfig
    from popo.common.messages import WeightsReady


def arith_prompts(n: int) -> list[str]:
    return [f"{(i * 37) % 100}+{(i * 53) % 100}+{(i * 11) % 10}=" for i in range(n)]


def bench_raw(engine, prompts: list[str]) -> tuple[int, float]:
    """All prompts submitted at once to the engine; returns (completion tokens, seconds)."""
    ids = [engine.encode(p) for p in prompts]
    params = engine.sampling_params()
    t0 = time.perf_counter()
    outs = engine.generate_many(ids, params)
    dt = time.perf_counter() - t0
    return sum(len(c.token_ids) for o in outs for c in o.outputs), dt


def bench_actor(engine, cfg, model_dir: Path, prompts: list[str]) -> tuple[int, float]:
    """The actor serves leases for `prompts` until every group reached the fake verifier."""
    import zmq

    from popo.actors.actor import Actor, ActorEndpoints
    from popo.common import transport
    from popo.common.messages import Lease, LeaseRequest, Leases, RolloutGroup, unpack_ids

    addrs = [f"tcp://127.0.0.1:{p}" for p in free_ports(3)]
    ctx = zmq.Context()
    learner = transport.bind(ctx, "dispatch", addrs[0], cfg.transport)
    verifier = transport.bind(ctx, "rollouts", addrs[1], cfg.transport)
    pub = transport.bind(ctx, "weights", addrs[2], cfg.transport)
    actor = Actor(cfg, model_dir, ActorEndpoints(addrs[0], [addrs[1]], addrs[2]), engine=engine)
    actor.setup()
    stop = threading.Event()
    th = threading.Thread(target=actor.run, args=(stop,), daemon=True)
    todo = list(enumerate(prompts))
    tokens = received = 0
    t0 = None
    # One blocking poll on both fake peers: a short-timeout loop here would spin beside the actor
    # and charge its CPU and GIL time to the actor's throughput.
    poller = zmq.Poller()
    for ch in (learner, verifier):
        poller.register(ch.sock, zmq.POLLIN)
    th.start()
    try:
        while received < len(prompts):
            ready = dict(poller.poll(1000))
            if learner.sock in ready and (got := learner.recv(0)) is not None:
                ident, req = got
                assert isinstance(req, LeaseRequest)
                t0 = t0 or time.perf_counter()
                give, todo = todo[: req.n], todo[req.n :]
                leases = [
                    Lease(
                        lease_id=i,
                        prompt_id=str(i),
                        prompt=p,
                        gold="0",
                        dispatch_version=0,
                        deadline=time.time() + 600,
                    )
                    for i, p in give
                ]
                learner.send(Leases(leases=leases, learner_version=0, retry_after_s=0.05), ident)
            while verifier.sock in ready and (got := verifier.recv(0)) is not None:
                g = got[1]
                assert isinstance(g, RolloutGroup)
                tokens += sum(len(unpack_ids(c.token_ids)) for c in g.completions)
                received += 1
        dt = time.perf_counter() - (t0 or time.perf_counter())
    finally:
        stop.set()
        th.join(timeout=60)
        actor.close()
        for ch in (learner, verifier, pub):
            ch.close()
        ctx.term()
    return tokens, dt


class Reloader:
    """The actor's own reload path (`Actor._load`: header check off the loop, in-place engine
    reload with the sha256 beside it, parity probe) on an already started engine, without sockets: the `sync`
    benchmark hands it the learner's announcements directly."""

    def __init__(self, engine: RolloutEngine, cfg: RunConfig, model_dir: Path) -> None:
        from popo.actors.actor import Actor, ActorEndpoints
        from popo.actors.reload import model_schema

        self.engine = engine
        self.actor = Actor(cfg, model_dir, ActorEndpoints("", [], ""), engine=engine)
        self.actor._schema = model_schema(model_dir)
        self.timings: list[ReloadTiming] = []
        """The engine's own phases (pause, load, resume) of every reload, in order."""
        inner = engine.reload_async

        async def reload_async(weights_dir: str, version: int, *check: Any) -> ReloadTiming:
            t = await inner(weights_dir, version, *check)
            self.timings.append(t)
            return t

        # the actor's `_load` calls the engine's method: record its timing on the way
        engine.reload_async = reload_async  # type: ignore[method-assign]

    def reload(self, msg: WeightsReady) -> tuple[float, float | None]:
        """Load one announced version; -> (actor reload seconds, probe mismatch KL or None)."""
        r = self.engine.call(self.actor._load(msg)).result()
        if self.engine.version != msg.version:
            raise RuntimeError(f"engine serves v{self.engine.version}, announced v{msg.version}")
        return r.seconds, r.mismatch_kl

    def close(self) -> None:
        self.actor.stats.metrics.close()


def random_model(out: Path, hidden: int, layers: int) -> Path:
    """A random-init model of the demo architecture (head size 32 up to hidden 128, else 64: sizes
    vLLM's CPU attention supports)."""
    from popo.common.demo_model import save_random_model

    heads = max(1, hidden // (32 if hidden <= 128 else 64))
    return save_random_model(
        out,
        seed=0,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=max(1, heads // 2),
        intermediate_size=4 * hidden,
    )


def start_engine(model_dir: Path, cfg: RunConfig) -> tuple[RolloutEngine, float]:
    """A started engine for `model_dir` with the actor config of `cfg`; -> (engine, start seconds)."""
    from popo.actors.engine import RolloutEngine

    engine = RolloutEngine(model_dir, cfg.actor, cfg.model, seed=0)
    t0 = time.perf_counter()
    engine.start()
    return engine, time.perf_counter() - t0


if __name__ == "__main__":
    import sys

    from popo.deploy.bench import main

    raise SystemExit(main(["generate", *sys.argv[1:]]))
