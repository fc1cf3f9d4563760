"""Prompts with gold answers: benchmark files, gold extraction and prompt templates.

A prompt source is a JSONL file (one JSON object a line) or a parquet file (one row a problem) with
configurable field names. Every bad row fails loudly with `file:line: reason` — a silently skipped
row would shift prompt ids and make two runs on "the same" data disagree. The gold answer comes
from a field as is (`plain`), from a GSM8K solution (`gsm8k`: the number after `#### `), or from
the last `\\boxed{...}` of a solution text (`boxed`).

This module imports neither torch nor vllm; pyarrow is imported only to read a parquet file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from popo.common.config import DataConfig

AnswerFormat = Literal["plain", "gsm8k", "boxed"]
Template = Literal["qwen_math", "plain"]
PromptTemplate = Literal["chat", "qwen_math", "plain"]

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
"""System prompt of the reference run (Qwen2.5-Math, POPO paper)."""

BENCHMARKS: dict[str, dict[str, Any]] = {
    "math500": dict(prompt_field="problem", answer_field="answer", id_field="unique_id"),
    "aime24": dict(prompt_field="problem", answer_field="answer", id_field="id"),
    "aime25": dict(prompt_field="problem", answer_field="answer"),
    "amc23": dict(prompt_field="problem", answer_field="answer", id_field="id"),
    "gsm8k": dict(
        prompt_field="question", answer_field="answer", answer_format="gsm8k", id_field="idx"
    ),
}
"""`load_problems` keyword arguments for the benchmark files shipped in `common/benchmarks/`
(field names as published by math-evaluation-harness); `answer_format` defaults to `plain`."""

BENCHMARK_DIR = Path(__file__).resolve().parent / "benchmarks"
"""The benchmark files installed with the package (their source and licence: its README.md)."""


def benchmark_path(name: str) -> Path:
    """The JSONL file of the shipped benchmark `name` (a key of BENCHMARKS, e.g. `math500`).

    Raises ValueError naming the known benchmarks for any other name."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    return BENCHMARK_DIR / f"{name}.jsonl"


@dataclass(frozen=True)
class Problem:
    """One prompt with its gold answer."""

    prompt_id: str
    """Unique within its source: the id field's value, or the 0-based row number."""
    problem: str
    """The problem text, before any template is applied."""
    gold: str
    """The gold answer as text (what math-verify parses as the reference)."""
    meta: dict = field(default_factory=dict)
    """The row's other fields, verbatim (e.g. `subject`, `level`, `solution`)."""


class DataError(ValueError):
    """A prompt source is unreadable or one of its rows is bad; the message starts `file:line:`."""


# --- gold extraction ---------------------------------------------------------------------------

