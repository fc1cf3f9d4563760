"""`popo bench sync`: the learner's publish plus the actor's in-place reload of one new version,
against a raw write + fsync + read of the same bytes (the filesystem's floor), per model size.

The reload goes through the actor's own path (`Reloader`: `Actor._load`'s sha256 and header checks,
the engine's in-place reload, the parity probe) on an already started engine, fed the learner's
announcements directly, without sockets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popo.common.config import RunConfig
from popo.deploy.bench import ints
from popo.deploy.bench.models import random_model
from popo.deploy.bench.plot import plot_ratios
from popo.deploy.bench.stats import BenchResult, Summary, alternate, paired_ratio

if TYPE_CHECKING:
    from popo.actors.engine import ReloadTiming, RolloutEngine
    from popo.common.messages import WeightsReady


class Reloader:
    """The actor's own reload path (`Actor._load`: header check off the loop, in-place engine
    reload with the sha256 beside it, parity probe) on an already started engine, without
    sockets: the `sync` benchmark hands it the learner's announcements directly."""

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


def sync_size(
    hidden: int, a: argparse.Namespace, out: Path
) -> tuple[dict[str, list[float]], dict[str, list[float]], int]:
    """One model size: alternate publish+reload with raw write+read; -> (runs, parts, nbytes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from popo.actors.engine import resolve_dtype
    from popo.common.weights import WeightStore
    from popo.deploy.bench.generate import start_engine
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
            rounding=a.rounding,
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
        data = WeightStore(root).weights_file(engine.version).read_bytes()
        return raw_write_read(data, root / "raw.bin")

    try:
        runs = alternate({"sync": sync, "raw": raw}, a.reps, warmup=1)
        last = WeightStore(root).path(engine.version)
        steps = publish_steps(model, last, dtype, a.rounding, probe, a.reps)
    finally:
        reloader.close()
        engine.close()
        for scratch in (root, model_dir):  # GBs at size: the figures are what the run keeps
            shutil.rmtree(scratch, ignore_errors=True)
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
    model: Any,
    version_dir: Path,
    dtype: Any,
    rounding: str,
    probe: tuple[list[int], list[int]],
    reps: int,
) -> dict[str, list[float]]:
    """Seconds of each step of a publish and of the actor's checks, taken one at a time on the
    last published version (after the timed rounds, so they do not disturb them): the state dict,
    the probe's log-probs (which a publish runs beside the write), the one-pass write with its
    cast to the published dtype (`rounding`) (+ sha256 on a second thread when there is a spare
    core) and its fsync, the actor's sha256 of the file (which a reload runs beside the engine's
    load) and its header check. The engine's own load time comes from the reloads themselves."""
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
        write_safetensors(scratch, tensors, dtype=dtype, rounding=rounding)
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


def measure(cfg: RunConfig, a: argparse.Namespace, out: Path) -> BenchResult:
    """`popo bench sync`: publish + reload against the raw file round trip, per model size."""
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

    a.rounding = a.rounding or cfg.learner.publish_rounding
    resolved = resolve_dtype(a.dtype)
    label = f"{resolved} ({a.rounding})" if resolved == "bfloat16" else resolved
    points = []
    for hidden in ints(a.sizes):
        runs, parts, nbytes = sync_size(hidden, a, out)
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
                label,
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
                "rounding": a.rounding,
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
        plot_ratios(
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
