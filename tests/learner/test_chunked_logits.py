"""Block-wise vocabulary projection: same log-probs, entropies and gradients as the whole-batch
log-softmax, on tiny random Qwen2 and Llama (tied embeddings) models from transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from learner_helpers import VOCAB, tiny_qwen2

from popo.learner.model import (
    LogitSpec,
    collate,
    ema_forward,
    logit_spec,
    policy_forward,
    token_logp_entropy,
)


def tiny_llama_tied(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, VOCAB, int(n)) for n in rng.integers(2, 6, 5)]
    comps = [rng.integers(1, VOCAB, int(n)) for n in rng.integers(1, 9, 5)]
    return collate(prompts, comps, [np.zeros(len(c)) for c in comps])


def _loss_and_grads(model, batch, chunk_bytes, temperature=1.0):
    model.zero_grad(set_to_none=True)
    out = policy_forward(model, batch, temperature=temperature, chunk_bytes=chunk_bytes)
    # a loss touching every output with distinct weights, so a wrong block shows in the gradients
    w = torch.linspace(0.5, 1.5, out.logp.numel()).view_as(out.logp)
    loss = (w * out.logp).sum() + 0.3 * (w.flip(0) * out.entropy).sum() + out.features.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("make", [tiny_qwen2, tiny_llama_tied], ids=["qwen2", "llama_tied"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_blocks_match_whole_batch_values_and_gradients(make, temperature):
    model = make()
    batch = _batch(1)
    whole, g_whole = _loss_and_grads(model, batch, chunk_bytes=0, temperature=temperature)
    # 3 rows of V fp32 logits per block: many blocks, the last one partial
    blocks, g_blocks = _loss_and_grads(model, batch, 3 * 4 * VOCAB, temperature=temperature)
    assert batch.n_tokens > 3 * 3
    torch.testing.assert_close(blocks.logp, whole.logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(blocks.entropy, whole.entropy, rtol=0, atol=1e-5)
    assert g_whole.keys() == g_blocks.keys() and model.lm_head.weight.grad is not None
    for name, g in g_whole.items():
        torch.testing.assert_close(g_blocks[name], g, rtol=1e-5, atol=1e-5, msg=name)


def test_values_equal_the_models_own_logits_at_temperature():
    model = tiny_llama_tied().eval()
    batch = _batch(2)
    t = 0.6
    out = policy_forward(model, batch, temperature=t, chunk_bytes=2 * 4 * VOCAB)
    full = model(batch.input_ids, attention_mask=batch.attention_mask).logits
    lsm = torch.log_softmax(full.float() / t, -1)
    want = lsm.gather(1, batch.pred_pos[..., None].expand(-1, -1, VOCAB))  # [N, T, V]
    want_lp = want.gather(-1, batch.targets[..., None])[..., 0] * batch.mask
    want_ent = -(want.exp() * want).sum(-1) * batch.mask
    torch.testing.assert_close(out.logp, want_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy, want_ent, rtol=0, atol=1e-5)


def test_no_grad_and_ema_paths_are_blockwise_too():
    model = tiny_qwen2()
    batch = _batch(3)
    with torch.no_grad():
        want = policy_forward(model, batch, need_entropy=False, chunk_bytes=0).logp
    _, lp = ema_forward(model, batch, with_logp=True, chunk_bytes=4 * VOCAB)
    torch.testing.assert_close(lp, want, rtol=0, atol=1e-6)
    assert not lp.requires_grad


def test_training_forwards_build_no_kv_cache():
    model = tiny_qwen2()
    seen = []
    model.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True
    )
    batch = _batch(4)
    policy_forward(model, batch)
    ema_forward(model, batch, with_logp=True)
    assert seen == [False, False]


def test_logit_spec_reads_the_models_final_transforms():
    assert logit_spec(tiny_qwen2()) == LogitSpec()
    model = tiny_qwen2()
    model.config.final_logit_softcapping = 30.0
    model.config.logit_scale = 0.5
    spec = logit_spec(model, temperature=2.0)
    assert spec == LogitSpec(0.5, 30.0, 2.0)
    z = torch.tensor([[10.0, -100.0]])
    torch.testing.assert_close(spec.apply(z), torch.tanh(z * 0.5 / 30.0) * 30.0 / 2.0)
    with pytest.raises(ValueError, match="temperature"):
        logit_spec(model, temperature=0.0)


def test_token_logp_entropy_hand_computed():
    # lm_head = identity on 2 logits: z = h; log-softmax of [0, ln 3] = [ln 1/4, ln 3/4]
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    h = torch.tensor([[0.0, np.log(3.0)], [0.0, 0.0]], dtype=torch.float32)
    lp, ent = token_logp_entropy(head, h, torch.tensor([1, 0]), chunk_bytes=4 * 2)
    torch.testing.assert_close(lp, torch.tensor([np.log(0.75), np.log(0.5)], dtype=torch.float32))
    h1 = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    torch.testing.assert_close(ent, torch.tensor([h1, np.log(2.0)], dtype=torch.float32))


@pytest.mark.parametrize("micro_batch_tokens", [4096, 24], ids=["one_micro_batch", "several"])
def test_trainer_step_gradients_blockwise_equal_whole(micro_batch_tokens):
    from learner_helpers import make_groups

    from popo.common.config import LearnerConfig, algorithm_config
    from popo.learner.trainer import Trainer, flatten_groups, pack_micro_batches

    groups = make_groups(4, 4, seed=6)
    results = []
    for chunk_bytes in (0, 2 * 4 * VOCAB):
        lc = LearnerConfig(
            lr=1e-3, total_steps=10, device="cpu", micro_batch_tokens=micro_batch_tokens
        )
        ac = algorithm_config(predictor_hidden=16, feature_noise_std=0.0)
        tr = Trainer(tiny_qwen2(), lc, ac, max_completion_len=8)
        tr.chunk_bytes = chunk_bytes
        grads: list[torch.Tensor] = []
        tr.optimizer.register_step_pre_hook(
            lambda opt, *_, grads=grads, tr=tr: grads.extend(p.grad.clone() for p in tr.params)
        )
        results.append((tr.train_step(groups), grads))
    # several micro-batches: the head's gradient is added into the existing .grad in place
    n_micro = len(pack_micro_batches(flatten_groups(groups, "popo"), micro_batch_tokens))
    assert (n_micro > 1) == (micro_batch_tokens < 4096)
    (m1, g1), (m2, g2) = results
    for k in ("loss", "loss_nll", "loss_ent", "entropy", "ema_kl", "grad_norm"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


class _HookedLinear(torch.nn.Linear):
    """Any head other than a plain nn.Linear (an FSDP unit is one) takes the checkpointed path."""


def _head_grads(head, h0, targets, spec, chunk_bytes, backwards=1, **kw):
    h = h0.clone().requires_grad_()
    w = torch.linspace(0.5, 1.5, h.shape[0])
    for _ in range(backwards):
        lp, ent = token_logp_entropy(head, h, targets, spec=spec, chunk_bytes=chunk_bytes, **kw)
        ((w * lp).sum() + 0.3 * (w.flip(0) * ent).sum()).backward()
    grads = [h.grad, head.weight.grad] + ([head.bias.grad] if head.bias is not None else [])
    head.zero_grad(set_to_none=True)
    return lp.detach(), ent.detach(), *grads


@pytest.mark.parametrize(
    "spec", [LogitSpec(), LogitSpec(0.5, 3.0, 1.3)], ids=["plain", "scale_softcap_temperature"]
)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_blocked_head_analytic_gradients_equal_autograd(spec, bias):
    vocab, rows = 300, 3
    torch.manual_seed(0)
    head = torch.nn.Linear(16, vocab, bias=bias)
    hooked = _HookedLinear(16, vocab, bias=bias)
    hooked.load_state_dict(head.state_dict())
    h0, targets = torch.randn(23, 16) * 2, torch.randint(0, vocab, (23,))
    want = _head_grads(head, h0, targets, spec, 0)
    # two backwards: the second adds the head's gradient into the existing .grad in place
    for got, n in [
        (_head_grads(head, h0, targets, spec, rows * 4 * vocab), 1),
        (_head_grads(hooked, h0, targets, spec, rows * 4 * vocab), 1),
        (_head_grads(head, h0, targets, spec, rows * 4 * vocab, 2, grad_in_place=True), 2),
    ]:
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)
        for g, wg in zip(got[2:], want[2:], strict=True):
            torch.testing.assert_close(g, n * wg, rtol=1e-5, atol=1e-5)


def _allocations():
    """A dispatch mode recording the shape of every tensor an op allocates (not a view of, nor an
    in-place result on, one of its inputs), in `.sizes`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            seen = {
                t.untyped_storage().data_ptr()
                for a in [*args, *kwargs.values()]
                for t in (a if isinstance(a, (tuple, list)) else [a])
                if isinstance(t, torch.Tensor)
            }
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    self.sizes.append(tuple(t.shape))
            return out

    mode = Allocations()
    mode.sizes: list[tuple[int, ...]] = []
    return mode


