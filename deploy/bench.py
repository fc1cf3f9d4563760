"""`popo bench SUB`: each component against its physical limit, and async against sync.

    popo bench generate   actor tokens/s vs the same vLLM engine's raw generate (target >= 0.9)
    popo bench verify     verifier service verifications/s per worker vs math-verify (>= 0.8)
    popo bench learn      learner step cost POPO vs GRPO vs NLL; POPO's saving vs pass rate (PNG)
    popo bench sync       publish + actor reload vs raw write+fsync+read of the bytes (<= 2x; PNG)
    popo bench e2e        trained positives/s, async vs synchronous `popo train`, pinned cores (>= 1.6)
    popo bench default    default `popo train` vs the plain synchronous trainer: time to accuracy

Every figure is a ratio of two measurements taken in the same repetitions (the two sides
alternate), reported as median [min, max] over `--reps`; a ratio whose repetitions disagree by more
than `--max-spread` ((max - min) / median) is refused, not printed (`popo.common.benchstats`).
Each subcommand prints a Markdown table and writes `SUB.json` (+ `SUB.png` where a curve says more)
under `--out` (default `runs/bench/<date>-<SUB>`). `--quick` runs a small version of the same
harness (CI checks the harness, not the timings).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from popo.common.benchstats import (
    DEFAULT_MAX_SPREAD,
    BenchResult,
    Summary,
    alternate,
    paired_ratio,
    timed,
)
from popo.common.config import RunConfig
from popo.common.process import free_port_flags
from popo.deploy.bench_default import bench_default

SUBS = ("generate", "verify", "learn", "sync", "e2e", "default")


def add_args(p: argparse.ArgumentParser) -> None:
    """Flags of `popo bench` (unset ones take the subcommand's full or `--quick` default)."""
    p.add_argument("sub", choices=SUBS, help="what to measure")
    p.add_argument("--quick", action="store_true", help="small and fast: checks the harness")
    p.add_argument("--reps", type=int, help="repetitions of every measurement")
    p.add_argument("--out", type=Path, help="output directory (default runs/bench/<date>-<sub>)")
    p.add_argument(
        "--max-spread",
        type=float,
        default=DEFAULT_MAX_SPREAD,
        help="refuse a ratio whose repetitions spread more: (max-min)/median",
    )
    g = p.add_argument_group("generate / sync / learn model")
    g.add_argument("--hidden", type=int, help="hidden size of the random model")
    g.add_argument("--layers", type=int, help="layers of the random model")
    g.add_argument("--model", type=Path, help="generate: model directory instead of a random one")
    g.add_argument("--prompts", type=int, help="generate: prompts per repetition")
    g.add_argument("--group-size", type=int, help="completions per prompt (generate, learn, e2e)")
    g.add_argument("--max-tokens", type=int, help="generate: completion tokens at most")
    g.add_argument("--inflight", type=int, help="generate: actor.max_inflight_prompts")
    g.add_argument("--sizes", help="sync: comma-separated hidden sizes (one engine each)")
    g.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="sync: the engine's dtype (model.dtype), which the learner publishes in",
    )
    v = p.add_argument_group("verify")
    v.add_argument("--workers", help="comma-separated worker counts")
    v.add_argument("--groups", type=int, help="prompts per repetition (verify), groups (learn)")
    lg = p.add_argument_group("learn")
    lg.add_argument(
        "--threads", type=int, default=1, help="torch threads of the learner side (learn, sync)"
    )
    lg.add_argument("--pass-rates", help="comma-separated pass rates for the POPO saving curve")
    lg.add_argument("--micro-batch-tokens", type=int, default=4096)
    e = p.add_argument_group("e2e")
    e.add_argument("--steps", type=int, help="optimizer steps per run")
    e.add_argument("--warmup-steps", type=int, help="steps left out of the throughput window")
    e.add_argument("--prompts-per-step", type=int)
    e.add_argument(
        "--async-staleness",
        type=int,
        default=1,
        help="learner.max_staleness of the async pipeline (sync is 0)",
    )
    e.add_argument(
        "--pin",
        default="learner=0;actor=1;verifier=1",
        help="role=cores;... (deploy.cpu_affinity); `none` pins nothing",
    )
    e.add_argument(
        "--train-flags",
        help="extra `popo train` flags for every run, one string: "
        '--train-flags="--actor.reload_keeps_kv=true --learner.publish_every=2"',
    )
    d = p.add_argument_group("default")
    d.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="held-out accuracy whose first reaching is timed",
    )
    d.add_argument(
        "--compare",
        action="append",
        metavar="NAME=FLAGS",
        help='another `popo train` side, e.g. --compare "previous=--learner.max_staleness=1"',
    )
    d.add_argument(
        "--plain-threads", type=int, default=2, help="torch threads of the plain trainer"
    )
    d.add_argument("--step-reps", type=int, help="standalone learner steps timed")


