"""The verifier service end to end over real ZeroMQ sockets on 127.0.0.1: a fake actor PUSHes
RolloutGroups, a fake learner PULLs ScoredGroups."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import msgspec
import zmq

from popo.common.messages import WeightsReady, encode, unpack_f32, unpack_ids

from .cases import CASES
from .helpers import HANG, Peers, make_cfg, make_group, running_verifier

POS, NEG = r"so \boxed{12}", r"so \boxed{13}"


def test_positives_only_with_summary(peers: Peers) -> None:
    cfg = make_cfg()  # algorithm popo: forward auto -> positives
    with running_verifier(cfg, peers.learner.address) as v:
        peers.connect_actor(v.rollouts.address)
        mixed = make_group(1, "12", [POS, NEG, POS, NEG, NEG, "no answer", POS, NEG])
        all_neg = make_group(2, "12", [NEG, NEG, NEG])
        empty = make_group(3, "12", [])
        for g in (mixed, all_neg, empty):
            peers.send(g)
        got = {s.lease_id: s for s in peers.collect(3)}
    s = got[1]
    assert s.forwarded == "positives"
    assert (s.n_total, s.n_positive) == (8, 3)
    assert s.verdicts == {"positive": 3, "negative": 5, "timeout": 0, "error": 0}
    assert [c.verdict for c in s.completions] == ["positive"] * 3
    assert [c.reward for c in s.completions] == [1.0] * 3
    # the positives' tokens and behaviour log-probs arrive unchanged, in order
    for sc, i in zip(s.completions, (0, 2, 6), strict=True):
        orig = mixed.completions[i]
        assert (unpack_ids(sc.token_ids) == unpack_ids(orig.token_ids)).all()
        assert (unpack_f32(sc.logprobs) == unpack_f32(orig.logprobs)).all()
    assert (s.prompt_id, s.actor_id, s.version_min, s.version_max) == ("p1", "actor-test", 2, 3)
    assert s.t_generated == mixed.t_finished and s.t_leased == mixed.t_leased
    assert s.t_verified >= s.t_generated and s.verify_seconds >= 0
    # all-negative and empty groups still close their leases
    assert (got[2].n_total, got[2].n_positive, got[2].completions) == (3, 0, [])
    assert got[2].verdicts["negative"] == 3
    assert (got[3].n_total, got[3].n_positive) == (0, 0)
    assert v.stats.groups_in == v.stats.groups_out == 3
    assert v.stats.verdicts["positive"] == 3 and v.stats.forwarded == 3


def test_forward_all_for_grpo_and_table_verdicts(peers: Peers) -> None:
    cfg = make_cfg(algorithm="grpo")  # auto -> all
    assert cfg.forward == "all"
    with running_verifier(cfg, peers.learner.address) as v:
        peers.connect_actor(v.rollouts.address)
        for k, (text, gold, _) in enumerate(CASES):
            peers.send(make_group(100 + k, gold, [text, text]))
        got = {s.lease_id: s for s in peers.collect(len(CASES))}
    for k, (_, _, expected) in enumerate(CASES):
        s = got[100 + k]
        assert s.forwarded == "all" and s.n_total == 2 and len(s.completions) == 2
        assert [c.verdict for c in s.completions] == [expected, expected]
        assert [c.reward for c in s.completions] == [float(expected == "positive")] * 2
    assert v.stats.scored == 2 * len(CASES)


def test_malformed_frames_dropped_and_counted(peers: Peers) -> None:
    cfg = make_cfg()
    with running_verifier(cfg, peers.learner.address) as v:
        raw = peers.ctx.socket(zmq.PUSH)
        raw.connect(v.rollouts.address)
        good = make_group(1, "12", [POS])
        wrong_version = msgspec.structs.replace(good, v=99)
        bad_utf8 = encode(make_group(2, "12", ["AAAA"])).replace(b"AAAA", b"A\xff\xfeA")
        frames = [
            [b"\x00garbage"],
            [encode(good)[:-7]],  # truncated
            [encode(wrong_version)],
            [encode(WeightsReady(version=1, path="/x", sha256="0", nbytes=1))],  # wrong endpoint
            [bad_utf8],  # invalid UTF-8 in completion text
            [encode(good), b"extra frame"],
        ]
        for f in frames:
            raw.send_multipart(f)
        raw.send(encode(good))
        (s,) = peers.collect(1)
        raw.close(0)
        assert s.lease_id == 1 and s.n_positive == 1
        assert v.stats.dropped == len(frames)
        assert v.stats.groups_in == 1


def test_timeout_in_service_and_groups_overlap(peers: Peers) -> None:
    cfg = make_cfg(num_workers=2, timeout_s=2.0)
    with running_verifier(cfg, peers.learner.address) as v:
        peers.connect_actor(v.rollouts.address)
        peers.send(make_group(1, "12", [HANG, POS, NEG]))
        for k in range(2, 12):
            peers.send(make_group(k, "12", [POS, NEG, POS, POS]))
        order = [s.lease_id for s in peers.collect(11, timeout_s=30)]
        # the stuck group did not hold the others back: they were scored while it waited
        assert order[-1] == 1 and sorted(order[:-1]) == list(range(2, 12))
        peers.send(make_group(50, "12", [POS]))
        (after,) = peers.collect(1)
        assert after.n_positive == 1
        assert v.stats.verdicts["timeout"] == 1 and v.stats.worker_restarts == 1


def test_timeout_verdict_counts(peers: Peers) -> None:
    cfg = make_cfg(algorithm="grpo", timeout_s=1.0)
    with running_verifier(cfg, peers.learner.address) as v:
        peers.connect_actor(v.rollouts.address)
        peers.send(make_group(1, "12", [HANG, POS, "{" * 300 + "}" * 300]))
        (s,) = peers.collect(1)
    assert s.verdicts == {"positive": 1, "negative": 0, "timeout": 1, "error": 1}
    assert [c.verdict for c in s.completions] == ["timeout", "positive", "error"]
    assert v.stats.pass_rate == 1 / 3


def test_many_groups_from_two_actors(peers: Peers) -> None:
    cfg = make_cfg(num_workers=2, max_inflight_groups=8)
    with running_verifier(cfg, peers.learner.address) as v:
        peers.connect_actor(v.rollouts.address)
        other = Peers(cfg)
        other.connect_actor(v.rollouts.address)
        for k in range(60):
            sender = peers if k % 2 else other
            sender.send(make_group(k, str(k), [rf"\boxed{{{k + d}}}" for d in range(8)]))
        got = peers.collect(60, timeout_s=60)
        other.close()
    assert sorted(s.lease_id for s in got) == list(range(60))
    assert all(s.n_total == 8 and s.n_positive == 1 for s in got)
    assert v.stats.scored == 480


def test_replicas_side_by_side(peers: Peers) -> None:
    cfg = make_cfg(num_workers=1)
    with (
        running_verifier(cfg, peers.learner.address, replica=0) as v0,
        running_verifier(cfg, peers.learner.address, replica=1) as v1,
    ):
        peers.connect_actor([v0.rollouts.address, v1.rollouts.address])
        time.sleep(0.3)  # both connections up, so PUSH round-robins over the two
        for k in range(20):
            peers.send(make_group(k, "12", [POS, NEG]))
        got = peers.collect(20)
    assert sorted(s.lease_id for s in got) == list(range(20))
    assert v0.stats.groups_in + v1.stats.groups_in == 20
    assert v0.stats.groups_in > 0 and v1.stats.groups_in > 0


def test_main_exits_zero_on_sigterm_and_nonzero_on_error(tmp_path) -> None:
    ctx = zmq.Context()
    blocker = ctx.socket(zmq.PULL)  # takes the rollouts port so the second run fails to bind
    port = blocker.bind_to_random_port("tcp://127.0.0.1")
    script = textwrap.dedent(
        f"""
        import sys
        from popo.common.config import RunConfig
        from popo.verifier.service import main
        if __name__ == "__main__":
            cfg = RunConfig(
                transport={{"rollouts_port": int(sys.argv[1]), "ingest_port": 1}},
                metrics={{"enabled": False}},
            )
            sys.exit(main(cfg, {str(tmp_path)!r}))
        """
    )
    path = tmp_path / "run_verifier.py"
    path.write_text(script)
    env = dict(os.environ)
    # a free port for the good run
    probe = ctx.socket(zmq.PULL)
    free = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(0)
    proc = subprocess.Popen(
        [sys.executable, str(path), str(free)], env=env, stderr=subprocess.PIPE, text=True
    )
    time.sleep(5)  # workers spawned, sockets bound
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopping" in err
    bad = subprocess.run(
        [sys.executable, str(path), str(port)], env=env, capture_output=True, text=True, timeout=60
    )
    blocker.close(0)
    ctx.term()
    assert bad.returncode == 1
    assert "verifier-0 failed" in bad.stderr and "Address already in use" in bad.stderr
