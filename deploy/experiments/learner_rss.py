"""The learner's RSS over many steps with and without `learner.release_memory`.

    .venv/bin/python deploy/experiments/learner_rss.py {keep,release} STEPS OUT.json

Runs the real learner work of the embedded default in one process — `build_trainer`, a
`train_step` on a fresh batch each step whose size and lengths vary like the live run's (random
rewards, so 1 to G-1 positives per prompt, which POPO keeps; 1-max_tokens tokens per completion),
`write_weights` every step and `write_checkpoint` every `checkpoint_every` — with no other role, and records VmRSS after each step. `release` calls
`release_free_memory()` (glibc malloc_trim) after each step, as the learner does by default, and
times it. Run both modes side by side to see the allocator's retention apart from any leak.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from popo.common.config import RunConfig
from popo.common.demo_model import resolve_model_dir
from popo.common.process import release_free_memory
from popo.deploy.bench.learn import make_batch
from popo.learner.ops import build_trainer, write_checkpoint, write_weights


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main(mode: str, steps: int, out: str) -> None:
    if mode not in ("keep", "release"):
        raise SystemExit("mode must be keep or release")
    torch.set_num_threads(1)
    cfg = RunConfig()
    run_dir = Path(tempfile.mkdtemp(prefix=f"learner-rss-{mode}-"))
    model_dir = resolve_model_dir(cfg)
    trainer, tokenizer = build_trainer(cfg, run_dir, model_dir, "cpu")
    rows, release_s, t0 = [], 0.0, time.time()
    for s in range(1, steps + 1):
        groups = make_batch(
            cfg.learner.prompts_per_step,
            cfg.actor.group_size,
            len(tokenizer),
            seed=s,
            completion_len=(1, cfg.actor.max_tokens),
        )
        trainer.train_step(groups)
        write_weights(trainer, cfg, run_dir, model_dir, s, set(), None)
        if s % cfg.learner.checkpoint_every == 0:
            write_checkpoint(trainer, cfg, run_dir)
        if mode == "release":
            release_s += release_free_memory()
        rows.append({"step": s, "t": time.time() - t0, "rss_mib": rss_mib()})
        if s % 50 == 0:
            print(
                f"{mode} step {s}: RSS {rows[-1]['rss_mib']:.0f} MiB, "
                f"release {1000 * release_s / s:.1f} ms/step",
                flush=True,
            )
    Path(out).write_text(
        json.dumps({"mode": mode, "release_ms_per_step": 1000 * release_s / steps, "rows": rows})
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
