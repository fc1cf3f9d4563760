"""Prompt building for a model: a task item -> rendered prompt text -> token ids, the same for the
actor (vLLM's tokenizer) and the learner (transformers'), with a chat template applied exactly
once. The chat tokenizer is built here: the demo model's byte tokenizer given turn markers, a BOS
post-processor and a chat template, so nothing is downloaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from popo.common import synthetic
from popo.common.config import DataConfig
from popo.common.data import (
    Problem,
    encode_prompt,
    load_prompts,
    prompt_ids,
    render_problems,
    render_prompt,
    resolve_template,
)
from popo.common.demo_model import build_tokenizer

BOS, START, END = "<s>", "<|im_start|>", "<|im_end|>"
# A Llama-3-like template: it writes the BOS itself, and a default system turn when none is given
# (as SmolLM2's does).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a calculator.<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_tokenizer():
    """The demo byte tokenizer with BOS and turn markers as special tokens, a post-processor that
    adds BOS on a plain `encode` (so a double BOS would show), and CHAT_TEMPLATE."""
    from tokenizers import processors

    tok = build_tokenizer()
    tok.add_special_tokens({"bos_token": BOS, "additional_special_tokens": [START, END]})
    backend = tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.convert_tokens_to_ids(BOS))]
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def chat_tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, chat_tok) -> Path:
    out = tmp_path_factory.mktemp("chat-tokenizer")
    chat_tok.save_pretrained(out)
    return out


def test_fixture_tokenizer_adds_bos_on_plain_encode(chat_tok) -> None:
    # Guard of the test below: without add_special_tokens=False a BOS would be doubled.
    assert chat_tok.encode("1+1")[0] == chat_tok.bos_token_id


def test_chat_template_applied_exactly_once(chat_tok) -> None:
    cfg = DataConfig(source="sums")
    p = load_prompts(cfg, "train")[0]
    ids = prompt_ids(p, cfg, chat_tok)
    # transformers' own tokenized rendering of the same turn is the reference
    want = chat_tok.apply_chat_template(
        [{"role": "user", "content": p.problem}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]
    assert ids == list(want)
    assert ids.count(chat_tok.bos_token_id) == 1 and ids[0] == chat_tok.bos_token_id
    start = chat_tok.convert_tokens_to_ids(START)
    assert ids.count(start) == 3  # system, user, assistant: one template application
    text = chat_tok.decode(ids)
    assert text.count(p.problem) == 1
    assert text.endswith(f"{START}assistant\n")


def test_system_prompt_replaces_the_default_one(chat_tok) -> None:
    cfg = DataConfig(source="sums", system_prompt="Add the numbers.")
    text = chat_tok.decode(prompt_ids(load_prompts(cfg, "test")[0], cfg, chat_tok))
    assert text.count("Add the numbers.") == 1 and "calculator" not in text
    assert text.count(f"{START}system") == 1


def test_actor_and_learner_encode_identical_ids(chat_dir: Path) -> None:
    """The learner renders with transformers' tokenizer and leases the text; the actor encodes it
    with vLLM's tokenizer of the same directory (RolloutEngine.encode). Both must give the ids
    the learner would compute itself, for the sums task and for GSM8K text (unicode, newlines)."""
    from transformers import AutoTokenizer
    from vllm.tokenizers import get_tokenizer

    learner_tok = AutoTokenizer.from_pretrained(chat_dir)
    actor_tok = get_tokenizer(str(chat_dir))
    for cfg in (
        DataConfig(source="sums"),
        DataConfig(source="gsm8k", eval_size=20, system_prompt="Reason step by step."),
    ):
        problems = load_prompts(cfg, "test")[:20]
        leased = render_problems(problems, cfg, learner_tok)
        for raw, lease in zip(problems, leased, strict=True):
            learner_ids = prompt_ids(raw, cfg, learner_tok)
            assert encode_prompt(actor_tok, lease.problem) == learner_ids
            assert encode_prompt(learner_tok, lease.problem) == learner_ids
            assert learner_tok.decode(learner_ids).count(raw.problem) == 1


def test_demo_tokenizer_keeps_the_plain_format() -> None:
    tok = build_tokenizer()  # no chat template
    for source in ("synthetic", "sums"):
        cfg = DataConfig(source=source)
        assert resolve_template(cfg, tok) == "plain"
        p = load_prompts(cfg, "train")[0]
        ids = prompt_ids(p, cfg, tok)
        assert ids == tok.encode(p.problem) and len(ids) == len(p.problem)
    # a file source keeps its Qwen-math default; an explicit template always wins
    assert resolve_template(DataConfig(source="x.jsonl"), tok) == "qwen_math"
    assert (
        resolve_template(DataConfig(source="sums", template="plain"), chat_tokenizer()) == "plain"
    )
    assert resolve_template(DataConfig(source="synthetic"), chat_tokenizer()) == "chat"


def test_chat_template_without_one_is_an_error() -> None:
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt("1+1", "chat", build_tokenizer())


def test_sums_task_is_the_synthetic_split_asked_in_words() -> None:
    cfg = DataConfig(source="sums")
    train, test = load_prompts(cfg, "train"), load_prompts(cfg, "test")
    assert train == load_prompts(cfg, "train")  # seeded
    assert {p.problem for p in train}.isdisjoint(p.problem for p in test)
    plain = synthetic.generate(cfg.synthetic, "test")
    for s, q in zip(plain, test, strict=True):
        a, b = q.meta["terms"]
        assert q.problem == f"What is {a}+{b}? Put the answer in \\boxed{{}}."
        assert q.gold == s.gold == str(a + b) and s.problem == f"{a}+{b}="
        assert 0 <= a <= 99 and 0 <= b <= 99


def test_shipped_benchmark_source_holds_out_its_first_rows() -> None:
    cfg = DataConfig(source="gsm8k", eval_size=100)
    train, test = load_prompts(cfg, "train"), load_prompts(cfg, "test")
    assert len(test) == 100 and len(train) == 1319 - 100
    assert {p.prompt_id for p in train}.isdisjoint(p.prompt_id for p in test)
    assert test[0].problem.startswith("Janet")  # the file's first row
    # evaluated on, not trained on: every row
    both = DataConfig(source="sums", eval_source="gsm8k")
    assert len(load_prompts(both, "test")) == 1319


def test_rendered_problems_keep_ids_and_golds(chat_tok) -> None:
    raw = [Problem("a", "What is 1+2? Put the answer in \\boxed{}.", "3")]
    (p,) = render_problems(raw, DataConfig(source="sums"), chat_tok)
    assert (p.prompt_id, p.gold) == ("a", "3") and p.problem.startswith(BOS)


def test_prepare_model_names_the_extra_or_an_unknown_model(tmp_path: Path) -> None:
    import importlib.util

    def popo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "popo.deploy.cli", "prepare-model", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = popo("nosuch", f"--model.packaged_cache_dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip() == (
        "popo prepare-model: unknown packaged model 'nosuch' (known: smollm2)"
    )
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if not missing:
        pytest.skip("the real extra is installed: the missing-extra message cannot show")
    r = popo("smollm2", f"--model.packaged_cache_dir={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"popo prepare-model: model.path = smollm2: needs the optional package(s) "
        f"{', '.join(missing)}; install them with pip install '.[real]'"
    ]
    assert not (tmp_path / "smollm2").exists()


@pytest.mark.parametrize("name", ["smollm2-sums-cpu.toml", "smollm2-gsm8k-cpu.toml"])
def test_smollm2_configs_load_and_hold_out_their_eval_prompts(name: str) -> None:
    from popo.common.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "deploy" / "configs" / name)
    assert cfg.model.path == "smollm2" and cfg.learner.eval_every > 0
    train, test = load_prompts(cfg.data, "train"), load_prompts(cfg.data, "test")
    assert len(test) >= cfg.data.eval_size
    assert {p.problem for p in train}.isdisjoint(p.problem for p in test)
