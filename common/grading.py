"""Whether a completion's answer equals a gold answer, by math-verify: the one reading shared by
the verifier (its worker pool scores training and `popo eval` completions) and the demo model's
warm-start.

math-verify's own time limits use `signal.alarm`, which only works in a process's main thread, so
they are switched off here (`parsing_timeout=None`, `timeout_seconds=None`). These functions can
run for unbounded time on adversarial input: the verifier calls them in worker processes that a
hard limit kills (`verifier/pool.py`); the demo model only on its own few-character answers.
"""

from __future__ import annotations

import logging
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# math-verify warns once per process that its timeouts are off; callers enforce their own.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# `\boxed{}` first (priority 0 beats the "final answer is" anchors at 50), then any LaTeX, then a
# bare expression: the reference run rewards the boxed answer.
PRED_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
# The gold is wrapped in `\boxed{}` so that commas, `\text{}` and units read as one answer
# ("1,-2" is the set {1, -2}, not the number 1); checked on every gold of MATH-500/AIME/AMC.
GOLD_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def parse_gold(gold: str) -> list[Any]:
    """Gold answer text -> math-verify's parsed form (a list of sympy objects and strings).

    An empty list means math-verify could not read the gold; no completion can then match it.
    """
    wrapped = gold if "\\boxed" in gold else "\\boxed{" + gold + "}"
    return parse(wrapped, GOLD_CONFIG, parsing_timeout=None)  # type: ignore[arg-type]


def parse_answer(text: str) -> list[Any]:
    """A completion's answer in math-verify's parsed form: the last `\\boxed{}` if any, else the
    last LaTeX or bare expression; an empty list when none is found."""
    return parse(text, PRED_CONFIG, parsing_timeout=None)  # type: ignore[arg-type]


def answers_equal(gold_parsed: list[Any], answer_parsed: list[Any]) -> bool:
    """math-verify's verdict on two parsed answers (gold first: the order matters to it)."""
    return bool(gold_parsed and answer_parsed) and verify(
        gold_parsed, answer_parsed, timeout_seconds=None
    )


def is_correct(gold: str, completion: str) -> bool:
    """True when the answer of `completion` equals the gold answer `gold`. Exceptions out of
    math-verify propagate (the verifier turns them into its `error` verdict)."""
    return answers_equal(parse_gold(gold), parse_answer(completion))
