"""No pickle on any boundary: a scan of the repository's own Python.

Unpickling runs arbitrary code, so nothing our processes exchange or store may be a pickle:
tensors travel and rest as safetensors, messages as msgpack (msgspec), checkpoints as safetensors +
JSON. The scan parses every Python file of the repository (not .venv, caches or run directories)
and fails on any of these outside `ALLOWED` (each entry says why it is safe):

- importing pickle, cPickle, cloudpickle, dill, joblib, shelve or marshal;
- `torch.load` without a literal `weights_only=True`; any `torch.save` (it pickles);
- `np.load(..., allow_pickle=<not False>)`, `np.save`/`np.savez` without `allow_pickle=False`
  (numpy pickles object arrays by default when saving);
- pickling helpers on a wire or a file: ZeroMQ `send_pyobj`/`recv_pyobj`, pandas
  `read_pickle`/`to_pickle`;
- a multiprocessing `Connection.send`/`.recv` (pickled objects; `send_bytes`/`recv_bytes` of
  msgpack are fine, as verifier/pool.py does) and multiprocessing queues or managers.

Ray pickles task arguments internally; that is Ray's transport, not ours, and is not flagged.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".venv", ".cache", "runs", "build", "dist", "node_modules", "__pycache__", ".git"}

PICKLE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "cloudpickle",
    "dill",
    "joblib",
    "shelve",
    "marshal",
}
PICKLING_CALLS = {"send_pyobj", "recv_pyobj", "read_pickle", "to_pickle"}
MP_QUEUES = {"Queue", "SimpleQueue", "JoinableQueue", "Manager"}
CONN_NAME = re.compile(r"(conn|pipe)", re.IGNORECASE)

ALLOWED: dict[tuple[str, str], str] = {
    # (path relative to the repository, rule) -> why it is not a pickle on our wire or in our
    # files. Empty today: process starts (`spawn` pickles a worker's arguments once, e.g. the
    # verifier pool's and test_fsdp's) are not flagged, and nothing else pickles.
}


@dataclass(frozen=True)
class Hit:
    path: str
    line: int
    rule: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.what}"


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan_source(source: str, path: str) -> list[Hit]:
    """Every pickle use in one file's source (see the module docstring for the rules)."""
    tree = ast.parse(source, filename=path)
    hits: list[Hit] = []
    uses_mp = False
    conn_names: set[str] = set()

    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            for m in mods:
                if m.split(".")[0] in PICKLE_MODULES:
                    hits.append(Hit(path, node.lineno, "import", f"imports {m}"))
                if "multiprocessing" in m:
                    uses_mp = True
        # Connections: results of Pipe() and parameters annotated Connection.
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and _dotted(node.value.func).split(".")[-1] == "Pipe"
        ):
            for t in node.targets:
                for e in t.elts if isinstance(t, ast.Tuple) else [t]:
                    conn_names.add(_dotted(e).split(".")[-1])
        if (
            isinstance(node, ast.arg)
            and node.annotation is not None
            and "Connection" in ast.unparse(node.annotation)
        ):
            conn_names.add(node.arg)

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if not name and isinstance(node.func, ast.Attribute):  # e.g. mp.get_context("spawn").Queue
            name = f"{ast.unparse(node.func.value)}.{node.func.attr}"
        last = name.split(".")[-1]
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if name.endswith("torch.load") or name.endswith("serialization.load"):
            if not _is_const(_kw(node, "weights_only"), True):
                hits.append(
                    Hit(path, node.lineno, "torch.load", "torch.load without weights_only=True")
                )
        elif name.endswith("torch.save") or name.endswith("serialization.save"):
            hits.append(Hit(path, node.lineno, "torch.save", "torch.save pickles"))
        elif owner in ("np", "numpy") and last == "load":
            flag = _kw(node, "allow_pickle")
            if flag is not None and not _is_const(flag, False):
                hits.append(Hit(path, node.lineno, "np.load", "np.load with allow_pickle"))
        elif owner in ("np", "numpy") and last in ("save", "savez", "savez_compressed"):
            if not _is_const(_kw(node, "allow_pickle"), False):
                hits.append(Hit(path, node.lineno, "np.save", f"np.{last} may pickle"))
        elif last in PICKLING_CALLS:
            hits.append(Hit(path, node.lineno, "pickling-call", f"{last} pickles"))
        elif uses_mp and last in ("send", "recv") and owner:
            recv_name = owner.split(".")[-1]
            if recv_name in conn_names or CONN_NAME.search(recv_name):
                hits.append(Hit(path, node.lineno, "connection", f"{name}() pickles objects"))
        elif (
            uses_mp
            and last in MP_QUEUES
            and owner
            and owner.split(".")[-1] not in ("queue", "asyncio")
        ):
            hits.append(Hit(path, node.lineno, "mp-queue", f"{name}() pickles what it carries"))
    return hits


