"""The real-model path end to end: SmolLM2-135M-Instruct built from its package (`popo
prepare-model smollm2`, the `real` extra) and trained a few POPO steps on the sums task through its
chat template with `popo train` and the shipped config. Skipped where the extra is not installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from e2e_helpers import assert_exactly_once, popo_train
from safetensors.torch import load_file

from popo.common.process import free_port_flags

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "configs" / "smollm2-sums-cpu.toml"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    missing = [m for m in ("gguf", "accelerate") if not importlib.util.find_spec(m)]
    if missing:
        pytest.skip(f"needs the real extra ({', '.join(missing)} missing): pip install '.[real]'")
    out = tmp_path_factory.mktemp("smollm2") / "model"
    built = subprocess.run(
        [sys.executable, "-m", "popo.deploy.cli", "prepare-model", "smollm2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert built.stdout.strip() == str(out)
    info = json.loads((out / "build_info.json").read_text())
    assert info["kind"] == "packaged" and 130e6 < info["params"] < 140e6
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (out / "model.safetensors").stat().st_size > 500e6  # float32, dequantized
    return out


def test_train_smollm2_on_sums(tmp_path: Path, smollm2_dir: Path) -> None:
    run_dir = tmp_path / "run"
    steps = 2
    proc = popo_train(
        [
            "--config",
            str(CONFIG),
            f"--deploy.run_dir={run_dir}",
            f"--model.path={smollm2_dir}",
            f"--learner.total_steps={steps}",
            "--learner.prompts_per_step=4",
            "--learner.eval_every=0",
            "--learner.checkpoint_every=2",
            "--data.eval_size=8",
            "--actor.group_size=4",
            "--actor.max_tokens=48",
            *free_port_flags(),
            "--metrics.jsonl_every_s=1",
        ]
    )
    try:
        out, _ = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]
    assert_exactly_once(run_dir, steps)

    # the held-out evaluation ran on the base weights and on the last ones
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, steps]
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in evals)

    # weights were published, in the dtype the config's actor serves, and reloaded in place
    versions = sorted((run_dir / "weights").glob("v*"))
    assert versions
    tensors = load_file(versions[-1] / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    actor = [r for r in recs if r["role"] == "actor"]
    assert max(r["popo_actor_policy_version"] for r in actor) >= 1
    assert max(r["popo_actor_weight_reload_seconds_count"] for r in actor) >= 1
    assert max(r.get("popo_actor_weight_reload_failures_total", 0) for r in actor) == 0

    assert 'source = "sums"' in (run_dir / "config.toml").read_text()


def test_smollm2_prompts_are_its_chat_turn_for_actor_and_learner(smollm2_dir: Path) -> None:
    """The real tokenizer: `auto` picks its chat template, the user turn holds the question once,
    and vLLM's tokenizer (the actor's) encodes the leased text to the learner's ids."""
    from transformers import AutoTokenizer
    from vllm.tokenizers import get_tokenizer

    from popo.common.config import DataConfig
    from popo.common.data import encode_prompt, load_prompts, prompt_ids, render_problems

    learner_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    actor_tok = get_tokenizer(str(smollm2_dir))
    cfg = DataConfig(source="sums")
    problems = load_prompts(cfg, "test")[:50]
    for raw, leased in zip(problems, render_problems(problems, cfg, learner_tok), strict=True):
        ids = prompt_ids(raw, cfg, learner_tok)
        assert encode_prompt(actor_tok, leased.problem) == ids
        text = learner_tok.decode(ids)
        assert text.startswith("<|im_start|>system\n") and text.count("<|im_start|>") == 3
        assert text.endswith(f"<|im_start|>user\n{raw.problem}<|im_end|>\n<|im_start|>assistant\n")
        assert len(ids) < 64
