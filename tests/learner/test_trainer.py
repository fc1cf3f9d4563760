"""Policy forward, predictor, EMA and the training step on a real (tiny) transformers Qwen2."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from learner_helpers import make_groups, tiny_qwen2

from popo.common.config import LearnerConfig, algorithm_config
from popo.learner.model import Predictor, collate, ema_forward, policy_forward
from popo.learner.trainer import Trainer, flatten_groups, pack_micro_batches


def _batch():
    prompts = [np.array([1, 2, 3]), np.array([4, 5])]
    comps = [np.array([6, 7]), np.array([8, 9, 10, 11])]
    mus = [np.array([-1.0, -2.0]), np.array([-1.0, -1.0, -1.0, -1.0])]
    return collate(prompts, comps, mus)


def test_policy_forward_matches_full_forward_and_final_norm(model):
    model.eval()
    b = _batch()
    out = policy_forward(model, b)
    full = model(b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
    lsm = torch.log_softmax(full.logits.float(), -1)
    last = full.hidden_states[-1]
    # the last hidden state is post-norm: equals norm(hidden before the final norm) — i.e. it is
    # what `model.model` returns, and pooled over the completion tokens' own positions
    want_feat = torch.stack([last[0, 3:5].mean(0), last[1, 2:6].mean(0)])
    torch.testing.assert_close(out.features, want_feat)
    # sequence 0: prompt length 3 -> completion token t predicted at position 2 + t
    torch.testing.assert_close(out.logp[0, :2], torch.stack([lsm[0, 2, 6], lsm[0, 3, 7]]))
    torch.testing.assert_close(
        out.logp[1],
        torch.stack([lsm[1, p, t] for p, t in zip(range(1, 5), [8, 9, 10, 11], strict=True)]),
    )
    ent = -(lsm.exp() * lsm).sum(-1)
    torch.testing.assert_close(out.entropy[0, :2], ent[0, 2:4])
    assert out.logp[0, 0].requires_grad and out.features.requires_grad
    assert out.entropy[0].tolist()[0] > 0 and out.logp[0].shape == (4,)  # padded to T = 4
    assert out.logp[0, 2:].abs().sum() == 0


def test_hidden_state_is_after_final_norm(model):
    """HF Qwen2: `last_hidden_state` = final RMSNorm output (not the raw residual stream)."""
    model.eval()
    b = _batch()
    captured = {}
    model.model.norm.register_forward_hook(lambda m, i, o: captured.update(inp=i[0], out=o))
    h = model.model(input_ids=b.input_ids, attention_mask=b.attention_mask)[0]
    torch.testing.assert_close(h, captured["out"])
    assert not torch.allclose(h, captured["inp"])


def test_ema_forward_no_lm_head_unless_kl(model):
    b = _batch()
    called = []
    hook = model.lm_head.register_forward_hook(lambda *a: called.append(1))
    feat, logp = ema_forward(model, b)
    assert logp is None and not called and not feat.requires_grad
    feat2, logp2 = ema_forward(model, b, with_logp=True)
    assert called and logp2 is not None and not logp2.requires_grad
    torch.testing.assert_close(feat, feat2)
    hook.remove()


def test_predictor_architecture():
    p = Predictor(32, 16, 3)
    kinds = [type(m).__name__ for m in p.net]
    assert kinds == ["Linear", "LayerNorm", "ReLU"] * 2 + ["Linear"]
    assert p(torch.randn(5, 32)).shape == (5, 32)
    lin = p.net[0]
    bound = (6 / (32 + 16)) ** 0.5  # Xavier-uniform bound
    assert lin.weight.abs().max() <= bound and torch.all(lin.bias == 0)
    assert [type(m).__name__ for m in Predictor(32, 16, 1).net] == ["Linear"]


def test_flatten_and_pack_whole_groups():
    groups = make_groups(5, 4, seed=3)
    seqs = flatten_groups(groups, "popo")
    assert all(s.reward > 0 for s in seqs)
    assert len(seqs) == sum(int(c.reward > 0) for g in groups for c in g.completions)
    mbs = pack_micro_batches(seqs, token_budget=40)
    assert sorted(i for mb in mbs for i in mb) == list(range(len(seqs)))
    for mb in mbs:
        gs = {seqs[i].group for i in mb}
        # whole groups: every sequence of a group is in this micro-batch
        assert {i for i, s in enumerate(seqs) if s.group in gs} == set(mb)
        lmax = max(len(seqs[i].prompt) + len(seqs[i].completion) for i in mb)
        assert len(mb) * lmax <= 40 or len(gs) == 1
    with pytest.raises(ValueError):
        flatten_groups(make_groups(2, forwarded="positives"), "grpo")


def _cfgs(algo="popo", **kw):
    lc = LearnerConfig(
        lr=1e-2, total_steps=10, warmup_ratio=0.1, micro_batch_tokens=4096, device="cpu"
    )
    if algo == "popo":
        kw = {"predictor_hidden": 16, **kw}
    ac = algorithm_config(name=algo, **kw)
    return lc, ac


@pytest.mark.parametrize("algo", ["popo", "grpo", "dr_grpo", "wapo"])
def test_train_step_every_algorithm(algo):
    lc, ac = _cfgs(algo, **({"kl_coef": 0.05} if algo == "grpo" else {}))
    tr = Trainer(tiny_qwen2(), lc, ac, max_completion_len=8)
    before = [p.detach().clone() for p in tr.policy.parameters()]
    groups = make_groups(4, 4, seed=1)
    m = tr.train_step(groups)
    assert m["step"] == 1 and m["tokens"] > 0 and np.isfinite(m["loss"])
    assert np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.policy.parameters(), strict=True))
    # the step's time, split into its phases (popo_learner_step_phase_seconds)
    phases = [m[f"phase_seconds_{p}"] for p in ("forward_backward", "optimizer", "after_step")]
    assert min(phases) >= 0 and sum(phases) <= m["step_seconds"] + 1e-6
    if algo == "popo":
        for k in (
            "loss_nll",
            "loss_sim",
            "loss_ent",
            "cos_sim",
            "is_clip_fraction",
            "weight_entropy",
            "ema_kl",
        ):
            assert k in m, k
        assert -1 <= m["cos_sim"] <= 1 and 0 <= m["is_clip_fraction"] <= 1
        assert m["ema_kl"] == pytest.approx(0.0, abs=1e-6)  # EMA == policy before the first step
    if algo == "grpo":
        assert "kl_ref" in m and "clip_fraction" in m


def test_all_negative_batch_is_skipped():
    lc, ac = _cfgs()
    tr = Trainer(tiny_qwen2(), lc, ac, max_completion_len=8)
    groups = make_groups(2, 4, seed=0, forwarded="positives")
    for g in groups:
        g.completions = []
    m = tr.train_step(groups)
    assert m["tokens"] == 0 and tr.step == 0


def test_micro_batching_equals_one_batch():
    """Gradient accumulation over whole-group micro-batches == one full batch (step-level normalisers)."""
    groups = make_groups(4, 4, seed=2)
    results = []
    for budget in (100_000, 1):  # one micro-batch vs one group per micro-batch
        lc, ac = _cfgs(feature_noise_std=0.0)
        lc.micro_batch_tokens = budget
        tr = Trainer(tiny_qwen2(), lc, ac, max_completion_len=8)
        grads = []
        # compare the accumulated gradients (Adam's first step is ~sign(g): it would magnify
        # float round-off on near-zero gradients)
        tr.optimizer.register_step_pre_hook(
            lambda opt, *_, grads=grads, tr=tr: grads.extend(p.grad.clone() for p in tr.params)
        )
        m = tr.train_step(groups)
        results.append((m, grads))
    (m1, p1), (m2, p2) = results
    assert len(p1) == len(p2) > 0
    for k in ("loss", "loss_nll", "loss_sim", "loss_ent", "weight_entropy"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-7), k
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_ema_tau_in_trainer():
    groups = make_groups(3, 4, seed=4)
    lc, ac = _cfgs(ema_tau=1.0)
    tr = Trainer(tiny_qwen2(), lc, ac, max_completion_len=8)
    ema0 = copy.deepcopy(tr.ema.state_dict())
    tr.train_step(groups)
    for k, v in tr.ema.state_dict().items():
        assert torch.equal(v, ema0[k]), k  # τ = 1 freezes
    assert all(not p.requires_grad for p in tr.ema.parameters())
    lc, ac = _cfgs(ema_tau=0.0)
    tr = Trainer(tiny_qwen2(), lc, ac, max_completion_len=8)
    tr.train_step(groups)
    pol = tr.policy.state_dict()
    for k, v in tr.ema.state_dict().items():
        assert torch.equal(v, pol[k]), k  # τ = 0 copies


def test_popo_steps_raise_positive_logprob():
    # is_level none: with token IS the NLL metric is ρ-weighted and ρ grows as π rises
    lc, ac = _cfgs(is_level="none")
    lc.lr, lc.warmup_ratio = 3e-3, 0.0
    tr = Trainer(tiny_qwen2(), lc, ac, max_completion_len=8)
    groups = make_groups(4, 4, seed=5, forwarded="positives")
    seqs = flatten_groups(groups, "popo")
    before = sum(tr.sequence_logprobs(s.prompt, s.completion).sum() for s in seqs)
    nll = [tr.train_step(groups)["loss_nll"] for _ in range(5)]
    after = sum(tr.sequence_logprobs(s.prompt, s.completion).sum() for s in seqs)
    assert after > before + 1.0
    assert nll[-1] < nll[0]


def test_lr_schedule_warmup_then_cosine():
    from popo.learner.trainer import cosine_with_warmup

    f = cosine_with_warmup(10, 0.2)
    assert [round(f(s), 6) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
