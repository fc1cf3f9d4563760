"""One reading of answers: the demo model's warm-start (`grading.is_correct`) and the verifier's
scoring (`verifier.scoring.score_text`, what its pool runs) agree, also where the gold answer only
reads as one answer inside `\\boxed{}` (tuples, intervals, `\\text{}`, roots)."""

from __future__ import annotations

import pytest

from popo.common import synthetic
from popo.common.config import SyntheticTaskConfig
from popo.common.grading import is_correct
from popo.verifier.scoring import score_text
from tests.verifier.cases import CASES

# (completion, gold, expected): golds that math-verify misreads unless wrapped in `\boxed{}`.
BOXED_GOLD_CASES: list[tuple[str, str, bool]] = [
    (r"\boxed{1,-2}", "1,-2", True),
    (r"\boxed{1}", "1,-2", False),
    (r"\boxed{\sqrt{51}}", r"\sqrt{51}", True),
    (r"\boxed{C}", r"\text{(C)}", True),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{1+x}", "x+1", True),
    (r"\boxed{[1,2)}", "[1,2)", True),
    (r"\boxed{(1,2)}", "[1,2)", False),
]

# (completion, gold, expected): the demo model's own answer shapes (`\boxed{N}` then EOS).
DEMO_CASES: list[tuple[str, str, bool]] = [
    (r"\boxed{81}", "81", True),
    (r"\boxed{81", "81", False),  # cut off by max_tokens
    (r"\boxed{8}", "81", False),
    (r"\boxed{}", "81", False),
    (r"\boxed{81}\boxed{82}", "81", False),  # the last box counts
    (r"82 \boxed{81}", "81", True),
    (r"\boxed{-5}", "-5", True),
    ("", "81", False),
    ("}}}{{{", "81", False),
]


@pytest.mark.parametrize(
    ("text", "gold", "expected"),
    [(t, g, e == "positive") for t, g, e in CASES] + BOXED_GOLD_CASES + DEMO_CASES,
)
def test_demo_model_and_verifier_judge_alike(text: str, gold: str, expected: bool) -> None:
    assert is_correct(gold, text) is expected
    assert (score_text(gold, text) == "positive") is expected


def test_synthetic_targets_are_correct_and_neighbours_are_not() -> None:
    for p in synthetic.generate(SyntheticTaskConfig(), "test")[:50]:
        target = p.meta["target"]
        wrong = synthetic.format_target(int(p.gold) + 1)
        assert is_correct(p.gold, target) and score_text(p.gold, target) == "positive"
        assert not is_correct(p.gold, wrong) and score_text(p.gold, wrong) == "negative"