def repository_files() -> list[Path]:
    out = []
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT).parts
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel[:-1]):
            continue
        out.append(p)
    return sorted(out)


def test_the_scanner_catches_every_rule() -> None:
    # A positive control: each forbidden pattern once, and the safe spelling of each beside it.
    bad = """
import pickle
import cloudpickle as cp
from dill import dumps
import multiprocessing as mp
import torch, numpy as np, zmq
torch.load(path)
torch.load(path, weights_only=False)
torch.save(model.state_dict(), path)
np.load(path, allow_pickle=True)
np.save(path, arr)
sock.send_pyobj({"a": 1})
df.to_pickle(path)
parent, child = mp.Pipe()
parent.send({"task": 1})
def worker(conn: Connection):
    conn.recv()
q = mp.get_context("spawn").Queue()
"""
    rules = sorted(h.rule for h in scan_source(bad, "bad.py"))
    assert rules == sorted(
        [
            "import",
            "import",
            "import",
            "torch.load",
            "torch.load",
            "torch.save",
            "np.load",
            "np.save",
            "pickling-call",
            "pickling-call",
            "connection",
            "connection",
            "mp-queue",
        ]
    )
    good = """
import multiprocessing as mp
import queue
import torch, numpy as np
torch.load(path, weights_only=True)
np.load(path)
np.load(path, allow_pickle=False)
np.save(path, arr, allow_pickle=False)
parent, child = mp.Pipe()
parent.send_bytes(b"msgpack")
child.recv_bytes()
channel.send(msg, timeout_ms=0)
q = queue.SimpleQueue()
"""
    assert scan_source(good, "good.py") == []


def test_no_pickle_in_the_repository() -> None:
    files = repository_files()
    assert len(files) > 50 and (ROOT / "verifier" / "pool.py") in files
    hits = [h for p in files for h in scan_source(p.read_text(), str(p.relative_to(ROOT)))]
    unexplained = [h for h in hits if (h.path, h.rule) not in ALLOWED]
    assert not unexplained, "pickle use outside the allow-list:\n" + "\n".join(
        map(str, unexplained)
    )
    # An allow-list entry that no longer matches anything is stale: remove it.
    stale = set(ALLOWED) - {(h.path, h.rule) for h in hits}
    assert not stale, f"stale allow-list entries: {sorted(stale)}"


@pytest.mark.parametrize("path", ["verifier/pool.py", "learner/checkpoint.py", "common/weights.py"])
def test_boundary_modules_use_the_safe_formats(path: str) -> None:
    # The modules that cross a process or disk boundary name their format explicitly.
    src = (ROOT / path).read_text()
    assert scan_source(src, path) == []
    expected = {
        "verifier/pool.py": ("send_bytes", "recv_bytes", "msgspec"),
        "learner/checkpoint.py": ("safetensors",),
        "common/weights.py": ("safetensors",),
    }[path]
    assert all(token in src for token in expected)
