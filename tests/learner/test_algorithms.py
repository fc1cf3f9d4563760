"""One module per algorithm: what each trains, when a group carries signal, which models it
needs; and the `[algorithm]` config as a union on `name` with each algorithm's own fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from learner_helpers import make_groups, tiny_qwen2

from popo.common.config import (
    ConfigError,
    DrGrpoConfig,
    GrpoConfig,
    LearnerConfig,
    PopoConfig,
    WapoConfig,
    algorithm_config,
    load_config,
)
from popo.common.messages import pack_f32, unpack_ids
from popo.learner.algorithms import ALGORITHMS, make_algorithm
from popo.learner.model import collate, policy_forward
from popo.learner.trainer import Trainer, flatten_groups


def _group(n_pos: int, n_tot: int, forwarded: str = "all"):
    g = make_groups(1, n_tot, seed=0, forwarded="all")[0]
    for i, c in enumerate(g.completions):
        c.reward = 1.0 if i < n_pos else 0.0
    if forwarded == "positives":
        g.completions = g.completions[:n_pos]
    g.n_positive, g.n_total, g.forwarded = n_pos, n_tot, forwarded
    return g


@pytest.mark.parametrize(
    ("name", "signal", "reason"),
    [
        ("popo", [False, True, True, True], "all_negative"),
        ("grpo", [False, True, True, False], "zero_advantage"),
        ("dr_grpo", [False, True, True, False], "zero_advantage"),
        ("wapo", [False, True, True, False], "zero_advantage"),
    ],
)
def test_signal_and_skip_reason(name, signal, reason):
    algo = make_algorithm(name)
    groups = [_group(k, 4) for k in (0, 1, 3, 4)]  # all negative, mixed, mixed, all positive
    assert [algo.has_signal(g) for g in groups] == signal
    assert algo.no_signal_reason == reason


def test_which_sequences_each_trains():
    mixed, all_pos = _group(2, 4), _group(4, 4)
    n = {name: len(flatten_groups([mixed, all_pos], name)) for name in ALGORITHMS}
    assert n == {"popo": 2 + 4, "grpo": 8, "dr_grpo": 8, "wapo": 2}  # wapo: mixed groups only
    for name in ("grpo", "dr_grpo"):
        with pytest.raises(ValueError, match="needs negatives"):
            flatten_groups([_group(2, 4, forwarded="positives")], name)


def test_auxiliary_models():
    lc = LearnerConfig(device="cpu")
    popo = Trainer(tiny_qwen2(), lc, algorithm_config(predictor_hidden=8), max_completion_len=8)
    assert popo.ema is not None and popo.predictor is not None and popo.reference is None
    grpo = Trainer(tiny_qwen2(), lc, GrpoConfig(kl_coef=0.1), max_completion_len=8)
    assert grpo.ema is None and grpo.predictor is None and grpo.reference is not None
    for cfg in (GrpoConfig(), DrGrpoConfig(), WapoConfig()):
        tr = Trainer(tiny_qwen2(), lc, cfg, max_completion_len=8)
        assert tr.ema is tr.predictor is tr.reference is None


def test_config_union_shows_each_algorithms_own_fields(tmp_path: Path):
    assert isinstance(load_config(None, []).algorithm, PopoConfig)
    assert isinstance(load_config(None, ["--algorithm.name", "dr_grpo"]).algorithm, DrGrpoConfig)
    # name left out: POPO
    assert load_config(None, ["--algorithm.alpha", "0.3"]).algorithm.alpha == 0.3
    path = tmp_path / "c.toml"
    path.write_text('[algorithm]\nname = "grpo"\nclip_high = 0.3\n')
    cfg = load_config(path)
    assert isinstance(cfg.algorithm, GrpoConfig) and cfg.algorithm.clip_high == 0.3
    assert cfg.forward == "all" and not hasattr(cfg.algorithm, "alpha")
    path.write_text('[algorithm]\nname = "grpo"\nalpha = 0.1\n')
    with pytest.raises(ConfigError, match=rf"{path}:3: algorithm\.alpha: Extra inputs"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"algorithm\.name: unknown algorithm 'ppo'"):
        load_config(None, ["--algorithm.name", "ppo"])
    # the snapshot a run writes reads back as the same config
    snap = tmp_path / "snap.toml"
    snap.write_text(cfg.to_toml())
    assert load_config(snap).algorithm == cfg.algorithm
    with pytest.raises(ValueError, match="unknown algorithm"):
        algorithm_config("ppo")


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--actor.temperature", "0.7"], "actor.logprobs_mode"),
        (["--actor.top_p", "0.95"], "actor.top_p"),
        (["--actor.top_p", "0.95", "--actor.logprobs_mode", "processed_logprobs"], "actor.top_p"),
        (["--actor.temperature", "0"], "actor.temperature"),
    ],
)
def test_inconsistent_behaviour_logprobs_refused(args, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, args)
    msg = str(err.value)
    assert msg.startswith(f"config error: command line: {key}: ") and "\n" not in msg, msg


def test_consistent_behaviour_logprobs_accepted():
    cfg = load_config(
        None, ["--actor.temperature", "0.7", "--actor.logprobs_mode", "processed_logprobs"]
    )
    assert cfg.actor.temperature == 0.7
    assert load_config(None, ["--actor.logprobs_mode", "processed_logprobs"]).actor.top_p == 1


def test_learner_logprobs_at_the_sampling_temperature():
    """μ recorded at temperature T (processed log-probs) is what the learner computes: on fresh
    rollouts every GRPO ratio is 1 and nothing is clipped; at temperature 1 it would not be."""
    t = 0.5
    model = tiny_qwen2()
    groups = make_groups(3, 4, seed=9)
    for g in groups:
        prompt = unpack_ids(g.prompt_token_ids).astype(np.int64)
        for c in g.completions:
            ids = unpack_ids(c.token_ids).astype(np.int64)
            with torch.no_grad():
                b = collate([prompt], [ids], [np.zeros(len(ids))])
                lp = policy_forward(model.eval(), b, need_entropy=False, temperature=t).logp[0]
            c.logprobs = pack_f32(lp.numpy())
    model.train()
    lc = LearnerConfig(device="cpu", lr=1e-3, total_steps=10)
    tight = GrpoConfig(clip_low=1e-4, clip_high=1e-4)
    fresh = Trainer(model, lc, tight, max_completion_len=8, temperature=t).train_step(groups)
    assert fresh["clip_fraction"] == 0.0
    at_one = Trainer(tiny_qwen2(), lc, tight, max_completion_len=8).train_step(groups)
    assert at_one["clip_fraction"] > 0.5


def test_policy_gradient_norm_clipped_without_the_predictor():
    lc = LearnerConfig(device="cpu", lr=1e-3, total_steps=10, grad_clip=1e-3)
    ac = algorithm_config(predictor_hidden=16, predictor_grad_clip=1e-4, feature_noise_std=0.0)
    tr = Trainer(tiny_qwen2(), lc, ac, max_completion_len=8)
    seen = {}

    def hook(opt, *_):
        seen["policy"] = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in tr.policy_params])
        )
        seen["predictor"] = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in tr.predictor_params])
        )

    tr.optimizer.register_step_pre_hook(hook)
    m = tr.train_step(make_groups(3, 4, seed=1))
    # each part is clipped to its own bound; the reported norms are each part's own, pre-clip
    assert float(seen["policy"]) == pytest.approx(1e-3, rel=1e-4)
    assert float(seen["predictor"]) == pytest.approx(1e-4, rel=1e-4)
    assert m["grad_norm"] > 1e-3 and m["predictor_grad_norm"] > 1e-4
    # unclipped predictor by default (as the authors' code)
    tr = Trainer(tiny_qwen2(), lc, algorithm_config(predictor_hidden=16), max_completion_len=8)
    tr.optimizer.register_step_pre_hook(hook)
    m = tr.train_step(make_groups(3, 4, seed=1))
    assert float(seen["predictor"]) == pytest.approx(m["predictor_grad_norm"], rel=1e-5)
