"""End to end: `popo train` with the real vLLM CPU actor, the verifier and the learner over ZeroMQ.

Each run is a real `popo train` process (the supervisor starts every role as its own process) on the
embedded demo model, shortened to a few steps, on free loopback ports.
"""

import json
import os
import signal
import time

import pytest
from e2e_helpers import assert_exactly_once, popo_train, train_args
from safetensors.torch import load_file

from popo.common.run_dir import RunDir

pytestmark = pytest.mark.vllm


def test_train_end_to_end(tmp_path, demo_model_dir):
    run_dir = tmp_path / "run"
    proc = popo_train(train_args(run_dir, demo_model_dir, steps=3))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "held-out accuracy" in out

    # the policy changed: the last published version differs from the base model
    base = load_file(str(demo_model_dir / "model.safetensors"))
    store = RunDir(run_dir).weight_store()
    versions = store.versions()
    assert versions and versions[-1] >= 3
    new = load_file(str(store.weights_file(versions[-1])))
    assert any((new[k] - base[k]).abs().max() > 0 for k in base)

    # actors moved to the new versions; metrics.jsonl was written by every role
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    roles = {r["role"] for r in recs}
    assert {"learner", "verifier", "actor"} <= roles
    actor_versions = [r.get("popo_actor_policy_version", 0) for r in recs if r["role"] == "actor"]
    assert max(actor_versions) >= 2
    # float32 versions keep every step's update: most sampled elements change between versions
    changed = [r["popo_learner_published_change_fraction"] for r in recs if r["role"] == "learner"]
    assert changed and changed[-1] > 0.5
    assert_exactly_once(run_dir, 3)
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == 2 and evals[0]["step"] == 0 and evals[-1]["step"] == 3
    # the learner reported the step-0 evaluation's progress while it waited for the engine
    key = "popo_learner_eval_round_prompts"
    rounds = [
        (r[f'{key}{{state="done"}}'], r[f'{key}{{state="total"}}'])
        for r in recs
        if r["role"] == "learner" and f'{key}{{state="total"}}' in r
    ]
    assert (0, 16) in rounds and all(d <= t and t in (0, 16) for d, t in rounds)
    assert rounds[-1] == (0, 0)  # none in progress once the last one is recorded


def test_stop_and_resume(tmp_path, demo_model_dir):
    run_dir = tmp_path / "run"
    args = train_args(run_dir, demo_model_dir, steps=8)
    # Every weight/checkpoint write then lasts >= 0.5 s (the chaos tests' hook), so the 6 steps
    # after the first checkpoint outlast the interrupt's arrival even on a loaded machine.
    proc = popo_train(
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

    resumed = popo_train(["--resume", str(run_dir), *args[1:]])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert_exactly_once(run_dir, 8)


def test_train_with_two_learner_ranks(tmp_path, demo_model_dir):
    """`learner.devices=2`: `popo learner` starts two FSDP2 ranks (gloo on CPU); rank 0 serves the
    role, rank 1 follows; the run finishes, checkpoints are 2-rank ones, nothing trained twice."""
    run_dir = tmp_path / "run"
    proc = popo_train([*train_args(run_dir, demo_model_dir, steps=2), "--learner.devices=2"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    log = (run_dir / "logs" / "learner.log").read_text()
    assert "learner rank 0 of 2" in log and "learner rank 1 of 2" in log, log[-3000:]
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert json.loads((ckpt / "meta.json").read_text())["world"] == 2
    assert_exactly_once(run_dir, 2)
