"""The learner's ingest refuses scored groups it cannot train on (hostile input): the
real dispatcher thread and ledger over real ZeroMQ sockets, with this test as actor and verifier."""

import time

import msgspec
import numpy as np
import zmq

from popo.common.config import RunConfig
from popo.common.data import Problem
from popo.common.messages import LeaseRequest, Leases, ScoredGroup, pack_f32, pack_ids
from popo.common.transport import connect
from popo.learner.dispatch import Dispatcher, SharedState
from popo.learner.ledger import Ledger
from tests.learner.learner_helpers import VOCAB, make_groups

replace = msgspec.structs.replace
MAX_TOKENS = RunConfig().actor.max_tokens


def _with_completion(g: ScoredGroup, ids: np.ndarray, logp: np.ndarray) -> ScoredGroup:
    c = replace(g.completions[0], token_ids=pack_ids(ids), logprobs=pack_f32(logp))
    return replace(g, completions=[c, *g.completions[1:]])


def _bad_groups(g: ScoredGroup) -> dict[str, ScoredGroup]:
    return {
        "id >= vocab": _with_completion(g, np.array([1, VOCAB]), np.array([-1.0, -1.0])),
        "negative id": replace(g, prompt_token_ids=pack_ids([3, -2])),
        "prompt id >= vocab": replace(g, prompt_token_ids=pack_ids([VOCAB + 7])),
        "positive log-prob": _with_completion(g, np.array([1, 2]), np.array([-1.0, 0.5])),
        "NaN log-prob": _with_completion(g, np.array([1, 2]), np.array([np.nan, -1.0])),
        "too long": _with_completion(g, np.ones(MAX_TOKENS + 1, int), -np.ones(MAX_TOKENS + 1)),
    }


def _dispatcher(tmp_path, **kw) -> tuple[Dispatcher, Ledger]:
    cfg = RunConfig(learner={"prompts_per_step": 4})
    ledger = Ledger(tmp_path / "ledger.db")
    problems = [Problem(str(i), f"{i}+1=", str(i + 1)) for i in range(8)]
    d = Dispatcher(
        cfg,
        ledger,
        problems,
        list(range(8)),
        [],
        SharedState(),
        "tcp://127.0.0.1:*",
        "tcp://127.0.0.1:*",
        vocab_size=VOCAB,
        **kw,
    )
    return d, ledger


def test_unusable_names_each_problem(tmp_path):
    d, ledger = _dispatcher(tmp_path)
    good = make_groups(1, g=4, seed=1)[0]
    assert d.unusable(good) is None
    assert d.unusable(_with_completion(good, np.array([1, 2]), np.array([1e-5, -1.0]))) is None
    for name, bad in _bad_groups(good).items():
        assert d.unusable(bad) is not None, name
    ledger.close()


def test_unusable_group_is_dropped_counted_and_its_lease_redispatched(tmp_path):
    drops: list[str] = []
    d, ledger = _dispatcher(tmp_path, on_drop=drops.append)
    d.start()
    assert d.ready.wait(10)
    ctx = zmq.Context()
    t = d.cfg.transport
    dealer = connect(ctx, "dispatch", d.dispatch_address, t, identity="actor-0:t")
    push = connect(ctx, "ingest", d.ingest_address, t)
    try:
        dealer.send(LeaseRequest(actor_id="actor-0", n=4, policy_version=0))
        got = dealer.recv(5000)
        assert got is not None and isinstance(got[1], Leases)
        leases = [x.lease_id for x in got[1].leases]
        assert len(leases) == 4
        template = make_groups(1, g=4, seed=2)[0]
        bad = list(_bad_groups(template).values())
        for lid, g in zip(leases, bad[:3], strict=False):
            push.send(replace(g, lease_id=lid))
        push.send(replace(template, lease_id=leases[3]))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (len(drops) < 3 or not ledger.received()):
            time.sleep(0.02)
        assert drops == ["unusable"] * 3
        assert [r.lease_id for r in ledger.received()] == [leases[3]]
        # the three dropped groups' leases are still open: they expire and are leased again
        assert ledger.in_flight() == 4
    finally:
        dealer.close()
        push.close()
        ctx.term()
        d.stop_event.set()
        d.join(5)
        ledger.close()
