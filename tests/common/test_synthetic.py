"""The synthetic arithmetic task: determinism, disjoint splits, formats, gold answers."""

import pytest
from math_verify import parse, verify

from popo.common import synthetic
from popo.common.config import SyntheticTaskConfig
from popo.common.data import Problem

SMALL = SyntheticTaskConfig(n_train=3000, n_test=300, n_val=200, max_terms=3)


def test_same_config_same_problems():
    for split in synthetic.SPLITS:
        assert synthetic.generate(SMALL, split) == synthetic.generate(SMALL, split)


def test_seed_changes_problems():
    other = SMALL.model_copy(update={"seed": 1})
    assert synthetic.generate(SMALL, "test") != synthetic.generate(other, "test")


def test_split_sizes_and_uniqueness():
    for split in synthetic.SPLITS:
        problems = synthetic.generate(SMALL, split)
        assert len(problems) == synthetic.split_size(SMALL, split)
        assert len({p.problem for p in problems}) == len(problems)
        assert len({p.prompt_id for p in problems}) == len(problems)
        assert all(isinstance(p, Problem) for p in problems)


def test_splits_are_disjoint_for_the_default_config():
    cfg = SyntheticTaskConfig()
    sets = {s: {p.problem for p in synthetic.generate(cfg, s)} for s in synthetic.SPLITS}
    assert not sets["train"] & sets["test"]
    assert not sets["train"] & sets["val"]
    assert not sets["val"] & sets["test"]


def test_one_split_size_does_not_change_another():
    bigger_train = SMALL.model_copy(update={"n_train": 5000})
    assert synthetic.generate(SMALL, "test") == synthetic.generate(bigger_train, "test")


def test_format_and_gold():
    problems = synthetic.generate(SMALL, "test")
    for p in problems:
        terms = p.meta["terms"]
        assert SMALL.min_terms <= len(terms) <= SMALL.max_terms
        assert all(0 <= t <= SMALL.max_operand for t in terms)
        assert p.problem == "+".join(map(str, terms)) + "="
        assert p.gold == str(sum(terms))
        assert p.meta["target"] == "\\boxed{" + p.gold + "}"
    # Both term counts occur: the mix is what spreads the warm-start's learning curve.
    assert {len(p.meta["terms"]) for p in problems} == {2, 3}


def test_targets_verify_with_math_verify():
    for p in synthetic.generate(SMALL, "test")[:20]:
        assert verify(parse(p.gold), parse(p.meta["target"]))
        wrong = "\\boxed{" + str(int(p.gold) + 1) + "}"
        assert not verify(parse(p.gold), parse(wrong))


def test_format_helpers():
    assert synthetic.format_prompt([17, 58, 6]) == "17+58+6="
    assert synthetic.format_target(81) == "\\boxed{81}"


def test_split_of_is_stable():
    # sha256-based, so the same string lands in the same split in every process.
    assert synthetic.split_of("17+58+6=", 0) == synthetic.split_of("17+58+6=", 0)
    owners = {synthetic.split_of(f"{a}+{b}=", 0) for a in range(30) for b in range(30)}
    assert owners == {"train", "val", "test"}


def test_bad_split_and_too_many_problems():
    with pytest.raises(ValueError, match="split"):
        synthetic.generate(SMALL, "dev")  # type: ignore[arg-type]
    tiny = SyntheticTaskConfig(max_terms=2, max_operand=9, n_test=10)
    with pytest.raises(ValueError, match="distinct"):
        synthetic.generate(tiny, "test")
    with pytest.raises(ValueError, match="min_terms"):
        synthetic.generate(SyntheticTaskConfig(min_terms=3, max_terms=2), "test")
