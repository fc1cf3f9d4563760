"""`popo bench generate`: completion tokens/s of the running actor (fake learner + fake verifier on
real ZeroMQ sockets, the whole lease -> sample -> push path) against the same engine's raw
`generate` of the same prompts with the same sampling, in the same process, alternating runs.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from popo.common.config import RunConfig
from popo.common.process import free_ports
from popo.deploy.bench.models import random_model
from popo.deploy.bench.stats import BenchResult, Summary, alternate, paired_ratio

if TYPE_CHECKING:
    from popo.actors.engine import RolloutEngine


def arith_prompts(n: int) -> list[str]:
    """`n` arithmetic prompts (three-term sums) in the demo task's format."""
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


def start_engine(model_dir: Path, cfg: RunConfig) -> tuple[RolloutEngine, float]:
    """A started engine for `model_dir` with the actor config of `cfg`; -> (engine, start seconds)."""
    from popo.actors.engine import RolloutEngine

    engine = RolloutEngine(model_dir, cfg.actor, cfg.model, seed=0)
    t0 = time.perf_counter()
    engine.start()
    return engine, time.perf_counter() - t0


def measure(cfg: RunConfig, a: argparse.Namespace, out: Path) -> BenchResult:
    """`popo bench generate`: the actor against its own engine's raw generate."""
    model_dir = a.model or random_model(out / "model", a.hidden, a.layers)
    bc = RunConfig()
    ac = bc.actor
    ac.group_size, ac.max_tokens, ac.max_inflight_prompts = a.group_size, a.max_tokens, a.inflight
    ac.max_pending_groups = max(ac.max_pending_groups, a.inflight)
    ac.max_num_seqs = a.inflight * a.group_size  # the raw reference runs under the same batch cap
    bc.metrics.enabled = False
    engine, start_s = start_engine(model_dir, bc)
    prompts = arith_prompts(a.prompts)
    tokens: dict[str, list[int]] = {"raw": [], "actor": []}

    def raw() -> float:
        n, dt = bench_raw(engine, prompts)
        tokens["raw"].append(n)
        return n / dt

    def actor() -> float:
        n, dt = bench_actor(engine, bc, model_dir, prompts)
        tokens["actor"].append(n)
        return n / dt

    try:
        bench_raw(engine, prompts[:8])  # compile / allocate before anything is timed
        runs = alternate({"raw": raw, "actor": actor}, a.reps, warmup=1)
    finally:
        engine.close()
    if min(tokens["raw"] + tokens["actor"]) <= 0:
        raise RuntimeError(f"a repetition generated no tokens: {tokens}")
    r = paired_ratio(runs["actor"], runs["raw"], a.max_spread, ">= 0.9")
    res = BenchResult(
        "generate",
        f"actor tokens/s vs raw vLLM generate ({a.prompts} prompts x G={a.group_size}, "
        f"max_tokens {a.max_tokens}, inflight {a.inflight}, {a.reps} alternating repetitions)",
        ["measure", "tokens/s median [min, max]", "ratio to raw (target >= 0.9)"],
    )
    res.rows = [
        ["raw vLLM generate (all prompts at once)", Summary.of(runs["raw"]).fmt(), "1.00"],
        ["actor (leases -> engine -> verifier, ZeroMQ)", Summary.of(runs["actor"]).fmt(), r.fmt()],
    ]
    res.ratios["actor_over_raw"] = r
    res.figures = {
        "engine_start_s": start_s,
        "tokens_per_s": runs,
        "tokens": tokens,
        "model": str(model_dir),
    }
    return res
