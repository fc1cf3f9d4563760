"""`popo report`'s headline figures: summary.json when the run finished, else the ledger (read-only)
and the learner's metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from popo.common.metrics import paired_p_value
from popo.common.run_dir import RunDir
from popo.deploy.report import held_out_p_value, markdown_table, summary_row
from popo.learner.ledger import Ledger


def _run(tmp_path: Path, metric_step: int) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text('[algorithm]\nname = "popo"\n[learner]\nseed = 3\n')
    recs = [
        {"t": 100.0 + i, "instance": "learner", "popo_learner_step": i}
        for i in range(metric_step + 1)
    ]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in recs))
    evals = [{"step": 0, "accuracy": 0.25, "t": 100.0}, {"step": 5, "accuracy": 0.5, "t": 130.0}]
    run.evals.write_text("".join(json.dumps(e) + "\n" for e in evals))
    return run


def test_an_unfinished_run_reports_the_ledgers_last_step(tmp_path):
    run = _run(tmp_path, metric_step=3)  # the last snapshot lags the ledger
    ledger = Ledger(run.ledger)
    try:
        ids = [x.lease_id for x in ledger.issue(5, "a0", 0, time.time() + 60, n_prompts=10)]
        for step, lid in enumerate(ids, start=1):
            ledger.receive(lid, 0, 4, 1, b"g")
            ledger.mark_trained([lid], step)
        # read beside the live learner, which keeps its connection open
        row = summary_row(run.root)
    finally:
        ledger.close()
    assert row["steps"] == 5
    assert (row["acc_before"], row["acc_after"], row["wall_s"]) == (0.25, 0.5, 30.0)
    # without summary.json the algorithm comes from the run's config snapshot
    assert "| run | popo | 25.0 % | 50.0 % | - | 5 |" in markdown_table([run.root])


def test_without_a_ledger_the_metrics_say_how_far_it_got(tmp_path):
    run = _run(tmp_path, metric_step=4)
    assert summary_row(run.root)["steps"] == 4
    assert not run.ledger.exists()  # reading never creates a ledger


def test_a_finished_run_reports_its_summary(tmp_path):
    run = _run(tmp_path, metric_step=3)
    Ledger(run.ledger).close()
    run.summary.write_text(json.dumps({"algorithm": "popo", "steps": 7, "tokens_trained": 900}))
    row = summary_row(run.root)
    assert (row["algorithm"], row["steps"], row["tokens"]) == ("popo", 7, 900)


def test_held_out_change_is_tested_prompt_by_prompt(tmp_path):
    run = _run(tmp_path, metric_step=3)
    # 6 of 8 prompts gain one positive of 4, two are unchanged: of the 2^6 sign patterns of
    # the changed prompts, only all-up and all-down reach |sum| = 6/4, so p = 2/64
    before = [[1, 4]] * 8
    after = [[2, 4]] * 6 + [[1, 4]] * 2
    evals = [
        {"step": 0, "accuracy": 0.25, "t": 100.0, "per_prompt": before},
        {"step": 5, "accuracy": 0.4375, "t": 130.0, "per_prompt": after},
    ]
    run.evals.write_text("".join(json.dumps(e) + "\n" for e in evals))
    assert summary_row(run.root)["p_paired"] == 2 / 64
    assert "| 25.0 % | 43.8 % | 0.0312 | 3 |" in markdown_table([run.root])
    # a mixed change of +2/4, +1/4, -1/4: |sum| >= 2/4 in 6 of the 8 sign patterns
    assert held_out_p_value(
        {"per_prompt": [[0, 4], [0, 4], [1, 4]]}, {"per_prompt": [[2, 4], [1, 4], [0, 4]]}
    ) == pytest.approx(6 / 8)
    assert held_out_p_value({"per_prompt": before}, {"per_prompt": after[:4]}) is None
    assert held_out_p_value({"accuracy": 0.1}, {"per_prompt": after}) is None


def test_many_changed_prompts_are_tested_by_seeded_random_signs():
    # 20 changed prompts, all up: no random pattern reaches the observed sum
    assert paired_p_value([[0, 1]] * 20, [[1, 1]] * 20) == 1 / 100_001
    # 40 changes that cancel out: nothing to see
    before, after = [[2, 4]] * 40, [[3, 4]] * 20 + [[1, 4]] * 20
    assert paired_p_value(before, after) > 0.99
    assert paired_p_value(before, after) == paired_p_value(before, after)  # seeded
    with pytest.raises(ValueError, match="differ in length"):
        paired_p_value([[1, 2]], [[1, 2], [1, 2]])
