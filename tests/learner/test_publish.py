"""Weight publishing: HF names, sha256, atomic versions, retention, parity probe, vLLM reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from learner_helpers import make_groups, tiny_qwen2
from safetensors import safe_open
from safetensors.torch import load_file

from popo.common.config import LearnerConfig, algorithm_config
from popo.common.demo_model import save_random_model
from popo.common.messages import WeightsReady, decode, encode, unpack_f32, unpack_ids
from popo.common.weights import WeightStore, cast_for_publish, verify_weights
from popo.learner.model import sequence_logprobs
from popo.learner.publish import (
    PublishedChange,
    hf_state_dict,
    publish_dtype,
    publish_weights,
)
from popo.learner.trainer import Trainer


def _trained(model_dir, steps=2, lr=3e-2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lc = LearnerConfig(lr=lr, warmup_ratio=0.0, total_steps=10, device="cpu")
    ac = algorithm_config(predictor_hidden=16, ema_tau=0.5)
    tr = Trainer(model, lc, ac, max_completion_len=8)
    for s in range(steps):
        tr.train_step(make_groups(4, 4, seed=s))
    return tr


def test_publish_names_checksum_retention_probe(tmp_path):
    src = save_random_model(tmp_path / "model", seed=0)
    tr = _trained(src)
    root = tmp_path / "weights"
    probe = (np.array([1, 20, 21, 22]), np.array([30, 31, 32]))
    msgs = [
        publish_weights(tr.policy, root, v, source_dir=src, keep=2, probe=probe) for v in (1, 2, 3)
    ]
    assert WeightStore(root).versions() == [2, 3]
    msg = decode(encode(msgs[-1]), WeightsReady)
    verify_weights(f"{msg.path}/model.safetensors", msg.sha256, msg.nbytes)
    # every HF tensor name of the source model, nothing else (no EMA, no predictor)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        src_keys = set(f.keys())
    published = load_file(f"{msg.path}/model.safetensors")
    assert set(published) == src_keys
    for k, v in tr.policy.state_dict().items():
        assert torch.equal(published[k], v), k
    ema = tr.ema.state_dict()
    assert any(not torch.equal(published[k], ema[k]) for k in published)
    names = {p.name for p in (root / "v3").iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors.sha256"} <= names
    # probe: the learner's log-probs of the continuation
    assert msg.probe_prompt_len == 4
    assert unpack_ids(msg.probe_token_ids).tolist() == [1, 20, 21, 22, 30, 31, 32]
    want = sequence_logprobs(tr.policy, *probe)
    np.testing.assert_array_equal(unpack_f32(msg.probe_logprobs), want)
    # protected versions survive pruning; versions are immutable
    publish_weights(tr.policy, root, 4, keep=1, protect=[2])
    assert WeightStore(root).versions() == [2, 4]
    with pytest.raises(FileExistsError):
        publish_weights(tr.policy, root, 4)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_publish_writes_shared_tensors_and_casts(tmp_path, dtype):
    model = tiny_qwen2()
    # tied by hand while the config says untied: both names stay in the state dict, one storage
    model.lm_head.weight = model.model.embed_tokens.weight
    msg = publish_weights(model, tmp_path / "weights", 1, dtype=dtype)
    assert msg is not None
    verify_weights(f"{msg.path}/model.safetensors", msg.sha256, msg.nbytes)
    got = load_file(f"{msg.path}/model.safetensors")
    want = hf_state_dict(model, dtype)
    assert set(got) == set(want) and "lm_head.weight" in got
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_published_change_counts_sampled_elements_the_cast_keeps_changed():
    w = {"a": torch.ones(10), "b": torch.full((2, 3), 0.5)}
    moved = {"a": w["a"] + torch.tensor([1e-4] * 8 + [1e-1] * 2), "b": w["b"] + 1e-4}
    # bfloat16 spacing is 2^-7 at 1.0 and 2^-8 at 0.5: only the two +0.1 elements survive the cast
    bf16 = PublishedChange()
    bf16.update(w, torch.bfloat16)
    assert bf16.fraction is None  # nothing to compare with yet
    bf16.update(moved, torch.bfloat16)
    assert bf16.fraction == pytest.approx(2 / 16)
    f32 = PublishedChange()
    for t in (w, moved):
        f32.update(t, None)
    assert f32.fraction == 1.0
    # the sample: at most `per_tensor` elements a tensor, evenly strided
    few = PublishedChange(per_tensor=4)
    few.update({"a": torch.zeros(100)}, None)
    few.update({"a": torch.arange(100.0) % 25}, None)  # zero at 0, 25, 50, 75: the sampled ones
    assert few.fraction == 0.0
    # dithered versions: the sample rounds as the writer rounds those elements, so a drift of a
    # tenth of the spacing shows in about a tenth of them, where rounding to nearest shows none
    x = {"c": torch.full((40_960,), 1.0 + 0.3 * 2**-7)}  # sampled: every 10th element
    drift = {"c": x["c"] + 0.1 * 2**-7}
    dithered, nearest = PublishedChange(), PublishedChange()
    for t in (x, drift):
        dithered.update(t, torch.bfloat16, "dither")
        nearest.update(t, torch.bfloat16)
    assert nearest.fraction == 0.0 and dithered.fraction == pytest.approx(0.1, abs=0.02)
    written = [cast_for_publish(t["c"], torch.bfloat16, "dither", "c")[::10] for t in (x, drift)]
    assert dithered.fraction == (written[0] != written[1]).float().mean().item()


def test_publish_weights_tracks_the_change_between_versions(tmp_path):
    src = save_random_model(tmp_path / "model", seed=0)
    tr = _trained(src, steps=1, lr=3e-2)
    change = PublishedChange()
    publish_weights(tr.policy, tmp_path / "w", 1, change=change, dtype=torch.bfloat16)
    publish_weights(tr.policy, tmp_path / "w", 2, change=change, dtype=torch.bfloat16)
    assert change.fraction == 0.0  # same weights
    tr.train_step(make_groups(4, 4, seed=5))
    publish_weights(tr.policy, tmp_path / "w", 3, change=change, dtype=torch.bfloat16)
    assert 0.0 < change.fraction <= 1.0
    # dithered versions: bfloat16 files, identical while the weights are
    a, b = (
        publish_weights(tr.policy, tmp_path / "w", v, dtype=torch.bfloat16, rounding="dither")
        for v in (4, 5)
    )
    assert a.sha256 == b.sha256
    got = load_file(f"{a.path}/model.safetensors")
    want = hf_state_dict(tr.policy, torch.bfloat16, "dither")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
    assert any(
        not torch.equal(got[k], v.to(torch.bfloat16))
        for k, v in tr.policy.state_dict().items()
        if k in got
    )


def _engine(src, dtype: str):
    """An offline vLLM CPU engine on `src` (no prefix cache: every call recomputes)."""
    from vllm import LLM

    return LLM(
        model=str(src),
        dtype=dtype,
        enforce_eager=True,
        seed=0,
        enable_prefix_caching=False,
        max_model_len=256,
    )


def _vllm_logprobs(llm, prompt, cont):
    from vllm import SamplingParams, TokensPrompt

    ids = [int(x) for x in np.concatenate([prompt, cont])]
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0]
    plp = out.prompt_logprobs
    return np.array([plp[i][ids[i]].logprob for i in range(len(prompt), len(ids))])


@pytest.mark.vllm
def test_vllm_reload_matches_learner_logprobs(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")

    src = save_random_model(tmp_path / "model", seed=0)
    tr = _trained(src, steps=3)
    prompt, cont = np.array([1, 40, 41, 23, 12]), np.array([50, 51, 14, 15, 77, 2])
    msg = publish_weights(tr.policy, tmp_path / "weights", 1, source_dir=src, probe=(prompt, cont))
    learner_lp = unpack_f32(msg.probe_logprobs)

    llm = _engine(src, "float32")
    before = _vllm_logprobs(llm, prompt, cont)
    assert np.abs(before - learner_lp).max() > 1e-2  # the trained policy differs from the base
    llm.collective_rpc("reload_weights", kwargs={"weights_path": msg.path})
    after = _vllm_logprobs(llm, prompt, cont)
    print(f"parity after reload: max |Δ log p| = {np.abs(after - learner_lp).max():.2e}")
    np.testing.assert_allclose(after, learner_lp, atol=2e-4)


@pytest.mark.vllm
def test_vllm_reloads_a_bf16_publish_exactly(tmp_path, monkeypatch):
    """A bf16 engine reloading bf16 files: the trained policy moves its log-probs, and the base
    model published in bf16 brings back exactly the log-probs of the engine's own initial load
    (which cast the same float32 weights to bf16), so every tensor arrived bit for bit."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoModelForCausalLM

    src = save_random_model(tmp_path / "model", seed=0)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tr = _trained(src, steps=3)
    prompt, cont = np.array([1, 40, 41, 23, 12]), np.array([50, 51, 14, 15, 77, 2])
    llm = _engine(src, "bfloat16")
    before = _vllm_logprobs(llm, prompt, cont)
    root = tmp_path / "weights"
    trained = publish_weights(tr.policy, root, 1, source_dir=src, dtype=torch.bfloat16)
    llm.collective_rpc("reload_weights", kwargs={"weights_path": trained.path})
    assert np.abs(_vllm_logprobs(llm, prompt, cont) - before).max() > 1e-2
    again = publish_weights(base, root, 2, source_dir=src, dtype=torch.bfloat16)
    llm.collective_rpc("reload_weights", kwargs={"weights_path": again.path})
    np.testing.assert_array_equal(_vllm_logprobs(llm, prompt, cont), before)


