"""End to end without a shared weight directory: `popo train` with `transport.weights_mode=stream`,
so the actor never reads the learner's weights/ and loads every version from its own cache."""

import json
import socket

import pytest
from e2e_helpers import assert_exactly_once, popo_train, train_args

from popo.common.run_dir import RunDir
from popo.common.weights import WeightStore

# ~80 s on 2 cores: opt-in; tests/actors/test_actor_stream.py covers fetch -> reload in the default suite
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_train_with_streamed_weights(tmp_path, demo_model_dir):
    run_dir = tmp_path / "run"
    args = [
        *train_args(run_dir, demo_model_dir, steps=2),
        "--transport.weights_mode=stream",
        "--transport.stream_chunk_bytes=262144",
    ]
    proc = popo_train(args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert_exactly_once(run_dir, 2)

    log = (run_dir / "logs" / "actor-0.log").read_text()
    streamed = [line for line in log.splitlines() if "streamed version" in line]
    assert len(streamed) >= 2, log[-3000:]
    assert "weights mode stream" in log
    run = RunDir(run_dir)
    cache = WeightStore(run.weights_cache(socket.gethostname()))  # one cache per node
    published = run.weight_store()
    newest = published.versions()[-1]
    assert cache.weights_file(newest).read_bytes() == published.weights_file(newest).read_bytes()
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    actor = [r for r in recs if r["role"] == "actor"]
    assert max(r.get("popo_actor_policy_version", 0) for r in actor) >= 2
    assert any(r.get('popo_actor_weights_mode{mode="stream"}') == 1.0 for r in actor)
    assert max(r.get("popo_actor_weights_streamed_bytes_total", 0) for r in actor) > 0
