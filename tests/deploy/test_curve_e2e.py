"""A real `popo train` with CurveZMQ keys (`popo keys`): every role's endpoints are Curve servers or
clients, the run trains as without keys, and a peer without the keys cannot connect meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from e2e_helpers import assert_exactly_once, popo_train, train_args

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_train_with_curve_keys(tmp_path: Path, demo_model_dir: Path) -> None:
    keys = tmp_path / "keys"
    made = subprocess.run(
        [sys.executable, "-m", "popo.deploy.cli", "keys", "--out", str(keys)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    run_dir = tmp_path / "run"
    args = [*train_args(run_dir, demo_model_dir, steps=2), f"--transport.curve_keys_dir={keys}"]
    proc = popo_train(args)
    ports = {a.split("=")[0]: int(a.split("=")[1]) for a in args if "_port=" in a}
    ctx = zmq.Context()
    try:
        # While the learner serves, a peer without keys gets no connection to it.
        deadline = time.time() + 300
        while not (run_dir / "endpoints.json").exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.5)
        rogue = ctx.socket(zmq.PUSH)
        rogue.linger = 0
        rogue.setsockopt(zmq.IMMEDIATE, 1)
        rogue.connect(f"tcp://127.0.0.1:{ports['--transport.ingest_port']}")
        assert rogue.poll(1500, zmq.POLLOUT) == 0
        rogue.close()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        ctx.term()
    assert proc.returncode == 0, out
    assert_exactly_once(run_dir, 2)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("popo_actor_policy_version", 0) for r in recs if r["role"] == "actor") >= 1
    assert (run_dir / "config.toml").read_text().count(str(keys)) == 1