# --- defaults per subcommand ------------------------------------------------------------------------

DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "generate": {
        "full": dict(
            reps=5, hidden=128, layers=4, prompts=64, group_size=8, max_tokens=64, inflight=16
        ),
        "quick": dict(
            reps=2, hidden=128, layers=1, prompts=8, group_size=2, max_tokens=16, inflight=4
        ),
    },
    "verify": {
        "full": dict(reps=5, workers="1,2", groups=60),
        "quick": dict(reps=2, workers="1", groups=4),
    },
    "learn": {
        "full": dict(
            reps=7,
            hidden=128,
            layers=4,
            groups=16,
            group_size=8,
            pass_rates="0.125,0.25,0.5,0.75,1",
        ),
        "quick": dict(reps=2, hidden=32, layers=1, groups=2, group_size=4, pass_rates="0.25,0.5,1"),
    },
    "sync": {
        "full": dict(reps=5, sizes="128,512,1024", layers=4),
        "quick": dict(reps=2, sizes="128", layers=1),
    },
    "e2e": {
        "full": dict(
            reps=3, steps=40, warmup_steps=5, prompts_per_step=16, group_size=8, train_flags=""
        ),
        "quick": dict(
            reps=1, steps=3, warmup_steps=1, prompts_per_step=4, group_size=4, train_flags=""
        ),
    },
    "default": {
        "full": dict(reps=3, step_reps=10, train_flags=""),
        "quick": dict(
            reps=1,
            step_reps=2,
            train_flags="--learner.total_steps=2 "
            "--learner.eval_every=1 --learner.prompts_per_step=4 --data.eval_size=8",
        ),
    },
}


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    for k, v in DEFAULTS[args.sub]["quick" if args.quick else "full"].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def _ints(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",") if x]


# --- generate ---------------------------------------------------------------------------------------


def bench_generate(cfg: RunConfig, a: argparse.Namespace, out: Path) -> BenchResult:
    from popo.actors.bench import arith_prompts, bench_actor, bench_raw, random_model, start_engine

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


# --- verify -----------------------------------------------------------------------------------------


def bench_verify(cfg: RunConfig, a: argparse.Namespace, out: Path) -> BenchResult:
    from popo.verifier.bench import G, ServiceBench, build_groups, run_direct

    workers = _ints(a.workers)
    per_rep = a.groups
    n = per_rep * G
    # Disjoint slices per (worker count, repetition) plus a warm-up slice: math-verify's parse
    # caches help neither side, and both sides score the same slice in the same repetition.
    n_slices = len(workers) * (a.reps + 1)
    groups = build_groups(per_rep * n_slices)
    slices = [groups[i * per_rep : (i + 1) * per_rep] for i in range(n_slices)]
    res = BenchResult(
        "verify",
        f"verifier service per worker vs math-verify direct ({n} completions per repetition, "
        f"{a.reps} alternating repetitions)",
        [
            "setup",
            "verifications/s median [min, max]",
            "per worker/s",
            "ratio per worker / direct (target >= 0.8)",
        ],
    )
    figures: dict[str, Any] = {"completions_per_rep": n}
    k = 0
    for w in workers:
        svc = ServiceBench(w)
        direct_rate: list[float] = []
        svc_rate: list[float] = []
        try:
            for rep in range(a.reps + 1):
                part = slices[k]
                k += 1
                d_s, dv = run_direct(part)
                s_s, sv = svc.run(part)
                if dv != sv:
                    raise RuntimeError(f"service and direct verdicts differ ({w} workers)")
                if rep:  # the first slice warms both up
                    direct_rate.append(n / d_s)
                    svc_rate.append(n / s_s / w)
        finally:
            svc.close()
        r = paired_ratio(svc_rate, direct_rate, a.max_spread, ">= 0.8")
        res.ratios[f"per_worker_over_direct_w{w}"] = r
        if w == workers[0]:
            d = Summary.of(direct_rate)
            res.rows.append(["math-verify direct, 1 process", d.fmt(), d.fmt(), "1.00"])
        tot = Summary.of([x * w for x in svc_rate])
        res.rows.append(
            [f"service, {w} worker{'s' * (w > 1)}", tot.fmt(), Summary.of(svc_rate).fmt(), r.fmt()]
        )
        figures[f"w{w}"] = {"direct_per_s": direct_rate, "service_per_worker_per_s": svc_rate}
    res.figures = figures
    return res


def _timer(fn: Callable[[], Any]) -> Callable[[], float]:
    return lambda: timed(fn)


# --- learn ------------------------------------------------------------------------------------------


