"""Helpers of the end-to-end tests: a short `popo train` on the demo model on free loopback ports,
and the exactly-once check of its ledger."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from popo.common.process import free_port_flags


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
    db = sqlite3.connect(run_dir / "ledger.db")
    states = dict(db.execute("SELECT state, COUNT(*) FROM leases GROUP BY state").fetchall())
    assert states.get("trained", 0) > 0, states
    # no prompt lease trained twice, every trained lease has a step within the run
    (dups,) = db.execute(
        "SELECT COUNT(*) FROM (SELECT lease_id FROM leases WHERE state='trained'"
        " GROUP BY lease_id HAVING COUNT(*) > 1)"
    ).fetchone()
    assert dups == 0
    (max_step,) = db.execute("SELECT MAX(step) FROM leases WHERE state='trained'").fetchone()
    assert max_step == steps
    (bad,) = db.execute(
        "SELECT COUNT(*) FROM leases WHERE state IN ('trained','skipped','expired')"
        " AND ended_at IS NULL"
    ).fetchone()
    assert bad == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ledger_problems"] == []
    assert summary["steps"] == steps
