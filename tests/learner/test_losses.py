"""Pure losses (docs/architecture.md, Loss) against hand-computed values, plus their properties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from popo.learner.losses import (
    dr_grpo_loss,
    ema_update,
    group_advantages,
    grpo_loss,
    k3_kl,
    popo_loss,
    popo_weights,
    truncated_is,
    wapo_loss,
    weight_entropy,
)

LN2 = math.log(2.0)


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float64, **kw)


# --- weights -------------------------------------------------------------------------------------


def test_softmax_weights_hand_computed():
    # group 0: positives with ℓ̄ = 0 and ln 3, one negative -> softmax = [1, 3] / 4 and 0.
    # group 1: no positive -> all zero.  group 2: one positive -> 1.
    lbar = t([0.0, math.log(3.0), 5.0, -1.0, -2.0, -7.0])
    pos = torch.tensor([1, 1, 0, 0, 0, 1], dtype=torch.bool)
    gid = torch.tensor([10, 10, 10, 11, 11, 12])
    w = popo_weights(lbar, pos, gid, temperature=1.0, mode="softmax")
    torch.testing.assert_close(w, t([0.25, 0.75, 0, 0, 0, 1.0]))


def test_softmax_temperature_hand_computed():
    # T_w = 2: exp(0/2) : exp(ln 9 / 2) = 1 : 3 -> [1/4, 3/4].
    w = popo_weights(t([0.0, math.log(9.0)]), torch.tensor([True, True]), torch.tensor([0, 0]), 2.0)
    torch.testing.assert_close(w, t([0.25, 0.75]))


def test_uniform_and_length_norm_hand_computed():
    pos = torch.tensor([True, True, False])
    gid = torch.tensor([0, 0, 0])
    w = popo_weights(t([-3.0, 0.0, 1.0]), pos, gid, mode="uniform")
    torch.testing.assert_close(w, t([0.5, 0.5, 0.0]))
    # uniform / |y| = [1/1, 1/3] -> renormalised [3/4, 1/4].
    w = popo_weights(t([-3.0, 0.0, 1.0]), pos, gid, mode="uniform", length=t([1.0, 3.0, 2.0]))
    torch.testing.assert_close(w, t([0.75, 0.25, 0.0]))
    # softmax [1/4, 3/4] / [1, 3] = [1/4, 1/4] -> [1/2, 1/2].
    w = popo_weights(t([0.0, math.log(3.0), 0.0]), pos, gid, length=t([1.0, 3.0, 1.0]))
    torch.testing.assert_close(w, t([0.5, 0.5, 0.0]))


def test_weights_are_detached_and_stable_for_large_logits():
    lbar = t([-1000.0, -1001.0], requires_grad=True)
    w = popo_weights(lbar, torch.tensor([True, True]), torch.tensor([0, 0]))
    assert not w.requires_grad
    e = math.exp(-1.0)
    torch.testing.assert_close(w, t([1 / (1 + e), e / (1 + e)]))


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.floats(-50, 0, allow_nan=False),
            st.booleans(),
            st.integers(0, 4),
            st.integers(1, 30),
        ),
        min_size=1,
        max_size=24,
    ),
    temp=st.floats(0.05, 10.0),
    mode=st.sampled_from(["softmax", "uniform"]),
    use_len=st.booleans(),
)
def test_weight_properties(data, temp, mode, use_len):
    lbar = t([d[0] for d in data])
    pos = torch.tensor([d[1] for d in data])
    gid = torch.tensor([d[2] for d in data])
    length = t([float(d[3]) for d in data]) if use_len else None
    w = popo_weights(lbar, pos, gid, temp, mode, length)
    assert torch.all(w >= 0) and torch.all(w <= 1 + 1e-12)
    assert torch.all(w[~pos] == 0)
    for g in gid.unique():
        in_g = gid == g
        total = w[in_g].sum().item()
        if pos[in_g].any():
            assert total == pytest.approx(1.0, abs=1e-9)
        else:
            assert total == 0.0  # a group with no positive contributes nothing


def test_weight_entropy():
    # group 0 uniform over 2 -> ln 2; group 1 one positive -> 0; group 2 all-negative: ignored.
    w = t([0.5, 0.5, 1.0, 0.0])
    h = weight_entropy(w, torch.tensor([0, 0, 1, 2]))
    assert h.item() == pytest.approx(LN2 / 2)


# --- importance correction -------------------------------------------------------------------------


def _toy():
    # Two positive completions of one prompt, T = 2 (second row padded).
    logp = t([[math.log(0.5), math.log(0.25)], [math.log(0.5), 0.0]])
    mu = t([[math.log(0.25), math.log(0.5)], [math.log(0.1), 0.0]])
    mask = t([[1.0, 1.0], [1.0, 0.0]])
    w = t([0.25, 0.75])
    ent = t([[1.0, 2.0], [3.0, 9.0]])  # 9 sits on padding and must not count
    return logp, mu, mask, w, ent


def test_truncated_is_levels_and_cap():
    logp, mu, mask, _, _ = _toy()
    rho, clipped = truncated_is(logp, mu, mask, "token", cap=1.5)
    # ratios: 0.5/0.25 = 2 -> 1.5 (clipped), 0.25/0.5 = 0.5, 0.5/0.1 = 5 -> 1.5 (clipped)
    torch.testing.assert_close(rho * mask, t([[1.5, 0.5], [1.5, 0.0]]))
    assert clipped.tolist() == [[True, False], [True, False]]
    # sequence: row 0 mean log-ratio (ln 2 − ln 2)/2 = 0 -> 1; row 1 ln 5 -> 5 -> 1.5
    rho, clipped = truncated_is(logp, mu, mask, "sequence", cap=1.5)
    torch.testing.assert_close(rho * mask, t([[1.0, 1.0], [1.5, 0.0]]))
    rho, clipped = truncated_is(logp, mu, mask, "none", cap=1.5)
    assert torch.all(rho == 1) and not clipped.any()


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    cap=st.floats(0.1, 5.0),
    level=st.sampled_from(["token", "sequence"]),
)
def test_is_cap_holds(seed, cap, level):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 5
    mu = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 5
    mask = (torch.rand(4, 7, generator=g) > 0.3).double()
    rho, _ = truncated_is(logp, mu, mask, level, cap)
    assert torch.all(rho <= cap) and torch.all(rho >= 0)


# --- POPO loss ---------------------------------------------------------------------------------


def test_popo_nll_hand_computed_all_is_levels():
    logp, mu, mask, w, ent = _toy()
    n = 3.0  # positive-completion tokens
    cases = {
        # (0.25·(ln2 + ln4) + 0.75·ln2) / 3 = 1.5 ln2 / 3
        "none": 1.5 * LN2 / n,
        # (0.25·(1.5·ln2 + 0.5·2ln2) + 0.75·1.5·ln2) / 3 = 1.75 ln2 / 3
        "token": 1.75 * LN2 / n,
        # (0.25·1·3ln2 + 0.75·1.5·ln2) / 3 = 1.875 ln2 / 3
        "sequence": 1.875 * LN2 / n,
    }
    for level, want in cases.items():
        loss, m = popo_loss(
            logp, mu, mask, w, ent, None, None, alpha=0.0, beta_ent=0.0, is_level=level, is_cap=1.5
        )
        assert loss.item() == pytest.approx(want), level
        assert m["loss_nll"].item() == pytest.approx(want)
    _, m = popo_loss(logp, mu, mask, w, ent, None, None, is_level="token", is_cap=1.5)
    assert m["is_clip_fraction"].item() == pytest.approx(2 / 3)


def test_popo_full_loss_hand_computed():
    logp, mu, mask, w, ent = _toy()
    pred = t([[1.0, 0.0], [0.0, 1.0]])
    ema = t([[1.0, 0.0], [1.0, 1.0]])
    # L_NLL (none) = 0.5 ln2; L_ent = −(1+2+3)/3 = −2; cos = [1, 1/√2] -> L_sim = −(0.25 + 0.75/√2)
    l_sim = -(0.25 + 0.75 / math.sqrt(2))
    want = 0.5 * LN2 + 0.5 * l_sim + 0.1 * (-2.0)
    loss, m = popo_loss(logp, mu, mask, w, ent, pred, ema, alpha=0.5, beta_ent=0.1, is_level="none")
    assert loss.item() == pytest.approx(want)
    assert m["loss_sim"].item() == pytest.approx(l_sim)
    assert m["cos_sim"].item() == pytest.approx(-l_sim)
    assert m["entropy"].item() == pytest.approx(2.0)
    # noise is added to the EMA target: ε = [0, −1] on row 1 makes its target [1, 0] -> cos 0
    noise = t([[0.0, 0.0], [0.0, -1.0]])
    _, m = popo_loss(logp, mu, mask, w, ent, pred, ema, alpha=0.5, feature_noise=noise)
    assert m["cos_sim"].item() == pytest.approx(0.25)


def test_popo_none_equals_reference_formulation():
    """is_level="none" == the paper's synchronous POPO, written out independently."""
    g = torch.Generator().manual_seed(0)
    n, tlen, h = 6, 5, 8
    logp = -torch.rand(n, tlen, generator=g, dtype=torch.float64) * 3
    mu = -torch.rand(n, tlen, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(n, tlen, generator=g) > 0.2).double()
    ent = torch.rand(n, tlen, generator=g, dtype=torch.float64)
    pred = torch.randn(n, h, generator=g, dtype=torch.float64)
    ema = torch.randn(n, h, generator=g, dtype=torch.float64)
    pos = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    gid = torch.tensor([0, 0, 0, 1, 1, 2])
    lbar = (logp * mask).sum(-1) / mask.sum(-1)
    w = popo_weights(lbar, pos, gid, 0.7)
    loss, _ = popo_loss(
        logp, mu, mask, w, ent, pred, ema, alpha=0.1, beta_ent=0.01, is_level="none"
    )
    ref_nll, ref_ent, ntok = 0.0, 0.0, 0.0
    ref_sim_num, ref_sim_den = 0.0, 0.0
    for i in range(n):
        if not pos[i]:
            continue
        for j in range(tlen):
            if mask[i, j]:
                ref_nll += w[i].item() * -logp[i, j].item()
                ref_ent += ent[i, j].item()
                ntok += 1
        cos = torch.dot(pred[i], ema[i]) / (pred[i].norm() * ema[i].norm())
        ref_sim_num += w[i].item() * cos.item()
        ref_sim_den += w[i].item()
    ref = ref_nll / ntok + 0.1 * (-ref_sim_num / ref_sim_den) + 0.01 * (-ref_ent / ntok)
    assert loss.item() == pytest.approx(ref, rel=1e-12)
    # fresh rollouts (μ = π) make every IS level equal to `none`
    for level in ("token", "sequence"):
        l2, _ = popo_loss(logp, logp.clone(), mask, w, ent, pred, ema, is_level=level)
        assert l2.item() == pytest.approx(loss.item(), rel=1e-12)


