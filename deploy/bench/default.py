"""`popo bench default`: the default `popo train` against the plain synchronous trainer (and,
optionally, other `popo train` settings) on the same machine, model, task and evaluation.

Per run: the whole command's wall-clock, the time from its start to the first held-out evaluation
at or above `--threshold`, the held-out accuracy at every evaluated step, and for `popo train`
runs the start-up phases, the learner's in-system step time, per-role idle fractions and each
role's CPU seconds. The sides alternate within each repetition, and repetition r runs with learner and actor seed r, so
the accuracy columns are medians over seeds. Once, after the runs, the
learner's step is timed standalone (same model, threads and batch shape: groups, completions and
tokens per step of the measured runs) to compare with the in-system step.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from popo.common.config import RunConfig
from popo.common.process import free_port_flags
from popo.common.run_dir import RunDir, read_jsonl
from popo.deploy.bench.e2e import idle_fractions, step_times
from popo.deploy.bench.runs import run_logged, train_command
from popo.deploy.bench.stats import BenchResult, Summary, paired_ratio, timed

PLAIN = "plain synchronous trainer"
DEFAULT = "popo train (defaults)"


def sides(a: argparse.Namespace) -> dict[str, list[str] | None]:
    """Name -> extra `popo train` arguments, or None for the plain trainer. A `--compare` spec is
    `NAME=ARGS`: dotted flags, and `VAR=value` words that go into that side's environment."""
    out: dict[str, list[str] | None] = {DEFAULT: [], PLAIN: None}
    for spec in a.compare or []:
        name, _, flags = spec.partition("=")
        out[f"popo train {name.strip()}"] = shlex.split(flags)
    return out


def one_run(
    name: str,
    flags: list[str] | None,
    model_dir: Path,
    run_dir: Path,
    a: argparse.Namespace,
    extra: list[str],
) -> dict[str, Any]:
    """Run one side to the end; its figures."""
    common = [f"--model.path={model_dir}", *extra]
    env = dict(f.split("=", 1) for f in flags or [] if "=" in f and not f.startswith("-"))
    flags = None if flags is None else [f for f in flags if f.startswith("-") or "=" not in f]
    if flags is None:
        cmd = [
            sys.executable,
            "-m",
            "popo.deploy.plain_trainer",
            "--out",
            str(run_dir),
            "--threads",
            str(a.plain_threads),
            *common,
        ]
    else:
        cmd = train_command(run_dir, *free_port_flags(), *common, *flags)
    t0 = run_logged(cmd, run_dir.parent / f"{run_dir.name}.log", timeout=3600, env=env)
    wall = time.time() - t0
    evals = read_jsonl(RunDir(run_dir).evals)
    hit = next((e for e in evals if e["accuracy"] >= a.threshold), None)
    info: dict[str, Any] = {
        "name": name,
        "run_dir": str(run_dir),
        "wall_s": wall,
        "to_threshold_s": hit["t"] - t0 if hit else None,
        "accuracy": {int(e["step"]): e["accuracy"] for e in evals},
    }
    if flags is not None:
        info.update(_train_figures(run_dir))
    return info


CPU_KEY = "popo_process_tree_cpu_seconds_total"


def cpu_shares(recs: list[dict[str, Any]], t0: float, t1: float) -> dict[str, float]:
    """Per role instance, the cores its process tree used on average over [t0, t1]: the CPU
    seconds between its first and last metrics record inside the window, over their time apart."""
    out: dict[str, float] = {}
    for inst in sorted({r["instance"] for r in recs}):
        inside = [r for r in recs if r["instance"] == inst and t0 <= r["t"] <= t1 and CPU_KEY in r]
        if len(inside) >= 2 and inside[-1]["t"] > inside[0]["t"]:
            a, b = inside[0], inside[-1]
            out[inst] = (b[CPU_KEY] - a[CPU_KEY]) / (b["t"] - a["t"])
    return out


def _train_figures(run_dir: Path) -> dict[str, Any]:
    summary = json.loads(RunDir(run_dir).summary.read_text())
    recs = read_jsonl(RunDir(run_dir).metrics)
    last = [r for r in recs if r["role"] == "learner"][-1]
    n = last.get("popo_learner_step_seconds_count", 0)
    steps = step_times(run_dir)
    ks = sorted(steps)
    cfg = RunConfig.model_validate(_toml(RunDir(run_dir).config))
    idle = idle_fractions(
        run_dir, steps[ks[0]]["end"], steps[ks[-1]]["end"], cfg.verifier.num_workers
    )
    cpu = cpu_shares(recs, steps[ks[0]]["end"], steps[ks[-1]]["end"])
    return {
        "startup": summary.get("startup", {}),
        "step_s": last["popo_learner_step_seconds_sum"] / n if n else None,
        "tokens_per_step": last.get("popo_learner_tokens_total", 0) / max(1, n),
        "seqs_per_step": last.get("popo_learner_sequences_total", 0) / max(1, n),
        "train_s": steps[ks[-1]]["end"] - steps[ks[0]]["end"],
        "idle": idle,
        "cpu_s": cpu,
        "placement": _json(RunDir(run_dir).placement),
    }


