"""The embedded demo model (docs/architecture.md, Embedded default): a character-level tokenizer and a tiny Qwen2.

No model hub is reachable here, so the project builds its own policy: a fast tokenizer over single
bytes (so one token per ASCII character) and a small `Qwen2ForCausalLM`, saved as
a Hugging Face directory (safetensors + tokenizer.json) that transformers and vLLM's CPU build both
load. Torch and transformers are imported inside the functions so that importing this module (e.g.
from the CLI before config parsing) stays cheap.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from transformers import PreTrainedTokenizerFast

    from popo.common.config import DemoModelConfig, ModelConfig, RunConfig, SyntheticTaskConfig
    from popo.common.data import Problem

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
"""Ids 256 and 257, after the 256 byte tokens. No BOS: Qwen models use none either."""
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Attention head sizes vLLM 0.32's CPU backend accepts (`CPUAttentionBackend.get_supported_head_sizes`)."""

# Qwen-style pre-tokenizer split. transformers 5 loads any `qwen2` model's tokenizer.json through
# `Qwen2Tokenizer`, which rebuilds this exact pipeline (Split + ByteLevel, NFC, ByteLevel decoder)
# around the stored vocab; building ours the same way makes both loads encode identically.
_QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: one token per byte (so one per ASCII character).

    The vocabulary is the 256 byte-level symbols (token id = byte value) plus two special tokens; the BPE model has no merges, so nothing is ever fused
    and every UTF-8 string is encodable (`len(encode(s)) == len(s.encode())`, no BOS). The pipeline
    is Qwen2's, so transformers' `Qwen2Tokenizer` and vLLM load it unchanged.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = _byte_symbols()
    vocab = {sym: i for i, sym in enumerate(byte_symbols)}
    vocab.update({tok: len(byte_symbols) + i for i, tok in enumerate(SPECIAL_TOKENS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        model_max_length=1 << 30,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def _byte_symbols() -> list[str]:
    """The GPT-2 byte-to-unicode map, in byte order: symbol i stands for byte i."""
    # Printable latin-1 bytes map to themselves; the rest are shifted past 255 (GPT-2's scheme).
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, shift = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + shift)
            shift += 1
    return [out[b] for b in range(256)]


def make_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
):
    """A randomly initialised `Qwen2ForCausalLM` (float32) sized for `tokenizer`.

    Untied embeddings: the learner publishes every tensor by name and vLLM's in-place reload
    then needs no special case for a shared lm_head. The head size `hidden_size / num_heads` must be
    one vLLM's CPU attention supports (`CPU_HEAD_SIZES`); 16, for instance, fails at the first step.
    """
    head_size, rem = divmod(hidden_size, num_heads)
    if rem or head_size not in CPU_HEAD_SIZES:
        raise ValueError(
            f"hidden_size / num_heads = {hidden_size}/{num_heads} must be one of {CPU_HEAD_SIZES} "
            "(vLLM CPU attention head sizes)"
        )
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    )
    return model


