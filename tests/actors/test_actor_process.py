"""`popo actor` as the launcher runs it: a real process with its own engine, stopped by SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import zmq
from actor_harness import free_port

from popo.common import transport
from popo.common.config import RunConfig
from popo.common.messages import LeaseRequest

pytestmark = pytest.mark.vllm


def test_popo_actor_serves_then_exits_cleanly_on_sigterm(model_dir, tmp_path):
    cfg = RunConfig()
    cfg.model.path = str(model_dir)
    cfg.actor.max_tokens = 8
    cfg.metrics.enabled = False
    cfg.transport.dispatch_port = free_port()
    cfg.transport.rollouts_port = free_port()
    cfg.transport.weights_port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(cfg.to_toml())
    ctx = zmq.Context()
    learner = transport.bind(
        ctx, "dispatch", transport.address(cfg.transport, "dispatch"), cfg.transport
    )
    argv = [sys.executable, "-m", "popo.deploy.cli", "actor", "--config", str(config)]
    proc = subprocess.Popen(
        [*argv, "--run-dir", str(tmp_path), "--index", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        got = learner.recv(120_000)  # engine start-up, then the first lease request
        assert got is not None, "no lease request from the actor process"
        assert isinstance(got[1], LeaseRequest) and got[1].actor_id == "actor-0"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
        assert time.monotonic() - t0 < 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        learner.close()
        ctx.term()


def test_popo_actor_exits_nonzero_on_a_bad_model(tmp_path):
    cfg = RunConfig()
    cfg.model.path = str(tmp_path / "no-such-model")
    cfg.metrics.enabled = False
    config = tmp_path / "c.toml"
    config.write_text(cfg.to_toml())
    argv = [sys.executable, "-m", "popo.deploy.cli", "actor", "--config", str(config)]
    proc = subprocess.run(
        [*argv, "--run-dir", str(tmp_path)], capture_output=True, timeout=120, check=False
    )
    assert proc.returncode != 0
