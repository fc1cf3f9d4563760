"""Helpers of the end-to-end tests: a short `popo train` on the demo model on free loopback ports,
and the exactly-once check of its ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from popo.common.process import free_port_flags
from popo.common.run_dir import RunDir
from popo.learner.ledger import LedgerReader


def train_args(run_dir: Path, model_dir: Path, steps: int) -> list[str]:
    """`popo train` flags of a short run: `steps` steps of 4 prompts x 4 completions."""
    return [
        f"--deploy.run_dir={run_dir}",
        f"--model.path={model_dir}",
        f"--learner.total_steps={steps}",
        "--learner.prompts_per_step=4",
        "--learner.checkpoint_every=2",
        "--data.eval_size=16",
        "--actor.group_size=4",
        *free_port_flags(),
        "--metrics.jsonl_every_s=1",
    ]


def popo_train(args: list[str], **kw) -> subprocess.Popen:
    """`popo train ARGS` as a child process, stdout and stderr together in `.stdout`."""
    env = kw.pop("env", dict(os.environ, PYTHONUNBUFFERED="1"))
    return subprocess.Popen(
        [sys.executable, "-m", "popo.deploy.cli", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kw,
    )


def assert_exactly_once(run_dir: Path, steps: int) -> None:
    """The finished run trained `steps` steps, no lease twice, and closed every lease it ended."""
    run = RunDir(run_dir)
    with LedgerReader(run.ledger) as db:
        states = db.state_counts()
        trained = [r["lease_id"] for r in db.leases() if r["state"] == "trained"]
        max_step = db.last_trained_step()
        bad = db.ended_without_time()
    assert states.get("trained", 0) > 0, states
    # no prompt lease trained twice, every trained lease has a step within the run
    dups = len(trained) - len(set(trained))
    assert dups == 0
    assert max_step == steps
    assert bad == 0
    summary = json.loads(run.summary.read_text())
    assert summary["ledger_problems"] == []
    assert summary["steps"] == steps
