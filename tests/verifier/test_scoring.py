"""Scoring: the table of real answer formats, pathological inputs, the pool's time limit."""

from __future__ import annotations

import os
import signal
import time

import pytest
from math_verify import parse, verify

from popo.common.grading import GOLD_CONFIG, PRED_CONFIG
from popo.verifier.pool import ScoringPool
from popo.verifier.scoring import precheck, score_text

from .cases import CASES
from .helpers import HANG, score_all


def math_verify_direct(gold: str, text: str) -> str:
    """math-verify's own verdict: its public API, its own (signal) time limits, main thread."""
    gold_parsed = parse("\\boxed{" + gold + "}", GOLD_CONFIG)
    return "positive" if verify(gold_parsed, parse(text, PRED_CONFIG)) else "negative"


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 40
    assert {e for _, _, e in CASES} == {"positive", "negative"}


@pytest.mark.parametrize(("text", "gold", "expected"), CASES)
def test_table_matches_math_verify(text: str, gold: str, expected: str) -> None:
    assert math_verify_direct(gold, text) == expected
    assert score_text(gold, text) == expected


def test_table_through_pool(pool: ScoringPool) -> None:
    results = score_all(pool, [(g, t) for t, g, _ in CASES])
    assert [r.verdict for r in results] == [e for _, _, e in CASES]


def test_precheck_guards() -> None:
    assert precheck(r"\boxed{1}") is None
    assert precheck("x" * 70_000).startswith("too long")
    assert precheck("a\udcffb").startswith("invalid unicode")
    assert precheck("{" * 500 + "}" * 500).startswith("braces nested 500")
    # many braces, shallow nesting: fine
    assert precheck(r"\frac{1}{2}" * 200) is None


PATHOLOGICAL = {
    "power tower": HANG,
    "100k chars": "Let us think. " * 7200 + r"\boxed{42}",
    "2000 nested braces": r"\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}",
    "20000 unbalanced braces": r"\boxed{" * 20000,
    "lone surrogate": "The answer is \udcff\\boxed{42}",
    "nested fractions": r"\boxed{" + r"\frac{1}{" * 60 + "2" + "}" * 60 + "}",
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_completion_ends_as_timeout_or_error(pool: ScoringPool, name: str) -> None:
    t0 = time.monotonic()
    (r,) = score_all(pool, [("42", PATHOLOGICAL[name])], timeout_s=30)
    assert time.monotonic() - t0 < pool.limits.timeout_s + 10
    if name == "nested fractions":  # deep but legal LaTeX: math-verify reads it (wrongly, 1/2)
        assert r.verdict in ("negative", "timeout", "error")
    else:
        assert r.verdict in ("timeout", "error"), r
    # the pool keeps working afterwards
    (ok,) = score_all(pool, [("42", r"\boxed{42}")])
    assert ok.verdict == "positive"


def test_timeout_kills_and_replaces_worker(pool: ScoringPool) -> None:
    before = pool.restarts
    items = [("42", HANG)] + [("42", rf"\boxed{{{40 + k}}}") for k in range(6)]
    t0 = time.monotonic()
    results = score_all(pool, items)
    elapsed = time.monotonic() - t0
    assert results[0].verdict == "timeout"
    assert pool.limits.timeout_s <= results[0].seconds < pool.limits.timeout_s + 1.0
    assert [r.verdict for r in results[1:]] == ["negative"] * 2 + ["positive"] + ["negative"] * 3
    assert pool.restarts == before + 1
    assert elapsed < pool.limits.timeout_s + 5


def test_dead_worker_is_replaced(pool: ScoringPool) -> None:
    before = pool.restarts
    base = 7_000_000
    pool.submit(base, "42", HANG)
    pool.poll(0.2)
    running = [w for w in pool._workers if w.queue and w.queue[0].task_id == base]
    assert running, "the hanging task should be running"
    os.kill(running[0].proc.pid, signal.SIGKILL)  # e.g. the kernel's OOM killer
    results = []
    deadline = time.monotonic() + 10
    while not results and time.monotonic() < deadline:
        results = pool.poll(0.2)
    assert [(r.task_id, r.verdict) for r in results] == [(base, "error")]
    assert "died" in results[0].detail
    assert pool.restarts == before + 1
    (ok,) = score_all(pool, [("7", r"\boxed{7}")])
    assert ok.verdict == "positive"


def test_pool_runs_workers_in_parallel(pool: ScoringPool) -> None:
    # two hanging completions time out together, not one after the other
    pool.wait_ready()
    t0 = time.monotonic()
    results = score_all(pool, [("1", HANG), ("2", HANG)])
    assert [r.verdict for r in results] == ["timeout", "timeout"]
    assert time.monotonic() - t0 < 2 * pool.limits.timeout_s
