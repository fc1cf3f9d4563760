"""Scoring one completion against a gold answer with math-verify.

Pure functions, run inside the pool's worker processes (`verifier/pool.py`) and directly by tests,
`popo eval` and the benchmark. The reading of answers is `popo.common.grading` (shared with the
demo model), whose math-verify time limits are off; the hard per-completion limit is the pool's,
which kills a stuck worker.

Verdicts: `positive` (math-verify says equal), `negative` (not equal, or no answer extracted),
`timeout` (the pool killed the worker), `error` (input rejected before math-verify, or an
exception escaped it).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from popo.common.grading import answers_equal, parse_answer, parse_gold
from popo.common.messages import Verdict

DEFAULT_MAX_CHARS = 65536
DEFAULT_MAX_BRACE_DEPTH = 100


def precheck(
    text: str, max_chars: int = DEFAULT_MAX_CHARS, max_depth: int = DEFAULT_MAX_BRACE_DEPTH
) -> str | None:
    """Why `text` must not reach math-verify, or None when it may.

    Cheap guards against inputs that would only burn a worker until its time limit: lone
    surrogates (not encodable, cannot cross the pool's pipe), overlong text, and brace nesting
    deeper than any real answer (latex2sympy recurses on it: 2000 levels take ~10 s).
    """
    if len(text) > max_chars:
        return f"too long ({len(text)} > {max_chars} chars)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid unicode (lone surrogate)"
    # str.count is C-fast; only walk the text when the nesting could exceed the bound at all.
    if text.count("{") > max_depth:
        depth = deepest = 0
        for ch in text:
            if ch == "{":
                depth += 1
                deepest = max(deepest, depth)
            elif ch == "}" and depth:
                depth -= 1
        if deepest > max_depth:
            return f"braces nested {deepest} deep (> {max_depth})"
    return None


@lru_cache(maxsize=4096)
def parse_gold_cached(gold: str) -> list[Any]:
    """`parse_gold`, once per distinct gold in this process (a group's G completions share one)."""
    return parse_gold(gold)


def score_completion(
    gold_parsed: list[Any],
    text: str,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_depth: int = DEFAULT_MAX_BRACE_DEPTH,
) -> tuple[Verdict, str]:
    """Score one completion against an already parsed gold. Returns (verdict, detail).

    Never raises: an exception out of math-verify is the `error` verdict (detail = its type).
    It can run for unbounded time on adversarial input; call it where a timeout can kill it.
    """
    reason = precheck(text, max_chars, max_depth)
    if reason is not None:
        return "error", reason
    if not gold_parsed:
        return "error", "gold answer not parsable"
    try:
        pred = parse_answer(text)
        if not pred:
            return "negative", "no answer found"
        ok = answers_equal(gold_parsed, pred)
    except Exception as e:  # the per-completion fault boundary the design asks for
        return "error", f"{type(e).__name__} in math-verify"
    return ("positive", "") if ok else ("negative", "")


def score_text(gold: str, text: str, **limits: int) -> Verdict:
    """Convenience: verdict of `text` against the gold answer string (gold parse cached)."""
    try:
        gold_parsed = parse_gold_cached(gold)
    except Exception:
        return "error"
    return score_completion(gold_parsed, text, **limits)[0]
