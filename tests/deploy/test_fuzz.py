"""Hostile input on every endpoint of running roles, property-based.

The real role objects run in this process with their real sockets on loopback: the learner
(dispatch ROUTER, ingest PULL, weightstream ROUTER), a verifier replica (rollouts PULL, with its
scoring worker processes) and an actor (weights SUB, on a real vLLM engine). Hypothesis sends them
random frames and mutated valid ones: truncated, bytes flipped, another schema version, another
message type, extra frames, msgpack length fields claiming gigabytes, integers past 64 bits,
content that decodes but cannot be right (odd packed arrays, counts that do not add up).

The property for every frame: the role either handles it as a valid message or drops and counts
it, exactly once (Channel.dropped and the role's Prometheus `*_dropped_messages_total` agree with
the frames that could not be valid), never crashes, and serves a well-formed peer afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from fuzzing import (
    BASES,
    FUZZ,
    HUGE_HEADERS,
    SEMANTIC_BAD,
    frames,
    is_valid,
    metric,
    raw_socket,
    rollout,
    scored,
    wait_for,
)
from hypothesis import given

from popo.common import transport
from popo.common.config import RunConfig
from popo.common.messages import (
    FetchRequest,
    LeaseRequest,
    Leases,
    ManifestRequest,
    RolloutGroup,
    ScoredGroup,
    decode,
    encode,
)


def test_the_frame_strategies_hit_every_class() -> None:
    # The classifier the properties rely on, on hand-picked frames of each class.
    ok = (LeaseRequest,)
    assert is_valid([encode(LeaseRequest(actor_id="a", n=1))], ok)
    assert not is_valid([encode(LeaseRequest(actor_id="a", n=1))] * 2, ok)  # extra frame
    assert not is_valid([encode(scored())], ok)  # wrong type
    assert not is_valid([encode(LeaseRequest(actor_id="a", n=1, v=2))], ok)
    assert not is_valid([encode(LeaseRequest(actor_id="a", n=1))[:-1]], ok)
    assert not is_valid([HUGE_HEADERS[2] + b"\x00"], ok)
    assert all(not is_valid([encode(m)], (type(m),)) for m in SEMANTIC_BAD)
    # and no real message is rejected: every base message passes as its own type
    assert all(is_valid([encode(m)], (type(m),)) for m in BASES)


# --- learner -----------------------------------------------------------------------------------------


def _learner_config(tmp_path: Path) -> RunConfig:
    cfg = RunConfig()
    t = cfg.transport
    t.dispatch_port = t.ingest_port = t.weights_port = t.weightstream_port = 0
    t.linger_ms = 0
    cfg.metrics.base_port = 0
    cfg.data.synthetic.n_train = 64
    cfg.data.synthetic.n_test = 16
    cfg.data.eval_size = 8
    cfg.deploy.run_dir = str(tmp_path)
    return cfg


@pytest.fixture(scope="module")
def learner(tmp_path_factory: pytest.TempPathFactory, random_model_dir: Path) -> Iterator:
    from popo.learner.service import Learner

    run_dir = tmp_path_factory.mktemp("fuzz-learner")
    lrn = Learner(_learner_config(run_dir), run_dir, random_model_dir)
    lrn.setup()
    yield lrn
    lrn.close()


def test_fuzz_learner_dispatch_router(learner) -> None:  # type: ignore[no-untyped-def]
    d = learner.orch.dispatcher
    ctx = zmq.Context()
    dealer = raw_socket(ctx, zmq.DEALER, d.dispatch_address)
    d0 = d.dropped
    m0 = metric(learner.metrics.registry, "popo_learner_dropped_messages_total")
    sent = {"bad": 0, "good": 0}

    @FUZZ
    @given(frames([LeaseRequest(actor_id="fuzz", n=2, policy_version=0)]))
    def prop(parts: list[bytes]) -> None:
        dealer.send_multipart(parts)
        if is_valid(parts, (LeaseRequest,)):
            sent["good"] += 1
            assert dealer.poll(5000, zmq.POLLIN), "a valid request got no answer"
            assert isinstance(decode(dealer.recv()), Leases)
        else:
            sent["bad"] += 1
            assert wait_for(lambda: d.dropped - d0 >= sent["bad"]), "a bad frame was not counted"
        assert d.dropped - d0 == sent["bad"]
        assert d.is_alive() and d.error is None

    try:
        prop()
        assert sent["good"] > 0 and sent["bad"] > 10  # both kinds were exercised
        m = metric(learner.metrics.registry, "popo_learner_dropped_messages_total")
        assert m - m0 == sent["bad"] == d.dropped - d0
    finally:
        dealer.close()
        ctx.term()


def test_fuzz_learner_ingest_pull(learner) -> None:  # type: ignore[no-untyped-def]
    d = learner.orch.dispatcher
    ctx = zmq.Context()
    push = raw_socket(ctx, zmq.PUSH, d.ingest_address)
    d0 = d.dropped
    m0 = metric(learner.metrics.registry, "popo_learner_dropped_messages_total")
    sent = {"bad": 0, "good": 0}

    @FUZZ
    @given(frames([scored(), scored(lease_id=-7)]))
    def prop(parts: list[bytes]) -> None:
        push.send_multipart(parts)
        if is_valid(parts, (ScoredGroup,)):
            sent["good"] += 1
        else:
            sent["bad"] += 1
            assert wait_for(lambda: d.dropped - d0 >= sent["bad"]), "a bad frame was not counted"
        assert d.dropped - d0 == sent["bad"]
        assert d.is_alive() and d.error is None

    dealer = raw_socket(ctx, zmq.DEALER, d.dispatch_address)
    try:
        prop()
        assert sent["good"] > 0 and sent["bad"] > 10
        m = metric(learner.metrics.registry, "popo_learner_dropped_messages_total")
        assert m - m0 == sent["bad"] == d.dropped - d0
        # Still serving: a real lease, and its group, go through and are accounted for.
        dealer.send(encode(LeaseRequest(actor_id="actor-0", n=1, policy_version=0)))
        assert dealer.poll(5000, zmq.POLLIN)
        leases = decode(dealer.recv())
        assert isinstance(leases, Leases) and leases.leases
        ingested = learner.orch.state.ingested
        push.send(encode(scored(lease_id=leases.leases[0].lease_id)))
        assert wait_for(lambda: learner.orch.state.ingested == ingested + 1)
    finally:
        dealer.close()
        push.close()
        ctx.term()


# --- verifier ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verifier() -> Iterator:
    from popo.verifier import service
    from popo.verifier.service import Verifier

    # a loop step waits at most 50 ms, so the verifier stops promptly at the module's end
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service, "WAIT_S", 0.05)
        cfg = RunConfig()
        cfg.transport.rollouts_port = 0
        cfg.transport.linger_ms = 0
        cfg.verifier.timeout_s = 2.0
        cfg.metrics.base_port = 0
        ctx = zmq.Context()
        learner_pull = transport.bind(ctx, "ingest", "tcp://127.0.0.1:*", cfg.transport)
        v = Verifier(cfg, ingest_addr=learner_pull.address)
        v.setup()
        stop = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                v.run(stop)
            except BaseException as e:  # the test asserts there was none
                errors.append(e)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield v, learner_pull, thread, errors
        stop.set()
        thread.join(10)
        v.close()
        learner_pull.close()
        ctx.term()


def test_fuzz_verifier_rollouts_pull(verifier) -> None:  # type: ignore[no-untyped-def]
    v, learner_pull, thread, errors = verifier
    ctx = zmq.Context()
    push = raw_socket(ctx, zmq.PUSH, v.rollouts.address)
    d0, c0 = v.stats.dropped, v.rollouts.dropped
    m0 = metric(v.metrics.registry, "popo_verifier_dropped_messages_total")
    sent = {"bad": 0, "good": 0}

    @FUZZ
    @given(frames([rollout()]))
    def prop(parts: list[bytes]) -> None:
        push.send_multipart(parts)
        if is_valid(parts, (RolloutGroup,)):
            sent["good"] += 1
        else:
            sent["bad"] += 1
            assert wait_for(lambda: v.stats.dropped - d0 >= sent["bad"]), "a bad frame not counted"
        assert v.stats.dropped - d0 == sent["bad"] == v.rollouts.dropped - c0
        assert thread.is_alive() and not errors

    try:
        prop()
        assert sent["good"] > 0 and sent["bad"] > 10
        assert (
            metric(v.metrics.registry, "popo_verifier_dropped_messages_total") - m0 == sent["bad"]
        )
        # Every valid group was scored and forwarded, and a real one still scores positive.
        push.send(encode(rollout(lease_id=424242)))
        got = []
        while (rx := learner_pull.recv(timeout_ms=10_000)) is not None:
            got.append(rx[1])
            if rx[1].lease_id == 424242:
                break
        assert len(got) == sent["good"] + 1
        last = got[-1]
        assert isinstance(last, ScoredGroup) and last.n_total == 3 and last.n_positive == 1
    finally:
        push.close()
        ctx.term()


def test_fuzz_learner_weightstream_router(learner) -> None:  # type: ignore[no-untyped-def]
    from popo.common.messages import Chunk, Manifest, StreamError

    ws = learner.orch.weight_server
    assert ws is not None and ws.is_alive(), "the learner serves weight streams by default"
    ctx = zmq.Context()
    dealer = raw_socket(ctx, zmq.DEALER, ws.address)
    d0 = ws.dropped
    m0 = metric(learner.metrics.registry, "popo_learner_dropped_messages_total")
    sent = {"bad": 0, "good": 0}
    valid = [
        ManifestRequest(version=1),
        ManifestRequest(version=-3),
        FetchRequest(version=1, file="../../etc/passwd", offset=0, length=64),
        FetchRequest(version=1, file="model.safetensors", offset=2**62, length=2**40),
    ]

    @FUZZ
    @given(frames(valid))  # type: ignore[arg-type]
    def prop(parts: list[bytes]) -> None:
        dealer.send_multipart(parts)
        if is_valid(parts, (ManifestRequest, FetchRequest)):
            sent["good"] += 1
            assert dealer.poll(5000, zmq.POLLIN), "a valid request got no answer"
            assert isinstance(decode(dealer.recv()), Manifest | Chunk | StreamError)
        else:
            sent["bad"] += 1
            assert wait_for(lambda: ws.dropped - d0 >= sent["bad"]), "a bad frame was not counted"
        assert ws.dropped - d0 == sent["bad"]
        assert ws.is_alive() and ws.error is None

    try:
        prop()
        assert sent["good"] > 0 and sent["bad"] > 10
        m = metric(learner.metrics.registry, "popo_learner_dropped_messages_total")
        assert m - m0 == sent["bad"]
    finally:
        dealer.close()
        ctx.term()