def test_blocked_head_allocates_no_token_by_vocabulary_tensor_and_one_head_gradient():
    vocab, hidden, m, rows = 500, 8, 40, 4
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(m, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (m,))
    for in_place, head_grads in [(False, 1), (True, 0)]:
        with _allocations() as mode:
            lp, ent = token_logp_entropy(
                head, h, targets, chunk_bytes=rows * 4 * vocab, grad_in_place=in_place
            )
            (lp.sum() + ent.sum()).backward()
        # blocks of `rows` logits only, and one [V, H] gradient summed in place (none when it
        # goes straight into the existing .grad)
        assert max(n[0] for n in mode.sizes if len(n) == 2 and n[1] == vocab) == rows
        assert mode.sizes.count((vocab, hidden)) == head_grads, mode.sizes
    assert head.weight.grad is not None and h.grad is not None


@pytest.mark.parametrize(
    "make, padding_idx",
    [(tiny_qwen2, None), (tiny_qwen2, 0), (tiny_llama_tied, None)],
    ids=["qwen2", "qwen2_padding_idx", "llama_tied"],
)
def test_gradients_in_place_over_micro_batches_equal_autograds(make, padding_idx):
    # two backwards, as two micro-batches: the second adds the embedding's and the head's
    # gradients into the existing .grad; the reference is plain autograd, whole-batch logits
    batches = [_batch(5), _batch(6)]
    grads = []
    for kw in [{"chunk_bytes": 0}, {"chunk_bytes": 3 * 4 * VOCAB, "grad_in_place": True}]:
        model = make()
        model.get_input_embeddings().padding_idx = padding_idx  # collate pads with id 0
        for batch in batches:
            out = policy_forward(model, batch, **kw)
            w = torch.linspace(0.5, 1.5, out.logp.numel()).view_as(out.logp)
            (w * out.logp + 0.3 * w.flip(0) * out.entropy).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    want, got = grads
    assert want.keys() == got.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-5, msg=name)
    if padding_idx is not None:
        assert got["model.embed_tokens.weight"][padding_idx].abs().max() == 0


def test_tied_vocabulary_matrix_gets_one_gradient_tensor_in_place():
    # head and input embedding share the matrix: both backwards sum into the one .grad
    model = tiny_llama_tied()
    batch = _batch(7)
    with _allocations() as mode:
        out = policy_forward(model, batch, chunk_bytes=3 * 4 * VOCAB, grad_in_place=True)
        (out.logp.sum() + out.entropy.sum()).backward()
    assert mode.sizes.count(tuple(model.lm_head.weight.shape)) == 1
    assert model.lm_head.weight.grad is model.get_input_embeddings().weight.grad
