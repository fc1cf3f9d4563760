"""Bad configs and bad dataset rows stop `popo train` early: through the real CLI,
with `file:line` in one line on stderr, a non-zero exit, and no run directory left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from popo.deploy.cli import OFFLINE_ENV


def popo_train(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popo.deploy.cli", "train", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, **OFFLINE_ENV},
    )


def _error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr  # one line, no traceback
    return lines[0]


@pytest.mark.parametrize(
    ("body", "where", "key"),
    [
        ("# run\n[learner]\nlr = 1e-6\nbogus = 3\n", 4, "learner.bogus"),
        ('[learner]\ntotal_steps = "many"\n', 2, "learner.total_steps"),
        ("[actor]\ntemperature = -1.0\n", 2, "actor.temperature"),
        ('[transport]\nhost = "0.0.0.0"\n', 2, "transport.host"),
        ("[leaner]\nlr = 1.0\n", 1, "leaner"),
    ],
    ids=["unknown-key", "bad-type", "bad-value", "wildcard-bind", "unknown-table"],
)
def test_bad_config_fails_with_file_line(tmp_path: Path, body: str, where: int, key: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    run_dir = tmp_path / "run"
    r = popo_train("--config", str(cfg), "--deploy.run_dir", str(run_dir), cwd=tmp_path)
    assert r.returncode == 2
    assert f"{cfg}:{where}: {key}: " in _error_line(r)
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


def test_bad_flag_fails_naming_the_command_line(tmp_path: Path) -> None:
    r = popo_train("--learner.lr", "-1", "--deploy.run_dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2
    assert "command line: learner.lr:" in _error_line(r)
    assert not (tmp_path / "run").exists()


ROWS = [
    json.dumps({"problem": "1+1=", "answer": "2"}),
    json.dumps({"problem": "2+2=", "answer": "4"}),
]


@pytest.mark.parametrize(
    ("bad_row", "why"),
    [
        ('{"problem": "3+3=", "answer": ', "invalid JSON"),
        (json.dumps({"problem": "3+3="}), "missing field 'answer'"),
        (json.dumps(["3+3=", "6"]), "expected an object"),
        (json.dumps({"problem": 33, "answer": "6"}), "expected a string"),
    ],
    ids=["truncated-json", "missing-field", "not-an-object", "wrong-type"],
)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_bad_dataset_row_fails_before_the_run_dir(
    tmp_path: Path, bad_row: str, why: str, split: str
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([ROWS[0], ROWS[1], bad_row, ROWS[0]]) + "\n")
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(ROWS) + "\n")
    flags = ["--data.source", str(data if split == "train" else good)]
    if split == "eval":
        flags += ["--data.eval_source", str(data)]
    run_dir = tmp_path / "runs" / "r1"
    r = popo_train(*flags, "--deploy.run_dir", str(run_dir), cwd=tmp_path)
    assert r.returncode != 0
    line = _error_line(r)
    assert f"{data}:3: " in line and why in line, line
    assert not run_dir.exists() and not (tmp_path / "runs").exists()  # nothing half-written
