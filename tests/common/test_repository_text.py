"""The repository speaks of the product only: no issue numbers and no references to design
documents or folders outside it, in code, comments, docs or configs. Git history keeps who did
what and when; docs/architecture.md is the design reference."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = (".py", ".md", ".sh", ".toml", ".yml", ".yaml")
NAMED = ("Makefile", "Dockerfile")

FORBIDDEN: dict[str, re.Pattern[str]] = {
    "issue number": re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE),
    "design section": re.compile(r"\bDESIGN\s*§|§\s*\d"),
    "design document": re.compile(r"\bDESIGN\.md\b"),
    "folder outside the repository": re.compile(r"\.\./shared\b"),
}


def tracked_text_files() -> list[str]:
    """The repository's tracked source, doc and config files (paths relative to its root)."""
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return sorted(
        p for p in out.split("\0") if p.endswith(SUFFIXES) or Path(p).name.startswith(NAMED)
    )


def hits(text: str, path: str) -> list[str]:
    return [
        f"{path}:{n}: {what}: {line.strip()[:120]}"
        for n, line in enumerate(text.splitlines(), start=1)
        for what, pattern in FORBIDDEN.items()
        if pattern.search(line)
    ]


def test_the_patterns_catch_each_kind() -> None:
    bad = "\n".join(
        [
            "# fixed for issue " + "12",
            "see Issues #" + "7 and 8",
            "(DESIGN " + "§" + "3)",
            "as in " + "§" + "2",
            "the design reference: DESIGN" + ".md",
            "read ../" + "shared/data/math500.jsonl",
        ]
    )
    kinds = [h.split(": ")[1] for h in hits(bad, "bad.md")]
    assert kinds == [
        "issue number",
        "issue number",
        "design section",
        "design section",
        "design document",
        "folder outside the repository",
    ]
    good = "shared filesystem\nan issue with the disk\ndocs/architecture.md, Loss\n"
    assert hits(good, "good.md") == []


def test_no_issue_numbers_or_outside_references() -> None:
    files = tracked_text_files()
    assert "README.md" in files and "common/config.py" in files
    found = [
        h
        for path in files
        for h in hits((ROOT / path).read_text(encoding="utf-8", errors="replace"), path)
    ]
    assert not found, "\n".join(found)
