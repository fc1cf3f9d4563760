"""The config tree: light import, TOML, dotted CLI overrides, one-line errors, TOML snapshots."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from popo.common.config import ConfigError, RunConfig, load_config


def _write(tmp_path: Path, body: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def test_import_pulls_in_no_heavy_library() -> None:
    code = (
        "import sys, popo.common.config\n"
        "print(','.join(m for m in ('torch', 'vllm', 'ray', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the config imported: {out.stdout.strip()}"


def test_defaults_are_valid_and_every_field_documented() -> None:
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.forward == "positives"  # POPO's default: negatives stay at the verifier

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            assert info.description, f"{prefix}{name} has no docstring"
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")

    walk(RunConfig, "")


def test_toml_load(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[learner]\nlr = 1e-4\ntotal_steps = 7\n\n[actor]\nstop = ["\\n\\n"]\n\n'
        '[data]\nsource = "gsm8k.jsonl"\nanswer_format = "gsm8k"\n\n[data.synthetic]\nseed = 3\n',
    )
    cfg = load_config(path)
    assert cfg.learner.lr == 1e-4 and cfg.learner.total_steps == 7
    assert cfg.actor.stop == ["\n\n"]
    assert cfg.data.answer_format == "gsm8k" and cfg.data.synthetic.seed == 3
    assert cfg.actor.group_size == RunConfig().actor.group_size  # untouched keys keep defaults


def test_cli_overrides_beat_toml(tmp_path: Path) -> None:
    path = _write(tmp_path, '[learner]\nlr = 1e-4\ntotal_steps = 7\n[actor]\nstop = ["a"]\n')
    cfg = load_config(path, ["--learner.lr", "1e-6", "--actor.stop", '["x", "y"]'])
    assert cfg.learner.lr == 1e-6
    assert cfg.learner.total_steps == 7  # TOML value not named on the command line survives
    assert cfg.actor.stop == ["x", "y"]
    # argparse style: a repeated list flag appends.
    cfg = load_config(
        path, ["--actor.stop", "x", "--actor.stop", "y", "--data.synthetic.seed", "5"]
    )
    assert cfg.actor.stop == ["x", "y"] and cfg.data.synthetic.seed == 5
    assert load_config(None, ["--algorithm.name", "grpo"]).forward == "all"


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("[learner]\nlrr = 1.0\n", "learner.lrr"),
        ('[learner]\nlr = "fast"\n', "learner.lr"),
        ("[learner]\nlr = -1.0\n", "learner.lr"),
        ("[nope]\nx = 1\n", "nope"),
        ("top = 1\n", "top"),
        ('[data.synthetic]\nseed = "x"\n', "data.synthetic.seed"),
        ('[algorithm]\nname = "ppo"\n', "algorithm.name"),
        ("[actor]\nstop = 3\n", "actor.stop"),
        ("learner = 3\n", "learner"),
    ],
)
def test_bad_toml_gives_one_line_naming_key_and_file(tmp_path: Path, body: str, key: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg
    # file:line of the offending key (the line that names its last part)
    line = next(i for i, t in enumerate(body.splitlines(), 1) if key.split(".")[-1] in t)
    assert f"{path}:{line}: {key}: " in msg, msg


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--learner.lrr", "1"], "--learner.lrr"),
        (["--learner.lr", "fast"], "learner.lr"),
        (["--learner.total_steps", "2.5"], "learner.total_steps"),
        (["--algorithm.name", "ppo"], "algorithm.name"),
        (["--actor.stop", "[1"], "actor.stop"),
        (["--learner.lr"], "--learner.lr"),
    ],
)
def test_bad_flag_gives_one_line_naming_key(tmp_path: Path, args: list[str], key: str) -> None:
    path = _write(tmp_path, "[learner]\nlr = 1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, args)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("config error: command line: "), msg
    assert key in msg, msg


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")
    path = _write(tmp_path, "[learner\n")
    with pytest.raises(ConfigError, match=r"invalid TOML") as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_cross_field_check() -> None:
    with pytest.raises(ConfigError, match="cannot train grpo") as err:
        load_config(None, ["--algorithm.name", "grpo", "--verifier.forward", "positives"])
    assert "\n" not in str(err.value)


def test_stop_grace_must_outlast_the_actor_drain() -> None:
    """A grace shorter than the drain would SIGKILL every actor that still has groups to send."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--deploy.stop_grace_s", "20", "--actor.drain_timeout_s", "30"])
    msg = str(err.value)
    assert msg.startswith("config error: command line: deploy.stop_grace_s: ") and "\n" not in msg
    assert load_config(None, ["--deploy.stop_grace_s", "20", "--actor.drain_timeout_s", "2"])


def test_sections_validate_assignment() -> None:
    cfg = RunConfig()
    with pytest.raises(ValidationError):
        cfg.learner.lr = -1.0


def _round_trip(cfg: RunConfig, tmp_path: Path) -> RunConfig:
    path = tmp_path / "snapshot.toml"
    path.write_text(cfg.to_toml())
    return load_config(path)


def test_to_toml_round_trips(tmp_path: Path) -> None:
    assert _round_trip(RunConfig(), tmp_path) == RunConfig()
    # Built in Python, not from flags: pydantic-settings' CLI does not unescape list elements
    # (`--actor.stop '["\\n"]'` is a backslash and an n), and control characters are the point here.
    cfg = RunConfig(
        learner={"lr": 1e-7},
        actor={"stop": ["\n\n", "</s>", 'a"b\\c', "tab\there", "\x7f\x00", "é∑"]},
        data={
            "source": "C:\\data\\gsm8k.jsonl",
            "id_field": "idx",
            "eval_source": "../data/aime25.jsonl",
            "synthetic": {"n_train": 123},
        },
        algorithm={"name": "wapo"},
        transport={"curve_keys_dir": "keys"},
    )
    assert cfg.actor.stop[0] == "\n\n" and cfg.data.source == "C:\\data\\gsm8k.jsonl"
    assert _round_trip(cfg, tmp_path) == cfg
    tomllib.loads(cfg.to_toml())  # valid TOML on its own, not only through load_config


@settings(max_examples=50, deadline=None)
@given(stop=st.lists(st.text(max_size=12), max_size=4), source=st.text(min_size=1, max_size=30))
def test_to_toml_round_trips_any_strings(stop: list[str], source: str) -> None:
    cfg = RunConfig(actor={"stop": stop}, data={"source": source})
    back = RunConfig(**tomllib.loads(cfg.to_toml()))
    assert back == cfg
