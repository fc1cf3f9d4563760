"""`LedgerReader`: read-only queries on a real SQLite ledger, beside the learner's live `Ledger`."""

from __future__ import annotations

import sqlite3
import time

import pytest

from popo.common.run_dir import RunDir
from popo.learner.ledger import Ledger, LedgerReader, StepTiming


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(RunDir(tmp_path).ledger)
    yield led
    led.close()


def _play(ledger: Ledger) -> dict[str, list[int]]:
    """Six train leases and one eval lease through every end state; steps 1 and 2 trained."""
    soon = time.time() + 60
    ids = [x.lease_id for x in ledger.issue(6, "a0", version=0, deadline=soon, n_prompts=100)]
    ev = ledger.issue(
        1, "a0", version=0, deadline=soon, n_prompts=4, kind="eval", cursor_key="eval"
    )[0].lease_id
    for lid, pos in zip(ids[:4], (2, 0, 3, 1), strict=True):
        assert ledger.receive(lid, 0, 4, pos, b"g") == "train"
    ledger.mark_trained(ids[:2], step=1)
    ledger.mark_trained(ids[2:3], step=2)
    ledger.skip([ids[3]], "too_stale")
    assert ledger.expire(now=soon + 1) == 3  # ids[4], ids[5] and the eval lease
    ledger.set("version", 2)
    return {"train": ids, "eval": [ev]}


def test_queries_match_what_the_learner_wrote(ledger):
    leases = _play(ledger)
    ids = leases["train"]
    with LedgerReader(ledger.path) as db:
        assert db.state_counts() == {"trained": 3, "skipped": 1, "expired": 3}
        assert db.state_counts(kind="eval") == {"expired": 1}
        assert db.last_trained_step() == 2
        assert db.trained_steps() == [1, 2]
        assert db.trained_after(1) == 1 and db.trained_after(2) == 0
        assert db.outstanding() == []
        assert db.states([ids[0], ids[3], ids[4], 10_000]) == {
            ids[0]: "trained",
            ids[3]: "skipped",
            ids[4]: "expired",
        }
        assert db.states([]) == {}
        assert db.ended_without_time() == 0
        assert db.prompts_trained_twice() == 0
        assert db.buffered_untrained() == 0  # skipped payloads are dropped; trained ones stay
        assert db.meta("version") == 2 and db.meta("cursor") == 6 and db.meta("absent", -1) == -1
        rows = db.leases()
        assert [r["lease_id"] for r in rows] == sorted([*ids, *leases["eval"]])
        assert rows[0]["state"] == "trained" and rows[0]["step"] == 1
        timings = db.step_timings()
        assert [(t.step, t.positives, t.groups) for t in timings] == [(1, 2, 2), (2, 3, 1)]
        assert all(isinstance(t, StepTiming) and t.first_issued <= t.end for t in timings)


def test_reads_a_live_ledger_and_sees_each_commit(ledger):
    ids = [x.lease_id for x in ledger.issue(2, "a0", 0, time.time() + 60, n_prompts=10)]
    with LedgerReader(ledger.path) as db:
        assert db.outstanding() == ids and db.last_trained_step() == 0
        ledger.receive(ids[0], 0, 4, 1, b"g")
        ledger.mark_trained([ids[0]], step=1)
        assert db.outstanding() == ids[1:] and db.last_trained_step() == 1
        # the learner keeps writing while a reader is open
        ledger.issue(1, "a0", 1, time.time() + 60, n_prompts=10)
        assert len(db.outstanding()) == 2


def test_it_cannot_write(ledger):
    _play(ledger)
    db = LedgerReader(ledger.path)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            db._db.execute("DELETE FROM leases")
    finally:
        db.close()
    with LedgerReader(ledger.path) as again:
        assert again.state_counts()["trained"] == 3


def test_a_missing_ledger_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ledger there"):
        LedgerReader(tmp_path / "ledger.db")
    assert not (tmp_path / "ledger.db").exists()  # a reader never creates one


def test_reads_a_closed_ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.db")
    _play(led)
    led.close()
    with LedgerReader(tmp_path / "ledger.db") as db:
        assert db.trained_steps() == [1, 2]
