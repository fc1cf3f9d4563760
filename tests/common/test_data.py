"""Prompt loading on the shipped benchmark files (common/benchmarks/) and on small bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popo.common.config import DataConfig
from popo.common.data import (
    BENCHMARKS,
    QWEN_MATH_SYSTEM,
    DataError,
    Problem,
    apply_template,
    benchmark_path,
    extract_boxed,
    extract_gsm8k,
    load_problems,
    load_prompts,
)


def _bench(name: str, **over) -> list[Problem]:
    return load_problems(benchmark_path(name), **{**BENCHMARKS[name], **over})


# --- the real benchmark files ------------------------------------------------------------------


def test_every_benchmark_ships_as_package_data() -> None:
    import fnmatch
    import tomllib

    import popo.common

    root = Path(__file__).resolve().parents[2]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["popo.common"] == "common"
    package = Path(popo.common.__file__).resolve().parent
    patterns = setuptools["package-data"]["popo.common"]
    for name in BENCHMARKS:
        path = benchmark_path(name)
        assert path.is_file(), path
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), (rel, patterns)
    licence = benchmark_path("math500").parent / "LICENSE.math-evaluation-harness"
    assert "MIT License" in licence.read_text()
    with pytest.raises(ValueError, match=r"unknown benchmark .math501.*math500"):
        benchmark_path("math501")


@pytest.mark.parametrize(
    ("name", "rows", "meta_keys"),
    [
        ("math500", 500, {"answer", "solution", "subject", "level", "unique_id"}),
        ("aime24", 30, {"answer", "id", "solution", "url"}),
        ("aime25", 30, {"answer"}),
        ("amc23", 40, {"answer", "id", "url"}),
        ("gsm8k", 1319, {"answer", "idx"}),
    ],
)
def test_benchmark_rows_and_fields(name: str, rows: int, meta_keys: set[str]) -> None:
    problems = _bench(name)
    assert len(problems) == rows
    assert len({p.prompt_id for p in problems}) == rows
    for p in problems:
        assert p.problem.strip() and p.gold.strip()
        assert meta_keys <= set(p.meta)
        assert BENCHMARKS[name]["prompt_field"] not in p.meta


def test_gsm8k_gold_extracted_from_every_solution() -> None:
    problems = _bench("gsm8k")
    assert len(problems) == 1319
    raw = [json.loads(line) for line in benchmark_path("gsm8k").read_text().splitlines()]
    for p, row in zip(problems, raw, strict=True):
        assert re.fullmatch(r"-?\d+(\.\d+)?", p.gold), p.gold
        # Independent reading: the solution's last line is "#### N".
        last_line = row["answer"].strip().splitlines()[-1]
        assert last_line.startswith("#### ")
        assert p.gold == last_line[5:].replace(",", "").strip()
        assert p.prompt_id == str(row["idx"])
    assert problems[0].gold == "18"
    with_commas = [p for p, row in zip(problems, raw, strict=True) if "," in row["answer"][-12:]]
    assert with_commas and all("," not in p.gold for p in with_commas)


def test_amc23_float_golds_read_as_integers() -> None:
    problems = _bench("amc23")
    raw = [json.loads(line) for line in benchmark_path("amc23").read_text().splitlines()]
    assert all(isinstance(row["answer"], float) for row in raw)
    assert [p.gold for p in problems] == [str(int(row["answer"])) for row in raw]
    assert problems[0].gold == "27"
    assert "-1" in {p.gold for p in problems}


@pytest.mark.parametrize("name", ["aime24", "aime25"])
def test_aime_golds_are_integers_0_to_999(name: str) -> None:
    for p in _bench(name):
        assert p.gold.isdigit() and 0 <= int(p.gold) <= 999


def test_math500_boxed_solution_matches_answer_field() -> None:
    # The `boxed` extractor, run on MATH-500's solutions, must reproduce the published answers.
    plain = _bench("math500")
    boxed = _bench("math500", answer_field="solution", answer_format="boxed")
    assert [p.gold for p in boxed] == [p.gold for p in plain]
    assert plain[0].prompt_id == "test/precalculus/807.json"
    assert plain[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_row_number_ids_and_limit() -> None:
    problems = _bench("aime25", limit=5)
    assert [p.prompt_id for p in problems] == ["0", "1", "2", "3", "4"]
    assert problems[0].gold == "70"
    assert (
        load_problems(
            benchmark_path("aime25"), prompt_field="problem", answer_field="answer", limit=0
        )
        == []
    )


def test_load_prompts_from_file_sources() -> None:
    cfg = DataConfig(
        source=str(benchmark_path("gsm8k")),
        prompt_field="question",
        answer_format="gsm8k",
        id_field="idx",
        eval_source=str(benchmark_path("gsm8k")),
    )
    train = load_prompts(cfg, "train")
    assert len(train) == 1319 and train[0].gold == "18"
    assert load_prompts(cfg, "test") == train
    with pytest.raises(ValueError, match="split"):
        load_prompts(cfg, "valid")  # type: ignore[arg-type]


def test_load_prompts_synthetic() -> None:
    synthetic = pytest.importorskip(
        "popo.common.synthetic", reason="synthetic task not written yet"
    )
    cfg = DataConfig()
    train, test = load_prompts(cfg, "train"), load_prompts(cfg, "test")
    assert train == synthetic.generate(cfg.synthetic, "train")
    assert len(train) == cfg.synthetic.n_train and len(test) == cfg.synthetic.n_test
    assert all(isinstance(p, Problem) for p in train[:10] + test[:10])


# --- parquet -----------------------------------------------------------------------------------


def test_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {"q": f"What is {i} + {i}?", "sol": f"so \\boxed{{{2 * i}}}", "uid": f"p{i}", "level": i}
        for i in range(10_000)  # > one read batch
    ]
    jsonl, parquet = tmp_path / "p.jsonl", tmp_path / "p.parquet"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    kw = dict(prompt_field="q", answer_field="sol", answer_format="boxed", id_field="uid")
    from_parquet = load_problems(parquet, **kw)
    assert from_parquet == load_problems(jsonl, **kw)
    assert from_parquet[7] == Problem(
        "p7", "What is 7 + 7?", "14", {"sol": "so \\boxed{14}", "uid": "p7", "level": 7}
    )


def test_parquet_bad_row_names_its_row(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "a", "a": "1"}, {"q": "b", "a": None}]), path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: field 'a' is NoneType"):
        load_problems(path, prompt_field="q", answer_field="a")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"^{re.escape(str(garbage))}: unreadable parquet"):
        load_problems(garbage, prompt_field="q", answer_field="a")


# --- bad rows ----------------------------------------------------------------------------------

# A row every answer format accepts, so only the bad row under test fails.
GOOD = json.dumps({"id": "a", "q": "1+1?", "a": "2", "sol": "so \\boxed{2}\n#### 2"}) + "\n"


@pytest.mark.parametrize(
    ("bad_line", "kw", "reason"),
    [
        ('{"id": "b", "q": "2+2?", "a": "4"\n', {}, "invalid JSON"),
        ("[1, 2]\n", {}, "row is a JSON list, expected an object"),
        ('{"id": "b", "a": "4"}\n', {}, "missing field 'q' (row has: a, id)"),
        ('{"id": "b", "q": "2+2?"}\n', {}, "missing field 'a'"),
        ('{"q": "2+2?", "a": "4"}\n', {"id_field": "id"}, "missing field 'id'"),
        ('{"id": "b", "q": "2+2?", "a": "  "}\n', {}, "empty gold answer in field 'a'"),
        ('{"id": "b", "q": "", "a": "4"}\n', {}, "field 'q' is empty"),
        ('{"id": "b", "q": ["2+2?"], "a": "4"}\n', {}, "field 'q' is list, expected a string"),
        ('{"id": "b", "q": "2+2?", "a": true}\n', {}, "field 'a' is bool"),
        ('{"id": "b", "q": "2+2?", "a": null}\n', {}, "field 'a' is NoneType"),
        ('{"id": "b", "q": "2+2?", "a": {"v": 4}}\n', {}, "field 'a' is dict"),
        ('{"id": "b", "q": "2+2?", "a": NaN}\n', {}, "not a finite number"),
        (
            '{"id": "a", "q": "2+2?", "a": "4"}\n',
            {"id_field": "id"},
            "duplicate id 'a' (first on line 1)",
        ),
        ('{"id": 1.5, "q": "2+2?", "a": "4"}\n', {"id_field": "id"}, "field 'id' is float"),
        (
            '{"id": "b", "q": "2+2?", "a": "x", "sol": "it is 4"}\n',
            {"answer_field": "sol", "answer_format": "gsm8k"},
            "no '#### <number>' in field 'sol'",
        ),
        (
            '{"id": "b", "q": "2+2?", "a": "x", "sol": "#### four"}\n',
            {"answer_field": "sol", "answer_format": "gsm8k"},
            "no '#### <number>' in field 'sol'",
        ),
        (
            '{"id": "b", "q": "2+2?", "a": "x", "sol": 4}\n',
            {"answer_field": "sol", "answer_format": "gsm8k"},
            "field 'sol' is int, expected a string",
        ),
        (
            '{"id": "b", "q": "2+2?", "a": "x", "sol": "so \\\\boxed{\\\\frac{1}{2}"}\n',
            {"answer_field": "sol", "answer_format": "boxed"},
            "no non-empty balanced \\boxed{...} in field 'sol'",
        ),
        (
            '{"id": "b", "q": "2+2?", "a": "x", "sol": "so \\\\boxed{ }"}\n',
            {"answer_field": "sol", "answer_format": "boxed"},
            "no non-empty balanced \\boxed{...}",
        ),
    ],
)
def test_bad_row_fails_with_file_line_and_reason(
    tmp_path: Path, bad_line: str, kw: dict, reason: str
) -> None:
    path = tmp_path / "bad.jsonl"
    # Line 2 is blank: blank lines are skipped but still counted, so the bad row is line 3.
    path.write_text(GOOD + "\n" + bad_line + GOOD.replace('"id": "a"', '"id": "c"'))
    args = {"prompt_field": "q", "answer_field": "a", **kw}
    with pytest.raises(DataError) as err:
        load_problems(path, **args)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert reason in msg, msg
    assert "\n" not in msg
    # The rows before the bad one are fine: a limit that stops before it loads them.
    assert len(load_problems(path, **args, limit=1)) == 1


def test_not_utf8_row(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + '{"q": "caf\xe9", "a": "1"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not UTF-8"):
        load_problems(path, prompt_field="q", answer_field="a")


def test_file_level_errors(tmp_path: Path) -> None:
    kw = dict(prompt_field="q", answer_field="a")
    with pytest.raises(DataError, match="no such file"):
        load_problems(tmp_path / "absent.jsonl", **kw)
    csv = tmp_path / "p.csv"
    csv.write_text("q,a\n1+1,2\n")
    with pytest.raises(DataError, match=r"unknown file type '\.csv'"):
        load_problems(csv, **kw)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no problems"):
        load_problems(empty, **kw)


def test_plain_gold_numbers_and_strings(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    golds = [3, -1.0, 2.5, " \\frac{1}{2} ", 1e20]
    path.write_text("".join(json.dumps({"q": "x", "a": g}) + "\n" for g in golds))
    got = [p.gold for p in load_problems(path, prompt_field="q", answer_field="a")]
    assert got == ["3", "-1", "2.5", "\\frac{1}{2}", "100000000000000000000"]


# --- gold extraction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gold"),
    [
        ("so \\boxed{5}.", "5"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),
        ("\\boxed {42}", "42"),
        ("\\boxed{\\boxed{7}}", "7"),
        ("\\boxed{}", ""),
        ("no box here", None),
        ("\\boxed{3} and \\boxed{\\frac{1}{2}", None),  # last box truncated
        ("\\boxed", None),
        ("", None),
    ],
)
def test_extract_boxed(text: str, gold: str | None) -> None:
    assert extract_boxed(text) == gold


_balanced = st.recursive(
    st.text(alphabet=st.characters(blacklist_characters="{}\\", codec="utf-8"), max_size=8),
    lambda inner: st.lists(inner, max_size=3).map(lambda xs: "".join("{" + x + "}" for x in xs)),
    max_leaves=10,
)


@given(body=_balanced, before=st.text(max_size=20), after=st.text(alphabet="abc }{.", max_size=10))
def test_extract_boxed_returns_balanced_body(body: str, before: str, after: str) -> None:
    if "\\boxed" in after:
        return
    assert extract_boxed(before + "\\boxed{" + body + "}" + after) == body


@pytest.mark.parametrize(
    ("text", "gold"),
    [
        ("a\n#### 18", "18"),
        ("#### 2,125", "2125"),
        ("####  -3 ", "-3"),
        ("#### 0.5", "0.5"),
        ("#### 1\nno, wait\n#### 2", "2"),
        ("#### $5", None),
        ("####", None),
        ("the answer is 4", None),
    ],
)
def test_extract_gsm8k(text: str, gold: str | None) -> None:
    assert extract_gsm8k(text) == gold


# --- templates ---------------------------------------------------------------------------------


def test_qwen_math_template_is_exact() -> None:
    assert (
        QWEN_MATH_SYSTEM
        == "Please reason step by step, and put your final answer within \\boxed{}."
    )
    assert apply_template("What is 1+1?", "qwen_math") == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_plain_template_and_unknown_template() -> None:
    assert apply_template("12+7=", "plain") == "12+7="
    with pytest.raises(ValueError, match="unknown template"):
        apply_template("x", "chatml")  # type: ignore[arg-type]
