"""Checkpoints: atomic, pickle-free, last K kept, and resuming reproduces the next step exactly."""

from __future__ import annotations

import json

import pytest
import torch
from learner_helpers import make_groups, tiny_qwen2
from safetensors import safe_open

from popo.common.config import LearnerConfig, algorithm_config
from popo.learner.checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from popo.learner.trainer import Trainer


def _trainer(algo: str = "popo", seed: int = 0, **kw) -> Trainer:
    lc = LearnerConfig(lr=1e-2, total_steps=6, device="cpu", seed=3)
    popo = {"predictor_hidden": 16, "ema_tau": 0.9} if algo == "popo" else {}
    ac = algorithm_config(name=algo, **popo, **kw)
    return Trainer(tiny_qwen2(seed=seed), lc, ac, max_completion_len=8)


@pytest.mark.parametrize("algo", ["popo", "grpo"])
def test_resume_reproduces_next_step_exactly(tmp_path, algo):
    kw = {"kl_coef": 0.1} if algo == "grpo" else {}
    b1, b2, b3 = (make_groups(3, 4, seed=s) for s in (10, 11, 12))
    a = _trainer(algo, **kw)
    a.train_step(b1)
    a.train_step(b2)
    ckpt = save_checkpoint(a, tmp_path / "ckpt")
    want = a.train_step(b3)

    b = _trainer(algo, seed=7, **kw)  # different init: everything must come from the checkpoint
    load_checkpoint(b, ckpt)
    assert b.step == 2
    got = b.train_step(b3)
    for k in ("loss", "grad_norm", "lr"):
        assert got[k] == want[k], k  # bit-identical, not approximately equal
    for (n, p), q in zip(a.policy.named_parameters(), b.policy.parameters(), strict=True):
        assert torch.equal(p, q), n
    if algo == "popo":
        for p, q in zip(a.ema.parameters(), b.ema.parameters(), strict=True):
            assert torch.equal(p, q)
        for p, q in zip(a.predictor.parameters(), b.predictor.parameters(), strict=True):
            assert torch.equal(p, q)


def test_checkpoint_files_retention_and_no_pickle(tmp_path):
    tr = _trainer()
    root = tmp_path / "ckpt"
    for s in range(3):
        tr.train_step(make_groups(2, 4, seed=s))
        save_checkpoint(tr, root, keep=2)
    names = [p.name for p in list_checkpoints(root)]
    assert names == ["step-00000002", "step-00000003"]
    assert latest_checkpoint(root).name == "step-00000003"
    assert checkpoint_step(latest_checkpoint(root)) == 3
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]
    files = sorted(p.name for p in latest_checkpoint(root).iterdir())
    assert files == ["meta.json", "tensors.safetensors"]
    meta = json.loads((latest_checkpoint(root) / "meta.json").read_text())
    assert meta["step"] == 3
    with safe_open(str(latest_checkpoint(root) / "tensors.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"rng.torch", "rng.generator", "rng.numpy"} <= keys
    assert any(k.startswith("optim.") and k.endswith(".exp_avg_sq") for k in keys)
    assert any(k.startswith("ema.") for k in keys) and any(k.startswith("predictor.") for k in keys)
    # re-saving the same step replaces it in place
    again = save_checkpoint(tr, root, keep=2)
    assert again == latest_checkpoint(root) and len(list_checkpoints(root)) == 2
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
