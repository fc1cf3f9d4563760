"""Actor benchmark (issue 4): `python -m popo.actors.bench [--prompts 64 --group-size 8 ...]`.

1. Throughput: completion tokens/s of the running actor (fake learner + fake verifier on real
   ZeroMQ sockets, the whole lease -> sample -> push path) against the same engine's raw `generate`
   of the same prompts with the same sampling, in the same process, alternating runs.
2. Reload: the actor's in-place weight reload (engine side: pause + load + resume; and the whole
   path: + sha256 + header check) against reading the same safetensors file into memory.

Prints a Markdown table (for BENCHMARKS.md) and writes it as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(n: int) -> list[str]:
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

    addrs = [f"tcp://127.0.0.1:{_free_port()}" for _ in range(3)]
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
    th.start()
    try:
        while received < len(prompts):
            if (got := learner.recv(1)) is not None:
                ident, req = got
                assert isinstance(req, LeaseRequest)
                t0 = t0 or time.perf_counter()
                give, todo = todo[: req.n], todo[req.n :]
                leases = [
                    Lease(lease_id=i, prompt_id=str(i), prompt=p, gold="0", dispatch_version=0,
                          deadline=time.time() + 600)
                    for i, p in give
                ]  # fmt: skip
                learner.send(Leases(leases=leases, learner_version=0, retry_after_s=0.05), ident)
            while (got := verifier.recv(0)) is not None:
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


def bench_reload(engine, reference_state: dict, tmp: Path, reps: int) -> dict[str, float]:
    """Median seconds: reading the file, the engine's reload, and the actor's whole reload path."""
    import torch
    from safetensors.torch import load_file

    from popo.actors.reload import check_schema, read_schema
    from popo.common.weights import WEIGHTS_FILE, verify_weights, write_version_dir

    schema = None
    read, engine_s, full = [], [], []
    for r in range(reps):
        version = engine.version + 1
        g = torch.Generator().manual_seed(r)
        state = {
            k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in reference_state.items()
        }
        path, sha, nbytes = write_version_dir(tmp / f"v{version}", state)
        schema = schema or read_schema(path)
        os.sync()
        t0 = time.perf_counter()
        load_file(str(path))
        read.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        verify_weights(path, sha, nbytes)
        check_schema(path, schema)
        timing = engine.reload(path.parent, version).result()
        full.append(time.perf_counter() - t0)
        engine_s.append(timing.total_s)
        assert path.name == WEIGHTS_FILE
    return {
        "read_s": statistics.median(read),
        "reload_engine_s": statistics.median(engine_s),
        "reload_full_s": statistics.median(full),
        "nbytes": float(nbytes),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m popo.actors.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--inflight", type=int, default=16, help="actor.max_inflight_prompts")
    p.add_argument(
        "--max-num-seqs", type=int, default=None,
        help="engine batch cap for both runs (default: inflight * group size)",
    )  # fmt: skip
    p.add_argument("--reps", type=int, default=3, help="alternating raw/actor repetitions")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--model", help="model directory (default: a random model of the given size)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    for k, v in {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)

    from safetensors.torch import load_file

    from popo.actors.engine import RolloutEngine
    from popo.common.config import RunConfig

    tmp = Path(tempfile.mkdtemp(prefix="popo-actor-bench-"))
    if args.model:
        model_dir = Path(args.model)
    else:
        from popo.common.demo_model import save_random_model

        model_dir = save_random_model(
            tmp / "model", seed=0, hidden_size=args.hidden, num_layers=args.layers,
            num_heads=args.heads, num_kv_heads=max(1, args.heads // 2),
            intermediate_size=4 * args.hidden,
        )  # fmt: skip
    cfg = RunConfig()
    a = cfg.actor
    a.group_size, a.max_tokens, a.max_inflight_prompts = (
        args.group_size,
        args.max_tokens,
        args.inflight,
    )
    a.max_pending_groups = max(a.max_pending_groups, args.inflight)
    # the raw reference and the actor run under the same batch cap
    a.max_num_seqs = args.max_num_seqs or args.inflight * args.group_size
    cfg.metrics.enabled = False
    engine = RolloutEngine(model_dir, a, cfg.model, seed=0)
    t0 = time.perf_counter()
    engine.start()
    start_s = time.perf_counter() - t0
    prompts = _prompts(args.prompts)
    bench_raw(engine, prompts[:8])  # warm-up
    raw, act = [], []
    for _ in range(args.reps):
        tok, dt = bench_raw(engine, prompts)
        raw.append(tok / dt)
        tok, dt = bench_actor(engine, cfg, model_dir, prompts)
        act.append(tok / dt)
    state = load_file(str(next(model_dir.glob("*.safetensors"))))
    rl = bench_reload(engine, state, tmp / "weights", reps=5)
    engine.close()

    raw_tps, act_tps = statistics.median(raw), statistics.median(act)
    res = {
        "engine_start_s": start_s,
        "params": sum(v.numel() for v in state.values()),
        "raw_tokens_per_s": raw_tps,
        "actor_tokens_per_s": act_tps,
        "throughput_ratio": act_tps / raw_tps,
        "raw_runs": raw,
        "actor_runs": act,
        **rl,
        "reload_engine_over_read": rl["reload_engine_s"] / rl["read_s"],
        "reload_full_over_read": rl["reload_full_s"] / rl["read_s"],
        "args": vars(args),
    }
    print(
        f"\nmodel: {res['params'] / 1e6:.2f} M params ({rl['nbytes'] / 2**20:.1f} MiB safetensors), "
        f"{args.prompts} prompts x G={args.group_size}, max_tokens={args.max_tokens}, "
        f"actor.max_inflight_prompts={args.inflight}, max_num_seqs={a.max_num_seqs}, "
        f"median of {args.reps} alternating runs\n"
    )
    print("| measure | value |\n| --- | --- |")
    print(f"| raw vLLM generate | {raw_tps:,.0f} tokens/s |")
    print(f"| actor (leases -> engine -> verifier) | {act_tps:,.0f} tokens/s |")
    print(f"| ratio actor / raw | {res['throughput_ratio']:.3f} |")
    print(f"| read safetensors file (load_file) | {rl['read_s'] * 1e3:.2f} ms |")
    print(f"| in-place reload, engine (pause+load+resume) | {rl['reload_engine_s'] * 1e3:.2f} ms |")
    print(f"| in-place reload, actor path (+sha256+header) | {rl['reload_full_s'] * 1e3:.2f} ms |")
    print(f"| ratio engine reload / read | {res['reload_engine_over_read']:.1f} |")
    print(f"| ratio actor reload / read | {res['reload_full_over_read']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
