"""The staleness bound's three decisions, hand-computed: admission, room and freshness."""

from __future__ import annotations

from popo.learner.ledger import Received
from popo.learner.staleness import StalenessPolicy

POLICY = StalenessPolicy(max_staleness=2, prompts_per_step=4)


def test_an_actor_lagging_more_than_the_bound_gets_no_lease():
    assert POLICY.admits(actor_version=5, version=7)
    assert not POLICY.admits(actor_version=4, version=7)
    assert StalenessPolicy(0, 4).admits(7, 7) and not StalenessPolicy(0, 4).admits(6, 7)


def test_room_shrinks_by_one_step_per_version_the_actor_lags():
    # in step with the learner: (2 + 1) steps * 4 prompts in flight at most
    assert POLICY.room(in_flight=5, actor_version=7, version=7) == 12 - 5
    # one version behind: a lease behind 8 others is trained by version 9 = 6 + 3 > 6 + 2
    assert POLICY.room(in_flight=5, actor_version=6, version=7) == 8 - 5
    assert POLICY.room(in_flight=8, actor_version=6, version=7) == 0
    # at the bound: only what the very next step takes
    assert POLICY.room(in_flight=1, actor_version=5, version=7) == 4 - 1
    # a synchronous run: one step's worth, from actors that serve the learner's version
    assert StalenessPolicy(0, 4).room(in_flight=0, actor_version=7, version=7) == 4
    # an actor ahead of the learner (a restarted learner re-announces) is not given more
    assert POLICY.room(in_flight=0, actor_version=9, version=7) == 12


def test_a_group_is_fresh_within_the_bound_and_a_resumed_one_always():
    def group(version_min: int, resumed: bool = False) -> Received:
        return Received(1, 0, version_min, b"", resumed)

    assert POLICY.fresh(group(5), version=7) and not POLICY.fresh(group(4), version=7)
    assert POLICY.fresh(group(0, resumed=True), version=7)