def bench_learn(cfg: RunConfig, a: argparse.Namespace, out: Path) -> BenchResult:
    import torch

    from popo.learner.bench import as_step, base_model, pass_rate_variants, step_variants

    torch.set_num_threads(a.threads)
    base, vocab = base_model(a.hidden, a.layers)
    tokens: dict[str, float] = {}

    def timers(variants: dict[str, tuple[object, list]]) -> dict[str, Callable[[], float]]:
        return {k: _timer(as_step(t, b, tokens, k)) for k, (t, b) in variants.items()}

    steps = alternate(
        timers(step_variants(base, vocab, a.groups, a.group_size, a.micro_batch_tokens)), a.reps
    )
    rates = [float(x) for x in str(a.pass_rates).split(",")]
    curve = alternate(
        timers(
            pass_rate_variants(base, vocab, a.groups, a.group_size, a.micro_batch_tokens, rates)
        ),
        a.reps,
    )
    n_params = sum(p.numel() for p in base.parameters())
    res = BenchResult(
        "learn",
        f"learner step, Qwen2 hidden {a.hidden} x {a.layers} layers ({n_params / 1e6:.2f} M "
        f"params), {a.groups} groups x G={a.group_size}, torch threads {a.threads}, "
        f"{a.reps} round-robin repetitions",
        ["step", "completion tokens", "seconds median [min, max]", "tokens/s", "cost ratio"],
    )
    ref = "plain NLL"
    for name, ts in steps.items():
        r = paired_ratio(ts, steps[ref], a.max_spread)
        res.ratios[f"cost_over_nll/{name}"] = r
        s = Summary.of(ts)
        res.rows.append(
            [
                name,
                f"{tokens[name]:,.0f}",
                s.fmt(".3f"),
                f"{tokens[name] / s.median:,.0f}",
                f"{r.fmt()} (to NLL)",
            ]
        )
    grpo = curve["grpo"]
    s = Summary.of(grpo)
    res.rows.append(
        [
            "GRPO, full batch (pass-rate curve reference)",
            f"{tokens['grpo']:,.0f}",
            s.fmt(".3f"),
            f"{tokens['grpo'] / s.median:,.0f}",
            "1.00 (to GRPO)",
        ]
    )
    points = []
    for p in rates:
        name = f"popo@{p:g}"
        r = paired_ratio(curve[name], grpo, a.max_spread)
        res.ratios[f"popo_over_grpo/pass_rate={p:g}"] = r
        s = Summary.of(curve[name])
        res.rows.append(
            [
                f"POPO, pass rate {p:g} (positives only)",
                f"{tokens[name]:,.0f}",
                s.fmt(".3f"),
                f"{tokens[name] / s.median:,.0f}",
                f"{r.fmt()} (to GRPO)",
            ]
        )
        points.append(
            {
                "pass_rate": p,
                "tokens": tokens[name],
                "ratio": r.median,
                "min": r.min,
                "max": r.max,
                "refused": r.refused,
                "token_fraction": tokens[name] / tokens["grpo"],
            }
        )
    res.figures = {
        "step_seconds": steps,
        "pass_rate_seconds": curve,
        "tokens": tokens,
        "pass_rate_curve": points,
        "params": n_params,
    }
    res.notes.append(
        "POPO's saving at pass rate p = 1 - (cost ratio to GRPO); its token fraction "
        "of GRPO's batch is the ideal (a step costing exactly its tokens)."
    )
    _plot(
        out / "learn.png",
        "POPO step cost vs GRPO on the full batch",
        "pass rate (positive fraction of each group)",
        "POPO step time / GRPO step time",
        {
            "POPO / GRPO (median, min-max)": points,
            "token fraction (ideal)": [
                {"pass_rate": q["pass_rate"], "ratio": q["token_fraction"]} for q in points
            ],
        },
        x="pass_rate",
    )
    return res


# --- sync -------------------------------------------------------------------------------------------


def raw_write_read(data: bytes, path: Path, chunk: int = 1 << 20) -> float:
    """Seconds to write `data` to a new file, fsync it, and read it back: the physical floor of a
    publish + load through the filesystem. The read lands in one reused `chunk` buffer, as the
    actor's reads do (sha256 blocks; the engine maps the file): reading into a new object of the
    file's size would add its allocation and page faults (~2x the read) to the floor. Both sides
    read what was just written, from the page cache."""
    buf = bytearray(chunk)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    back = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            back += n
    dt = time.perf_counter() - t0
    path.unlink()
    if back != len(data):
        raise RuntimeError(f"read back {back} of {len(data)} bytes")
    return dt


