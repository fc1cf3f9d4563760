"""The actor against the real vLLM CPU engine, with fake learner / verifier peers on real sockets.

One engine serves every test here (see actor_harness.py); tests that load new weights keep the
transformers reference in step with what the engine serves, so their order does not matter.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from actor_harness import (
    LOGPROB_ATOL,
    Peers,
    actor_test_config,
    announce_until,
    assert_serves,
    publish,
    running,
)

from popo.actors.actor import Actor
from popo.common.messages import (
    LeaseRequest,
    WeightsReady,
    pack_f32,
    pack_ids,
    unpack_f32,
    unpack_ids,
)
from popo.common.run_dir import RunDir
from popo.common.weights import WEIGHTS_FILE, sha256_file

pytestmark = pytest.mark.vllm

PROMPT = "12+34="


def wait_for(cond, seconds: float, what: str, peers: Peers | None = None) -> None:
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        if peers is not None:
            peers.serve(0.05)
        else:
            time.sleep(0.02)


def make_actor(engine, model_dir: Path, peers: Peers, run_dir: Path | None = None) -> Actor:
    actor = Actor(actor_test_config(), model_dir, peers.endpoints(), run_dir=run_dir, engine=engine)
    actor.setup()
    return actor


# --- sampling ------------------------------------------------------------------------------------


def test_sampling_returns_g_completions_with_behaviour_logprobs(engine, reference):
    prompt_ids = engine.encode(PROMPT)
    assert prompt_ids == list(PROMPT.encode())  # char-level demo tokenizer, no BOS
    group = engine.sample(prompt_ids).result(timeout=60)
    cfg = actor_test_config().actor
    assert len(group.samples) == cfg.group_size
    for s in group.samples:
        assert 1 <= len(s.token_ids) <= cfg.max_tokens
        assert s.logprobs.shape == s.token_ids.shape
        assert np.all(s.logprobs <= 0) and np.all(np.isfinite(s.logprobs))
        assert s.finish_reason in ("stop", "length")
        assert s.versions == (engine.version,)
    assert group.version_min == group.version_max == engine.version
    assert group.num_tokens == sum(len(s.token_ids) for s in group.samples)


def test_logprobs_equal_transformers_forward(engine, reference):
    """mu from vLLM == a transformers float32 forward on the same tokens (within LOGPROB_ATOL)."""
    prompt_ids = engine.encode("7+5=")
    assert_serves(engine, reference, prompt_ids)
    # the probe path (prompt log-probs) agrees as well
    group = engine.sample(prompt_ids).result(timeout=60)
    s = group.samples[0]
    lp = engine.prompt_logprobs(prompt_ids + s.token_ids.tolist()).result(timeout=60)
    np.testing.assert_allclose(lp[len(prompt_ids) - 1 :], s.logprobs, atol=LOGPROB_ATOL, rtol=0)


# --- flow control ----------------------------------------------------------------------------------


def test_actor_started_before_learner_and_verifier(engine, model_dir, reference, peers):
    actor = make_actor(engine, model_dir, peers)
    with running(actor):
        time.sleep(1.0)  # nobody there: requests cannot even be sent, the actor backs off
        assert actor.stats.lease_requests == 0
        peers.bind_learner()  # the learner comes up late
        wait_for(lambda: len(peers.requests) >= 1, 10, "a lease request", peers)
        req = peers.requests[0]
        assert req.actor_id == "actor-0" and req.n == 4 and req.policy_version == engine.version
        peers.bind_verifier()  # the verifier comes up later still
        wait_for(lambda: len(peers.received) >= 6, 60, "rollout groups", peers)
    by_id = {lease.lease_id: lease for lease in peers.granted}
    for g in peers.received:
        lease = by_id[g.lease_id]
        assert g.prompt_id == lease.prompt_id and g.gold == lease.gold
        prompt_ids = unpack_ids(g.prompt_token_ids).tolist()
        assert prompt_ids == list(lease.prompt.encode())
        assert len(g.completions) == 4
        assert g.version_min == g.version_max == engine.version
        assert g.t_leased <= g.t_started <= g.t_finished
        for c in g.completions:
            ids, lps = unpack_ids(c.token_ids), unpack_f32(c.logprobs)
            assert len(ids) == len(lps) >= 1
            assert c.finish_reason in ("stop", "length")
    # what crossed the wire is the behaviour policy itself
    g = peers.received[0]
    c = g.completions[0]
    ref = reference.logprobs(
        unpack_ids(g.prompt_token_ids).tolist(), unpack_ids(c.token_ids).tolist()
    )
    np.testing.assert_allclose(unpack_f32(c.logprobs), ref, atol=LOGPROB_ATOL, rtol=0)


def test_backpressure_without_verifier(engine, model_dir, peers):
    """No verifier: finished groups pile up to max_pending_groups, then lease requests stop;
    when a verifier appears the backlog drains and requests resume."""
    peers.bind_learner()
    actor = make_actor(engine, model_dir, peers)
    bound = actor.acfg.max_pending_groups
    with running(actor):
        wait_for(lambda: len(actor.pending) >= bound, 60, "the pending bound", peers)
        n_requests, n_granted = len(peers.requests), len(peers.granted)
        peers.serve(2.0)  # the actor must stay quiet now
        assert len(peers.requests) == n_requests
        assert len(peers.granted) == n_granted == bound
        assert len(actor.pending) == bound and not actor.inflight and not actor.waiting
        peers.bind_verifier()
        wait_for(lambda: len(peers.received) >= bound + 2, 60, "the backlog to drain", peers)
        assert len(peers.requests) > n_requests
    assert sorted(g.lease_id for g in peers.received[:bound]) == list(range(1, bound + 1))


def test_sigterm_drains_inflight_groups(engine, model_dir, peers):
    """Stopping mid-generation delivers every group already in the engine, whole."""
    peers.bind_learner()
    peers.bind_verifier()
    actor = make_actor(engine, model_dir, peers)
    with running(actor) as stop:
        wait_for(lambda: len(actor.inflight) >= 2, 30, "groups in flight", peers)
        in_flight = set(actor.inflight)
        stop.set()
        peers.serve(15, until=lambda: in_flight <= {g.lease_id for g in peers.received})
    got = {g.lease_id for g in peers.received}
    assert in_flight <= got
    assert not actor.inflight and not actor.pending
    assert all(len(g.completions) == 4 for g in peers.received)


# --- weights --------------------------------------------------------------------------------------


def test_new_version_reloads_in_place_and_matches_learner(
    engine, model_dir, reference, peers, tmp_path
):
    peers.bind_learner()
    peers.bind_verifier()
    peers.bind_pub()
    actor = make_actor(engine, model_dir, peers)
    prompt_ids = engine.encode("3+4+5=")
    old = assert_serves(engine, reference, prompt_ids)
    version = engine.version + 1
    state = reference.perturbed(seed=version)
    vdir, sha, nbytes = publish(tmp_path, f"v{version}", state)

    # the learner's probe: its own log-probs of a fixed continuation on the new weights
    prev_state = {k: v.clone() for k, v in reference.model.state_dict().items()}
    reference.load(state)
    probe_cont = list(b"12")
    probe_lp = reference.logprobs(prompt_ids, probe_cont)
    msg = WeightsReady(
        version=version,
        path=str(vdir),
        sha256=sha,
        nbytes=nbytes,
        probe_token_ids=pack_ids(prompt_ids + probe_cont),
        probe_prompt_len=len(prompt_ids),
        probe_logprobs=pack_f32(probe_lp),
    )
    try:
        with running(actor):
            # keep groups in flight across the reload: it must not drop them
            wait_for(lambda: len(actor.inflight) >= 1, 30, "groups in flight", peers)
            announce_until(peers, msg, lambda: actor.stats.version == version)
            assert engine.version == version and actor.stats.reloads == 1
            assert actor.stats.mismatch_kl is not None and actor.stats.mismatch_kl < 1e-6
            assert actor.stats.probe_max_abs_diff < LOGPROB_ATOL
            # the next lease request reports the new version and the probe's mismatch
            n = len(peers.requests)
            wait_for(lambda: len(peers.requests) > n, 30, "a lease request after reload", peers)
            req: LeaseRequest = peers.requests[-1]
            assert req.policy_version == version and req.mismatch_kl == actor.stats.mismatch_kl
            wait_for(
                lambda: any(g.version_min == version for g in peers.received),
                60,
                "a group of the new version",
                peers,
            )
        new = assert_serves(engine, reference, prompt_ids)  # matches the learner's new weights
    except BaseException:
        reference.load(prev_state)
        raise
    assert old.shape != new.shape or np.max(np.abs(old - new)) > 100 * LOGPROB_ATOL
    # nothing was dropped across the reload: every group the actor sent arrived whole
    peers.serve(1.0)
    assert len(peers.received) == actor.stats.rollouts
    assert all(len(g.completions) == 4 for g in peers.received)


@pytest.mark.parametrize(
    "fault",
    ["bad_sha", "truncated", "wrong_shape", "missing_dir", "flipped", "truncated_announced"],
)
def test_corrupt_version_is_rejected_and_old_one_keeps_serving(
    fault, engine, model_dir, reference, peers, tmp_path
):
    peers.bind_pub()
    actor = make_actor(engine, model_dir, peers)
    prompt_ids = engine.encode("9+9=")
    served = engine.version
    version = served + 1
    state = reference.perturbed(seed=1000 + version)
    if fault == "wrong_shape":
        key = next(k for k in state if k.endswith("mlp.up_proj.weight"))
        state[key] = state[key][:-1]
    vdir, sha, nbytes = publish(tmp_path, f"v{version}", state)
    if fault == "bad_sha":
        sha = "0" * 64
    elif fault == "truncated":
        f = vdir / WEIGHTS_FILE
        f.write_bytes(f.read_bytes()[: nbytes // 2])
    elif fault == "missing_dir":
        vdir = tmp_path / "does-not-exist"
    elif fault == "flipped":  # bit rot after the checksum: same size, other bytes
        f = vdir / WEIGHTS_FILE
        data = bytearray(f.read_bytes())
        data[-100] ^= 0xFF
        f.write_bytes(bytes(data))
    elif fault == "truncated_announced":  # cut short, announced with the short file's checksum
        f = vdir / WEIGHTS_FILE
        f.write_bytes(f.read_bytes()[: nbytes - 1000])
        sha, nbytes = sha256_file(f), f.stat().st_size
    bad = WeightsReady(version=version, path=str(vdir), sha256=sha, nbytes=nbytes)
    with running(actor):
        announce_until(peers, bad, lambda: actor.stats.reload_failures >= 1)
        assert engine.version == served and actor.stats.version == served
        assert_serves(engine, reference, prompt_ids)  # the old weights, untouched
        # the next good announcement is taken
        good_state = reference.perturbed(seed=2000 + version)
        gdir, gsha, gbytes = publish(tmp_path, f"v{version}-good", good_state)
        good = WeightsReady(version=version, path=str(gdir), sha256=gsha, nbytes=gbytes)
        announce_until(peers, good, lambda: actor.stats.version == version)
    reference.load(good_state)
    assert actor.stats.reload_failures == 1
    assert_serves(engine, reference, prompt_ids)


def test_late_actor_loads_newest_published_version(engine, model_dir, reference, peers, tmp_path):
    """An actor (re)started after announcements went out finds the newest version on disk."""
    version = engine.version + 5
    state = reference.perturbed(seed=3000 + version)
    RunDir(tmp_path).weight_store().publish(version, state)
    actor = make_actor(engine, model_dir, peers, run_dir=tmp_path)
    with running(actor):
        wait_for(lambda: actor.stats.version == version, 30, "the on-disk version")
    reference.load(state)
    assert_serves(engine, reference, engine.encode("1+1="))