def test_popo_micro_batches_sum_to_full_batch():
    """Step-level normalisers make gradient accumulation exact (whole groups per micro-batch)."""
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(4, 3, generator=g, dtype=torch.float64)
    mu = -torch.rand(4, 3, generator=g, dtype=torch.float64)
    mask = t([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    ent = torch.rand(4, 3, generator=g, dtype=torch.float64)
    pred, ema = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    w = t([0.3, 0.7, 1.0, 0.0])
    full, _ = popo_loss(logp, mu, mask, w, ent, pred, ema)
    n_tok, w_tot = 6.0, 2.0
    a, _ = popo_loss(
        logp[:2], mu[:2], mask[:2], w[:2], ent[:2], pred[:2], ema[:2], n_tokens=n_tok, w_total=w_tot
    )
    b, _ = popo_loss(
        logp[2:], mu[2:], mask[2:], w[2:], ent[2:], pred[2:], ema[2:], n_tokens=n_tok, w_total=w_tot
    )
    assert (a + b).item() == pytest.approx(full.item(), rel=1e-6)


def test_popo_gradients_flow_only_where_they_should():
    logp, mu, mask, w, ent = _toy()
    logp = logp.clone().requires_grad_(True)
    mu = mu.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    ent = ent.clone().requires_grad_(True)
    pred = t([[1.0, 0.2], [0.3, 1.0]], requires_grad=True)
    ema = t([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    noise = t([[0.1, 0.0], [0.0, 0.1]], requires_grad=True)
    loss, _ = popo_loss(
        logp,
        mu,
        mask,
        w,
        ent,
        pred,
        ema,
        alpha=0.5,
        beta_ent=0.1,
        is_level="token",
        is_cap=1.5,
        feature_noise=noise,
    )
    loss.backward()
    for name, x in {"weights": w, "behaviour": mu, "ema": ema}.items():
        assert x.grad is None, name
    assert logp.grad is not None and pred.grad is not None and ent.grad is not None
    # ∂L/∂logp_it = −w_i ρ_it m_it / n: padding gets none; IS ratio is a constant (detached)
    torch.testing.assert_close(logp.grad, t([[-0.25 * 1.5, -0.25 * 0.5], [-0.75 * 1.5, 0.0]]) / 3)
    torch.testing.assert_close(ent.grad, t([[-0.1, -0.1], [-0.1, 0.0]]) / 3)


def test_implicit_negative_gradient_on_toy_softmax_policy():
    """Training on positives alone lowers the probability of a held-out negative (the implicit negative gradient)."""
    torch.manual_seed(0)
    theta = torch.zeros(6, dtype=torch.float64, requires_grad=True)  # a policy over 6 answers
    positives = torch.tensor([0, 1])  # the two correct answers sampled for this prompt
    held_out_negative = 5
    opt = torch.optim.SGD([theta], lr=0.5)
    p_neg = [torch.softmax(theta, 0)[held_out_negative].item()]
    for _ in range(20):
        logprobs = torch.log_softmax(theta, 0)
        logp = logprobs[positives][:, None]  # [N=2, T=1]
        lbar = logp[:, 0].detach()
        w = popo_weights(lbar, torch.tensor([True, True]), torch.tensor([0, 0]))
        ent = -(logprobs.exp() * logprobs).sum().expand(2, 1)
        loss, _ = popo_loss(
            logp,
            logp.detach(),
            torch.ones(2, 1, dtype=torch.float64),
            w,
            ent,
            None,
            None,
            alpha=0.0,
            beta_ent=0.0,
        )
        opt.zero_grad()
        loss.backward()
        # the negative's own logit is pushed down although it never appears in the loss
        assert theta.grad[held_out_negative] > 0
        opt.step()
        p_neg.append(torch.softmax(theta, 0)[held_out_negative].item())
    assert all(b < a for a, b in itertools.pairwise(p_neg))
    assert p_neg[-1] < 0.5 * p_neg[0]


# --- baselines --------------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    r = t([1.0, 0.0, 1.0, 1.0, 1.0])
    gid = torch.tensor([0, 0, 1, 1, 2])
    a = group_advantages(r, gid)
    s = math.sqrt(0.5)  # unbiased std of {1, 0}
    torch.testing.assert_close(a, t([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0, 0, 0]))
    torch.testing.assert_close(
        group_advantages(r, gid, normalize_std=False), t([0.5, -0.5, 0, 0, 0])
    )


def test_grpo_hand_computed():
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    adv = t([a, -a])
    # ratio 1.5 on the positive (A>0: clipped at 1.28), 0.5 on the negative (A<0: clipped at 0.8)
    mu = t([[0.0], [0.0]])
    logp = t([[math.log(1.5)], [math.log(0.5)]])
    mask = t([[1.0], [1.0]])
    loss, m = grpo_loss(logp, mu, mask, adv)
    assert loss.item() == pytest.approx((-1.28 * a + 0.8 * a) / 2)
    assert m["clip_fraction"].item() == pytest.approx(1.0)
    # inside the clip range: surrogate is −ρA, token mean over 3 tokens
    logp2 = t([[math.log(1.1), math.log(0.9)], [math.log(1.0), 0.0]])
    mask2 = t([[1.0, 1.0], [1.0, 0.0]])
    loss2, m2 = grpo_loss(logp2, torch.zeros(2, 2, dtype=torch.float64), mask2, adv)
    assert loss2.item() == pytest.approx((-1.1 * a - 0.9 * a + 1.0 * a) / 3)
    assert m2["clip_fraction"].item() == 0.0
    # k3 KL to a reference: ref = ln 0.25, logp = ln 0.5 -> e^{-ln2} + ln2 − 1 per token
    lp = t([[math.log(0.5)]])
    ref = t([[math.log(0.25)]])
    assert k3_kl(lp, ref).item() == pytest.approx(LN2 - 0.5)
    loss3, m3 = grpo_loss(lp, lp.detach(), t([[1.0]]), t([0.0]), ref_logp=ref, kl_coef=0.1)
    assert loss3.item() == pytest.approx(0.1 * (LN2 - 0.5))
    assert m3["kl_ref"].item() == pytest.approx(LN2 - 0.5)


def test_dr_grpo_hand_computed():
    adv = t([0.5, -0.5])
    logp = t([[math.log(1.5), 0.0], [math.log(0.5), 0.0]])
    mask = t([[1.0, 0.0], [1.0, 0.0]])
    loss, _ = dr_grpo_loss(logp, torch.zeros(2, 2, dtype=torch.float64), mask, adv, 4)
    # (−1.28·0.5 + 0.8·0.5) / (B=2 · 4) = −0.24 / 8
    assert loss.item() == pytest.approx(-0.03)


def test_wapo_hand_computed():
    # row 0: mixed group (2 of 8 correct) -> A = 0.75, ratios [2, 20] -> one-sided clip [2, 10]
    # row 1: all-positive group -> A = 0, excluded from loss and token count
    logp = t([[math.log(2.0), math.log(20.0)], [0.5, 0.5]])
    mu = torch.zeros(2, 2, dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.float64)
    loss, m = wapo_loss(logp, mu, mask, torch.tensor([2, 8]), torch.tensor([8, 8]), eps=9.0)
    assert loss.item() == pytest.approx(-(2 * 0.75 + 10 * 0.75) / 2)
    assert m["clip_fraction"].item() == pytest.approx(0.5)


# --- EMA -----------------------------------------------------------------------------------------


def test_ema_update_tau_0_copies_tau_1_freezes_and_mixes():
    online = torch.nn.Linear(3, 2)
    target = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 1.0)
    for p, b in zip(target.parameters(), before, strict=True):
        assert torch.equal(p, b)
    ema_update(target, online, 0.5)
    for p, b, o in zip(target.parameters(), before, online.parameters(), strict=True):
        torch.testing.assert_close(p, 0.5 * b + 0.5 * o)
    ema_update(target, online, 0.0)
    for p, o in zip(target.parameters(), online.parameters(), strict=True):
        assert torch.equal(p, o)
    assert all(p.grad is None for p in online.parameters())


def test_popo_loss_sequence_normalization_hand_computed():
    # two positives: lengths 1 and 2, w = [0.25, 0.75], ρ = 1 (is_level none);
    # per-sequence NLL means: 1 and (2 + 4) / 2 = 3 -> L_NLL = (0.25·1 + 0.75·3) / 2 = 1.25
    logp = t([[-1.0, 0.0], [-2.0, -4.0]])
    mask = t([[1.0, 0.0], [1.0, 1.0]])
    w = t([0.25, 0.75])
    pred = t([[1.0, 0.0], [1.0, 0.0]])
    ema = t([[1.0, 0.0], [0.0, 1.0]])  # cosines 1 and 0
    kw = dict(alpha=1.0, beta_ent=0.0, is_level="none", normalization="sequence")
    loss, m = popo_loss(logp, logp, mask, w, torch.zeros_like(logp), pred, ema, **kw)
    assert m["loss_nll"].item() == pytest.approx(1.25)
    # similarity: each sequence's own cosine, unweighted: −(1 + 0) / 2
    assert m["loss_sim"].item() == pytest.approx(-0.5)
    assert loss.item() == pytest.approx(0.75)
    # step normalisation of the same batch: token mean Σ w ρ (−log π) / 3, weighted similarity
    _, m = popo_loss(
        logp, logp, mask, w, torch.zeros_like(logp), pred, ema, **{**kw, "normalization": "step"}
    )
    assert m["loss_nll"].item() == pytest.approx((0.25 * 1 + 0.75 * 6) / 3)
    assert m["loss_sim"].item() == pytest.approx(-0.25)