_BOXED_OPEN = re.compile(r"\\boxed\s*\{")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, braces balanced, or None.

    Escaped braces (`\\{`, `\\}`) inside the box are content, not structure, so `\\boxed{\\{1,2\\}}`
    gives `\\{1,2\\}`. An unclosed last box (a truncated completion) gives None rather than a guess.
    """
    # `\boxed {x}` (a space before the brace) is valid LaTeX and appears in model outputs.
    opens = list(_BOXED_OPEN.finditer(text))
    if not opens:
        return None
    open_at = opens[-1].end() - 1
    depth = 0
    i = open_at
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character (\{, \}, \\)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def extract_gsm8k(solution: str) -> str | None:
    """The number after the last `#### ` of a GSM8K solution, thousands commas removed, or None."""
    if "####" not in solution:
        return None
    tail = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return tail if _NUMBER.fullmatch(tail) else None


# --- prompt templates --------------------------------------------------------------------------


def apply_template(problem: str, template: Template) -> str:
    """The prompt text the engine sees: `qwen_math` wraps `problem` in the Qwen chat format with
    the reference run's system prompt; `plain` returns it unchanged (the demo model's format).
    The model's own chat template needs its tokenizer: `render_prompt`."""
    if template == "qwen_math":
        return (
            f"<|im_start|>system\n{QWEN_MATH_SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{problem}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    if template == "plain":
        return problem
    raise ValueError(f"unknown template {template!r} (expected 'qwen_math' or 'plain')")


def has_chat_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` (transformers or vLLM's wrapper of it) carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(cfg: DataConfig, tokenizer: Any) -> PromptTemplate:
    """`cfg.template`, with `auto` resolved: `chat` when the model's tokenizer has a chat
    template, else by the source (`DataConfig.resolved_template`)."""
    if cfg.template == "auto" and has_chat_template(tokenizer):
        return "chat"
    return cfg.resolved_template


def render_prompt(
    problem: str, template: PromptTemplate, tokenizer: Any = None, system: str | None = None
) -> str:
    """The prompt text of one problem for one model. `chat` renders `[system?, user]` through the
    tokenizer's chat template with the assistant turn opened; the others are `apply_template`'s.
    The text already holds every special token the model expects: encode it with `encode_prompt`."""
    if template != "chat":
        return apply_template(problem, template)
    if not has_chat_template(tokenizer):
        raise ValueError("data.template = chat, but the model's tokenizer has no chat template")
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": problem})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt text -> token ids, the one encoding used by actors, learner and evaluation.

    No special tokens are added: a rendered prompt already holds them (a chat template writes its
    own BOS / turn markers), and adding a BOS again would apply part of the template twice."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def prompt_ids(problem: Problem, cfg: DataConfig, tokenizer: Any) -> list[int]:
    """The prompt token ids of one task item for the model whose tokenizer is `tokenizer`:
    `render_prompt` with the run's resolved template and system prompt, then `encode_prompt`."""
    text = render_prompt(
        problem.problem, resolve_template(cfg, tokenizer), tokenizer, cfg.system_prompt
    )
    return encode_prompt(tokenizer, text)


def render_problems(problems: list[Problem], cfg: DataConfig, tokenizer: Any) -> list[Problem]:
    """`problems` with their text replaced by the rendered prompt (`render_prompt`, the run's
    resolved template and system prompt): what leases carry and actors encode."""
    template = resolve_template(cfg, tokenizer)
    return [
        Problem(
            p.prompt_id, render_prompt(p.problem, template, tokenizer, cfg.system_prompt), p.gold
        )
        for p in problems
    ]


# --- loading -----------------------------------------------------------------------------------


def _iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, row) pairs: the 1-based line of a JSONL file, the 1-based row of a parquet file.
    Raises DataError on a row that is not a JSON object."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue  # blank lines (e.g. a trailing newline pair) carry no row
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not UTF-8 ({e.reason})") from None
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{line_no}: invalid JSON: {e.msg} (col {e.colno})"
                    ) from None
                yield line_no, row
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq  # only parquet sources pay for the import

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow's error types vary by version; report them as one kind
            raise DataError(f"{path}: unreadable parquet file: {e}") from None
        row_no = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, row
    else:
        raise DataError(f"{path}: unknown file type {suffix!r} (expected .jsonl or .parquet)")


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise ValueError(f"field {name!r} is empty")
    return value


def _gold(value: Any, name: str, answer_format: AnswerFormat) -> str:
    if answer_format == "plain":
        # Numbers are accepted (AMC 2023 stores 27.0); an integral float reads as an integer.
        if isinstance(value, bool):
            raise ValueError(f"field {name!r} is bool, expected a string or a number")
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"field {name!r} is {value}, not a finite number")
            return str(int(value)) if value.is_integer() else repr(value)
        if not isinstance(value, str):
            raise ValueError(
                f"field {name!r} is {type(value).__name__}, expected a string or a number"
            )
        gold = value.strip()
        if not gold:
            raise ValueError(f"empty gold answer in field {name!r}")
        return gold
    text = _text(value, name)
    if answer_format == "gsm8k":
        gold = extract_gsm8k(text)
        if gold is None:
            raise ValueError(f"no '#### <number>' in field {name!r}")
        return gold
    if answer_format == "boxed":
        gold = extract_boxed(text)
        if gold is None or not gold.strip():
            raise ValueError(f"no non-empty balanced \\boxed{{...}} in field {name!r}")
        return gold.strip()
    raise ValueError(f"unknown answer_format {answer_format!r}")


def _prompt_id(row: dict[str, Any], id_field: str | None, index: int) -> str:
    if id_field is None:
        return str(index)
    value = row[id_field]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(
            f"field {id_field!r} is {type(value).__name__}, expected a string or an int"
        )
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"field {id_field!r} is empty")
    return str(value)


def load_problems(
    path: str | Path,
    *,
    prompt_field: str,
    answer_field: str,
    answer_format: AnswerFormat = "plain",
    id_field: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Read problems from a JSONL or parquet file, in file order.

    `limit` keeps the first `limit` rows. Raises DataError (`file:line: reason`) on a bad row:
    invalid JSON, not an object, a missing field, a wrong type, an empty text or gold, a gold that
    cannot be extracted, or a duplicate id. Parquet rows are numbered from 1 in place of lines.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    problems: list[Problem] = []
    seen: dict[str, int] = {}  # prompt id -> line where it first appeared
    if limit is not None and limit <= 0:
        return problems
    for line, row in _iter_rows(path):
        try:
            if not isinstance(row, dict):
                raise ValueError(f"row is a JSON {type(row).__name__}, expected an object")
            for name in (prompt_field, answer_field, *([id_field] if id_field else [])):
                if name not in row:
                    have = ", ".join(sorted(row)) or "nothing"
                    raise ValueError(f"missing field {name!r} (row has: {have})")
            prompt_id = _prompt_id(row, id_field, len(problems))
            if prompt_id in seen:
                raise ValueError(f"duplicate id {prompt_id!r} (first on line {seen[prompt_id]})")
            problem = Problem(
                prompt_id=prompt_id,
                problem=_text(row[prompt_field], prompt_field),
                gold=_gold(row[answer_field], answer_field, answer_format),
                meta={k: v for k, v in row.items() if k != prompt_field},
            )
        except ValueError as e:
            raise DataError(f"{path}:{line}: {e}") from None
        seen[prompt_id] = line
        problems.append(problem)
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataError(f"{path}: no problems in the file")
    return problems


def load_prompts(cfg: DataConfig, split: Literal["train", "test"]) -> list[Problem]:
    """The problems of one split of a run's data source (raw text, before any template).

    `train` is `cfg.source`; `test` is `cfg.eval_source` when set (a file is read with the same
    field names, a shipped benchmark with its own), else the source's own held-out split:
    `synthetic` and `sums` have disjoint seeded splits, a shipped benchmark holds out its first
    `eval_size` rows and trains on the rest; a file's held-out split is the synthetic test split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    source = cfg.source if split == "train" else cfg.eval_source
    if split == "test" and source is None and cfg.source in ("sums", *BENCHMARKS):
        source = cfg.source
    if source is None or source in ("synthetic", "sums"):
        from popo.common import synthetic  # its generator is only needed for the embedded task

        problems = synthetic.generate(cfg.synthetic, split)
        if source == "sums":
            problems = [
                Problem(p.prompt_id, synthetic.format_question(p.meta["terms"]), p.gold, p.meta)
                for p in problems
            ]
        return problems
    if source in BENCHMARKS:
        rows = load_problems(benchmark_path(source), **BENCHMARKS[source])
        if source != cfg.source:  # evaluated only: every row
            return rows
        held_out, rest = rows[: cfg.eval_size], rows[cfg.eval_size :]
        if not rest:
            raise DataError(
                f"{source}: all {len(rows)} rows are held out (data.eval_size); none left to train"
            )
        return rest if split == "train" else held_out
    return load_problems(
        source,
        prompt_field=cfg.prompt_field,
        answer_field=cfg.answer_field,
        answer_format=cfg.answer_format,
        id_field=cfg.id_field,
    )


def drop_too_long(
    problems: list[Problem], token_len: Callable[[str], int], max_prompt_tokens: int
) -> tuple[list[Problem], int]:
    """Keep the problems whose prompt fits `max_prompt_tokens` (max_model_len - max_tokens): an
    engine rejects a longer one, so it must never be leased. Returns (kept, number dropped)."""
    kept = [p for p in problems if token_len(p.problem) <= max_prompt_tokens]
    return kept, len(problems) - len(kept)
