"""The demo model's tokenizer and HF directories (transformers side; vLLM is in test_demo_model_vllm)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from popo.common import synthetic
from popo.common.config import DemoModelConfig, ModelConfig, SyntheticTaskConfig
from popo.common.demo_model import (
    BUILD_INFO,
    build_hash,
    build_tokenizer,
    ensure_demo_model,
    make_model,
    sample_and_score,
)

TEXTS = ["17+58+6=", "\\boxed{81}", "a b  c\n\nd", "What is 3*(4+5)? \\boxed{27}", "é 😀 ü"]


def test_tokenizer_is_character_level():
    tok = build_tokenizer()
    assert tok.is_fast
    assert len(tok) == 258
    assert tok.eos_token_id == 256 and tok.pad_token_id == 257 and tok.bos_token_id is None
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == list(text.encode())  # one token per byte, no BOS, nothing merged
        assert tok.decode(ids) == text
    assert tok.decode([*b"12", tok.eos_token_id], skip_special_tokens=True) == "12"


def test_saved_tokenizer_loads_identically(random_model_dir):
    # transformers 5 loads a qwen2 directory's tokenizer through Qwen2Tokenizer, which rebuilds its
    # own pipeline around the stored vocabulary; it must encode exactly like ours.
    raw, loaded = build_tokenizer(), AutoTokenizer.from_pretrained(random_model_dir)
    for text in [*TEXTS, "\\boxed{81}<|endoftext|>"]:
        assert loaded(text).input_ids == raw(text).input_ids
        assert loaded.decode(loaded(text).input_ids) == text
    assert loaded.eos_token_id == raw.eos_token_id and loaded.pad_token_id == raw.pad_token_id


def test_random_model_loads_in_transformers(random_model_dir):
    names = {p.name for p in random_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(random_model_dir, dtype=torch.float32)
    assert model.config.model_type == "qwen2" and not model.config.tie_word_embeddings
    ids = torch.tensor([list(b"1+2=")])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, 4, 258) and torch.isfinite(logits).all()


def test_head_size_must_suit_vllm_cpu():
    with pytest.raises(ValueError, match="head sizes"):
        make_model(build_tokenizer(), hidden_size=64, num_heads=4)


def test_build_hash_ignores_cache_dir_but_not_recipe():
    synth = SyntheticTaskConfig()
    a = build_hash(ModelConfig(), synth)
    assert a == build_hash(ModelConfig(demo={"cache_dir": "/elsewhere"}), synth)
    assert a != build_hash(ModelConfig(demo={"seed": 1}), synth)
    assert a != build_hash(ModelConfig(), SyntheticTaskConfig(max_operand=50))


def test_tiny_build_is_atomic_and_cached(tmp_path):
    # A deliberately tiny recipe (few steps) to test the build / cache mechanics quickly.
    model_cfg = ModelConfig(
        demo=DemoModelConfig(
            cache_dir=str(tmp_path / "cache"),
            hidden_size=32,
            heads=1,
            kv_heads=1,
            layers=1,
            intermediate_size=64,
            max_steps=4,
            eval_every=2,
            eval_prompts=8,
            target_accuracy=0.99,
        )
    )
    synth = SyntheticTaskConfig(n_train=200, n_val=8, n_test=8)
    out = ensure_demo_model(model_cfg, synth)
    assert out.parent == tmp_path / "cache" and out.name == build_hash(model_cfg, synth)
    info = json.loads((out / BUILD_INFO).read_text())
    assert info["steps"] == 4 and len(info["val_curve"]) == 2
    assert 0.0 <= info["test"]["pass@1"] <= info["test"]["pass@8"] <= 1.0
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]  # no temp dir left behind
    mtime = (out / BUILD_INFO).stat().st_mtime_ns
    assert ensure_demo_model(model_cfg, synth) == out  # cached: not rebuilt
    assert (out / BUILD_INFO).stat().st_mtime_ns == mtime
    AutoModelForCausalLM.from_pretrained(out)


def test_demo_model_meets_its_targets(demo_model_dir):
    """The cached default demo model: within the base-accuracy band, with pass@8 well above pass@1."""
    info = json.loads((demo_model_dir / BUILD_INFO).read_text())
    assert 0.10 <= info["test"]["pass@1"] <= 0.50
    assert info["test"]["pass@8"] >= info["test"]["pass@1"] + 0.2
    # Re-measure independently of the build: a different sampling seed, a subset of the test split.
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    problems = synthetic.generate(SyntheticTaskConfig(), "test")[:200]
    correct = sample_and_score(
        model,
        tok,
        problems,
        n_samples=4,
        seed=1234,
        score=lambda gold, text: text == f"\\boxed{{{gold}}}",
    )
    acc = sum(map(sum, correct)) / (len(problems) * 4)
    assert 0.05 <= acc <= 0.6