def _sync_size(
    hidden: int, a: argparse.Namespace, out: Path
) -> tuple[dict[str, list[float]], dict[str, list[float]], int]:
    """One model size: alternate publish+reload with raw write+read; -> (runs, parts, nbytes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from popo.actors.bench import Reloader, random_model, start_engine
    from popo.actors.engine import resolve_dtype
    from popo.common.weights import WEIGHTS_FILE
    from popo.learner.publish import publish_weights

    torch.set_num_threads(a.threads)  # the learner side's torch threads, as in `learn`
    model_dir = random_model(out / f"model-h{hidden}", hidden, a.layers)
    bc = RunConfig()
    bc.actor.max_num_seqs = 8
    bc.metrics.enabled = False
    bc.model.dtype = a.dtype
    # the learner publishes in the engine's dtype (`learner.publish_dtype = auto`)
    dtype = getattr(torch, resolve_dtype(a.dtype))
    engine, _ = start_engine(model_dir, bc)
    reloader = Reloader(engine, bc, model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    probe = (tok("12+34=")["input_ids"], tok("\\boxed{46}")["input_ids"])
    root = Path(tempfile.mkdtemp(prefix="weights-", dir=out))
    parts: dict[str, list[float]] = {
        "publish": [],
        "reload": [],
        "kl": [],
        "engine_load": [],
        "pause_resume": [],
    }
    nbytes = 0
    gen = torch.Generator().manual_seed(hidden)

    def sync() -> float:
        nonlocal nbytes
        with torch.no_grad():  # a new policy each time, outside the timed part
            for p in model.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=gen))
        version = engine.version + 1
        t0 = time.perf_counter()
        msg = publish_weights(
            model,
            root,
            version,
            source_dir=model_dir,
            keep=2,
            probe=probe,
            pad_id=tok.pad_token_id or 0,
            dtype=dtype,
        )
        t1 = time.perf_counter()
        _, kl = reloader.reload(msg)
        t2 = time.perf_counter()
        nbytes = msg.nbytes
        parts["publish"].append(t1 - t0)
        parts["reload"].append(t2 - t1)
        parts["kl"].append(float("nan") if kl is None else kl)
        eng = reloader.timings[-1]
        parts["engine_load"].append(eng.load_s)
        parts["pause_resume"].append(eng.pause_s + eng.resume_s)
        return t2 - t0

    def raw() -> float:
        data = (root / f"v{engine.version}" / WEIGHTS_FILE).read_bytes()
        return raw_write_read(data, root / "raw.bin")

    try:
        runs = alternate({"sync": sync, "raw": raw}, a.reps, warmup=1)
        steps = publish_steps(model, root / f"v{engine.version}", dtype, probe, a.reps)
    finally:
        reloader.close()
        engine.close()
    # The parity probe proves each reload served the published weights (fp32: ~1e-6; a bf16
    # engine computes in bf16 what the learner computes in fp32).
    limit = 1e-3 if dtype == torch.float32 else 5e-2
    if not all(k < limit for k in parts["kl"][1:]):
        raise RuntimeError(f"actor and learner disagree after a reload: mismatch_kl {parts['kl']}")
    for k in list(parts):
        parts[k] = parts[k][1:]  # drop the warm-up round, as `alternate` did
    parts.update(steps)
    return runs, parts, nbytes


def publish_steps(
    model: Any, version_dir: Path, dtype: Any, probe: tuple[list[int], list[int]], reps: int
) -> dict[str, list[float]]:
    """Seconds of each step of a publish and of the actor's checks, taken one at a time on the
    last published version (after the timed rounds, so they do not disturb them): the state dict,
    the probe's log-probs (which a publish runs beside the write), the one-pass write with its
    cast to the published dtype (+ sha256 on a second thread when there is a spare core) and its
    fsync, the actor's sha256 of the file (which a reload runs beside the engine's load) and
    its header check. The engine's own load time comes from the reloads themselves."""
    import numpy as np

    from popo.actors.reload import check_schema, model_schema
    from popo.common.weights import WEIGHTS_FILE, sha256_file, write_safetensors
    from popo.learner.model import sequence_logprobs
    from popo.learner.publish import hf_state_dict

    path = version_dir / WEIGHTS_FILE
    schema = model_schema(version_dir)
    out: dict[str, list[float]] = {
        k: []
        for k in ("state_dict", "probe", "write_hash_fsync", "actor_sha256", "actor_header_check")
    }
    scratch = version_dir.parent / "steps.safetensors"
    prompt, cont = (np.asarray(p) for p in probe)
    for _ in range(reps):
        t0 = time.perf_counter()
        tensors = hf_state_dict(model)  # a CPU policy: the writer casts, as in publish_weights
        t1 = time.perf_counter()
        sequence_logprobs(model, prompt, cont)
        t2 = time.perf_counter()
        write_safetensors(scratch, tensors, dtype=dtype)
        t3 = time.perf_counter()
        scratch.unlink()
        del tensors
        t4 = time.perf_counter()
        sha256_file(path)
        t5 = time.perf_counter()
        check_schema(path, schema)
        t6 = time.perf_counter()
        for k, dt in zip(out, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t6 - t5), strict=True):
            out[k].append(dt)
    return out