def _toml(path: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(path.read_text())


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def standalone_step(
    model_dir: Path,
    cfg: RunConfig,
    groups: int,
    seqs: float,
    tokens: float,
    threads: int,
    reps: int,
) -> list[float]:
    """Seconds of `Trainer.train_step` alone on batches shaped like the run's mean step:
    `groups` groups holding `seqs` trained completions of `tokens / seqs` tokens on average."""
    import torch
    from transformers import AutoModelForCausalLM

    from popo.deploy.bench.learn import make_batch
    from popo.learner.trainer import Trainer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Trainer(model, cfg.learner, cfg.algorithm, max_completion_len=cfg.actor.max_tokens)
    g = max(1, round(seqs / groups))
    mean = max(1, round(tokens / max(seqs, 1)))
    span = (max(1, mean - 3), min(cfg.actor.max_tokens, mean + 3))
    vocab = model.config.vocab_size
    out = []
    for rep in range(reps + 1):
        batch = make_batch(groups, g, vocab, seed=rep, pass_rate=1.0, completion_len=span)
        t = timed(lambda b=batch: trainer.train_step(b))
        if rep:  # the first one allocates
            out.append(t)
    return out


def med(xs: Any) -> float | None:
    """Median of the values that are not None (None if there is none)."""
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def measure(cfg: RunConfig, a: argparse.Namespace, out: Path) -> BenchResult:
    """`popo bench default`: every side run to the end, alternating, repetitions as seeds."""
    from popo.common.demo_model import resolve_model_dir

    model_dir = resolve_model_dir(cfg)
    extra = shlex.split(a.train_flags)
    plan = sides(a)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in plan}
    for rep in range(a.reps):
        for name, flags in plan.items():  # alternating, so load drifts hit every side alike
            slug = name.replace(" ", "_").replace("(", "").replace(")", "")
            seeds = [f"--learner.seed={rep}", f"--actor.seed={rep}"]  # repetitions are seeds
            info = one_run(
                name, flags, model_dir, out / "runs" / f"{slug}-{rep}", a, [*seeds, *extra]
            )
            runs[name].append(info)
            print(
                f"{name} rep {rep}: whole command {info['wall_s']:.1f}s, to "
                f">= {a.threshold:.0%}: {info['to_threshold_s']}",
                flush=True,
            )

    res = BenchResult(
        "default",
        f"`popo train` vs the plain synchronous trainer, same model / task / hyper-parameters "
        f"(extra flags: `{a.train_flags or 'none'}`), {a.reps} alternating repetitions; "
        f"threshold: held-out avg@G >= {a.threshold:.0%}",
        [
            "run",
            "whole command s",
            f"to >= {a.threshold:.0%} s",
            "held-out accuracy by step",
            "ratio of whole command to plain",
        ],
    )
    wall = {k: [r["wall_s"] for r in v] for k, v in runs.items()}
    for name, rs in runs.items():
        hits = [r["to_threshold_s"] for r in rs if r["to_threshold_s"] is not None]
        steps = sorted(rs[0]["accuracy"])
        acc = " / ".join(
            f"{statistics.median(r['accuracy'][s] for r in rs if s in r['accuracy']):.1%}"
            for s in steps
        )
        r = paired_ratio(wall[name], wall[PLAIN], a.max_spread)
        res.ratios[f"wall_over_plain/{name}"] = r
        res.rows.append(
            [
                name,
                Summary.of(wall[name]).fmt(".1f"),
                Summary.of(hits).fmt(".1f")
                + ("" if len(hits) == len(rs) else f" ({len(hits)} of {len(rs)} reached it)")
                if hits
                else "not reached",
                f"steps {'/'.join(map(str, steps))}: {acc}",
                r.fmt(),
            ]
        )
    d = runs[DEFAULT]
    learner_threads = next(
        (
            x["threads"]
            for r in d
            for x in (r.get("placement") or {}).get("roles", [])
            if x["name"] == "learner"
        ),
        a.plain_threads,
    )
    alone = standalone_step(
        model_dir,
        cfg,
        cfg.learner.prompts_per_step,
        med(r["seqs_per_step"] for r in d),
        med(r["tokens_per_step"] for r in d),
        learner_threads,
        a.step_reps,
    )
    in_sys = med(r["step_s"] for r in d)
    phases = {k: med(r["startup"].get(k) for r in d) for k in d[0]["startup"]}
    idle = {k: med(r["idle"].get(k) for r in d) for k in d[0]["idle"]}
    cores = {k: med(r["cpu_s"].get(k) for r in d) for k in d[0]["cpu_s"]}
    shares = {r["name"]: len(r["cpus"]) for r in d[0]["placement"].get("roles", [])}
    res.notes.append(
        f"{DEFAULT}, medians: start-up from launch "
        + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items() if v is not None)
        + f"; training (first to last step) {med(r['train_s'] for r in d):.1f}s; learner step "
        f"in the system {in_sys:.3f}s vs standalone {statistics.median(alone):.3f}s on the same "
        f"batch shape and {learner_threads} thread(s) (ratio standalone / in-system "
        f"{statistics.median(alone) / in_sys:.2f}); idle fraction while training: "
        + ", ".join(f"{k} {v:.0%}" for k, v in idle.items() if v is not None)
        + "; cores used while training (process tree, of the cores placed): "
        + ", ".join(
            f"{k} {v:.2f} of {shares.get(k, '?')}" for k, v in cores.items() if v is not None
        )
    )
    res.figures = {
        "runs": runs,
        "standalone_step_s": alone,
        "model": str(model_dir),
        "threshold": a.threshold,
    }
    return res
