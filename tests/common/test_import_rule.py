"""The import rule, checked on every source file: a role (actors, learner, verifier) imports only
`popo.common` and itself, `popo.common` imports no role, and `popo.deploy` composes them all. So a
role can be read, tested and deployed alone, and the wire contracts in `common` are all that roles
share. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("actors", "learner", "verifier", "common", "deploy")
ROLES = ("actors", "learner", "verifier")

ALLOWED: dict[str, set[str]] = {
    **{role: {role, "common"} for role in ROLES},
    "common": {"common"},
    "deploy": set(PACKAGES),
}
"""Package -> the `popo` packages its modules may import."""

EXCEPTIONS: dict[tuple[str, str], str] = {
    # (path, imported package) -> why it is allowed. An entry that matches nothing fails the test.
}


def popo_imports(source: str, package: str, path: str) -> list[tuple[int, str]]:
    """(line, imported popo package) for every import of a `popo.*` module in `source`, a module of
    `package`; relative imports resolve to `package` itself."""
    found = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from . import x` stays inside the package
                found.append((node.lineno, package))
                continue
            names = [node.module or ""]
            if node.module == "popo":  # `from popo import learner`
                names = [f"popo.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "popo" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
            elif parts[0] in PACKAGES:  # the unprefixed folder names are not importable
                found.append((node.lineno, f"<bare {parts[0]}>"))
    return found


def violations(source: str, package: str, path: str) -> list[tuple[str, str, int]]:
    """(path, imported package, line) of each import `package` may not make."""
    return [
        (path, target, line)
        for line, target in popo_imports(source, package, path)
        if target not in ALLOWED[package]
    ]


def source_files() -> list[tuple[str, Path]]:
    files = []
    for package in PACKAGES:
        files += [(package, p) for p in sorted((ROOT / package).rglob("*.py"))]
    return files


def test_the_rule_catches_each_kind_of_import() -> None:
    bad = """
import popo.learner.service
from popo.verifier import pool
from popo import actors, learner
from common import config
def late():
    from popo.learner.losses import popo_loss
"""
    found = violations(bad, "actors", "bad.py")
    assert [(target, line) for _, target, line in found] == [
        ("learner", 2),
        ("verifier", 3),
        ("learner", 4),
        ("<bare common>", 5),
        ("learner", 7),
    ]
    good = """
import popo.common.config
from popo.common.messages import Lease
from popo.actors.engine import Engine
from . import stats
import numpy, zmq
"""
    assert violations(good, "actors", "good.py") == []
    assert violations("from popo.actors import actor", "common", "c.py") != []
    assert violations("from popo.actors import actor\nimport popo.learner", "deploy", "d.py") == []


def test_every_module_keeps_the_import_rule() -> None:
    files = source_files()
    assert {pkg for pkg, _ in files} == set(PACKAGES)
    found = [
        v for pkg, p in files for v in violations(p.read_text(), pkg, str(p.relative_to(ROOT)))
    ]
    unexplained = [
        f"{path}:{line}: imports popo.{t}" for path, t, line in found if (path, t) not in EXCEPTIONS
    ]
    assert not unexplained, "imports across roles:\n" + "\n".join(unexplained)
    stale = set(EXCEPTIONS) - {(path, t) for path, t, _ in found}
    assert not stale, f"stale exceptions: {sorted(stale)}"