def bench_sync(cfg: RunConfig, a: argparse.Namespace, out: Path) -> BenchResult:
    res = BenchResult(
        "sync",
        f"learner publish + actor reload vs raw write+fsync+read of the same bytes "
        f"({a.reps} alternating repetitions per size)",
        [
            "model",
            "dtype",
            "MiB",
            "raw write+fsync+read ms",
            "publish ms",
            "actor reload ms",
            "publish+reload ms",
            "publish+reload MiB/s",
            "ratio to raw (target <= 2)",
        ],
    )
    from popo.actors.engine import resolve_dtype

    resolved = resolve_dtype(a.dtype)
    points = []
    for hidden in _ints(a.sizes):
        runs, parts, nbytes = _sync_size(hidden, a, out)
        breakdown = {k: f"{Summary.of(v).median * 1e3:.1f}" for k, v in parts.items() if k != "kl"}
        res.notes.append(
            f"hidden {hidden}, median ms: " + ", ".join(f"{k} {v}" for k, v in breakdown.items())
        )
        r = paired_ratio(runs["sync"], runs["raw"], a.max_spread, "<= 2")
        res.ratios[f"sync_over_raw/h{hidden}"] = r
        mib = nbytes / 2**20
        sync_s = Summary.of(runs["sync"])
        res.rows.append(
            [
                f"hidden {hidden} x {a.layers}",
                resolved,
                f"{mib:.1f}",
                Summary.of(runs["raw"]).fmt(".1f", 1e3),
                Summary.of(parts["publish"]).fmt(".1f", 1e3),
                Summary.of(parts["reload"]).fmt(".1f", 1e3),
                sync_s.fmt(".1f", 1e3),
                f"{mib / sync_s.median:,.0f}",
                r.fmt(),
            ]
        )
        points.append(
            {
                "hidden": hidden,
                "dtype": resolved,
                "mib": mib,
                "nbytes": nbytes,
                "raw_s": runs["raw"],
                "sync_s": runs["sync"],
                **{f"{k}_s" if k != "kl" else "mismatch_kl": v for k, v in parts.items()},
                "ratio": r.median,
                "min": r.min,
                "max": r.max,
            }
        )
    res.figures = {"sizes": points}
    res.notes.append(
        "publish = the learner's publish_weights (state dict, probe log-probs beside the "
        "safetensors write with its cast, fsync, sha256, atomic rename, pruning of old "
        "versions); actor reload = header check + vLLM in-place reload (pause, load with "
        "the sha256 check beside it, resume) + parity probe. raw reads into a reused "
        "buffer; both sides read what was just written, from the page cache. Per-step "
        "medians (notes below, `sizes[].*_s` in the JSON): engine_load (with the overlapped "
        "sha256) and pause_resume from the reloads themselves; state_dict, probe, "
        "write_hash_fsync, actor_sha256 and actor_header_check timed one at a time "
        "after the rounds."
    )
    if len(points) > 1:
        import statistics

        med = statistics.median
        _plot(
            out / "sync.png",
            "weight sync latency vs model size",
            "MiB (safetensors)",
            "seconds (median)",
            {
                name: [{"mib": q["mib"], "ratio": med(q[key])} for q in points]
                for name, key in (
                    ("publish + reload", "sync_s"),
                    ("publish", "publish_s"),
                    ("actor reload", "reload_s"),
                    ("raw write+fsync+read", "raw_s"),
                )
            },
            x="mib",
            log=True,
        )
    return res


# --- e2e --------------------------------------------------------------------------------------------


def parse_pin(spec: str) -> dict[str, list[int]]:
    """`learner=0;actor=1;verifier=1` -> {"learner": [0], ...}; `none` -> {}."""
    if spec.strip().lower() in ("", "none"):
        return {}
    out = {}
    for part in spec.split(";"):
        role, cores = part.split("=")
        out[role.strip()] = _ints(cores.replace(" ", ""))
    return out


