"""The progress view reads metrics.jsonl as the roles append to it."""

from __future__ import annotations

import json
import logging
import time
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


def test_token_rates_span_the_bursts_of_long_groups(tmp_path: Path) -> None:
    """An actor's token counter moves once per finished group; the rate covers the last burst."""
    view = RunView(tmp_path, total_steps=10)
    key = "popo_actor_tokens_total"
    recs = [{"instance": "actor-0", "t": float(t), key: 0} for t in range(0, 60, 5)]
    recs += [{"instance": "actor-0", "t": float(t), key: 1200} for t in range(60, 115, 5)]
    _write(tmp_path, recs)
    # 1,200 tokens sampled from t = 0, counted at t = 60: 20 tokens/s at t = 110, not 0 (nothing
    # counted in the last 30 s) nor 1,200 / 30
    assert dict(view.rows())["actor-0 tokens/s"] == f"{1200 / 60:.0f}"
    # standing still for longer than the burst took: the wait counts
    _write(
        tmp_path, [{"instance": "actor-0", "t": float(t), key: 1200} for t in range(115, 150, 5)]
    )
    assert dict(view.rows())["actor-0 tokens/s"] == f"{1200 / 85:.0f}"
    # the next burst: 300 tokens sampled since the last one, not 300 in a 30 s window
    _write(tmp_path, [{"instance": "actor-0", "t": 150.0, key: 1500}])
    assert dict(view.rows())["actor-0 tokens/s"] == f"{300 / 90:.0f}"
    # a counter that moves in every record: the last 30 s
    smooth = [
        {"instance": "learner", "t": float(t), "popo_learner_tokens_total": t * t}
        for t in range(60)
    ]
    _write(tmp_path, smooth)
    assert dict(view.rows())["learner tokens/s"] == f"{(59**2 - 29**2) / 30:.0f}"
    idle = [{"instance": "actor-0", "t": 150.0 + t, key: 1500} for t in range(5, 400, 5)]
    _write(tmp_path, idle)
    assert dict(view.rows())["actor-0 tokens/s"] == "0"  # nothing for longer than the history


def test_accuracies_show_a_dash_until_measured_then_the_last_evaluation(tmp_path: Path) -> None:
    view = RunView(tmp_path, total_steps=10)
    # the learner's gauges read 0 before their first value
    learner = {"instance": "learner", "role": "learner", "t": 1.0, "popo_learner_step": 0}
    learner |= {"popo_learner_pass_rate": 0.0, "popo_learner_eval_accuracy": 0.0}
    verifier = {"instance": "verifier-0", "t": 1.0, "popo_verifier_completions_total": 0}
    _write(tmp_path, [learner, verifier])
    rows = dict(view.rows())
    assert rows["pass rate (verifier)"] == "-" and rows["held-out accuracy"] == "-"

    _write(tmp_path, [{**learner, "popo_learner_pass_rate": 0.25}])
    _write(tmp_path, [{**verifier, "t": 2.0, "popo_verifier_completions_total": 8}])
    evals = [{"step": 0, "accuracy": 0.125}, {"step": 20, "accuracy": 0.5}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals) + '{"st')
    rows = dict(view.rows())
    assert rows["pass rate (verifier)"] == "25.0%"
    # the last complete record, whichever learner process wrote it
    assert rows["held-out accuracy"] == "50.0% at step 20"
    key = "popo_learner_eval_round_prompts"
    _write(tmp_path, [{**learner, f'{key}{{state="done"}}': 12, f'{key}{{state="total"}}': 48}])
    rows = dict(view.rows())
    assert rows["held-out accuracy"] == "50.0% at step 20 (evaluating: 12/48 prompts)"


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


def test_jsonl_records_carry_the_process_trees_cpu_and_memory(tmp_path: Path) -> None:
    import subprocess
    import sys

    from popo.common.metrics import process_tree_usage

    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    child = subprocess.Popen([sys.executable, "-c", busy + "time.sleep(30)"])
    try:
        deadline = time.time() + 20
        while process_tree_usage(child.pid)["cpu_seconds"] < 0.25:
            assert time.time() < deadline, "the child never used its CPU"
            time.sleep(0.1)
        tree = process_tree_usage()  # this process and the child
        assert tree["processes"] >= 2 and tree["rss_bytes"] > 0
        assert tree["cpu_seconds"] >= process_tree_usage(child.pid)["cpu_seconds"]
        m = RoleMetrics("actor", MetricsConfig(), tmp_path, instance="actor-0")
        m.write_jsonl()
    finally:
        child.kill()
        child.wait()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["popo_process_tree_cpu_seconds_total"] >= 0.25
    assert rec["popo_process_tree_resident_memory_bytes"] > 0


def test_cpu_shares_are_cores_used_inside_the_training_window() -> None:
    from popo.deploy.bench.default import cpu_shares

    key = "popo_process_tree_cpu_seconds_total"
    recs = [
        {"instance": "actor-0", "t": 0.0, key: 0.0},  # before the window: left out
        {"instance": "actor-0", "t": 10.0, key: 5.0},
        {"instance": "actor-0", "t": 20.0, key: 14.0},
        {"instance": "learner", "t": 12.0, key: 1.0},
        {"instance": "learner", "t": 16.0, key: 3.0},
        {"instance": "verifier-0", "t": 15.0, key: 1.0},  # one record: no rate
    ]
    assert cpu_shares(recs, 5.0, 25.0) == {"actor-0": 0.9, "learner": 0.5}
