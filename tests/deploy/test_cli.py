"""The `popo` command: config errors, subcommands, report."""

import json
import subprocess
import sys

import pytest

from popo.deploy.cli import COMMANDS, main


def run_popo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "popo.deploy.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_commands_listed():
    assert {
        "config",
        "demo-model",
        "train",
        "learner",
        "verifier",
        "actor",
        "eval",
        "report",
    } <= set(COMMANDS)


def test_bad_key_is_one_line_naming_key_and_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[learner]\nlrr = 1\n")
    r = run_popo("train", "--config", str(bad))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "learner.lrr" in lines[0] and str(bad) in lines[0]


def test_bad_flag_type(capsys):
    assert main(["config", "--learner.lr", "fast"]) == 2
    err = capsys.readouterr().err
    assert "learner.lr" in err and "command line" in err


def test_config_prints_overrides(capsys):
    assert main(["config", "--learner.lr", "1e-6", "--actor.num_actors", "3"]) == 0
    out = capsys.readouterr().out
    assert "lr = 1e-06" in out and "num_actors = 3" in out


def test_resume_requires_a_run_dir(tmp_path):
    (tmp_path / "config.toml").write_text("")
    r = run_popo("train", "--resume", str(tmp_path))
    assert r.returncode != 0 and "not a run directory" in r.stderr


def test_report_draws_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('[algorithm]\nname = "popo"\n')
    recs = [
        {
            "t": 100.0 + i,
            "role": "learner",
            "instance": "learner",
            "popo_learner_step": i,
            "popo_learner_tokens_total": 50.0 * i,
            "popo_learner_pass_rate": 0.1 + 0.01 * i,
            'popo_learner_loss{term="total"}': 1.0 / (i + 1),
        }
        for i in range(40)
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    evals = [{"step": 0, "accuracy": 0.2, "t": 100.0}, {"step": 39, "accuracy": 0.5, "t": 139.0}]
    (run / "eval.jsonl").write_text("\n".join(json.dumps(e) for e in evals) + "\n")
    out = tmp_path / "r.png"
    r = run_popo("report", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_report_rejects_non_run(tmp_path):
    r = run_popo("report", str(tmp_path))
    assert r.returncode == 2 and "not a run directory" in r.stderr


@pytest.mark.parametrize("cmd", ["learner", "verifier", "actor"])
def test_role_commands_need_run_dir(cmd):
    r = run_popo(cmd)
    assert r.returncode == 2 and "--run-dir" in r.stderr


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_command_help_exits_0(cmd):
    r = run_popo(cmd, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    # the command's own flags first, then every config field
    assert r.stdout.startswith(f"usage: popo {cmd}") and "--model.path" in r.stdout
    assert r.stderr == ""


def _bad_model_dirs(tmp_path):
    not_json = tmp_path / "not-json"
    not_json.mkdir()
    (not_json / "config.json").write_text("{")
    config_is_dir = tmp_path / "config-is-dir"
    (config_is_dir / "config.json").mkdir(parents=True)
    return {
        "missing": (tmp_path / "nonexistent", "no config.json"),
        "file": (not_json / "config.json", "no config.json"),
        "not_json": (not_json, "not valid JSON"),
        "unreadable": (config_is_dir, "unreadable"),
    }


@pytest.mark.parametrize("cmd", ["train", "eval", "learner", "actor"])
def test_bad_model_path_is_one_line_naming_the_key(tmp_path, cmd):
    run_dir = tmp_path / "run"
    where = ["--run-dir", str(run_dir)] if cmd in ("learner", "actor") else []
    for path, reason in _bad_model_dirs(tmp_path).values():
        r = run_popo(cmd, *where, "--model.path", str(path), "--deploy.run_dir", str(run_dir))
        assert r.returncode == 2, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr[-2000:]
        assert lines[0].startswith(f"popo {cmd}: model.path = {path}: ") and reason in lines[0]
        assert not run_dir.exists()  # refused before anything is written


def test_eval_bad_model_flag_names_the_flag(tmp_path):
    path, _ = _bad_model_dirs(tmp_path)["not_json"]
    r = run_popo("eval", "--model", str(path))
    assert r.returncode == 2
    assert r.stderr.strip() == f"popo eval: --model = {path}: config.json is not valid JSON"
