"""`popo bench e2e`: trained positive samples/s of `popo train` with the async pipeline against the
same run made synchronous (`learner.max_staleness` 0), on pinned cores, alternating runs.

The figures of a run come from its run directory: per-step times and positives from the ledger
(`step_times`), idle fractions and the learner's wait / train / publish split from metrics.jsonl.
Each synchronous run also gives the ceilings that ideal overlap of its parts would reach.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
from pathlib import Path
from typing import Any

from popo.common.config import RunConfig
from popo.common.process import free_port_flags
from popo.common.run_dir import RunDir, read_jsonl
from popo.deploy.bench import ints
from popo.deploy.bench.runs import run_logged, train_command
from popo.deploy.bench.stats import BenchResult, Summary, paired_ratio
from popo.learner.ledger import LedgerReader


def parse_pin(spec: str) -> dict[str, list[int]]:
    """`learner=0;actor=1;verifier=1` -> {"learner": [0], ...}; `none` -> {}."""
    if spec.strip().lower() in ("", "none"):
        return {}
    out = {}
    for part in spec.split(";"):
        role, cores = part.split("=")
        out[role.strip()] = ints(cores.replace(" ", ""))
    return out


def step_times(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per trained step, from the ledger: when its leases were closed (`end`, right after the
    step's publish), the earliest lease issue (`first_issued`), and positives trained."""
    with LedgerReader(RunDir(run_dir).ledger) as ledger:
        timings = ledger.step_timings()
    return {
        t.step: {
            "end": t.end,
            "first_issued": t.first_issued,
            "positives": float(t.positives),
            "groups": float(t.groups),
        }
        for t in timings
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
    for rec in read_jsonl(RunDir(run_dir).metrics):
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
    for rec in read_jsonl(RunDir(run_dir).metrics):
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
    cmd = train_command(
        run_dir,
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
    )
    run_logged(cmd, run_dir.parent / f"{run_dir.name}.log", timeout=1800)
    return run_dir


def measure(cfg: RunConfig, a: argparse.Namespace, out: Path) -> BenchResult:
    """`popo bench e2e`: async against synchronous `popo train`, alternating runs."""
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
