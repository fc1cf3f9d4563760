"""Weights without a shared filesystem, into the real vLLM engine: the actor streams a version from
a real WeightServer into its node-local cache and reloads it in place (`transport.weights_mode`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import zmq
from actor_harness import actor_test_config, announce_until, assert_serves, publish, running

from popo.actors.actor import Actor, ActorEndpoints
from popo.common.messages import WeightsReady
from popo.common.weight_stream import WeightServer
from popo.common.weights import WEIGHTS_FILE, WeightStore

pytestmark = pytest.mark.vllm


def test_actor_streams_a_version_it_cannot_see_and_serves_it(
    engine, model_dir, reference, peers, tmp_path
):
    cfg = actor_test_config()
    cfg.transport.weights_mode = "auto"
    cfg.transport.stream_chunk_bytes = 256 << 10  # several chunks for the ~3 MB demo weights
    cfg.actor.weights_cache_dir = str(tmp_path / "node-cache")
    root = tmp_path / "learner-run" / "weights"
    root.mkdir(parents=True)
    ctx = zmq.Context()
    server = WeightServer(root, "tcp://127.0.0.1:*", cfg.transport, ctx)
    server.start()
    peers.bind_pub()
    eps = ActorEndpoints(
        peers.dispatch_addr, [peers.rollouts_addr], peers.weights_addr, weightstream=server.address
    )
    actor = Actor(cfg, model_dir, eps, engine=engine)
    actor.setup()
    prompt_ids = engine.encode("5+6=")
    prev_state = {k: v.clone() for k, v in reference.model.state_dict().items()}
    try:
        with running(actor):
            # 1. the announced path holds the version on this node: read it in place
            v1 = engine.version + 1
            s1 = reference.perturbed(seed=4000 + v1)
            d1, sha1, n1 = publish(root, f"v{v1}", s1)
            announce_until(
                peers,
                WeightsReady(version=v1, path=str(d1), sha256=sha1, nbytes=n1),
                lambda: actor.stats.version == v1,
            )
            assert actor.stats.mode == "shared" and actor.stats.streamed_bytes == 0

            # 2. the learner's path does not exist here (another node): stream, verify, reload
            v2 = v1 + 1
            s2 = reference.perturbed(seed=4000 + v2)
            d2, sha2, n2 = publish(root, f"v{v2}", s2)
            elsewhere = f"/learner-node{d2}"
            assert not Path(elsewhere).exists()
            announce_until(
                peers,
                WeightsReady(version=v2, path=elsewhere, sha256=sha2, nbytes=n2),
                lambda: actor.stats.version == v2,
            )
            assert engine.version == v2 and actor.stats.reload_failures == 0
            assert actor.stats.mode == "stream"
            cached = WeightStore(tmp_path / "node-cache").path(v2)
            assert (cached / "model.safetensors").read_bytes() == (
                d2 / "model.safetensors"
            ).read_bytes()
            assert actor.stats.streamed_bytes == sum(p.stat().st_size for p in d2.iterdir())
            # the node cache holds the version's manifest for neighbours, and the actor's lease on it
            assert (cached / ".manifest.json").is_file() and actor._fetcher.leased() == [v2]
            assert server.bytes_sent == actor.stats.streamed_bytes
            metrics = actor.stats.metrics.registry
            assert metrics.get_sample_value("popo_actor_weights_mode", {"mode": "stream"}) == 1.0
            assert metrics.get_sample_value("popo_actor_weights_mode", {"mode": "shared"}) == 0.0
            assert (
                metrics.get_sample_value("popo_actor_weights_streamed_bytes_total")
                == actor.stats.streamed_bytes
            )
            reference.load(s2)
            assert_serves(engine, reference, prompt_ids)  # the streamed weights are served

            # 3. the path is visible with the announced size and sidecar but holds other bytes
            # (a damaged node copy): its sha256, checked while the engine loads it, fails; the
            # engine takes v2 back, then the learner's own bytes are streamed and served
            v3 = v2 + 1
            s3 = reference.perturbed(seed=4000 + v3)
            d3, sha3, n3 = publish(root, f"v{v3}", s3)
            stale = tmp_path / "node-copy" / f"v{v3}"
            shutil.copytree(d3, stale)
            raw = bytearray((stale / WEIGHTS_FILE).read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            (stale / WEIGHTS_FILE).write_bytes(raw)
            announce_until(
                peers,
                WeightsReady(version=v3, path=str(stale), sha256=sha3, nbytes=n3),
                lambda: actor.stats.version == v3,
            )
            assert actor.stats.mode == "stream" and actor.stats.reload_failures == 0
            assert (tmp_path / "node-cache" / f"v{v3}" / WEIGHTS_FILE).read_bytes() == (
                d3 / WEIGHTS_FILE
            ).read_bytes()
        reference.load(s3)
        assert_serves(engine, reference, prompt_ids)  # the learner's v3, not the damaged copy
    except BaseException:
        reference.load(prev_state)
        raise
    finally:
        server.stop()
        ctx.term()
