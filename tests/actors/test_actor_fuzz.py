"""Hostile input on a running actor's endpoints: the weights SUB and the dispatch
DEALER, fuzzed with hypothesis through the fake learner's real sockets while the actor samples on
the shared vLLM engine. Frame strategies: tests/fuzzing.py.

Every frame that cannot be valid is dropped and counted (Channel.dropped, ActorStats.dropped and
`popo_actor_dropped_messages_total` agree); a well-formed WeightsReady whose file is missing or
does not match is rejected and counted as a reload failure; the served version never changes and
the actor keeps delivering groups.
"""

from __future__ import annotations

import time

import pytest
from actor_harness import actor_test_config, running
from fuzzing import FUZZ, frames, is_valid, ready
from hypothesis import given

from popo.actors.actor import Actor
from popo.common.messages import Leases, WeightsReady, decode

pytestmark = pytest.mark.vllm


def metric(actor: Actor) -> float:
    v = actor.stats.metrics.registry.get_sample_value("popo_actor_dropped_messages_total")
    return 0.0 if v is None else v


def test_fuzz_actor_weights_sub_and_dispatch(engine, model_dir, peers, tmp_path) -> None:
    peers.bind_learner()
    peers.bind_verifier()
    peers.bind_pub()
    actor = Actor(actor_test_config(), model_dir, peers.endpoints(), engine=engine)
    actor.setup()
    served = engine.version
    sent = {"bad": 0, "reload_bad": 0}

    def settle(cond, what: str) -> None:
        end = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < end, f"timed out: {what}"
            peers.serve(0.005)

    with running(actor):
        # The SUB joins asynchronously: PUB garbage until the first drop proves it is connected.
        end = time.monotonic() + 10
        while actor.stats.dropped == 0:
            assert time.monotonic() < end, "the actor's SUB never connected"
            peers.pub.sock.send(b"\xc1")  # msgpack's one never-used byte
            peers.serve(0.05)
        settle(lambda: len(peers.received) >= 1, "a first group")
        d0, m0, f0 = actor.stats.dropped, metric(actor), actor.stats.reload_failures

        @FUZZ
        @given(frames([ready(), ready(version=0)]))
        def weights(parts: list[bytes]) -> None:
            peers.pub.sock.send_multipart(parts)
            if is_valid(parts, (WeightsReady,)):
                msg = decode(parts[0])
                assert isinstance(msg, WeightsReady)
                if msg.version > served:  # a newer version whose file is not there: rejected
                    sent["reload_bad"] += 1
                    settle(
                        lambda: actor.stats.reload_failures - f0 >= sent["reload_bad"],
                        "a rejected version counted",
                    )
            else:
                sent["bad"] += 1
                settle(lambda: actor.stats.dropped - d0 >= sent["bad"], "a bad frame counted")
            assert actor.stats.dropped - d0 == sent["bad"]
            assert actor.stats.reload_failures - f0 == sent["reload_bad"]
            assert engine.version == served

        weights()
        assert sent["bad"] > 10 and sent["reload_bad"] > 0
        assert actor.weights.dropped == actor.stats.dropped - d0 + 1  # + the join probe
        assert metric(actor) - m0 == sent["bad"]

        # The dispatch DEALER: hostile "leases" from the learner side, sent to the actor's identity.
        n_req = len(peers.requests)
        settle(lambda: len(peers.requests) > n_req, "a lease request")
        ident = None
        got = peers.learner.recv(0)
        while got is None:
            time.sleep(0.01)
            got = peers.learner.recv(10)
        ident = got[0]
        d1 = actor.stats.dropped
        sent_d = {"bad": 0}

        @FUZZ
        @given(frames([Leases(leases=[], learner_version=served)]))
        def dispatch(parts: list[bytes]) -> None:
            peers.learner.sock.send_multipart([ident, *parts])
            if not is_valid(parts, (Leases,)):
                sent_d["bad"] += 1
                settle(lambda: actor.stats.dropped - d1 >= sent_d["bad"], "a bad lease frame")
            assert actor.stats.dropped - d1 == sent_d["bad"]

        dispatch()
        assert sent_d["bad"] > 10 and actor.dispatch.dropped == sent_d["bad"]
        # Still serving the same version, and still delivering groups.
        n = len(peers.received)
        settle(lambda: len(peers.received) > n, "groups after the fuzzing")
        assert actor.stats.version == served == engine.version
