"""Which leases a request gets: the dispatcher's answer, called directly on a real ledger. The
learner's next batch goes first, then an evaluation round's prompts, then the rest of the room,
which shrinks one step's worth per version the asking actor lags."""

from __future__ import annotations

from popo.common.config import RunConfig
from popo.common.data import Problem
from popo.common.messages import LeaseRequest
from popo.learner.dispatch import Dispatcher, EvalRound, SharedState
from popo.learner.ledger import Ledger


def _dispatcher(tmp_path) -> tuple[Dispatcher, Ledger]:
    cfg = RunConfig(learner={"prompts_per_step": 4, "max_staleness": 2})
    ledger = Ledger(tmp_path / "ledger.db")
    train = [Problem(str(i), f"{i}+1=", str(i + 1)) for i in range(40)]
    evals = [Problem(f"e{i}", f"{i}+2=", str(i + 2)) for i in range(6)]
    state = SharedState()
    d = Dispatcher(
        cfg, ledger, train, list(range(40)), evals, state, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*"
    )
    return d, ledger


def _kinds(d: Dispatcher, n: int, actor_version: int) -> str:
    """The kinds of the leases a request gets, in order: t(rain) or e(val)."""
    got = d._answer(LeaseRequest(actor_id="a", n=n, policy_version=actor_version))
    return "".join("e" if lease.lease_id < 0 else "t" for lease in got.leases)


def _end_all(ledger: Ledger) -> None:
    ledger.skip(list(range(1, 100)), "too_stale")


def test_next_batch_then_round_then_room(tmp_path):
    d, ledger = _dispatcher(tmp_path)
    try:
        d.state.eval = EvalRound(version=0, pending=list(range(6))[::-1], size=6)
        assert _kinds(d, 8, 0) == "tttt" + "eeee"  # one step's worth first, then the round
        assert _kinds(d, 8, 0) == "ee" + "tttttt"  # the round's rest, then the room: 12 - 4 = 8
        assert ledger.in_flight() == 10
        assert _kinds(d, 8, 0) == "tt"
        # the learner wrote two versions during the round: only the next step's worth is left
        # for actors on the evaluated weights (the rest would be too stale to train)
        d.state.version = 2
        assert _kinds(d, 8, 0) == ""
        _end_all(ledger)
        assert _kinds(d, 8, 0) == "tttt"
    finally:
        ledger.close()


def test_a_lagging_actor_gets_one_step_less_per_version(tmp_path):
    d, ledger = _dispatcher(tmp_path)
    try:
        d.state.version = 5
        assert _kinds(d, 20, 5) == "t" * 12  # (2 + 1) steps of 4
        _end_all(ledger)
        assert _kinds(d, 20, 4) == "t" * 8
        _end_all(ledger)
        assert _kinds(d, 20, 3) == "t" * 4
        assert _kinds(d, 20, 2) == ""  # beyond the bound: it reloads first
    finally:
        ledger.close()
