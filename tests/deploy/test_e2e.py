"""End to end: `popo train` with the real vLLM CPU actor, the verifier and the learner over ZeroMQ.

Each run is a real `popo train` process (the supervisor starts every role as its own process) on the
embedded demo model, shortened to a few steps, on free loopback ports.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from popo.common.process import free_port_flags

pytestmark = pytest.mark.vllm


def _args(run_dir: Path, model_dir: Path, steps: int) -> list[str]:
    return [
        f"--deploy.run_dir={run_dir}", f"--model.path={model_dir}",
        f"--learner.total_steps={steps}", "--learner.prompts_per_step=4",
        "--learner.checkpoint_every=2", "--data.eval_size=16", "--actor.group_size=4",
        *free_port_flags(), "--metrics.jsonl_every_s=1",
    ]  # fmt: skip


def _popo(args: list[str], **kw) -> subprocess.Popen:
    env = kw.pop("env", dict(os.environ, PYTHONUNBUFFERED="1"))
    return subprocess.Popen(
        [sys.executable, "-m", "popo.deploy.cli", "train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw,
    )  # fmt: skip


def _ledger(run_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(run_dir / "ledger.db")


def _assert_exactly_once(run_dir: Path, steps: int) -> None:
    db = _ledger(run_dir)
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


def test_train_end_to_end(tmp_path, demo_model_dir):
    run_dir = tmp_path / "run"
    proc = _popo(_args(run_dir, demo_model_dir, steps=3))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "held-out accuracy" in out

    # the policy changed: the last published version differs from the base model
    base = load_file(str(demo_model_dir / "model.safetensors"))
    versions = sorted(int(p.name[1:]) for p in (run_dir / "weights").glob("v*"))
    assert versions and versions[-1] >= 3
    new = load_file(str(run_dir / "weights" / f"v{versions[-1]}" / "model.safetensors"))
    assert any((new[k] - base[k]).abs().max() > 0 for k in base)

    # actors moved to the new versions; metrics.jsonl was written by every role
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    roles = {r["role"] for r in recs}
    assert {"learner", "verifier", "actor"} <= roles
    actor_versions = [r.get("popo_actor_policy_version", 0) for r in recs if r["role"] == "actor"]
    assert max(actor_versions) >= 2
    _assert_exactly_once(run_dir, 3)
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == 2 and evals[0]["step"] == 0 and evals[-1]["step"] == 3


def test_stop_and_resume(tmp_path, demo_model_dir):
    run_dir = tmp_path / "run"
    args = _args(run_dir, demo_model_dir, steps=8)
    # Every weight/checkpoint write then lasts >= 0.5 s (the chaos tests' hook), so the 6 steps
    # after the first checkpoint outlast the interrupt's arrival even on a loaded machine.
    proc = _popo(
        args,
        start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", POPO_FAULT_WRITE_DELAY_S="0.5"),
    )
    # stop the run once a checkpoint exists and a step after it is being trained
    deadline = time.time() + 400
    while time.time() < deadline:
        if (
            list((run_dir / "checkpoints").glob("step-*"))
            if (run_dir / "checkpoints").exists()
            else []
        ):
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("no checkpoint within the time limit")
    # SIGTERM takes the same path as Ctrl-C; SIGINT itself is ignored by processes started in
    # the background of a non-interactive shell (e.g. `make test &`), which this test may be.
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert not (run_dir / "summary.json").exists(), "the run finished before the interrupt"

    resumed = _popo(["--resume", str(run_dir), *args[1:]])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    _assert_exactly_once(run_dir, 8)


def test_train_with_two_learner_ranks(tmp_path, demo_model_dir):
    """`learner.devices=2`: `popo learner` starts two FSDP2 ranks (gloo on CPU); rank 0 serves the
    role, rank 1 follows; the run finishes, checkpoints are 2-rank ones, nothing trained twice."""
    run_dir = tmp_path / "run"
    proc = _popo([*_args(run_dir, demo_model_dir, steps=2), "--learner.devices=2"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    log = (run_dir / "logs" / "learner.log").read_text()
    assert "learner rank 0 of 2" in log and "learner rank 1 of 2" in log, log[-3000:]
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert json.loads((ckpt / "meta.json").read_text())["world"] == 2
    _assert_exactly_once(run_dir, 2)
