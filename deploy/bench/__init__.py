"""`popo bench SUB`: each component against its physical limit, and async against sync.

    popo bench generate   actor tokens/s vs the same vLLM engine's raw generate (target >= 0.9)
    popo bench verify     verifier service verifications/s per worker vs math-verify (>= 0.8)
    popo bench learn      learner step cost POPO vs GRPO vs NLL; POPO's saving vs pass rate (PNG)
    popo bench sync       publish + actor reload vs raw write+fsync+read of the bytes (<= 2x; PNG)
    popo bench e2e        trained positives/s, async vs synchronous `popo train`, pinned cores (>= 1.6)
    popo bench default    default `popo train` vs the plain synchronous trainer: time to accuracy

Every figure is a ratio of two measurements taken in the same repetitions (the two sides
alternate), reported as median [min, max] over `--reps`; a ratio whose repetitions disagree by more
than `--max-spread` ((max - min) / median) is refused, not printed (`popo.deploy.bench.stats`).
Each subcommand prints a Markdown table and writes `SUB.json` (+ `SUB.png` where a curve says more)
under `--out` (default `runs/bench/<date>-<SUB>`). `--quick` runs a small version of the same
harness (CI checks the harness, not the timings).

This module is the command line (flags, per-subcommand defaults, the JSON and the table); each
subcommand is the module of its name here, whose `measure(cfg, args, out) -> BenchResult` runs its
harness. Subcommand modules are imported only when run, so `popo bench --help` stays light.
Besides them: `weight_stream` (`python -m popo.deploy.bench.weight_stream`, weight streaming vs a
raw ZeroMQ transfer), `runs` (whole `popo train` runs in a subprocess), `models` (the random models
measured), `plot` and `stats`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popo.deploy.bench.stats import DEFAULT_MAX_SPREAD

if TYPE_CHECKING:
    from popo.common.config import RunConfig

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
    g.add_argument(
        "--rounding",
        choices=("nearest", "dither"),
        help="sync: learner.publish_rounding of bfloat16 versions (default: the config's)",
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
            # metrics every 0.5 s: the idle fractions need two records inside the few seconds
            # between the first and the last of two steps
            train_flags="--learner.total_steps=2 --learner.eval_every=1 "
            "--learner.prompts_per_step=4 --data.eval_size=8 --metrics.jsonl_every_s=0.5",
        ),
    },
}


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    for k, v in DEFAULTS[args.sub]["quick" if args.quick else "full"].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def ints(s: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4] (the comma-separated flags)."""
    return [int(x) for x in str(s).split(",") if x]


def machine() -> dict[str, Any]:
    """What the JSON records of the machine a benchmark ran on."""
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


def run(cfg: RunConfig, args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run one subcommand, print its table, write `SUB.json` (and `SUB.png`) under `--out`."""
    a = resolve(args)
    out = Path(a.out or time.strftime(f"runs/bench/%Y%m%d-%H%M%S-{a.sub}"))
    out.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[1:] if argv is None else argv
    command = "popo " + shlex.join(argv)
    before = machine()
    t0 = time.time()
    res = importlib.import_module(f"popo.deploy.bench.{a.sub}").measure(cfg, a, out)
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
