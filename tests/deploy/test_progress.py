"""The progress view reads metrics.jsonl as the roles append to it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from popo.actors.stats import ActorStats
from popo.common.config import MetricsConfig
from popo.common.metrics import RoleMetrics
from popo.deploy.progress import RunView


def _write(run_dir: Path, recs: list[dict]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)


def test_rows_show_steps_and_expired_leases_only_when_there_are_some(tmp_path: Path) -> None:
    view = RunView(tmp_path, total_steps=10)
    learner = {"instance": "learner", "role": "learner", "t": 1.0, "popo_learner_step": 4}
    actor = {"instance": "actor-0", "role": "actor", "t": 1.0, "popo_actor_tokens_total": 100}
    _write(tmp_path, [learner, actor])
    rows = dict(view.rows())
    assert rows["step"].startswith("4/10")
    assert "actor-0 leases expired" not in rows

    _write(tmp_path, [{**actor, "t": 2.0, "popo_actor_leases_expired_total": 16}])
    rows = dict(view.rows())
    assert rows["actor-0 leases expired"] == "16 (learner.lease_timeout_s)"
    assert rows["actor-0 tokens/s"] == "0"


def test_expired_leases_warn_at_each_power_of_ten(caplog: pytest.LogCaptureFixture) -> None:
    stats = ActorStats(RoleMetrics("actor", MetricsConfig()))
    with caplog.at_level(logging.WARNING, logger="popo.actor"):
        for _ in range(12):
            stats.expired()
        stats.expired(100)
    warned = [r.getMessage().split()[0] for r in caplog.records]
    assert warned == ["1", "10", "112"]
    assert stats.leases_expired == 112
    assert "learner.lease_timeout_s" in caplog.records[0].getMessage()
