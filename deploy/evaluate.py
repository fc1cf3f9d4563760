"""`popo eval`: greedy pass@1, sampled avg@k and unbiased pass@k of a model on a benchmark, with vLLM.

The benchmark is the name of a shipped benchmark (math500, aime24, aime25, amc23, gsm8k; see
common/benchmarks/README.md), a JSONL / parquet file (field names from the config's `data` section,
or known from the file name for copies of the shipped files) or the synthetic task's held-out split. Completions are scored by the verifier's math-verify pool (worker
processes with a hard time limit), exactly as in training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from popo.common.config import ConfigError, RunConfig
from popo.common.data import (
    BENCHMARKS,
    Problem,
    benchmark_path,
    drop_too_long,
    encode_prompt,
    load_problems,
    load_prompts,
    render_problems,
)
from popo.common.metrics import paired_p_value, pass_at_k

log = logging.getLogger("popo.eval")


def load_benchmark(cfg: RunConfig, benchmark: str, limit: int | None) -> list[Problem]:
    if benchmark in ("synthetic", "sums"):
        return load_prompts(cfg.data.model_copy(update={"source": benchmark}), "test")[:limit]
    path = benchmark_path(benchmark) if benchmark in BENCHMARKS else Path(benchmark)
    known = BENCHMARKS.get(path.stem)
    if known is not None:
        return load_problems(path, limit=limit, **known)
    d = cfg.data
    return load_problems(
        path,
        prompt_field=d.prompt_field,
        answer_field=d.answer_field,
        answer_format=d.answer_format,
        id_field=d.id_field,
        limit=limit,
    )


def score(cfg: RunConfig, golds: list[str], texts: list[str]) -> list[bool]:
    """math-verify verdicts of `texts` against `golds` (positive -> True) in the scoring pool."""
    from popo.verifier.pool import PoolLimits, ScoringPool

    v = cfg.verifier
    pool = ScoringPool(
        v.num_workers,
        PoolLimits(v.timeout_s, v.max_completion_chars, v.max_brace_depth, v.worker_memory_mib),
    )
    pool.start()
    try:
        for i, (g, t) in enumerate(zip(golds, texts, strict=True)):
            pool.submit(i, g, t)
        verdicts: dict[int, str] = {}
        while len(verdicts) < len(texts):
            for r in pool.poll(1.0):
                verdicts[r.task_id] = r.verdict
    finally:
        pool.close()
    return [verdicts[i] == "positive" for i in range(len(texts))]


def evaluate(
    cfg: RunConfig, model_dir: Path, benchmark: str, k: int, limit: int | None = None
) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from popo.actors.engine import resolve_dtype

    a = cfg.actor
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = cfg.data
    if benchmark in ("synthetic", "sums"):  # an embedded task: its own format, not the file's
        data = data.model_copy(update={"source": benchmark, "template": "auto"})
    problems = render_problems(load_benchmark(cfg, benchmark, limit), data, tokenizer)
    budget = cfg.model.max_model_len - a.max_tokens
    problems, too_long = drop_too_long(problems, lambda t: len(encode_prompt(tokenizer, t)), budget)
    if too_long:
        log.warning(
            "%d prompts are longer than max_model_len - max_tokens = %d tokens: skipped",
            too_long,
            budget,
        )
    if not problems:
        raise ValueError(
            f"no prompt of {benchmark} fits in {budget} tokens (raise --model.max_model_len)"
        )
    prompts = [TokensPrompt(prompt_token_ids=encode_prompt(tokenizer, p.problem)) for p in problems]
    t0 = time.time()
    # The CPU engine sizes its KV cache from the environment (GiB, whole numbers); as in the actor.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(a.kv_cache_gib)))
    llm = LLM(
        model=str(model_dir),
        dtype=resolve_dtype(cfg.model.dtype),
        enforce_eager=a.enforce_eager,
        max_model_len=cfg.model.max_model_len,
        seed=a.seed,
        tensor_parallel_size=a.tensor_parallel_size,
        gpu_memory_utilization=a.gpu_memory_utilization,
    )
    greedy = llm.generate(
        prompts, SamplingParams(n=1, temperature=0.0, max_tokens=a.max_tokens, stop=a.stop or None)
    )
    sampled = llm.generate(
        prompts,
        SamplingParams(
            n=k,
            temperature=a.temperature,
            top_p=a.top_p,
            max_tokens=a.max_tokens,
            stop=a.stop or None,
            # No per-request seed: on vLLM's CPU build a seeded request dies when the engine
            # splits a long prefill over steps. `LLM(seed=...)` seeds the engine, as in the actor.
        ),
    )
    gen_s = time.time() - t0
    golds = [p.gold for p in problems]
    g_ok = score(cfg, golds, [o.outputs[0].text for o in greedy])
    s_outs = [c for o in sampled for c in o.outputs]
    s_texts = [c.text for c in s_outs]
    s_ok = score(cfg, [g for g in golds for _ in range(k)], s_texts)
    per_prompt = [sum(s_ok[i * k : (i + 1) * k]) for i in range(len(problems))]
    result = {
        "benchmark": benchmark,
        "model": str(model_dir),
        "prompts": len(problems),
        "skipped_too_long": too_long,
        "k": k,
        "temperature": a.temperature,
        "pass@1_greedy": sum(g_ok) / len(problems),
        f"avg@{k}": sum(s_ok) / len(s_ok),
        f"pass@{k}": sum(pass_at_k(k, c, k) for c in per_prompt) / len(problems),
        "pass@1_sampled": sum(pass_at_k(k, c, 1) for c in per_prompt) / len(problems),
        # Length and the share cut off at max_tokens: a low score with most completions capped
        # says the budget, not only the model, limits the answers.
        "mean_completion_tokens": sum(len(c.token_ids) for c in s_outs) / len(s_outs),
        "capped": sum(c.finish_reason == "length" for c in s_outs) / len(s_outs),
        "generate_seconds": gen_s,
        "seconds": time.time() - t0,
        # per prompt, for a paired comparison with another evaluation (`--baseline`)
        "prompt_ids": [p.prompt_id for p in problems],
        "per_prompt": [[c, k] for c in per_prompt],
    }
    return result


def load_baseline(path: Path) -> dict[str, Any]:
    """An earlier `popo eval --out` result, checked before any model is loaded."""
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--baseline {path}: not a readable popo eval result ({e})") from None
    if not isinstance(r, dict) or "per_prompt" not in r or "prompt_ids" not in r:
        raise ConfigError(f"--baseline {path}: no per-prompt results (written by popo eval --out)")
    return r


def compare(result: dict[str, Any], baseline: dict[str, Any]) -> str:
    """The change from `baseline` on the prompts both evaluated, with its paired p-value."""
    before = dict(zip(baseline["prompt_ids"], baseline["per_prompt"], strict=True))
    pairs = [
        (before[i], now)
        for i, now in zip(result["prompt_ids"], result["per_prompt"], strict=True)
        if i in before
    ]
    if not pairs:
        return "against the baseline: no prompt in common"
    b, a = [x for x, _ in pairs], [y for _, y in pairs]
    acc = lambda xs: sum(c for c, _ in xs) / sum(n for _, n in xs)  # noqa: E731
    p = paired_p_value(b, a)
    return (
        f"against the baseline: sampled accuracy {100 * acc(b):.1f}% -> {100 * acc(a):.1f}% "
        f"on {len(pairs)} shared prompts, paired p = {p:.3g}"
    )


def print_result(r: dict[str, Any]) -> None:
    k = r["k"]
    print(
        f"{r['benchmark']}: {r['prompts']} prompts ({r['skipped_too_long']} too long, skipped) | greedy pass@1 {100 * r['pass@1_greedy']:.1f}% | "
        f"avg@{k} {100 * r[f'avg@{k}']:.1f}% | pass@{k} {100 * r[f'pass@{k}']:.1f}% | "
        f"{r['mean_completion_tokens']:.0f} tokens a completion, {100 * r['capped']:.0f}% at "
        f"max_tokens (T={r['temperature']}, {r['seconds']:.0f}s)",
        flush=True,
    )


def write_result(r: dict[str, Any], out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=1))