def save_model_dir(model, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """Write `model` (safetensors) + tokenizer + generation config into `out_dir` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def save_random_model(out_dir: str | Path, *, seed: int = 0, **sizes: int) -> Path:
    """Save a random-init tiny Qwen2 + the character tokenizer as a HF directory; return it.
    `sizes` are `make_model`'s (hidden_size, num_layers, num_heads, ...; its defaults otherwise).

    For tests that need a real model quickly (well under 2 s); loads in transformers and in
    `vllm.LLM(model=dir, dtype="float32", enforce_eager=True)`.
    """
    tokenizer = build_tokenizer()
    model = make_model(tokenizer, seed=seed, **sizes)
    out = save_model_dir(model, tokenizer, out_dir)
    (out / "build_info.json").write_text(
        json.dumps({"kind": "random", "seed": seed, "params": model.num_parameters()}, indent=2)
    )
    return out


# ---------------------------------------------------------------------------------------------
# The warm-started demo model
# ---------------------------------------------------------------------------------------------

BUILD_VERSION = 1
"""Bumped whenever the build recipe changes, so cached models of an older recipe are rebuilt."""
BUILD_INFO = "build_info.json"
"""Written last into a demo model directory: a directory without it is not a finished build."""


def build_params(model_cfg: ModelConfig, synth_cfg: SyntheticTaskConfig) -> dict[str, Any]:
    """Everything that determines the built model (and nothing else: not the cache location)."""
    # keyed `demo_<field>`, the recipe's names before it had its own table: cached builds keep
    # their hash
    params = {f"demo_{k}": v for k, v in model_cfg.demo.model_dump().items() if k != "cache_dir"}
    return {"version": BUILD_VERSION, "model": params, "synthetic": synth_cfg.model_dump()}


def build_hash(model_cfg: ModelConfig, synth_cfg: SyntheticTaskConfig) -> str:
    """Short stable hash of `build_params`: the demo model's cache key."""
    blob = json.dumps(build_params(model_cfg, synth_cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def ensure_demo_model(model_cfg: ModelConfig, synth_cfg: SyntheticTaskConfig) -> Path:
    """The cached demo model directory `demo.cache_dir/<build_hash>`, built first if absent.

    A file lock serialises concurrent callers (two test sessions, two launchers): the second one
    waits and then finds the finished directory instead of building it again.
    """
    cache = Path(model_cfg.demo.cache_dir)
    out = cache / build_hash(model_cfg, synth_cfg)
    if (out / BUILD_INFO).is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / BUILD_INFO).is_file():
            build_demo_model(model_cfg, synth_cfg, out)
    return out


def build_demo_model(
    model_cfg: ModelConfig,
    synth_cfg: SyntheticTaskConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
) -> Path:
    """Build the warm-started demo model into `out_dir` (which must not exist) and return it.

    Setup: the character tokenizer and a seeded random Qwen2 (`model_cfg.demo`). Train: AdamW on
    the synthetic train split, cross-entropy on the completion `\\boxed{N}<eos>` only, until the
    sampled accuracy (temperature 1, one sample per problem) on the val split reaches
    `demo.target_accuracy`, or `demo.max_steps`. Measure: pass@1 and pass@8 on the test split.
    Save: everything is written into a temporary sibling directory that is renamed into place last,
    so a crash never leaves a directory that looks finished.
    """
    import torch

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or use ensure_demo_model")
    log = progress_logger(progress)
    t_start = time.monotonic()
    # One thread, always: results stay bit-reproducible (reduction order depends on the thread
    # count), and on a shared 2-core machine two OpenMP threads spin against other processes; a
    # step measured 13x slower with 2 threads than with 1 under load (0.11 s vs 1.4 s, batch 64).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = _build(model_cfg, synth_cfg, out, log, t_start)
    finally:
        torch.set_num_threads(threads)
    log(f"demo model saved to {out} in {info['build_seconds']:.1f} s")
    return out


def _build(model_cfg: ModelConfig, synth_cfg: SyntheticTaskConfig, out: Path, log, t_start: float):
    """The build proper (setup, warm-start, measure, atomic save); returns the build info."""
    import torch

    from popo.common import synthetic

    torch.manual_seed(model_cfg.demo.seed)

    tokenizer = build_tokenizer()
    model = make_model(
        tokenizer,
        seed=model_cfg.demo.seed,
        hidden_size=model_cfg.demo.hidden_size,
        num_layers=model_cfg.demo.layers,
        num_heads=model_cfg.demo.heads,
        num_kv_heads=model_cfg.demo.kv_heads,
        intermediate_size=model_cfg.demo.intermediate_size,
        max_position_embeddings=model_cfg.max_model_len,
    )
    n_params = model.num_parameters()
    train = synthetic.generate(synth_cfg, "train")
    val = synthetic.generate(synth_cfg, "val")[: model_cfg.demo.eval_prompts]
    test = synthetic.generate(synth_cfg, "test")
    log(f"demo model: {n_params / 1e6:.2f} M parameters, {len(train)} train problems")

    steps, val_curve = _warm_start(model, tokenizer, train, val, model_cfg.demo, log)
    train_s = time.monotonic() - t_start

    model.eval()
    t_eval = time.monotonic()
    test_stats = _sampled_accuracy(
        model, tokenizer, test, n_samples=8, seed=model_cfg.demo.seed + 1
    )
    log(
        f"test: pass@1 {test_stats['pass@1']:.3f}  pass@8 {test_stats['pass@8']:.3f}  "
        f"({len(test)} problems x 8 samples, {time.monotonic() - t_eval:.1f} s)"
    )
    info = {
        "kind": "demo",
        "build_hash": build_hash(model_cfg, synth_cfg),
        "params": n_params,
        "steps": steps,
        "train_seconds": round(train_s, 2),
        "val_curve": val_curve,
        "test": test_stats,
        "build_params": build_params(model_cfg, synth_cfg),
        "torch": torch.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_dir(model, tokenizer, tmp)
    info["build_seconds"] = round(time.monotonic() - t_start, 2)
    commit_build(tmp, out, info)
    return info


def commit_build(tmp: Path, out: Path, info: dict[str, Any]) -> None:
    """Finish a model build written into `tmp`: `info` as its BUILD_INFO (written last), every
    file fsynced, then `tmp` renamed to `out`, so a crash never leaves a directory that looks
    finished."""
    from popo.common.weights import fsync_dir

    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    os.rename(tmp, out)
    fsync_dir(out.parent)


def progress_logger(enabled: bool):
    def log(line: str) -> None:
        if enabled:
            print(line, file=sys.stderr, flush=True)

    return log


def _encode_batch(tokenizer, problems, device="cpu"):
    """Right-padded training batch: input ids, labels (-100 outside the completion), mask.

    Sequence i is `prompt_i + target_i + <eos>`; all three tensors are [B, T_max].
    """
    import torch

    seqs, n_prompt = [], []
    for p in problems:
        prompt_ids = tokenizer.encode(p.problem, add_special_tokens=False)
        target_ids = tokenizer.encode(p.meta["target"], add_special_tokens=False)
        seqs.append(prompt_ids + target_ids + [tokenizer.eos_token_id])
        n_prompt.append(len(prompt_ids))
    t_max = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t_max), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), t_max), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), t_max), dtype=torch.long)
    for i, (s, k) in enumerate(zip(seqs, n_prompt, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, k : len(s)] = torch.tensor(s[k:])
        mask[i, : len(s)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def _warm_start(model, tokenizer, train, val, cfg: DemoModelConfig, log) -> tuple[int, list[dict]]:
    """Supervised steps until val sampled accuracy >= target; returns (steps, val curve)."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    curve: list[dict] = []
    t0 = time.monotonic()
    order = torch.randperm(len(train), generator=gen)
    cursor = 0
    for step in range(1, cfg.max_steps + 1):
        model.train()
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=gen), 0
        batch = [train[i] for i in order[cursor : cursor + cfg.batch_size].tolist()]
        cursor += cfg.batch_size
        ids, labels, mask = _encode_batch(tokenizer, batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            model.eval()
            acc = _sampled_accuracy(model, tokenizer, val, n_samples=1, seed=cfg.seed + step)
            elapsed = time.monotonic() - t0
            curve.append(
                {
                    "step": step,
                    "seconds": round(elapsed, 2),
                    "loss": round(loss.item(), 4),
                    "val_acc": acc["pass@1"],
                }
            )
            log(
                f"warm-start step {step:5d}  loss {loss.item():.4f}  "
                f"val sampled acc {acc['pass@1']:.3f}  {elapsed:6.1f} s"
            )
            if acc["pass@1"] >= cfg.target_accuracy:
                return step, curve
    return cfg.max_steps, curve


def _sampled_accuracy(model, tokenizer, problems, *, n_samples: int, seed: int) -> dict[str, Any]:
    """Sample `n_samples` completions per problem at temperature 1 and score them with math-verify.

    Returns pass@1 (mean correctness over all samples), pass@k (fraction of problems with at least
    one correct sample, k = n_samples) and per-term-count pass@1.
    """
    from popo.common.grading import is_correct  # math-verify only when sampling

    correct = sample_and_score(
        model, tokenizer, problems, n_samples=n_samples, seed=seed, score=is_correct
    )
    per_problem = [sum(c) for c in correct]
    total = len(problems) * n_samples
    by_terms: dict[str, list[int]] = {}
    for p, c in zip(problems, per_problem, strict=True):
        by_terms.setdefault(str(len(p.meta.get("terms", []))), []).append(c)
    return {
        "pass@1": round(sum(per_problem) / total, 4),
        f"pass@{n_samples}": round(sum(c > 0 for c in per_problem) / len(problems), 4),
        "pass@1_by_terms": {
            k: round(sum(v) / (len(v) * n_samples), 4) for k, v in sorted(by_terms.items())
        },
        "n_problems": len(problems),
        "n_samples": n_samples,
    }


def sample_and_score(
    model,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[Problem],
    *,
    n_samples: int,
    seed: int,
    score: Callable[[str, str], bool],
    max_new_tokens: int = 16,
) -> list[list[bool]]:
    """Sample completions with the transformers model (temperature 1, no top-k / top-p) and score
    each one: returns `correct[i][j] = score(problems[i].gold, completion_text)`, j < n_samples.
    Seeded through a forked RNG, so the caller's torch RNG state is left untouched.

    Prompts are grouped by token length so no padding is needed (exact positions, no mask).
    """
    import torch

    gen_cfg = dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    by_len: dict[int, list[int]] = {}
    from popo.common.data import encode_prompt

    encoded = [encode_prompt(tokenizer, p.problem) for p in problems]
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    correct: list[list[bool]] = [[] for _ in problems]
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for _, idx in sorted(by_len.items()):
            prompt = torch.tensor([encoded[i] for i in idx]).repeat_interleave(n_samples, 0)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **gen_cfg)
            texts = tokenizer.batch_decode(out[:, prompt.shape[1] :], skip_special_tokens=True)
            for row, text in enumerate(texts):
                i = idx[row // n_samples]
                correct[i].append(bool(score(problems[i].gold, text)))
    return correct


def check_model_dir(path: str | Path, key: str = "model.path") -> Path:
    """`path` if it is a readable Hugging Face model directory (its config.json parses as a JSON
    object); else ConfigError, one line naming the setting `key` it came from."""
    from popo.common.config import ConfigError

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(
            f"{key} = {path}: not a Hugging Face model directory (no config.json)"
        ) from None
    except OSError as e:
        raise ConfigError(f"{key} = {path}: unreadable ({e.strerror or e})") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{key} = {path}: config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key} = {path}: config.json is not a JSON object")
    return path


def resolve_model_dir(cfg: RunConfig) -> Path:
    """The policy's model directory: `model.path` (checked by check_model_dir), the embedded
    demo model (built and cached on first use) when it is `auto`, or a packaged model (built and
    cached on first use, `popo.common.packaged_models`) when it is one's name."""
    from popo.common.packaged_models import ensure_packaged_model, is_packaged

    if is_packaged(cfg.model.path):
        return ensure_packaged_model(cfg.model.path, cfg.model.packaged_cache_dir)
    if cfg.model.path != "auto":
        return check_model_dir(cfg.model.path)
    return Path(ensure_demo_model(cfg.model, cfg.data.synthetic))