def step_times(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per trained step, from the ledger: when its leases were closed (`end`, right after the
    step's publish), the earliest lease issue (`first_issued`), and positives trained."""
    db = sqlite3.connect(f"file:{run_dir / 'ledger.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT step, MAX(ended_at), MIN(issued_at), SUM(n_positive), COUNT(*) FROM leases"
            " WHERE state='trained' AND kind='train' GROUP BY step ORDER BY step"
        ).fetchall()
    finally:
        db.close()
    return {
        int(s): {"end": e, "first_issued": i, "positives": float(p), "groups": float(n)}
        for s, e, i, p, n in rows
    }


def overlap_fraction(steps: dict[int, dict[str, float]]) -> float:
    """Fraction of trained steps (after the first) with a lease issued before the previous step
    ended: 0 for a strictly alternating (synchronous) run, where generation waits for training."""
    ks = sorted(steps)
    pairs = list(itertools.pairwise(ks))
    if not pairs:
        return 0.0
    return sum(steps[b]["first_issued"] < steps[a]["end"] for a, b in pairs) / len(pairs)


def window_throughput(
    steps: dict[int, dict[str, float]], warmup: int
) -> tuple[float, float, float]:
    """(positives/s, positives, seconds) over the steps after `warmup`: from the end of step
    `warmup` to the end of the last step (engine start-up and evaluations fall outside)."""
    ks = sorted(steps)
    if len(ks) <= warmup or warmup < 1:
        raise ValueError(f"need more than {warmup} trained steps, got {len(ks)}")
    t0, t1 = steps[ks[warmup - 1]]["end"], steps[ks[-1]]["end"]
    pos = sum(steps[k]["positives"] for k in ks[warmup:])
    return pos / (t1 - t0), pos, t1 - t0


IDLE_COUNTERS = {
    "actor": "popo_actor_idle_seconds_total",
    "learner": "popo_learner_wait_seconds_total",
    "verifier": "popo_verifier_verify_seconds_sum",  # busy worker time: idle = 1 - busy/wall
}


def idle_fractions(
    run_dir: Path, t0: float, t1: float, verifier_workers: int
) -> dict[str, float | None]:
    """Per role instance, the fraction of [t0, t1] it spent idle, from metrics.jsonl: actor = no
    prompt in its engine, learner = waiting for a full batch, verifier = workers not scoring."""
    series: dict[str, list[tuple[float, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        key = IDLE_COUNTERS.get(rec["role"])
        if key in rec and t0 - 0.5 <= rec["t"] <= t1 + 0.5:
            series.setdefault(rec["instance"], []).append((rec["t"], rec[key]))
    out: dict[str, float | None] = {}
    for inst, pts in sorted(series.items()):
        pts.sort()
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            out[inst] = None
            continue
        frac = (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])
        out[inst] = 1.0 - frac / verifier_workers if inst.startswith("verifier") else frac
    return out


# Set by the e2e harness itself: the comparison is only sync vs async if both runs share them.
E2E_OWN_KEYS = (
    "deploy.run_dir",
    "model.path",
    "learner.max_staleness",
    "learner.total_steps",
    "learner.prompts_per_step",
    "actor.group_size",
    "deploy.cpu_affinity",
)


def train_flags(spec: str) -> list[str]:
    """`--train-flags` -> extra `popo train` arguments; refuses the keys the harness sets."""
    flags = shlex.split(spec)
    for f in flags:
        key = f.removeprefix("--").split("=", 1)[0]
        if f.startswith("--") and key in E2E_OWN_KEYS:
            raise SystemExit(
                f"popo bench e2e: --train-flags may not set {key} (a bench option "
                "or the harness sets it)"
            )
    return flags


def learner_split(run_dir: Path, t0: float, t1: float) -> dict[str, float]:
    """Seconds per trained step over [t0, t1] of the learner's loop, from metrics.jsonl: `wait`
    (blocked on a batch), `train` (optimizer step), `publish` (write + announce, amortised over
    steps when `publish_every` > 1); means over the steps the first and last records span."""
    pts = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["role"] == "learner" and t0 - 0.5 <= rec["t"] <= t1 + 0.5:
            pts.append(rec)
    pts.sort(key=lambda r: r["t"])
    if len(pts) < 2:
        raise ValueError(f"{run_dir}: fewer than 2 learner metric records in the window")
    first, last = pts[0], pts[-1]

    def delta(key: str) -> float:
        return float(last.get(key, 0.0)) - float(first.get(key, 0.0))

    steps = delta("popo_learner_step_seconds_count")
    if steps <= 0:
        raise ValueError(f"{run_dir}: no learner step recorded in the window")
    return {
        "wait": delta("popo_learner_wait_seconds_total") / steps,
        "train": delta("popo_learner_step_seconds_sum") / steps,
        "publish": delta("popo_learner_publish_seconds_sum") / steps,
    }


def overlap_ceiling(step_s: float, busy_s: dict[str, float]) -> dict[str, Any]:
    """The best async/sync throughput ratio a synchronous run's timings allow when the parts in
    `busy_s` (seconds each is busy per synchronous step of `step_s`) run side by side: a step
    then takes as long as the busiest part, so async/sync <= step_s / max(busy_s). It assumes no
    part gets slower when overlapped, which is what the measured async row is compared against."""
    bottleneck = max(busy_s, key=busy_s.__getitem__)
    period = busy_s[bottleneck]
    return {
        "busy_s": dict(busy_s),
        "bottleneck": bottleneck,
        "period_s": period,
        "ratio": step_s / period,
    }


def sync_ceilings(
    step_s: float, wait_s: float, idle: dict[str, float | None]
) -> dict[str, dict[str, Any]]:
    """Two ceilings from one synchronous run (strictly serial: the learner waits `wait_s` for
    the batch, then trains and publishes for `step_s - wait_s`).

    `halves`: the generation side (everything the learner waits for: leases, generation,
    reload, verification, ingest) overlapped with the learner's work; the issue's
    `sync_step / max(gen, train + publish)` with bookkeeping counted on the learner's side.
    `stages`: every role overlapped with every other, each busy per step as long as it was in the
    synchronous run (actor and verifier from their idle fractions): the pipeline's limit once
    lease round trips and verification hide behind generation too."""
    learner = step_s - wait_s
    stages = {r: step_s * (1.0 - f) for r, f in idle.items() if r != "learner" and f is not None}
    return {
        "halves": overlap_ceiling(step_s, {"generation side": wait_s, "learner": learner}),
        "stages": overlap_ceiling(step_s, {**stages, "learner": learner}),
    }


def run_train(
    model_dir: Path, run_dir: Path, staleness: int, a: argparse.Namespace, pin: dict
) -> Path:
    """One short `popo train` (a real run: every role its own process) on free loopback ports."""
    args = [
        f"--deploy.run_dir={run_dir}",
        f"--model.path={model_dir}",
        f"--learner.max_staleness={staleness}",
        f"--learner.total_steps={a.steps}",
        f"--learner.prompts_per_step={a.prompts_per_step}",
        f"--actor.group_size={a.group_size}",
        f"--learner.checkpoint_every={a.steps}",
        "--learner.eval_every=0",
        "--data.eval_size=16",
        f"--deploy.cpu_affinity={json.dumps(pin)}",
        *([] if pin else ["--deploy.placement=off"]),  # `--pin none`: no automatic placement either
        *free_port_flags(),
        "--metrics.jsonl_every_s=0.5",
        *train_flags(a.train_flags),
    ]
    cmd = [sys.executable, "-m", "popo.deploy.cli", "train", *args]
    log_path = run_dir.parent / f"{run_dir.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as f:
        proc = subprocess.run(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=1800,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    if proc.returncode != 0:
        raise RuntimeError(
            f"popo train failed ({proc.returncode}); see {log_path}:\n"
            + "\n".join(log_path.read_text().splitlines()[-20:])
        )
    return run_dir


def bench_e2e(cfg: RunConfig, a: argparse.Namespace, out: Path) -> BenchResult:
    from popo.common.demo_model import resolve_model_dir

    model_dir = resolve_model_dir(cfg)
    pin = parse_pin(a.pin)
    cores = sorted(os.sched_getaffinity(0))
    if any(c not in cores for cs in pin.values() for c in cs):
        raise SystemExit(f"popo bench e2e: --pin {a.pin} names cores outside {cores}")
    train_flags(a.train_flags)  # refuse bad flags before the first run, not after it
    modes = {"sync": 0, "async": a.async_staleness}
    tput: dict[str, list[float]] = {m: [] for m in modes}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for rep in range(a.reps):
        for mode, staleness in modes.items():  # alternating, so load drifts hit both alike
            run_dir = run_train(model_dir, out / "runs" / f"{mode}-{rep}", staleness, a, pin)
            steps = step_times(run_dir)
            rate, pos, secs = window_throughput(steps, a.warmup_steps)
            ks = sorted(steps)
            t0, t1 = steps[ks[a.warmup_steps - 1]]["end"], steps[ks[-1]]["end"]
            info = {
                "run_dir": str(run_dir),
                "positives_per_s": rate,
                "positives": pos,
                "seconds": secs,
                "steps": len(ks),
                "overlap_fraction": overlap_fraction(steps),
                "idle": idle_fractions(run_dir, t0, t1, cfg.verifier.num_workers),
                "step_seconds": secs / (len(ks) - a.warmup_steps),
                "learner_split": learner_split(run_dir, t0, t1),
            }
            if mode == "sync":
                info["ceilings"] = sync_ceilings(
                    info["step_seconds"], info["learner_split"]["wait"], info["idle"]
                )
            # The synchronous baseline must really alternate, or the comparison means nothing.
            if mode == "sync" and info["overlap_fraction"] > 0:
                raise RuntimeError(f"{run_dir}: max_staleness 0 overlapped generation and training")
            tput[mode].append(rate)
            runs[mode].append(info)
    r = paired_ratio(tput["async"], tput["sync"], a.max_spread, ">= 1.6")
    pin_txt = ", ".join(f"{k} {v}" for k, v in pin.items()) or "none"
    res = BenchResult(
        "e2e",
        f"trained positive samples/s, `popo train` async (max_staleness {a.async_staleness}) vs "
        "synchronous "
        f"(max_staleness 0); {a.steps} steps x {a.prompts_per_step} prompts x G={a.group_size}, "
        f"first {a.warmup_steps} steps excluded, pinned cores: {pin_txt}, {a.reps} alternating "
        f"repetitions" + (f", train flags `{a.train_flags}`" if a.train_flags.strip() else ""),
        [
            "pipeline",
            "positives/s median [min, max]",
            "s per step",
            "overlap of gen. and training",
            "idle: actor / verifier / learner",
            "ratio to sync (target >= 1.6)",
        ],
    )
    import statistics

    for mode in modes:
        idle = {}
        for role in ("actor-0", "verifier-0", "learner"):
            vals = [x["idle"].get(role) for x in runs[mode]]
            vals = [v for v in vals if v is not None]
            idle[role] = f"{statistics.median(vals):.0%}" if vals else "n/a"
        res.rows.append(
            [
                "synchronous (max_staleness 0)"
                if mode == "sync"
                else f"async (max_staleness {a.async_staleness})",
                Summary.of(tput[mode]).fmt(".1f"),
                f"{statistics.median(x['step_seconds'] for x in runs[mode]):.2f}",
                f"{statistics.median(x['overlap_fraction'] for x in runs[mode]):.0%}",
                " / ".join(idle.values()),
                "1.00" if mode == "sync" else r.fmt(),
            ]
        )
    # What ideal overlap would give, from each synchronous run's own timings.
    ceil: dict[str, Summary] = {}
    for kind, label in (
        ("halves", "ceiling: generation side overlapped with the learner"),
        ("stages", "ceiling: every role overlapped"),
    ):
        cs = [x["ceilings"][kind] for x in runs["sync"]]
        ceil[kind] = Summary.of([c["ratio"] for c in cs])
        res.rows.append(
            [
                label,
                Summary.of([t * c["ratio"] for t, c in zip(tput["sync"], cs, strict=True)]).fmt(
                    ".1f"
                ),
                f"{statistics.median(c['period_s'] for c in cs):.2f}",
                "100%",
                "n/a",
                f"{ceil[kind].fmt('.2f')} (bound: {cs[0]['bottleneck']})",
            ]
        )

    step = statistics.median(x["step_seconds"] for x in runs["sync"])
    split = {
        k: statistics.median(x["learner_split"][k] for x in runs["sync"])
        for k in ("wait", "train", "publish")
    }
    busy_runs = [x["ceilings"]["stages"]["busy_s"] for x in runs["sync"]]
    busy = {
        k: statistics.median(b[k] for b in busy_runs)
        for k in busy_runs[0]
        if all(k in b for b in busy_runs)
    }
    res.notes.append(
        "Ceilings = sync s per step / the longest part once the parts overlap. Sync runs, median "
        f"s per step: step {step:.3f} = learner wait {split['wait']:.3f} + learner work "
        f"{step - split['wait']:.3f} (train {split['train']:.3f}, publish {split['publish']:.3f}, "
        "rest bookkeeping); busy per step: "
        + ", ".join(f"{k} {v:.3f}" for k, v in busy.items())
        + f". Measured async / ceiling: {r.median / ceil['halves'].median:.0%} (generation side "
        f"vs learner), {r.median / ceil['stages'].median:.0%} (every role)."
    )
    res.ratios["async_over_sync"] = r
    res.figures = {
        "runs": runs,
        "pin": pin,
        "model": str(model_dir),
        "ceilings": {k: v.to_json() for k, v in ceil.items()},
        "train_flags": a.train_flags,
    }
    return res


# --- output -----------------------------------------------------------------------------------------


def _plot(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: dict[str, list[dict]],
    x: str,
    log: bool = False,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in series.items():
        xs = [p[x] for p in pts]
        ys = [p["ratio"] for p in pts]
        if pts and "min" in pts[0]:
            err = [
                [y - p["min"] for y, p in zip(ys, pts, strict=True)],
                [p["max"] - y for y, p in zip(ys, pts, strict=True)],
            ]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        else:
            ax.plot(xs, ys, marker=".", linestyle="--", label=name)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


BENCHES: dict[str, Callable[[RunConfig, argparse.Namespace, Path], BenchResult]] = {
    "generate": bench_generate,
    "verify": bench_verify,
    "learn": bench_learn,
    "sync": bench_sync,
    "e2e": bench_e2e,
    "default": bench_default,
}


def run(cfg: RunConfig, args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run one subcommand, print its table, write `SUB.json` (and `SUB.png`) under `--out`."""
    a = _resolve(args)
    out = Path(a.out or time.strftime(f"runs/bench/%Y%m%d-%H%M%S-{a.sub}"))
    out.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[1:] if argv is None else argv
    command = "popo " + shlex.join(argv)
    before = machine()
    t0 = time.time()
    res = BENCHES[a.sub](cfg, a, out)
    doc = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t0)),
        "seconds": time.time() - t0,
        "quick": a.quick,
        "machine": before,
        "load_average_after": os.getloadavg(),
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(a).items()
            if k not in ("overrides", "config")
        },
        **res.to_json(),
    }
    (out / f"{a.sub}.json").write_text(json.dumps(doc, indent=1))
    print(f"\n{res.title}\n")
    print(res.table())
    for note in res.notes:
        print(f"\n{note}")
    load = ", ".join(f"{x:.2f}" for x in before["load_average"])
    print(
        f"\ncommand: {command}\nload average before: {load}; "
        f"written: {out / (a.sub + '.json')}"
        + (f", {out / (a.sub + '.png')}" if (out / f"{a.sub}.png").exists() else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m popo.deploy.bench SUB ...` (the role modules' `python -m` entries land here)."""
    from popo.deploy.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