@pytest.mark.parametrize(
    "publish, served, device, want",
    [
        ("auto", "auto", "cpu", torch.float32),  # CPU engines serve fp32
        ("auto", "auto", "cuda", torch.bfloat16),  # GPU engines serve bf16
        ("auto", "float16", "cuda", torch.float16),  # the actors' explicit dtype
        ("auto", "bfloat16", "cpu", torch.bfloat16),
        ("float32", "auto", "cuda", torch.float32),  # an explicit publish dtype wins
        ("bfloat16", "float32", "cpu", torch.bfloat16),
    ],
)
def test_publish_dtype_defaults_to_the_actors_serving_dtype(publish, served, device, want):
    assert publish_dtype(publish, served, device) == want


@pytest.mark.vllm
def test_vllm_fp32_engine_loads_a_bf16_publish_as_its_rounded_values(tmp_path, monkeypatch):
    """An fp32 engine reloading a bf16 version (vLLM copies each tensor into its fp32 parameter,
    casting it) serves exactly the bf16-rounded policy: the same log-probs, bit for bit, as the
    fp32 version of the rounded weights — half the bytes, nothing lost beyond the rounding."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")

    src = save_random_model(tmp_path / "model", seed=0)
    tr = _trained(src, steps=2)
    prompt, cont = np.array([1, 40, 41, 23, 12]), np.array([50, 51, 14, 15, 77, 2])
    llm = _engine(src, "float32")
    root = tmp_path / "weights"
    half = publish_weights(tr.policy, root, 1, source_dir=src, dtype=torch.bfloat16)
    assert half.nbytes < 0.51 * (src / "model.safetensors").stat().st_size
    llm.collective_rpc("reload_weights", kwargs={"weights_path": half.path})
    from_bf16 = _vllm_logprobs(llm, prompt, cont)
    with torch.no_grad():
        for p in tr.policy.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    rounded = publish_weights(tr.policy, root, 2, source_dir=src, dtype=torch.float32)
    llm.collective_rpc("reload_weights", kwargs={"weights_path": rounded.path})
    np.testing.assert_array_equal(from_bf16, _vllm_logprobs(llm, prompt, cont))
    learner = sequence_logprobs(tr.policy, prompt, cont)
    np.testing.assert_allclose(from_bf16, learner, atol=2e-4)
