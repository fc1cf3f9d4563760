"""The synthetic arithmetic task of the embedded default (docs/architecture.md, Embedded default).

A problem is a sum of `min_terms..max_terms` non-negative integers written without spaces and
ending in `=` (e.g. `17+58=`, or `17+58+6=` with `max_terms = 3`); the demo model answers `\\boxed{81}` and then EOS. Plain text,
no chat template: the demo model's tokenizer is character-level and its whole world is this task.

Splits are disjoint by construction, not by bookkeeping: every problem string is hashed (with the
task seed) into a bucket, and each split only keeps strings of its own buckets. So no string can
ever be in two splits, whatever `n_train` / `n_test` are, and each split is a pure function of the
config. The default is two-term sums of operands 0..99 (10^4 strings: 8500 train, 1000 test, 500 val
owners). Its supervised learning curve is steep, so the demo warm-start does not stop
on a time budget but on measured val accuracy, checked every few steps, which lands it in the
10-50 % band reproducibly; three-term sums (`max_terms = 3`) learn far more slowly.

No torch here: the data loader and the verifier import this.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Literal

from popo.common.data import Problem

if TYPE_CHECKING:
    from popo.common.config import SyntheticTaskConfig

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")

# Buckets out of 1000: test owns 10 % of the problem space, val 5 %, train the other 85 %.
_BUCKETS = 1000
_SPLIT_BUCKETS: dict[str, range] = {
    "test": range(0, 100),
    "val": range(100, 150),
    "train": range(150, _BUCKETS),
}


def format_prompt(terms: list[int]) -> str:
    """The prompt text of a sum: `[17, 58, 6]` -> `'17+58+6='`."""
    return "+".join(str(t) for t in terms) + "="


def format_question(terms: list[int]) -> str:
    """The same sum asked in words, for chat models (the `sums` source):
    `[17, 58]` -> `'What is 17+58? Put the answer in \\boxed{}.'`."""
    return f"What is {'+'.join(str(t) for t in terms)}? Put the answer in \\boxed{{}}."


def format_target(answer: int | str) -> str:
    """The completion the model is taught (EOS excluded): `81` -> `'\\boxed{81}'`."""
    return f"\\boxed{{{answer}}}"


def split_of(problem: str, seed: int) -> Split:
    """Which split owns a problem string (stable across Python runs: sha256, not `hash`)."""
    digest = hashlib.sha256(f"{seed}:{problem}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % _BUCKETS
    for name, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return name  # type: ignore[return-value]
    raise AssertionError("bucket ranges cover 0..999")


def problem_space_size(cfg: SyntheticTaskConfig) -> int:
    """Number of distinct prompt strings the config can produce (all splits together)."""
    values = cfg.max_operand + 1
    return sum(values**n for n in range(cfg.min_terms, cfg.max_terms + 1))


def split_size(cfg: SyntheticTaskConfig, split: Split) -> int:
    """How many problems `generate(cfg, split)` returns."""
    return {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]


def generate(cfg: SyntheticTaskConfig, split: Split) -> list[Problem]:
    """The problems of one split, deterministic in `cfg` (same config -> same list, same order).

    Problems are unique within a split and disjoint across splits. `gold` is the sum as plain
    digits (what math-verify parses as the reference); `meta["target"]` is the supervised
    completion `\\boxed{N}` and `meta["terms"]` the operands.
    Raises ValueError when the split cannot hold that many distinct problems.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if not cfg.min_terms <= cfg.max_terms:
        raise ValueError(f"min_terms ({cfg.min_terms}) > max_terms ({cfg.max_terms})")
    n = split_size(cfg, split)
    share = len(_SPLIT_BUCKETS[split]) / _BUCKETS
    # Sampling with rejection slows down as the split fills up; ask for a comfortable margin.
    if n > 0.5 * share * problem_space_size(cfg):
        raise ValueError(
            f"synthetic {split} split: {n} problems asked, but only ~{int(share * problem_space_size(cfg))} "
            "distinct ones exist; raise max_operand or max_terms"
        )
    # One RNG stream per split, so the size of one split never changes the contents of another.
    rng = random.Random(f"popo-synthetic:{cfg.seed}:{split}")
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < n:
        n_terms = rng.randint(cfg.min_terms, cfg.max_terms)
        terms = [rng.randint(0, cfg.max_operand) for _ in range(n_terms)]
        prompt = format_prompt(terms)
        if prompt in seen or split_of(prompt, cfg.seed) != split:
            continue
        seen.add(prompt)
        answer = sum(terms)
        out.append(
            Problem(
                prompt_id=f"synthetic-{split}-{len(out)}",
                problem=prompt,
                gold=str(answer),
                meta={"target": format_target(answer), "terms": terms},
            )
        )
    return out
