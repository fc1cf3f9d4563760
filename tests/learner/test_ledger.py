"""The SQLite ledger: every lease ends exactly once, nothing received is lost across a crash."""

import random
import sqlite3
import time

import pytest

from popo.learner.ledger import Ledger


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.db")
    yield led
    led.close()


def test_wal_mode(ledger, tmp_path):
    (mode,) = sqlite3.connect(tmp_path / "ledger.db").execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"


def test_issue_receive_train_checkpoint(ledger):
    leases = ledger.issue(3, "a0", version=0, deadline=time.time() + 60, n_prompts=10)
    assert [lease.prompt_idx for lease in leases] == [0, 1, 2]
    assert ledger.in_flight() == 3
    assert ledger.receive(leases[0].lease_id, 0, 8, 2, b"g0") == "train"
    assert ledger.receive(leases[1].lease_id, 0, 8, 0, b"g1") == "train"
    # a second completion of the same lease is a late duplicate
    assert ledger.receive(leases[0].lease_id, 0, 8, 2, b"again") is None
    assert ledger.duplicates == 1
    got = ledger.received()
    assert [(r.lease_id, r.payload) for r in got] == [
        (leases[0].lease_id, b"g0"),
        (leases[1].lease_id, b"g1"),
    ]
    ledger.mark_trained([leases[0].lease_id], step=1)
    ledger.skip([leases[1].lease_id], "all_negative")
    with pytest.raises(RuntimeError):
        ledger.mark_trained([leases[0].lease_id], step=2)  # never twice
    assert ledger.counts() == {
        "trained": 1,
        "skipped": 1,
        "skipped:all_negative": 1,
        "outstanding": 1,
    }
    ledger.checkpointed(1)
    assert ledger.check_exactly_once() == []


def test_expired_lease_is_redispatched_and_late_completion_ignored(ledger):
    (lease,) = ledger.issue(1, "a0", version=0, deadline=time.time() - 1, n_prompts=10)
    assert ledger.expire() == 1
    assert ledger.receive(lease.lease_id, 0, 8, 8, b"late") is None
    (again,) = ledger.issue(1, "a1", version=0, deadline=time.time() + 60, n_prompts=10)
    assert again.prompt_idx == lease.prompt_idx and again.lease_id != lease.lease_id
    assert ledger.counts()["expired"] == 1


def test_rewind_after_crash_retrains_exactly_the_uncheckpointed_steps(tmp_path):
    path = tmp_path / "ledger.db"
    led = Ledger(path)
    ls = led.issue(4, "a0", 0, time.time() + 60, n_prompts=10)
    for lease in ls:
        led.receive(lease.lease_id, 0, 8, 1, f"g{lease.lease_id}".encode())
    led.mark_trained([ls[0].lease_id, ls[1].lease_id], step=1)
    led.checkpointed(1)
    led.mark_trained([ls[2].lease_id, ls[3].lease_id], step=2)
    led.close()  # crash before the checkpoint of step 2

    led = Ledger(path)
    assert led.get("checkpoint_step") == 1
    assert led.rewind_to(1) == 2
    rows = led.received()
    assert [r.lease_id for r in rows] == [ls[2].lease_id, ls[3].lease_id]
    assert all(r.resumed for r in rows)
    assert led.check_exactly_once() == []
    led.close()


def test_random_interleavings_keep_accounting_exact(ledger):
    rng = random.Random(0)
    step = 0
    for _ in range(300):
        op = rng.random()
        if op < 0.3:
            ledger.issue(
                rng.randint(1, 3), "a", step, time.time() + rng.choice([-1, 60]), n_prompts=7
            )
        elif op < 0.5:
            ledger.expire()
        elif op < 0.8:
            (lid,) = rng.choice(
                ledger._db.execute("SELECT lease_id FROM leases").fetchall() or [(0,)]
            )
            ledger.receive(lid, step, 4, rng.randint(0, 4), b"x")
        else:
            rows = ledger.received(limit=3)
            if rows:
                step += 1
                ledger.mark_trained([r.lease_id for r in rows], step)
                if rng.random() < 0.5:
                    ledger.checkpointed(step)
    assert ledger.check_exactly_once() == []
    (n_ended_twice,) = ledger._db.execute(
        "SELECT COUNT(*) FROM leases WHERE state='trained' AND step IS NULL"
    ).fetchone()
    assert n_ended_twice == 0
